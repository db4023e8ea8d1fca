"""Name -> (factory, config class) registries whose entries live in plugin packages.

Mixers (``research.models.registry``), optimizers (``research.optimizers``), data tasks (``research.data``),
training regimes (``research.train.regime``) and run presets (``research.train.presets``) are registries. A plugin
registers an entry together with the frozen config dataclass it owns::

    @register_mixer("mom", config=MoMConfig)
    def mom_mixer(cfg: MoMConfig, ctx: MixerContext, *, rngs): ...

The core never names a plugin: packages that hold plugins declare themselves as entry points of the group
``memlab.plugins`` (``pyproject.toml``), and every registry imports them on its first lookup. Code that runs from a
source tree without ``pip install -e .`` (no entry points) imports its plugin packages itself, as
``experiments`` does.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")
PLUGIN_GROUP = "memlab.plugins"
_plugins_loaded = False


def load_plugins() -> None:
  """Import every module declared as an entry point of ``memlab.plugins`` (once per process)."""
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
    importlib.import_module(entry.value)


class Entry(NamedTuple, Generic[T]):
  """One registered plugin: what builds it and the config dataclass it owns (None: it has no settings)."""

  factory: T
  config: type | None


class Registry(Generic[T]):
  """Entries of one kind; ``kind`` names it in messages (``Registry("layer")`` -> "unknown layer 'x'")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Entry[T]] = {}

  def register(self, name: str, *, config: type | None = None) -> Callable[[T], T]:
    """Decorator that makes ``entry`` available as ``name``, configured by the frozen dataclass ``config``."""
    if not name.isidentifier():
      raise ValueError(f"{self.kind} name must be an identifier, got {name!r}")
    if config is not None and not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
      raise TypeError(f"{self.kind} {name!r}: config must be a frozen dataclass, got {config!r}")

    def decorate(factory: T) -> T:
      old = self._entries.get(name)
      if old is not None and (old.factory is not factory or old.config is not config):
        raise ValueError(f"{self.kind} {name!r} is already registered to {old.factory!r}")
      self._entries[name] = Entry(factory, config)
      return factory

    return decorate

  def names(self) -> tuple[str, ...]:
    """Sorted names of every entry, plugins included."""
    load_plugins()
    return tuple(sorted(self._entries))

  def entry(self, name: str) -> Entry[T]:
    """The entry called ``name``; ``KeyError`` naming the registered ones otherwise."""
    load_plugins()
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}") from None

  def get(self, name: str) -> T:
    """The factory registered as ``name``."""
    return self.entry(name).factory

  def config_class(self, name: str) -> type | None:
    """The config dataclass of ``name`` (None if it takes no settings)."""
    return self.entry(name).config

  def __contains__(self, name: str) -> bool:
    load_plugins()
    return name in self._entries

