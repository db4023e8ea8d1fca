"""Deep-memory peer (spec §11.2): lucidrains' ``NeuralMemory`` (titans-pytorch) fwd and fwd+bwd on the GPU.

Matched to ``benchmarks/miras.py``: model width heads × head_dim (1024 = 16 × 64 by default), store and retrieve
chunks of 64 tokens, the default ``MemoryMLP`` of depth 2 and expansion 4, momentum off (as Moneta, Yaad and
Memora), activations under bf16 autocast with float32 memory weights. Its semantics differ from ours (spec §7):
one summed gradient per chunk, chunk-granular reads, all chunks' gradients at the sequence-start weights unless
``batch_size`` is set, learned per-head initial weights; so it is a peer for speed and memory, not for outputs.

Timings are medians of 10 calls after 3 warm-ups, with CUDA events; the peak is
``torch.cuda.max_memory_allocated`` over one fwd+bwd (PyTorch's allocator, not comparable byte for byte with
XLA's temporaries). Run it where titans-pytorch is importable (its wheels are carried, docs/benchmarks.md):

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lucid .whl/lucid/*.whl
  PYTHONPATH=.:/tmp/lucid python3 benchmarks/lucid_memory.py --json $OUT/lucid.json --shapes 8x4096

or through ``benchmarks/miras.py --lucid``, which runs it in a child process beside the JAX layers.
Prints one JSON row per shape and writes them all.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys


def _median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
  import torch
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  samples = []
  for _ in range(iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    samples.append(start.elapsed_time(end))
  return statistics.median(samples)


def time_neural_memory(b: int, t: int, heads: int, head_dim: int, chunk: int) -> dict:
  """One row: fwd ms, fwd+bwd ms, ktok/s and peak GiB of NeuralMemory at batch b, sequence t."""
  row = {"kind": "time", "op": f"lucid_neural_memory[c{chunk},momentum off]", "B": b, "T": t}
  try:
    import titans_pytorch
    import torch

    row.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
               titans_pytorch=importlib.metadata.version("titans-pytorch"))
    memory = titans_pytorch.NeuralMemory(dim=heads * head_dim, chunk_size=chunk, heads=heads, dim_head=head_dim,
                                         momentum=False,
                                         default_model_kwargs={"depth": 2, "expansion_factor": 4.0}).cuda()
    x = torch.randn(b, t, heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def forward():
      with torch.autocast("cuda", dtype=torch.bfloat16):
        return memory(x)[0]

    def forward_backward():
      x.grad = None
      memory.zero_grad(set_to_none=True)
      forward().float().pow(2).sum().backward()

    row["fwd_ms"] = _median_ms(forward)
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    row["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["fwd_bwd_ms"] = _median_ms(forward_backward)
    for key in ("fwd", "fwd_bwd"):
      row[f"{key}_ktok_s"] = b * t / row[f"{key}_ms"]
  except Exception as e:  # noqa: BLE001 - report (no GPU, out of memory, missing wheel), keep the other shapes
    row["error"] = repr(e)[:400]
  print(json.dumps(row), flush=True)
  return row


def in_child(shapes: str, heads: int, head_dim: int, chunk: int, child_json: str) -> list[dict]:
  """This script's rows from a child process (PyTorch beside a JAX process that has left it GPU memory with
  XLA_PYTHON_CLIENT_PREALLOCATE=false); one error row if the child fails."""
  cmd = [sys.executable, os.path.abspath(__file__), "--json", child_json, "--shapes", shapes, "--heads", str(heads),
         "--head-dim", str(head_dim), "--chunk", str(chunk)]
  from benchmarks.child import rows_from_child

  return rows_from_child(cmd, child_json, "lucid_neural_memory")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="lucid.json", help="where to write the rows")
  parser.add_argument("--shapes", default="8x4096", help="BxT,BxT,...")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=64)
  args = parser.parse_args()
  shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",") if s]
  if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
    parser.error(f"--shapes must be BxT,... with positive sizes (got {args.shapes!r})")
  rows = [time_neural_memory(b, t, args.heads, args.head_dim, args.chunk) for b, t in shapes]
  with open(args.json, "w") as f:
    json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
