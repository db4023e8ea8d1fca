"""The optimizers of this package, registered by name for the training loop (``--optimizer galore``), each with
its own config (``--galore.rank 64``).

GaLore settings follow the paper's pre-training runs (Zhao et al., arXiv:2403.03507, App. C.1): T = 200,
α = 0.25, attention/MLP matrices projected; the rank defaults to d_model / 4, the paper's rank ratio for its 350M
and 1B models (its 60M/130M runs use 1/2 and 1/3). The Adam part takes the AdamW settings (``b1``, ``b2``,
``weight_decay`` on matrices only).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from optim.galore import galore
from optim.natural_galore import natural_galore
from research.config import option
from research.models.config import ModelConfig
from research.optimizers import AdamWConfig, decay_mask, register_optimizer

RANK_RATIO = 4


@dataclasses.dataclass(frozen=True)
class LowRankConfig(AdamWConfig):
  """Adam in a low-rank gradient subspace (``optax_galore``: optax.contrib.galore's algorithm).

  Attributes:
    rank: r, the projected rank; None means d_model / 4.
    update_proj_gap: T, steps between projector refreshes (SVD of the gradient).
  """

  rank: int | None = option(None, minimum=1)
  update_proj_gap: int = option(200, minimum=1)

  def resolved_rank(self, model: ModelConfig) -> int:
    """``rank``, or d_model / 4 when it is None."""
    return self.rank if self.rank is not None else max(1, model.d_model // RANK_RATIO)


@dataclasses.dataclass(frozen=True)
class GaLoreConfig(LowRankConfig):
  """GaLore as in the paper (``galore``): attention/MLP matrices projected, update scaled by α.

  Attributes:
    scale: α, the scale of the projected-back update (0.25 in every paper run).
  """

  scale: float = option(0.25, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class NaturalGaLoreConfig(GaLoreConfig):
  """Natural GaLore (``natural_galore``, Das et al., arXiv:2410.16029): an empirical-Fisher step on the low-rank
  gradient.

  Attributes:
    history: s, past low-rank gradients in the Fisher estimate (0: none, the step is g/λ).
  """

  history: int = option(20, minimum=0)


@register_optimizer("galore", config=GaLoreConfig)
def _galore(cfg: GaLoreConfig, schedule: optax.Schedule, model: ModelConfig) -> optax.GradientTransformation:
  return galore(schedule, rank=cfg.resolved_rank(model), update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
                b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, wd_mask=decay_mask)


@register_optimizer("natural_galore", config=NaturalGaLoreConfig)
def _natural_galore(cfg: NaturalGaLoreConfig, schedule: optax.Schedule,
                    model: ModelConfig) -> optax.GradientTransformation:
  return natural_galore(schedule, rank=cfg.resolved_rank(model), update_proj_gap=cfg.update_proj_gap,
                        scale=cfg.scale, history=cfg.history, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        wd_mask=decay_mask)


@register_optimizer("optax_galore", config=LowRankConfig)
def _optax_galore(cfg: LowRankConfig, schedule: optax.Schedule, model: ModelConfig) -> optax.GradientTransformation:
  """optax.contrib.galore's algorithm (every matrix projected, larger side, scale 1), same rank and gap.

  Equal to ``optax.contrib.galore`` update for update; only the non-matrix leaves are routed around it by
  ``optax.partition``, because its state holds a zero-size projector per such leaf and orbax refuses to
  checkpoint zero-size arrays.
  """
  def matrices(params):
    return jax.tree.map(lambda p: "galore" if p.ndim == 2 else "full_rank", params)

  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2)
  projected = optax.contrib.scale_by_galore(rank=cfg.resolved_rank(model), update_proj_gap=cfg.update_proj_gap,
                                            base_optimizer=adam)
  return optax.chain(optax.partition({"galore": projected, "full_rank": adam}, matrices),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(schedule))
