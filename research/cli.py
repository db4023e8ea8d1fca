"""Command lines generated from frozen config dataclasses, with one-line errors instead of tracebacks.

One mechanism for every entry point (``experiments.train``, ``experiments.mqar``, ``experiments.galore_study``,
``python -m memmap ...``):

* every field of the config is a flag ``--field-name`` (fields of nested core configs too, without a prefix:
  ``--d-model``, ``--layers``); ``_`` and ``-`` are interchangeable in flag names;
* every field of every registered plugin's config is a flag named after the plugin, ``--<plugin>.<field>``
  (``--mom.dispatch packed``, ``--galore.rank 64``, ``--mom.memory.chunk-size 32``); a plugin's flags apply only
  when the run selects it (``--layers``, ``--optimizer``, ``--task``, ``--regime``);
* ``--help`` lists each flag with its description (from the config's docstring), default and allowed values,
  grouped by plugin.

Any problem (an unknown flag, a malformed value, a value a config rejects, a flag of a plugin the run does not
use) exits with status 2 and one line ``error: <what is wrong and what is allowed>``. Built on argparse: tyro's
errors are multi-line panels and its nested configs cannot depend on another flag's value (which plugins a run
selects), and ml_collections' config flags want ConfigDicts rather than frozen dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

from research.config import (ConfigError, Problem, chosen_only, field_types, from_json, optional_inner,
                             slot_registry)
from research.registry import Registry


class UsageError(Exception):
  """A command line or config value is invalid; the message is one line for the user (control characters a value
  may carry, such as a newline, are escaped)."""

  def __init__(self, message: str):
    super().__init__("".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in message))


def fail(message: str) -> NoReturn:
  """Print ``error: message`` (one line) to stderr and exit with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{message} (see --help)")


