"""The ZO ledger: records round-trip, a torn tail (a crash mid-record) is detected and dropped losing only that
record, corruption elsewhere is refused, and a resumed run may re-append only identical rounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from optim.zo.ledger import Ledger, LedgerError, RoundRecord, read_ledger

HEADER = {"format": 1, "codec": "log8", "num_workers": 4, "num_samples": 3, "seed": 7}


def _round(step: int, active=(0, 1, 2, 3), seed: int = 0) -> RoundRecord:
  rng = np.random.default_rng(step * 100 + seed)
  codes = rng.integers(0, 256, size=(len(active), 3, 1), dtype=np.uint8)
  return RoundRecord(step, np.float32(1e-3 / (step + 1)), "log8", tuple(active), codes)


def _assert_same(a: RoundRecord, b: RoundRecord):
  assert (a.step, a.codec, a.active) == (b.step, b.codec, b.active)
  assert a.lr == b.lr and a.lr.dtype == np.float32
  np.testing.assert_array_equal(a.codes, b.codes)


def test_rounds_round_trip_with_their_active_workers(tmp_path):
  path = tmp_path / "ledger.bin"
  written = [_round(0), _round(1, active=(0, 2, 3)), _round(2, active=(2,))]
  ledger = Ledger.open(path, HEADER)
  assert ledger.append(written) == 3
  contents = read_ledger(path)
  assert contents.header == HEADER and contents.torn is None and contents.end == path.stat().st_size
  assert not path.with_name("ledger.bin.new").exists()
  for a, b in zip(written, contents.rounds, strict=True):
    _assert_same(a, b)
  codes, active = contents.rounds[1].full(4)
  np.testing.assert_array_equal(active, [True, False, True, True])
  assert not codes[1].any() and np.array_equal(codes[2], written[1].codes[1])
  # Bytes per round: S·A code bytes plus a fixed header and the active ids.
  sizes = [len(r.payload()) for r in written]
  assert sizes[0] - sizes[2] == (4 - 1) * (3 + 2)


def _write_rounds(path, steps) -> list[int]:
  """Append rounds one at a time; returns the file size after each (where the next frame starts)."""
  ledger = Ledger.open(path, HEADER)
  ends = []
  for k in steps:
    ledger.append([_round(k)])
    ends.append(path.stat().st_size)
  return ends


@pytest.mark.parametrize("cut", [1, 9, 20, -1])
def test_a_torn_tail_is_detected_and_dropped_losing_only_that_record(tmp_path, cut):
  path = tmp_path / "ledger.bin"
  ends = _write_rounds(path, range(5))
  full, last_start = path.read_bytes(), ends[3]
  # A crash while writing round 4: only part of its frame reached the disk.
  path.write_bytes(full[:last_start + cut if cut > 0 else len(full) - 1])
  contents = read_ledger(path)
  assert [r.step for r in contents.rounds] == [0, 1, 2, 3]
  assert contents.torn is not None and contents.torn.offset == last_start and contents.end == last_start
  logs = []
  ledger = Ledger.open(path, HEADER, log=logs.append)
  assert ledger.last_step == 3 and path.stat().st_size == last_start
  assert len(logs) == 1 and "dropped a torn last record" in logs[0]
  ledger.append([_round(4), _round(5)])  # the run goes on from where the intact ledger ends
  assert [r.step for r in read_ledger(path).rounds] == [0, 1, 2, 3, 4, 5] and read_ledger(path).torn is None


def test_a_bad_checksum_in_the_middle_is_corruption_not_a_torn_tail(tmp_path):
  path = tmp_path / "ledger.bin"
  ends = _write_rounds(path, range(4))
  data = bytearray(path.read_bytes())
  middle = ends[1] - 6  # inside round 1's codes
  data[middle] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(LedgerError, match="corrupt at byte"):
    read_ledger(path)


def test_a_resumed_run_may_only_re_append_identical_rounds_without_gaps(tmp_path):
  path = tmp_path / "ledger.bin"
  Ledger.open(path, HEADER).append([_round(k) for k in range(3)])
  ledger = Ledger.open(path, HEADER)
  assert ledger.append([_round(1), _round(2), _round(3)]) == 1  # rounds 1 and 2 recomputed identically
  assert [r.step for r in read_ledger(path).rounds] == [0, 1, 2, 3]
  with pytest.raises(LedgerError, match=r"round 2 .* differs .*\(\d+ of 12 code bytes\)"):
    ledger.append([_round(2, seed=1)])
  changed_lr = dataclasses.replace(_round(2), lr=np.float32(0.5))
  with pytest.raises(LedgerError, match="learning rate .* on file, 0.5 now"):
    ledger.append([changed_lr])
  with pytest.raises(LedgerError, match="gap"):
    ledger.append([_round(6)])
  with pytest.raises(LedgerError, match="another run .*num_samples"):
    Ledger.open(path, {**HEADER, "num_samples": 4})
