"""Frozen config dataclasses: declared options, one-line validation, plugin slots and a JSON round trip.

Every config in memlab (the core's ``ModelConfig`` and ``TrainConfig``, and each plugin's own) is a frozen dataclass
deriving from :class:`Config`, with fields declared by :func:`option`::

    @dataclasses.dataclass(frozen=True)
    class MoMConfig(Config):
      num_memories: int = option(4, minimum=1)
      dispatch: str = option("packed", choices=("packed", "sorted", "dense"), resumable=True)

      def check(self):                      # cross-field rules, run once every field is valid on its own
        if self.top_k > self.num_memories:
          yield Problem("top_k", f"must be <= num_memories ({self.num_memories}) (got {self.top_k})")

Construction validates: the field's type (int, finite float, str, bool, tuples, ``X | None``), ``choices``,
``minimum``/``maximum``, then :meth:`Config.check`. Problems raise one :class:`ConfigError` whose message is one
line (``"top_k must be <= num_memories (4) (got 7)"``); the CLI renders the same problems with flag names.

A *plugin slot* (:func:`plugin_slot`) holds the configs of the plugins chosen by other fields: ``ModelConfig.mixers``
has one config per mixer named in ``layers``; ``TrainConfig.plugins`` one for the chosen optimizer, task and
regime. Missing configs of chosen plugins are filled with their defaults and dicts (from JSON) become config
objects; a config given for a plugin that is not chosen is kept (a study that switches optimizers per variant
carries the settings of each).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from research.registry import Registry


class Problem(NamedTuple):
  """One thing wrong with a config: ``field`` (a dotted path inside it, or None for the whole) and what is wrong."""

  field: str | None
  message: str

  def render(self, name=lambda path: path) -> str:
    """``"<field> <message>"`` with the field shown by ``name`` (e.g. as a command-line flag)."""
    return self.message if self.field is None else f"{name(self.field)} {self.message}"


class ConfigError(ValueError):
  """A config value is invalid; ``problems`` says which fields and why, ``str()`` is one line."""

  def __init__(self, problems: Iterable[Problem]):
    self.problems = tuple(problems)
    super().__init__("; ".join(p.render() for p in self.problems))

  def nested(self, prefix: str) -> ConfigError:
    """The same problems with field paths under ``prefix`` (``"mom"`` + ``"top_k"`` -> ``"mom.top_k"``)."""
    return ConfigError(Problem(prefix if p.field is None else f"{prefix}.{p.field}", p.message)
                       for p in self.problems)


class FrozenDict(Mapping):
  """An immutable, hashable mapping: plugin slots hold one, so configs stay hashable (NNX keeps a module's config
  as static graph data, which must hash)."""

  __slots__ = ("_items",)

  def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
    object.__setattr__(self, "_items", dict(items))

  def __getitem__(self, key: str) -> Any:
    return self._items[key]

  def __iter__(self):
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(self._items.items()))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Mapping) and dict(self._items) == dict(other)

  def __repr__(self) -> str:
    return repr(self._items)

  def __setattr__(self, name: str, value: Any):
    raise AttributeError("FrozenDict is immutable")

  def __reduce__(self):
    return FrozenDict, (self._items,)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           choices: Iterable[Any] | None = None, minimum: float | None = None, maximum: float | None = None,
           below: float | None = None, registry: Registry | None = None, resumable: bool = False,
           positional: bool = False) -> Any:
  """A config field with declared rules.

  Args:
    default, default_factory: as ``dataclasses.field``.
    choices: the allowed values.
    minimum, maximum: inclusive bounds; ``below``: exclusive upper bound (b1 in [0, 1)).
    registry: the field names entries of this registry (a str, or a tuple of names); they must be registered.
    resumable: a resumed run may change this field (it does not change what the run computes, e.g. a kernel
      choice or a logging period).
    positional: on the command line, a positional argument rather than a flag.
  """
  metadata = {"choices": tuple(choices) if choices is not None else None, "minimum": minimum, "maximum": maximum,
              "below": below, "registry": registry, "resumable": resumable, "positional": positional}
  return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def plugin_slot(*selectors: str) -> Any:
  """A ``{plugin name: config}`` field for the plugins named by the fields ``selectors`` (declared with
  ``option(registry=...)``)."""
  return dataclasses.field(default_factory=FrozenDict, metadata={"plugin_selectors": selectors})


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
  """Resolved annotations of a dataclass (``from __future__ import annotations`` makes them strings)."""
  return typing.get_type_hints(cls)


def optional_inner(kind: Any) -> Any | None:
  """``X`` for ``X | None``, else None."""
  args = typing.get_args(kind)
  if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
    return next(a for a in args if a is not type(None))
  return None


def _type_problem(value: Any, kind: Any) -> str | None:
  """Why ``value`` does not fit the annotation ``kind`` (None if it does)."""
  if (inner := optional_inner(kind)) is not None:
    return None if value is None else _type_problem(value, inner)
  if typing.get_origin(kind) is tuple:
    if not isinstance(value, tuple):
      return f"must be a tuple (got {value!r})"
    item = typing.get_args(kind)[0]
    return next((p for p in (_type_problem(v, item) for v in value) if p), None)
  if kind is bool:
    return None if isinstance(value, bool) else f"must be true or false (got {value!r})"
  if kind is int:
    return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer (got {value!r})"
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"must be a number (got {value!r})"
    return None if math.isfinite(value) else f"must be a finite number (got {value})"
  if kind is str:
    return None if isinstance(value, str) else f"must be a string (got {value!r})"
  return None


def _rule_problem(value: Any, meta: Mapping[str, Any], kind: Any) -> str | None:
  """Why ``value`` breaks the field's declared choices/bounds/registry (None if it does not)."""
  if value is None:
    return None
  if (registry := meta.get("registry")) is not None:
    for name in (value if isinstance(value, tuple) else (value,)):
      if name not in registry:
        return f"names an unknown {registry.kind} {name!r}; registered {registry.kind}s: {', '.join(registry.names())}"
  if (choices := meta.get("choices")) is not None and value not in choices:
    return f"must be one of {', '.join(map(str, choices))} (got {value!r})"
  low, high, below = meta.get("minimum"), meta.get("maximum"), meta.get("below")
  whole = kind is int or optional_inner(kind) is int
  if low is not None and high is not None and not low <= value <= high:
    return f"must be in [{low}, {high}] (got {value})"
  if below is not None and not (low if low is not None else -math.inf) <= value < below:
    return f"must be in [{low}, {below}) (got {value})"
  if low is not None and value < low:
    return f"must be a positive integer (got {value})" if whole and low == 1 else f"must be >= {low} (got {value})"
  if high is not None and value > high:
    return f"must be <= {high} (got {value})"
  return None


