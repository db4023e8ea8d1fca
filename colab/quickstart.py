# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # memlab quickstart: train a byte-level LM, resume it, read its memory report
#
# This notebook imports the library; it defines nothing of its own. On Colab, run the first cell to pin memlab's
# versions of JAX/Flax/Optax (Colab preinstalls others). `TINY = True` keeps it to seconds on a CPU.

# %%
# %pip install -q -e /content/memlab  # a clone of this repository: pins its jax, flax, optax and orbax versions

# %%
import dataclasses
import json
import tempfile
from pathlib import Path

from experiments.configs import get_preset
from research.memory import format_memory_report
from research.metrics import read_metrics
from research.train import train_and_evaluate

TINY = True  # CI and CPUs: a few steps of a very small model
workdir = Path(tempfile.mkdtemp()) / "quickstart"

# %% [markdown]
# Start from the `tiny` preset and shrink it further when `TINY` is set. Configs are frozen dataclasses:
# `dataclasses.replace` makes a changed copy, and the constructor validates it. Each plugin owns its settings:
# the optimizer's are in `cfg.plugins["adamw"]`, the attention layer's in `cfg.model.mixers["attn"]`.

# %%
cfg = get_preset("tiny")
print(cfg.plugins["adamw"], cfg.model.mixers["attn"])
if TINY:
  cfg = dataclasses.replace(cfg, steps=4, eval_every=2, eval_batches=1, log_every=2, checkpoint_every=2,
                            seq_len=32, model=dataclasses.replace(cfg.model, d_model=32, num_heads=2,
                                                                  num_kv_heads=2))
summary = train_and_evaluate(cfg, workdir)
print(json.dumps({k: summary[k] for k in ("final_eval_loss", "uniform_loss", "final_eval_accuracy")}, indent=1))

# %% [markdown]
# Running it again resumes from the newest checkpoint. Asking for more steps changes the learning-rate schedule, so
# the run accepts that change explicitly (without it, it stops and says which setting differs).

# %%
resumed = train_and_evaluate(dataclasses.replace(cfg, steps=cfg.steps + 2), workdir, accept_changes=("steps",))
train_losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
print(f"{resumed['steps_this_session']} more steps; the curve:", [round(v, 3) for v in train_losses])

# %% [markdown]
# XLA's own accounting of the compiled train step, saved with the run:

# %%
print(format_memory_report(json.loads((workdir / "memory.json").read_text())))
