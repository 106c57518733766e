"""Options from flags, ``MESHAGENT_*`` environment variables and a ``--config-dir``.

Precedence: flag > environment > config-dir file > default. The config dir works like a
Kubernetes ConfigMap mount (the way the seed runs ``cilium-agent --config-dir=...``): one file
per option, the file name is the option name, the content its value.
"""

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from meshagent.errors import PluginError, UsageError

ENV_PREFIX = "MESHAGENT_"
CORE_GROUP = "agent"
CONFIG_DIR = "config-dir"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def parse_list(text: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated words: ``etcd,ebpf``."""
    if not isinstance(text, str):
        return tuple(text)
    return tuple(word.strip() for word in text.split(",") if word.strip())


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", parse_bool: "a boolean",
               parse_list: "a comma-separated list", Path: "a path"}


@attrs.frozen
class Option:
    name: str  # without the leading dashes
    type: Callable[[str], Any]
    default: Any
    help: str
    group: str
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def convert(self, raw: Any, source: str) -> Any:
        """Turn text from the environment or a config file into the option's value."""
        try:
            value = self.type(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError) as exc:
            kind = _TYPE_NAMES.get(self.type, getattr(self.type, "__name__", "a value"))
            raise UsageError(f"invalid {self.flag}={raw!r} (from {source}): expected {kind}"
                             f" ({exc})") from None
        self.check_choice(value, source)
        return value

    def check_choice(self, value: Any, source: str) -> None:
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"invalid {self.flag}={value!r} (from {source}): must be one of"
                f" {', '.join(map(str, self.choices))}"
            )


@attrs.frozen
class ParsedOptions:
    values: Mapping[str, Any]
    sources: Mapping[str, str]  # option name -> "flag", "env MESHAGENT_X", "config-dir PATH", "default"
    unknown_config_files: tuple[str, ...] = ()


class OptionGroup:
    """The options of one plugin (or of the core), shown together in ``--help``."""

    def __init__(self, parser: "Parser", name: str, description: str, prefix: str | None):
        self.parser = parser
        self.name = name
        self.description = description
        self.prefix = prefix

    def addoption(
        self,
        name: str,
        *,
        type: Callable[[str], Any] = str,
        default: Any = None,
        help: str,
        choices: Sequence[Any] | None = None,
    ) -> Option:
        name = name.removeprefix("--")
        if self.prefix and not name.startswith(f"{self.prefix}-"):
            raise PluginError(
                f"plugin {self.prefix!r} option --{name} must start with --{self.prefix}-"
            )
        if name in self.parser.options:
            other = self.parser.options[name].group
            raise PluginError(f"option --{name} is added by both {other!r} and {self.name!r}")
        option = Option(name, type, default, help, self.name, tuple(choices) if choices else None)
        self.parser.options[name] = option
        return option


class Parser:
    """Collects the core's and plugins' options, then resolves them from all sources."""

    def __init__(self, prog: str = "meshagent", description: str = ""):
        self.prog = prog
        self.description = description
        self.options: dict[str, Option] = {}
        self.groups: dict[str, OptionGroup] = {}
        self._core = self.getgroup(CORE_GROUP, "agent options", prefix=None)

    def getgroup(self, name: str, description: str = "", *, prefix: str | None = "") -> OptionGroup:
        """The group for plugin ``name``; its options must be named ``<name>-...``."""
        if name not in self.groups:
            self.groups[name] = OptionGroup(
                self, name, description or f"plugin {name}", name if prefix == "" else prefix
            )
        return self.groups[name]

    def addoption(self, name: str, **kwargs: Any) -> Option:
        """A core option (no prefix)."""
        return self._core.addoption(name, **kwargs)

    def argparser(self, *, add_help: bool = True) -> argparse.ArgumentParser:
        ap = _ArgumentParser(
            prog=self.prog, description=self.description, add_help=add_help, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for group in self.groups.values():
            options = [o for o in self.options.values() if o.group == group.name]
            if not options:
                continue
            ag = ap.add_argument_group(group.description)
            for opt in options:
                kwargs: dict[str, Any] = dict(
                    dest=opt.dest, type=opt.type, default=argparse.SUPPRESS,
                    help=f"{opt.help} [env {opt.env}; default: {_show(opt.default)}]",
                )
                if opt.type is parse_bool:
                    kwargs.update(nargs="?", const=True, metavar="BOOL")
                if opt.choices:
                    kwargs["choices"] = opt.choices
                ag.add_argument(opt.flag, **kwargs)
        return ap

    def parse(
        self, args: Sequence[str], environ: Mapping[str, str] | None = None, *, partial: bool = False
    ) -> ParsedOptions:
        """Resolve every option. ``partial`` ignores flags of options not added yet."""
        environ = os.environ if environ is None else environ
        ap = self.argparser(add_help=not partial)
        if partial:
            namespace, _ = ap.parse_known_args(list(args))
        else:
            namespace = ap.parse_args(list(args))
        given = vars(namespace)

        config_dir, files = None, {}
        if CONFIG_DIR in self.options:
            config_dir = self._resolve(self.options[CONFIG_DIR], given, environ, {}, None)[0]
            if config_dir:
                files = read_config_dir(Path(config_dir))

        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for opt in self.options.values():
            values[opt.name], sources[opt.name] = self._resolve(opt, given, environ, files, config_dir)
        unknown = tuple(sorted(name for name in files if name not in self.options))
        return ParsedOptions(values, sources, unknown)

    @staticmethod
    def _resolve(opt, given, environ, files, config_dir) -> tuple[Any, str]:
        if opt.dest in given:
            return given[opt.dest], "flag"
        if opt.env in environ:
            source = f"env {opt.env}"
            return opt.convert(environ[opt.env], source), source
        if opt.name in files:
            source = f"config-dir {Path(config_dir) / opt.name}"
            return opt.convert(files[opt.name], source), source
        return opt.default, "default"


def read_config_dir(path: Path) -> dict[str, str]:
    """``{option name: value}`` from a ConfigMap-style directory.

    Names starting with a dot are skipped: a ConfigMap mount keeps its own ``..data`` links and
    timestamped folders there.
    """
    if not path.is_dir():
        raise UsageError(f"invalid --config-dir={str(path)!r}: not a directory")
    values = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            values[entry.name] = entry.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config-dir file {entry}: {exc}") from None
    return values


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "(none)"
    if value is None or value == "":
        return "(none)"
    return str(value).lower() if isinstance(value, bool) else str(value)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")