class Config:
  """Base of memlab's frozen config dataclasses: validates declared options, fills plugin slots, then
  :meth:`check`."""

  def __post_init__(self):
    problems = []
    types_ = field_types(type(self))
    for f in dataclasses.fields(self):
      value, kind = getattr(self, f.name), types_[f.name]
      if "plugin_selectors" in f.metadata:
        continue
      if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):  # a nested config given as JSON
        object.__setattr__(self, f.name, from_json(kind, value))
        continue
      problem = _type_problem(value, kind) or _rule_problem(value, f.metadata, kind)
      if problem:
        problems.append(Problem(f.name, problem))
    if not problems:
      problems += self._fill_plugin_slots()
    if not problems:
      problems += list(self.check())
    if problems:
      raise ConfigError(problems)

  def check(self) -> Iterable[Problem]:
    """Cross-field rules of this config; yields :class:`Problem`s. Runs only when every field is valid alone."""
    return ()

  def _fill_plugin_slots(self) -> list[Problem]:
    problems = []
    for f in dataclasses.fields(self):
      if "plugin_selectors" not in f.metadata:
        continue
      given = dict(getattr(self, f.name) or {})
      chosen = [name for selector in f.metadata["plugin_selectors"]
                for name in _as_names(getattr(self, selector))]
      filled = {}
      for name in dict.fromkeys([*chosen, *given]):
        try:
          filled[name] = plugin_config(slot_registry(type(self), f.name, name), name, given.get(name))
        except ConfigError as e:
          problems += e.nested(f"{f.name}.{name}").problems
        except (TypeError, ValueError, KeyError) as e:
          problems.append(Problem(f"{f.name}.{name}", str(e).strip("'\"")))
      object.__setattr__(self, f.name, FrozenDict(filled))
    return problems


