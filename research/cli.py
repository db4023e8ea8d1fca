"""Command lines generated from frozen config dataclasses, with one-line errors instead of tracebacks.

Every field of the run config becomes ``--field-name`` (fields of nested dataclass configs too, without a prefix:
``--d-model``, ``--layers``). A run starts from a named preset (``--config tiny``) and applies the flags given.
Any problem — an unknown flag, a malformed value, a value the config rejects — exits with status 2 and one line
``error: <what is wrong and what is allowed>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn


class UsageError(Exception):
  """A command line or config value is invalid; the message is one line for the user."""


def fail(message: str) -> NoReturn:
  """Print ``error: message`` (one line) to stderr and exit with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{message} (see --help)")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _leaf_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
  """(path, field, resolved type) of every non-dataclass field, recursing into nested dataclass fields."""
  hints = typing.get_type_hints(cls)
  leaves = []
  for field in dataclasses.fields(cls):
    kind = hints[field.name]
    if dataclasses.is_dataclass(kind):
      leaves += [((field.name, *path), f, t) for path, f, t in _leaf_fields(kind)]
    else:
      leaves.append(((field.name,), field, kind))
  return leaves


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _converter(kind: Any, flag: str) -> Callable[[str], Any]:
  """A string -> value parser for a field annotation (int, float, str, tuple[str, ...], X | None)."""
  args = typing.get_args(kind)
  if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
    inner = _converter(next(a for a in args if a is not type(None)), flag)
    return lambda s: None if s.lower() == "none" else inner(s)
  if typing.get_origin(kind) is tuple:
    item = _converter(args[0], flag)
    return lambda s: tuple(item(part.strip()) for part in s.split(",") if part.strip())

  def convert(s: str):
    try:
      return kind(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{flag} takes {_KIND_NAMES.get(kind, kind.__name__)}, got {s!r}") from None

  convert.__name__ = kind.__name__
  return convert


def _apply(config: Any, overrides: dict[str, Any]) -> Any:
  """``dataclasses.replace`` with nested overrides ({"model": {"d_model": 64}, "steps": 9}) applied at once, so
  that values which are only valid together (num_heads and num_kv_heads) are checked together."""
  changes = {name: _apply(getattr(config, name), value) if isinstance(value, dict) else value
             for name, value in overrides.items()}
  return dataclasses.replace(config, **changes)


def parse_run_args(argv: Sequence[str] | None, *, config_cls: type, presets: Mapping[str, Callable[[], Any]],
                   description: str, default_preset: str, extra: Callable[[argparse.ArgumentParser], None]
                   = lambda parser: None) -> tuple[Any, argparse.Namespace]:
  """Parse ``argv`` into ``(config, namespace)``: ``presets[--config]()`` with every given flag applied.

  ``extra`` may add non-config arguments (e.g. ``--workdir``); they come back in the namespace. Raises
  :class:`UsageError` with a one-line message on any problem.
  """
  parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--config", default=default_preset, help=f"preset: one of {', '.join(presets)}")
  extra(parser)
  leaves = _leaf_fields(config_cls)
  for path, field, kind in leaves:
    flag = _flag(path[-1])
    if kind is bool:
      parser.add_argument(flag, dest="/".join(path), action=argparse.BooleanOptionalAction,
                          default=argparse.SUPPRESS, help=f"{'.'.join(path)} (bool)")
    else:
      parser.add_argument(flag, dest="/".join(path), type=_converter(kind, flag), default=argparse.SUPPRESS,
                          metavar=getattr(kind, "__name__", "VALUE").upper(), help=f"{'.'.join(path)}")
  try:
    args = parser.parse_args(argv)
  except argparse.ArgumentTypeError as e:
    raise UsageError(str(e)) from None
  if args.config not in presets:
    raise UsageError(f"unknown --config {args.config!r}; choose one of: {', '.join(presets)}")
  overrides: dict[str, Any] = {}
  for path, _, _ in leaves:
    key = "/".join(path)
    if hasattr(args, key):
      node = overrides
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = getattr(args, key)
  try:
    config = _apply(presets[args.config](), overrides)
  except (ValueError, TypeError, KeyError) as e:
    raise UsageError(str(e).strip("'\"")) from None
  return config, args
