"""The package structure: the core knows no plugin, libraries never import the experiments, no import cycles,
and a plugin written outside the library (here, in this test module) trains with its own config and flags."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from research.config import Config, option
from research.models import MixerContext, register_mixer
from research.models.blocks import dense
from research.optimizers import register_optimizer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("research", "layers", "optim", "memmap", "experiments")
LIBRARIES = ("research", "layers", "optim", "memmap")


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
  """module -> the memlab modules it imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
  files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
  graph = {}
  for module, path in files.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
      else:
        continue
      targets |= {n for n in names if n in files and n != module}
    graph[module] = targets
  return graph


def test_import_graph_has_no_cycle():
  graph = _import_graph()
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(module, path):
    state[module] = 1
    for target in sorted(graph[module]):
      if state.get(target) == 1:
        cycle = path[path.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if target not in state:
        visit(target, path + [target])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_libraries_never_import_experiments_and_the_core_imports_no_plugin():
  graph = _import_graph()
  assert len(graph) > 60  # the walk found the packages
  bad = [(m, t) for m, targets in graph.items() for t in targets
         if m.split(".")[0] in LIBRARIES and t.split(".")[0] == "experiments"]
  assert not bad, f"library modules import experiments: {bad}"
  core = [(m, t) for m, targets in graph.items() for t in targets
          if m.split(".")[0] == "research" and t.split(".")[0] in ("layers", "optim", "memmap")]
  assert not core, f"the core imports plugin packages: {core}"


def test_no_core_config_field_is_named_after_a_plugin():
  from research.models import ModelConfig
  from research.train import TrainConfig
  names = [f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]
  prefixes = ("attn_", "longgen_", "mom_", "gdn_", "linear_", "galore", "mqar_")
  assert not [n for n in names if n.startswith(prefixes)], names


def test_plugin_packages_are_declared_entry_points():
  declared = {e.value for e in importlib.metadata.entry_points(group="memlab.plugins")}
  assert {"layers", "optim", "experiments.configs"} <= declared


# A mixer and an optimizer defined here, outside the library, each with its own config.

@dataclasses.dataclass(frozen=True)
class ScaledMixConfig(Config):
  """A test-only mixer: a causal running mean of the projected input, scaled.

  Attributes:
    scale: the output scale.
  """

  scale: float = option(1.0, minimum=0.0)


@register_mixer("test_running_mean", config=ScaledMixConfig)
class RunningMean(nnx.Module):
  def __init__(self, cfg: ScaledMixConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
    self.scale = cfg.scale
    self.proj = dense(ctx.d_model, ctx.d_model, dtype=ctx.compute_dtype, rngs=rngs, axes=("embed", None))

  def __call__(self, x, *, use_cache=False):
    h = self.proj(x)
    mean = jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
    return self.scale * mean, {}


@dataclasses.dataclass(frozen=True)
class SignConfig(Config):
  """A test-only optimizer: signSGD.

  Attributes:
    damping: multiplies the sign step.
  """

  damping: float = option(1.0, minimum=0.0)


@register_optimizer("test_sign_sgd", config=SignConfig)
def _sign_sgd(cfg: SignConfig, schedule, model):
  del model
  return optax.chain(optax.scale_by_sign(), optax.scale(cfg.damping), optax.scale_by_learning_rate(schedule))


def test_a_plugin_defined_outside_the_library_trains_from_the_command_line(tmp_path, capsys):
  from experiments.train import main
  summary = main(["--config", "tiny", "--workdir", str(tmp_path), "--layers", "test_running_mean,attn",
                  "--test-running-mean.scale", "0.5", "--optimizer", "test_sign_sgd", "--test_sign_sgd.damping",
                  "0.25", "--steps", "2", "--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2",
                  "--seq-len", "32", "--batch-size", "8", "--eval-batches", "1", "--log-every", "1"])
  assert summary["final_step"] == 2 and summary["final_eval_loss"] < summary["uniform_loss"] + 0.5
  saved = (tmp_path / "config.json").read_text()
  assert '"scale": 0.5' in saved and '"damping": 0.25' in saved
  with pytest.raises(SystemExit):
    main(["--help"])
  help_text = capsys.readouterr().out
  assert "--test-running-mean.scale" in help_text and "--test-sign-sgd.damping" in help_text
  with pytest.raises(SystemExit):
    main(["--workdir", str(tmp_path / "bad"), "--layers", "test_running_mean", "--test-running-mean.scale", "-1"])
  assert capsys.readouterr().err == ("error: layer test_running_mean: --test-running-mean.scale must be >= 0.0 "
                                     "(got -1.0)\n")
