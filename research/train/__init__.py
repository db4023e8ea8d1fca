"""Training: the run config, regimes (first-order built in), the loop, resume rules and lowering for analysis.

Modules by job: ``config`` (TrainConfig, optimizer and schedule), ``regime`` (the regime interface and registry),
``first_order`` (the default regime), ``steps`` (the LM objective and the evaluation step), ``resume`` (saved
config vs the current one), ``loop`` (train_and_evaluate), ``lowering`` (the step on abstract inputs) and
``presets`` (named configs).
"""

from research.train import first_order  # noqa: F401  (registers the "first_order" regime)
from research.train.config import TrainConfig, TrainError, learning_rate_schedule, make_optimizer
from research.train.loop import build_model, build_regime, train_and_evaluate
from research.train.lowering import lower_train_step
from research.train.regime import Regime, SplitModel, register_regime
from research.train.resume import config_changes

__all__ = ["Regime", "SplitModel", "TrainConfig", "TrainError", "build_model", "build_regime", "config_changes",
           "learning_rate_schedule", "lower_train_step", "make_optimizer", "register_regime", "train_and_evaluate"]
