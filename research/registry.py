"""A name -> factory registry whose entries may live in plugin packages imported on the first lookup.

Used for sequence mixers (``research.models.registry``) and optimizers (``research.optimizers``): a plugin
package (``layers``, ``optim``) registers its entries when imported, and research never imports it eagerly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries of one kind (``kind`` names it in error messages), e.g. ``Registry("layer", plugins=("layers",))``."""

  def __init__(self, kind: str, *, plugins: Sequence[str] = ()):
    self.kind = kind
    self._entries: dict[str, T] = {}
    self._plugins = tuple(plugins)
    self._plugins_loaded = False

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that makes ``entry`` available under ``name``."""
    if not name.isidentifier():
      raise ValueError(f"{self.kind} name must be an identifier, got {name!r}")

    def decorate(entry: T) -> T:
      if name in self._entries and self._entries[name] is not entry:
        raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name]!r}")
      self._entries[name] = entry
      return entry

    return decorate

  def _load_plugins(self) -> None:
    if not self._plugins_loaded:
      self._plugins_loaded = True
      for package in self._plugins:
        importlib.import_module(package)

  def names(self) -> tuple[str, ...]:
    """Sorted names of every entry, plugins included."""
    self._load_plugins()
    return tuple(sorted(self._entries))

  def get(self, name: str) -> T:
    """The entry called ``name``; ``KeyError`` naming the registered ones otherwise."""
    self._load_plugins()
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}") from None
