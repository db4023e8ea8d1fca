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
# # Mixture-of-Memories: routing, packed dispatch, constant-memory decoding, and the MQAR study
#
# "MoM: Linear Sequence Modeling with Mixture-of-Memories" (arXiv 2502.13685) routes every token to k of M
# Gated DeltaNet memories ("Gated Delta Networks", arXiv 2412.06464), plus a shared memory that sees every token.
# This notebook only imports memlab. On Colab, run the first cell to pin memlab's versions of JAX/Flax/Optax.
# `TINY = True` keeps it to about a minute on a CPU.

# %%
# %pip install -q -e /content/memlab  # a clone of this repository: pins its jax, flax, optax and orbax versions

# %%
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from flax import nnx

from experiments import mqar
from experiments.configs import get_preset
from layers.gated_deltanet import GDNConfig
from layers.mom import MixtureOfMemories, MoMConfig, packed_layout, packed_length
from research.models import DecoderLM, MixerContext, ModelConfig
from research.models.generate import generate

TINY = True  # CI and CPUs: small widths and a few training steps

# %% [markdown]
# ## Routing
# A MoM layer with 4 memories, top-2 routing and a shared memory. `routing` returns the router's probabilities,
# the per-slot mixing weights (the top-k weights renormalised to sum to 1; the shared slot has weight 1), which
# slots each token reaches, and the top-k indices.

# %%
mom = MoMConfig(memory=GDNConfig(chunk_size=16), num_memories=4, top_k=2)
ctx = MixerContext(d_model=64, num_heads=2, head_dim=32)  # the model around the layer
layer = MixtureOfMemories(mom, ctx, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.PRNGKey(1), (2, 96, ctx.d_model))
probs, slot_weights, routed, _ = layer.routing(x)
loads = routed.sum(axis=(0, 1))  # tokens per slot over the batch
print("routed weights sum to 1:", bool(jnp.allclose(slot_weights[..., :-1].sum(-1), 1.0)))
plt.bar([f"memory {m}" for m in range(4)] + ["shared"], loads)
plt.ylabel("tokens routed")
plt.title("load per memory (random init)")
plt.show()

# %% [markdown]
# ## Packed dispatch
# For each sequence, every memory's tokens are laid out one memory after another, in time order. Each segment
# starts at a chunk boundary, and the state resets there. The row is about (k + 1)·t long instead of (M + 1)·t.
# The dense reference runs every memory over the whole sequence; both compute the same function.

# %%
chunk = mom.memory.chunk_size
layout = packed_layout(jnp.moveaxis(routed, -1, 0), chunk, copies=3)
print(f"packed row: {packed_length(96, chunk, 5, 3)} positions "
      f"({int((layout.token[0] >= 0).sum())} real tokens) vs sorted: 5 × 96 = 480")
dense = MixtureOfMemories(dataclasses.replace(mom, dispatch="dense"), ctx, rngs=nnx.Rngs(0))
y, aux = layer(x)
y_dense, _ = dense(x)
packed_error = float(jnp.max(jnp.abs(y - y_dense)))
print(f"packed vs dense reference: max |Δy| = {packed_error:.1e}; "
      f"load-balance loss {float(aux['mom_load_balance']):.3f} (k = 2 when balanced)")
plt.imshow(layout.slot[0][None].repeat(8, 0) * (layout.token[0] >= 0)[None], aspect="auto", cmap="tab10")
plt.yticks([])
plt.xlabel("packed position (padding is dark)")
plt.title("which memory each packed position belongs to")
plt.show()

# %% [markdown]
# ## Constant-memory decoding
# A decoder with MoM layers keeps one [H, K, V] state per memory and head, whatever the length. `generate`
# prefills the caches and then decodes token by token. Its logits equal those of one full forward pass.

# %%
model_cfg = ModelConfig(vocab_size=256, layers=("mom", "attn", "mom"), d_model=64, num_heads=2, num_kv_heads=2,
                        mixers={"mom": mom})
model = DecoderLM(model_cfg, rngs=nnx.Rngs(2))
prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 20), 0, 256)
tokens, logits = generate(model, prompt, max_new_tokens=8)
full_logits, _ = model(tokens[:, :-1])
decode_error = float(jnp.max(jnp.abs(logits - full_logits)))
print(f"cached decode vs full forward: max |Δlogits| = {decode_error:.1e}")

# %% [markdown]
# ## MQAR: attention vs Gated DeltaNet vs MoM
# Zoology's multi-query associative recall ("Zoology", arXiv 2312.04927). Every cell is one training run; the
# study writes a table and the accuracy-vs-pairs plot. The GPU sweep (`mqar_gpu`) and its results are in
# `docs/results.md`. `TINY` trains each cell for a few steps only, so accuracies stay near chance.

# %%
base = get_preset("mqar_tiny")
if TINY:
  base = dataclasses.replace(base, steps=6, eval_every=6, eval_batches=1, checkpoint_every=6, log_every=3,
                             batch_size=8, model=dataclasses.replace(base.model, d_model=32, vocab_size=128))
workdir = Path(tempfile.mkdtemp()) / "mqar"
workdir.mkdir(parents=True)
rows = mqar.run_study(base, workdir, ["attn", "gdn", "mom"], [(32, 4)] if TINY else [(64, 4), (64, 8), (128, 8)])
print(mqar.write_report(rows, workdir, base))
plt.imshow(plt.imread(workdir / "accuracy_vs_kv_pairs.png"))
plt.axis("off")
plt.show()
