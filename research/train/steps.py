"""The language-modelling objective every regime optimises, and the evaluation step.

``lm_loss`` is mean next-token cross entropy over scored tokens plus ``aux_weight`` times each auxiliary loss the
mixers return (e.g. MoM's load balancing); regimes differentiate it (first-order) or only evaluate it
(zeroth-order).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import token_cross_entropy
from research.train.regime import SplitModel


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array], aux_weight: float):
  """(total loss, {"loss": LM loss, "aux/<name>": ...}) of ``model`` on ``batch`` {"inputs", "labels": [b, t]}."""
  logits, aux = model(batch["inputs"])
  nll_sum, count = token_cross_entropy(logits, batch["labels"])
  lm = nll_sum / jnp.maximum(count, 1)
  total = lm + aux_weight * sum(aux.values(), start=jnp.zeros((), jnp.float32))
  return total, {"loss": lm, **{f"aux/{k}": v for k, v in aux.items()}}


def make_eval_step(model: SplitModel) -> Callable:
  """``eval_step(params, batch) -> (sum of NLL, scored tokens, correct argmax predictions)``."""

  def eval_step(params, batch):
    logits, _ = model.merge(params)(batch["inputs"])
    nll_sum, count = token_cross_entropy(logits, batch["labels"])
    scored = batch["labels"] != -100
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["labels"]) & scored)
    return nll_sum, count, correct

  return eval_step