def _as_names(value: str | tuple[str, ...]) -> tuple[str, ...]:
  return value if isinstance(value, tuple) else (value,)


def slot_registry(owner: type, slot: str, name: str) -> Registry:
  """The registry, among those selecting into ``owner.slot``, that holds plugin ``name`` (KeyError if none)."""
  fields = {f.name: f for f in dataclasses.fields(owner)}
  registries = [fields[s].metadata["registry"] for s in fields[slot].metadata["plugin_selectors"]]
  for registry in registries:
    if name in registry:
      return registry
  raise KeyError(f"no {' or '.join(r.kind for r in registries)} is registered as {name!r}")


def plugin_config(registry: Registry, name: str, given: Any) -> Any:
  """``given`` as the config of plugin ``name``: None -> its defaults, a dict -> built from JSON."""
  cls = registry.config_class(name)
  if cls is None:
    if given not in (None, {}):
      raise ValueError(f"{registry.kind} {name!r} takes no settings (got {given!r})")
    return None
  if given is None:
    return cls()
  if isinstance(given, Mapping):
    return from_json(cls, given)
  if not isinstance(given, cls):
    raise TypeError(f"must be a {cls.__name__} for {registry.kind} {name!r} (got {type(given).__name__})")
  return given


def chosen_only(config: Any) -> Any:
  """``config`` with every plugin slot (nested ones too) reduced to the plugins its selectors choose."""
  changes = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if "plugin_selectors" in f.metadata:
      chosen = {name for s in f.metadata["plugin_selectors"] for name in _as_names(getattr(config, s))}
      if set(value) - chosen:
        changes[f.name] = FrozenDict((k, v) for k, v in value.items() if k in chosen)
    elif dataclasses.is_dataclass(value) and isinstance(value, Config):
      if (pruned := chosen_only(value)) is not value:
        changes[f.name] = pruned
  return dataclasses.replace(config, **changes) if changes else config


def to_json(config: Any) -> Any:
  """A config (or a value inside one) as JSON-ready data."""
  if dataclasses.is_dataclass(config):
    return {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, Mapping):
    return {k: to_json(v) for k, v in config.items()}
  if isinstance(config, (tuple, list)):
    return tuple(to_json(v) for v in config)
  return config


def from_json(cls: type, data: Mapping[str, Any]) -> Any:
  """Build config class ``cls`` from :func:`to_json` data (lists become tuples; unknown keys are an error)."""
  names = {f.name for f in dataclasses.fields(cls)}
  if unknown := sorted(set(data) - names):
    raise ConfigError([Problem(k, f"is not a field of {cls.__name__}") for k in unknown])
  kinds = field_types(cls)
  values = {}
  for key, value in data.items():
    kind = optional_inner(kinds[key]) or kinds[key]
    if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
      try:
        value = from_json(kind, value)
      except ConfigError as e:
        raise e.nested(key) from None
    elif isinstance(value, list):
      value = tuple(value)
    values[key] = value
  return cls(**values)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}``."""
  flat = {}
  for key, value in data.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def resumable_paths(config: Any, prefix: str = "") -> set[str]:
  """Dotted paths of the fields declared ``resumable`` in ``config`` and in every config nested in it."""
  paths = set()
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.metadata.get("resumable"):
      paths.add(prefix + f.name)
    if dataclasses.is_dataclass(value):
      paths |= resumable_paths(value, f"{prefix}{f.name}.")
    elif isinstance(value, Mapping):
      for name, sub in value.items():
        if dataclasses.is_dataclass(sub):
          paths |= resumable_paths(sub, f"{prefix}{f.name}.{name}.")
  return paths
