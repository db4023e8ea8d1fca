"""``--optimizer mezo_sgd``: MeZO's zeroth-order SGD registered for the training loop, with its own config.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (arXiv 2305.17333): ε = 1e-3, one direction
per step, constant learning rate, weight decay off biases and norms. The optimizer needs the objective, not
gradients, so it trains under ``--regime zo_spsa`` (:mod:`optim.zo.regime`), which reads these settings and runs
the fused, inference-memory round; the factory below is its optax form (:func:`optim.zo.spsa.mezo_sgd`) for code
that passes ``obj_fn`` itself.
"""

from __future__ import annotations

import dataclasses

import optax

from optim.zo.directions import DISTRIBUTIONS
from optim.zo.spsa import mezo_sgd
from research.config import Config, option
from research.models.config import ModelConfig
from research.optimizers import decay_mask, register_optimizer


@dataclasses.dataclass(frozen=True)
class MeZOConfig(Config):
  """MeZO-SPSA (``mezo_sgd``, arXiv 2305.17333): SGD on central-difference estimates along seeded directions.

  Attributes:
    eps: ε, the perturbation scale of θ ± εz.
    num_samples: S, directions per worker per step (each costs two forward passes and one byte on the wire).
    distribution: the directions: gaussian (N(0, I)), rademacher (±1) or sphere (uniform, radius √d).
    weight_decay: decoupled weight decay (times the learning rate), on matrices only.
    seed: root seed of the directions (the run's seed sets initialisation and data).
    allow_low_precision: train bf16/fp16 parameters although θ ± εz can round back to θ.
  """

  eps: float = option(1e-3, minimum=1e-12)
  num_samples: int = option(1, minimum=1)
  distribution: str = option("gaussian", choices=DISTRIBUTIONS)
  weight_decay: float = option(0.0, minimum=0.0)
  seed: int = option(0, minimum=0)
  allow_low_precision: bool = False


@register_optimizer("mezo_sgd", config=MeZOConfig)
def _mezo_sgd(cfg: MeZOConfig, schedule: optax.Schedule, model: ModelConfig) -> optax.GradientTransformation:
  del model
  return mezo_sgd(schedule, eps=cfg.eps, num_samples=cfg.num_samples, weight_decay=cfg.weight_decay,
                  wd_mask=decay_mask, distribution=cfg.distribution, seed=cfg.seed,
                  allow_low_precision=cfg.allow_low_precision)
