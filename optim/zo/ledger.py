"""The ZO ledger: every round's (t, lr, codec, active worker ids, codes), append-only, one checksum per record.

Just One Byte (Zelikman et al., arXiv 2306.10015) shares only seeds and one byte per projected gradient, so a run
is fully described by its initial weights and the bytes of each round: the ledger is the run's tiny checkpoint
(bytes per step, not bytes per parameter). Initial weights + :func:`replay` of the ledger = the trained weights,
bit for bit, and a worker that joins at round k rebuilds θ from a checkpoint of round k plus ``records[k:]``.

File layout (little-endian), one frame per record::

    b"ZOL1" | kind (1 byte: b"H" header, b"R" round) | n = payload length (uint32) | payload | crc32 (uint32)

The crc32 covers kind, length and payload. The first frame is the header (JSON: the run's constants, e.g. codec,
seed, S, ε). A round's payload: t (uint64), lr (float32), codec id (uint8), S (uint16), bytes per code (uint8),
A = active workers (uint16), their ids (uint16 × A, ascending), codes (uint8 × A·S·bytes).

Crash safety: each append is one ``write`` followed by ``fsync``. A process killed mid-write leaves a *torn tail*
(a last frame that is short or fails its checksum): :func:`read_ledger` detects it and drops it, losing only that
record, and :meth:`Ledger.open` truncates the file to the last intact frame before appending. A damaged frame
followed by intact data is not a torn tail but corruption, and raises :class:`LedgerError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"ZOL1"
_FRAME = struct.Struct("<4scI")  # magic, kind, payload length
_CRC = struct.Struct("<I")
_ROUND = struct.Struct("<QfBHBH")  # t, lr, codec id, S, bytes per code, active count
CODEC_IDS = {"log8": 1, "job9": 2, "f32": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}


class LedgerError(RuntimeError):
  """The ledger cannot be used: corrupt in the middle, written by another run, or not continuing this run."""


@dataclasses.dataclass(frozen=True)
class RoundRecord:
  """One round of the ledger.

  Attributes:
    step: t, the round index (0-based; the directions' step).
    lr: the learning rate applied, as float32.
    codec: the codec's name.
    active: ascending ids of the workers whose codes count this round.
    codes: uint8 [len(active), S, bytes per code].
  """

  step: int
  lr: np.float32
  codec: str
  active: tuple[int, ...]
  codes: np.ndarray

  def payload(self) -> bytes:
    codes = np.ascontiguousarray(self.codes, np.uint8)
    _, samples, width = codes.shape
    head = _ROUND.pack(self.step, float(self.lr), CODEC_IDS[self.codec], samples, width, len(self.active))
    return head + struct.pack(f"<{len(self.active)}H", *self.active) + codes.tobytes()

  @classmethod
  def from_payload(cls, payload: bytes) -> RoundRecord:
    step, lr, codec, samples, width, count = _ROUND.unpack_from(payload)
    ids = struct.unpack_from(f"<{count}H", payload, _ROUND.size)
    start = _ROUND.size + 2 * count
    codes = np.frombuffer(payload, np.uint8, count * samples * width, start).reshape(count, samples, width)
    return cls(step, np.float32(lr), CODEC_NAMES[codec], tuple(ids), codes.copy())

  def full(self, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [W, S, b] with zero rows for inactive workers, active bool [W])."""
    codes = np.zeros((num_workers, *self.codes.shape[1:]), np.uint8)
    active = np.zeros(num_workers, bool)
    codes[list(self.active)] = self.codes
    active[list(self.active)] = True
    return codes, active

  def same_as(self, other: RoundRecord) -> bool:
    return self.payload() == other.payload()


def frame(kind: bytes, payload: bytes) -> bytes:
  """One framed record (module docstring)."""
  head = _FRAME.pack(MAGIC, kind, len(payload))
  return head + payload + _CRC.pack(zlib.crc32(head[4:] + payload))


class TornTail(NamedTuple):
  """A last frame that is incomplete or fails its checksum: where it starts, and how many bytes it has."""

  offset: int
  size: int


class LedgerContents(NamedTuple):
  """What :func:`read_ledger` found: the header, the intact rounds, the end of the last intact frame and the torn
  tail (None if the file ends cleanly)."""

  header: dict[str, Any]
  rounds: list[RoundRecord]
  end: int
  torn: TornTail | None


def read_ledger(path: str | os.PathLike) -> LedgerContents:
  """Parse a ledger file; a torn tail is reported, not raised. Raises :class:`LedgerError` on corruption."""
  data = Path(path).read_bytes()
  header, rounds, offset = None, [], 0
  while offset < len(data):
    problem, end = _check_frame(data, offset)
    if problem:
      if _intact_frame_follows(data, offset + 1):
        raise LedgerError(f"ledger {path} is corrupt at byte {offset} ({problem}) with intact records after it")
      return LedgerContents(_need_header(header, path), rounds, offset, TornTail(offset, len(data) - offset))
    kind, payload = data[offset + 4:offset + 5], data[offset + _FRAME.size:end - _CRC.size]
    if kind == b"H":
      header = json.loads(payload)
    else:
      rounds.append(RoundRecord.from_payload(payload))
    offset = end
  return LedgerContents(_need_header(header, path), rounds, offset, None)


def _check_frame(data: bytes, offset: int) -> tuple[str | None, int]:
  """(what is wrong with the frame at ``offset`` or None, the offset just past it)."""
  if len(data) - offset < _FRAME.size:
    return "short frame header", len(data)
  magic, kind, length = _FRAME.unpack_from(data, offset)
  end = offset + _FRAME.size + length + _CRC.size
  if magic != MAGIC or kind not in (b"H", b"R"):
    return "bad frame marker", len(data)
  if end > len(data):
    return "short record", len(data)
  (crc,) = _CRC.unpack_from(data, end - _CRC.size)
  if crc != zlib.crc32(data[offset + 4:end - _CRC.size]):
    return "checksum mismatch", end
  return None, end


def _intact_frame_follows(data: bytes, start: int) -> bool:
  position = data.find(MAGIC, start)
  while position != -1:
    if _check_frame(data, position)[0] is None:
      return True
    position = data.find(MAGIC, position + 1)
  return False


def _need_header(header: dict[str, Any] | None, path) -> dict[str, Any]:
  if header is None:
    raise LedgerError(f"ledger {path} has no intact header record")
  return header


class Ledger:
  """An open ledger file that rounds are appended to (module docstring).

  Use :meth:`open`; ``last_step`` is the newest round on file (-1 if none)."""

  def __init__(self, path: Path, header: dict[str, Any], rounds: list[RoundRecord]):
    self.path, self.header = path, header
    self._payloads = {r.step: r.payload() for r in rounds}
    self.last_step = rounds[-1].step if rounds else -1

  @classmethod
  def open(cls, path: str | os.PathLike, header: dict[str, Any], log=print) -> Ledger:
    """Open ``path`` for appending, creating it with ``header``; an existing ledger must have the same header, and
    a torn tail is cut off (and reported through ``log``)."""
    path = Path(path)
    if not path.exists():  # the header appears whole or not at all
      path.parent.mkdir(parents=True, exist_ok=True)
      partial = path.with_name(path.name + ".new")
      partial.unlink(missing_ok=True)
      _append_bytes(partial, frame(b"H", json.dumps(header, sort_keys=True).encode()))
      partial.replace(path)
      return cls(path, json.loads(json.dumps(header)), [])
    contents = read_ledger(path)
    if contents.header != json.loads(json.dumps(header)):
      changed = sorted(k for k in set(contents.header) | set(header) if contents.header.get(k) != header.get(k))
      raise LedgerError(f"ledger {path} belongs to another run (header differs in {', '.join(changed)})")
    if contents.torn is not None:
      with path.open("r+b") as f:
        f.truncate(contents.end)
        os.fsync(f.fileno())
      log(f"zo ledger: dropped a torn last record ({contents.torn.size} bytes at byte {contents.torn.offset}) "
          f"of {path}; {len(contents.rounds)} rounds intact")
    return cls(path, contents.header, contents.rounds)

  def append(self, records: list[RoundRecord]) -> int:
    """Append the rounds after :attr:`last_step`; rounds already on file must be byte-identical (a resumed run
    recomputes them). Returns how many rounds were written."""
    new = []
    for record in records:
      if record.step <= self.last_step:
        saved = self._payloads.get(record.step)
        if saved != record.payload():
          raise LedgerError(f"round {record.step} recomputed after a restart differs from the one in {self.path} "
                            f"({_difference(RoundRecord.from_payload(saved), record)}): the run's settings changed "
                            "since, or it is not deterministic on this backend")
        continue
      if record.step != self.last_step + 1:
        raise LedgerError(f"round {record.step} would leave a gap in {self.path} after round {self.last_step}")
      new.append(record)
      self._payloads[record.step] = record.payload()
      self.last_step = record.step
    if new:
      _append_bytes(self.path, b"".join(frame(b"R", r.payload()) for r in new))
    return len(new)


def _difference(saved: RoundRecord, new: RoundRecord) -> str:
  """Which fields of two records of one round differ, in words."""
  if saved.lr != new.lr:
    return f"learning rate {float(saved.lr):.8g} on file, {float(new.lr):.8g} now"
  if saved.active != new.active:
    return f"active workers {saved.active} on file, {new.active} now"
  return f"{int(np.sum(saved.codes != new.codes))} of {saved.codes.size} code bytes"


def _append_bytes(path: Path, data: bytes) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)
