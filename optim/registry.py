"""The optimizers of this package, registered by name for the training loop (``--optimizer galore``).

Each factory maps a ``research.train.TrainConfig`` and its learning-rate schedule to an optax transform, with the
config's betas, weight decay and decay mask (matrices only). GaLore settings follow the paper's pre-training
runs (Zhao et al., arXiv:2403.03507, App. C.1): T = 200, α = 0.25, attention/MLP matrices projected; the rank
defaults to d_model / 4, the paper's rank ratio for its 350M and 1B models (its 60M/130M runs use 1/2 and 1/3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import optax

from optim.galore import galore
from optim.natural_galore import natural_galore
from research.optimizers import decay_mask, register_optimizer

if TYPE_CHECKING:
  from research.train import TrainConfig

RANK_RATIO = 4


def galore_rank(cfg: "TrainConfig") -> int:
  """``cfg.galore_rank``, or d_model / 4 when it is None."""
  return cfg.galore_rank if cfg.galore_rank is not None else max(1, cfg.model.d_model // RANK_RATIO)


@register_optimizer("galore")
def _galore(cfg: "TrainConfig", schedule: optax.Schedule) -> optax.GradientTransformation:
  return galore(schedule, rank=galore_rank(cfg), update_proj_gap=cfg.galore_update_proj_gap,
                scale=cfg.galore_scale, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, wd_mask=decay_mask)


@register_optimizer("natural_galore")
def _natural_galore(cfg: "TrainConfig", schedule: optax.Schedule) -> optax.GradientTransformation:
  return natural_galore(schedule, rank=galore_rank(cfg), update_proj_gap=cfg.galore_update_proj_gap,
                        scale=cfg.galore_scale, history=cfg.natural_galore_history, b1=cfg.b1, b2=cfg.b2,
                        weight_decay=cfg.weight_decay, wd_mask=decay_mask)


@register_optimizer("optax_galore")
def _optax_galore(cfg: "TrainConfig", schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax.contrib.galore's algorithm (every matrix projected, larger side, scale 1), same rank and gap.

  Equal to ``optax.contrib.galore`` update for update; only the non-matrix leaves are routed around it by
  ``optax.partition``, because its state holds a zero-size projector per such leaf and orbax refuses to
  checkpoint zero-size arrays.
  """
  def matrices(params):
    return jax.tree.map(lambda p: "galore" if p.ndim == 2 else "full_rank", params)

  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2)
  projected = optax.contrib.scale_by_galore(rank=galore_rank(cfg), update_proj_gap=cfg.galore_update_proj_gap,
                                            base_optimizer=adam)
  return optax.chain(optax.partition({"galore": projected, "full_rank": adam}, matrices),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(schedule))