def field_docs(cls: type) -> dict[str, str]:
  """Field descriptions from the ``Attributes:`` sections of ``cls``'s docstring and its bases' (``a, b: text``
  documents both)."""
  docs: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
    if "Attributes:" not in text:
      continue
    name = None
    for line in text.split("Attributes:", 1)[1].splitlines():
      if not line.strip():
        continue
      if not line.startswith(" "):
        break  # the next section
      match = re.match(r"^ {2}([\w, ]+):\s*(.*)$", line)
      if match:
        names = [n.strip() for n in match.group(1).split(",")]
        for n in names:
          docs[n] = match.group(2).strip()
        name = names
      elif name:
        for n in name:
          docs[n] += " " + line.strip()
  return docs


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _converter(kind: Any, flag: str) -> Callable[[str], Any]:
  """A string -> value parser for a field annotation (int, float, str, tuple[str, ...], X | None)."""
  if (inner := optional_inner(kind)) is not None:
    parse = _converter(inner, flag)
    return lambda s: None if s.lower() == "none" else parse(s)
  if getattr(kind, "__origin__", None) is tuple:
    item = _converter(kind.__args__[0], flag)
    return lambda s: tuple(item(part.strip()) for part in s.split(",") if part.strip())

  def convert(s: str):
    try:
      return kind(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{flag} takes {_KIND_NAMES.get(kind, kind.__name__)}, got {s!r}") from None

  convert.__name__ = getattr(kind, "__name__", "value")
  return convert


def _flag_name(*parts: str) -> str:
  return "--" + ".".join(p.replace("_", "-") for p in parts)


def _help(field: dataclasses.Field, doc: str, default: Any) -> str:
  extras = [f"default: {default}"]
  if (choices := field.metadata.get("choices")) is not None:
    extras.append("one of " + ", ".join(map(str, choices)))
  if (registry := field.metadata.get("registry")) is not None:
    extras.append(f"registered {registry.kind}s: " + ", ".join(registry.names()))
  return f"{doc} ({'; '.join(extras)})".replace("%", "%%")


class PluginOf(NamedTuple):
  """Where a plugin flag belongs: the plugin (``registry``, ``name``), the path of the slot holding its config and
  the field that selects it (``layers``, ``optimizer``, ...)."""

  registry: Registry
  name: str
  slot: tuple[str, ...]
  selector: str


class Flag(NamedTuple):
  """One generated flag: its name, the config path its value goes to, and (for plugin flags) its plugin."""

  name: str
  path: tuple[str, ...]
  plugin: PluginOf | None


def _default_of(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return "(from the preset)"
  return "required"


def _metavar(kind: Any) -> str:
  if getattr(kind, "__origin__", None) is tuple:
    return "A,B,..."
  return getattr(kind, "__name__", "VALUE").upper()


def _add_fields(parser, group, cls: type, prefix: tuple[str, ...], flag_parts: tuple[str, ...],
                plugin: PluginOf | None, flags: list[Flag], slots: list) -> None:
  """Flags for every leaf field of ``cls``, recursing into nested dataclasses; plugin slots are collected into
  ``slots`` (their flags come after every core flag)."""
  docs, types = field_docs(cls), field_types(cls)
  for field in dataclasses.fields(cls):
    kind, path = types[field.name], (*prefix, field.name)
    if "plugin_selectors" in field.metadata:
      slots.append((cls, field, path))
      continue
    nested = optional_inner(kind) or kind
    if dataclasses.is_dataclass(nested):
      if plugin is not None:  # plugin configs keep the nested name in their flags (--mom.memory.chunk-size)
        _add_fields(parser, group, nested, path, (*flag_parts, field.name), plugin, flags, slots)
      else:
        sub = parser.add_argument_group(f"{field.name} ({nested.__name__})")
        _add_fields(parser, sub, nested, path, flag_parts, plugin, flags, slots)
      continue
    name = _flag_name(*flag_parts, field.name) if plugin is not None else _flag_name(field.name)
    help_text = _help(field, docs.get(field.name, ""), _default_of(field))
    if field.metadata.get("positional"):
      group.add_argument("/".join(path), type=_converter(kind, field.name), metavar=field.name.upper(),
                         help=help_text)
    elif kind is bool:
      group.add_argument(name, dest="/".join(path), action=argparse.BooleanOptionalAction,
                         default=argparse.SUPPRESS, help=help_text)
    else:
      group.add_argument(name, dest="/".join(path), type=_converter(kind, name), default=argparse.SUPPRESS,
                         metavar=_metavar(nested), help=help_text)
    flags.append(Flag(name, path, plugin))


def _add_plugin_flags(parser, owner: type, slot: dataclasses.Field, path: tuple[str, ...], flags: list[Flag]):
  for selector in slot.metadata["plugin_selectors"]:
    registry = next(f for f in dataclasses.fields(owner) if f.name == selector).metadata["registry"]
    for name in registry.names():
      cls = registry.config_class(name)
      if cls is None:
        continue
      summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ").replace("%", "%%")
      group = parser.add_argument_group(f"{registry.kind} {name} ({cls.__module__}.{cls.__name__})", summary)
      _add_fields(parser, group, cls, (*path, name), (name,), PluginOf(registry, name, path, selector), flags, [])


def _nested_set(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _apply(config: Any, overrides: Mapping[str, Any]) -> Any:
  """``dataclasses.replace`` with nested overrides ({"model": {"d_model": 64}, "steps": 9}) applied at once, so
  that values which are only valid together (num_heads and num_kv_heads) are checked together. Plugin slots take
  {plugin: {field: value}} and update only those fields of the plugin's config (its defaults if it has none yet).
  Problems come back with their full dotted paths."""
  changes = {}
  for name, value in overrides.items():
    current = getattr(config, name)
    if isinstance(value, dict) and isinstance(current, Mapping):  # a plugin slot
      updated = dict(current)
      for plugin, fields in value.items():
        registry = slot_registry(type(config), name, plugin)
        base = current[plugin] if plugin in current else registry.config_class(plugin)()
        updated[plugin] = _apply_at(base, fields, f"{name}.{plugin}")
      changes[name] = updated
    elif isinstance(value, dict):
      changes[name] = _apply_at(current, value, name)
    else:
      changes[name] = value
  return dataclasses.replace(config, **changes)


def _apply_at(current: Any, overrides: Mapping[str, Any], where: str) -> Any:
  """:func:`_apply` on a config nested at path ``where``, its problems reported under that path."""
  try:
    return _apply(current, overrides)
  except ConfigError as e:
    raise e.nested(where) from None


class ConfigParser:
  """Flags of a config class (and of the plugins its slots can select), parsed into a config.

  Args:
    config_cls: the (frozen, :class:`research.config.Config`) dataclass the command line builds.
    description: the ``--help`` headline.
    extra: adds arguments that are not config fields (e.g. ``--workdir``); they come back in the namespace.
    presets: named base configs (``--config NAME``), or None to start from ``config_cls()``.
    default_preset: the preset used without ``--config``.
    unselected_plugins: accept flags of plugins the config does not select (their settings are kept in its
      plugin slots): for studies that switch plugins per run.
    parser: an argparse parser to add the flags to (a subcommand's), instead of a new one.
    usage: the usage line (default: argparse's, which lists every flag).
  """

  def __init__(self, config_cls: type, *, description: str = "", extra: Callable[[argparse.ArgumentParser], None]
               = lambda parser: None, presets: Registry | None = None, default_preset: str | None = None,
               prog: str | None = None, unselected_plugins: bool = False,
               parser: argparse.ArgumentParser | None = None, usage: str | None = None):
    self.config_cls, self.presets, self.default_preset = config_cls, presets, default_preset
    self.unselected_plugins = unselected_plugins
    self.parser = parser or _Parser(prog=prog, description=description, usage=usage,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets is not None:
      self.parser.add_argument("--config", default=default_preset,
                               help=f"preset (default: {default_preset}; one of {', '.join(presets.names())})")
    extra(self.parser)
    self.flags: list[Flag] = []
    slots: list = []
    core = self.parser.add_argument_group(f"{config_cls.__name__} flags")
    _add_fields(self.parser, core, config_cls, (), (), None, self.flags, slots)
    for owner, slot, path in slots:
      _add_plugin_flags(self.parser, owner, slot, path, self.flags)
    self._flag_of = {".".join(f.path): f for f in self.flags}

  def parse(self, argv: Sequence[str] | None) -> tuple[Any, argparse.Namespace]:
    """(config, namespace) from ``argv`` (default ``sys.argv[1:]``); :class:`UsageError` on any problem."""
    return self.from_namespace(_parse_args(self.parser, argv))

  def from_namespace(self, args: argparse.Namespace) -> tuple[Any, argparse.Namespace]:
    """(config, namespace) from arguments this parser (or a subcommand built on it) has parsed."""
    if self.presets is not None:
      if args.config not in self.presets:
        raise UsageError(f"unknown --config {args.config!r}; choose one of: {', '.join(self.presets.names())}")
      base = self.presets.get(args.config)()
    else:
      base = None
    core, plugins = {}, {}
    for flag in self.flags:
      key = "/".join(flag.path)
      if hasattr(args, key):
        _nested_set(plugins if flag.plugin else core, flag.path, getattr(args, key))
    return self._build(base, core, plugins), args

  def _build(self, base: Any, core: dict, plugins: dict) -> Any:
    try:
      config = _apply(base, core) if base is not None else from_json(self.config_cls, core)
    except ConfigError as e:
      raise UsageError(self._render(e)) from None
    except (ValueError, TypeError, KeyError) as e:
      raise UsageError(str(e).strip("'\"")) from None
    if not self.unselected_plugins:
      self._check_selected(config, plugins)
    try:
      config = _apply(config, plugins)
    except ConfigError as e:
      raise UsageError(self._render(e)) from None
    return config if self.unselected_plugins else chosen_only(config)

  def _check_selected(self, config: Any, plugins: dict) -> None:
    """Refuse flags of plugins the config does not select."""
    for flag in self.flags:
      if flag.plugin is None or _get(plugins, flag.path) is _MISSING:
        continue
      p = flag.plugin
      if p.name not in _getattr_path(config, p.slot):
        raise UsageError(f"{flag.name} is set but the run uses no {p.registry.kind} {p.name!r} "
                         f"(select it with --{p.selector.replace('_', '-')})")

  def _render(self, error: ConfigError) -> str:
    """The problems with flag names; a plugin's problems name the plugin."""
    rendered = []
    for problem in error.problems:
      flag = self._flag_of.get(problem.field or "")
      if flag is None:
        rendered.append(problem.render())
      elif flag.plugin is None:
        rendered.append(Problem(flag.name, problem.message).render())
      else:
        rendered.append(f"{flag.plugin.registry.kind} {flag.plugin.name}: "
                        f"{Problem(flag.name, problem.message).render()}")
    return "; ".join(rendered)


class CommandParser:
  """A command with subcommands, each built from its own config class (``python -m memmap solve FILE ...``).

  Args:
    commands: subcommand name -> (config class, one-line help).
  """

  def __init__(self, commands: Mapping[str, tuple[type, str]], *, prog: str | None = None, description: str = ""):
    self.parser = _Parser(prog=prog, description=description)
    sub = self.parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    self.commands = {name: ConfigParser(cls, parser=sub.add_parser(
        name, help=text, description=text, formatter_class=argparse.RawDescriptionHelpFormatter))
        for name, (cls, text) in commands.items()}

  def parse(self, argv: Sequence[str] | None) -> tuple[str, Any]:
    """(subcommand, its config) from ``argv``; :class:`UsageError` on any problem."""
    args = _parse_args(self.parser, argv)
    return args.command, self.commands[args.command].from_namespace(args)[0]


def _parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  argv = [_normalise(a) for a in (sys.argv[1:] if argv is None else argv)]
  try:
    return parser.parse_args(argv)
  except argparse.ArgumentTypeError as e:
    raise UsageError(str(e)) from None


_MISSING = object()


def _get(tree: dict, path: Sequence[str]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return _MISSING
    tree = tree[key]
  return tree


def _getattr_path(config: Any, path: Sequence[str]) -> Any:
  for key in path:
    config = config[key] if isinstance(config, Mapping) else getattr(config, key)
  return config


def _normalise(arg: str) -> str:
  """``--mom.num_memories=4`` -> ``--mom.num-memories=4`` (flag names accept ``_`` for ``-``)."""
  if not arg.startswith("--"):
    return arg
  name, eq, value = arg.partition("=")
  return name.replace("_", "-") + eq + value
