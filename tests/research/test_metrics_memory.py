"""Metric records across a resume, the progress line, plots, and the XLA memory report."""

import io
import json

import jax
import jax.numpy as jnp

from research.memory import compiled_memory, format_memory_report, memory_report
from research.metrics import MetricWriter, ProgressLine, plot_losses, read_metrics


def test_resume_drops_records_newer_than_the_checkpoint_and_torn_lines(tmp_path):
  writer = MetricWriter(tmp_path)
  for step in range(1, 8):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 8, "split": "tr')  # a run killed mid-write
  writer = MetricWriter(tmp_path, resume_step=5)
  writer.write(6, "train", {"loss": 0.5})
  writer.close()
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]["loss"] == 0.5


def test_progress_line_reports_rate_and_eta():
  out = io.StringIO()
  progress = ProgressLine(total_steps=100, tokens_per_step=1000, stream=out)
  progress.start(0)
  rate = progress.update(10, {"loss": 2.5})
  line = out.getvalue()
  assert line.startswith("step  10/100 | loss 2.5 | ") and "tok/s" in line and "ETA" in line
  assert rate > 0


def test_loss_plot_is_written(tmp_path):
  records = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s} for s in range(1, 11)]
  records.append({"step": 10, "split": "eval", "loss": 2.2})
  plot_losses(records, tmp_path / "loss.png", title="t", reference_loss=5.5)
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_report_matches_xla_analysis():
  x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
  compiled = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a).lower(x).compile()
  report = compiled_memory(compiled)
  assert report["argument_size_in_bytes"] == 256 * 512 * 4
  assert report["output_size_in_bytes"] == 256 * 512 * 4
  assert report["peak_estimate_bytes"] >= report["argument_size_in_bytes"] + report["output_size_in_bytes"]
  text = format_memory_report(json.loads(json.dumps(memory_report(compiled, "toy"))))
  assert "XLA memory analysis of toy" in text and "0.50 MiB" in text
