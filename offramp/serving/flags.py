"""Command-line flags generated from a config dataclass, and the value parsers the CLIs share.

Every setting of a config (see ``offramp.serving.config.setting``) becomes one flag:
``--max-batch`` for ``max_batch``, explained by the field's help, with the
choices of a ``Literal`` and the field's default in the help. A flag the user
did not give stays None, so the config file's value or the field's default
stands. This module sits below the daemons' CLIs and imports no serving code.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from offramp.core.settings import flat_name
from offramp.serving.config import default_of, flat_settings, load_config

C = TypeVar("C")


def floats(text: str) -> list[float]:
    """Comma-separated numbers; ``inf`` and ``-inf`` mean "never" and "always" leave."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError("thresholds must be numbers, not NaN")
    return values


def ints(text: str) -> list[int]:
    """Comma-separated whole numbers (split blocks 2,4; bottleneck widths 4,8)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def exit_names(text: str) -> list[str]:
    """Comma-separated exit names, as 'offramp eval' prints them (slvit@2,slvit@4:fused)."""
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected exit names such as slvit@2,slvit@4")
    return values


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(text: str) -> bool:
    """An environment variable's yes or no: 1/true/yes/on, 0/false/no/off."""
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise argparse.ArgumentTypeError(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
    return word in _TRUE


def flag_name(f: dataclasses.Field) -> str:
    """``--max-batch`` for ``max_batch``: the setting's flat name, unless it names its flag."""
    return "--" + (f.metadata.get("flag") or flat_name(f)).replace("_", "-")


def choices(cls: type, name: str) -> list[Any]:
    """The values a ``Literal`` setting allows (``X | None`` included), for flags outside the config's own."""
    return list(typing.get_args(_required_type(typing.get_type_hints(cls)[name])))


def shown(value: Any, flag: bool = False) -> str:
    """A default as a user types it: a flag's booleans by the flag that sets them, comma-separated lists."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None,
                     with_defaults: bool = True) -> None:
    """One flag per setting of ``cls`` (or of those whose flat names are in ``names``), groups' settings
    included, but file-only ones; ``with_defaults``: say the default in the help."""
    wanted = None if names is None else set(names)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for _, f, owner in flat_settings(cls):
        if (wanted is not None and flat_name(f) not in wanted) or f.metadata.get("file_only"):
            continue
        heading = f.metadata.get("group")
        target = parser if heading is None else groups.setdefault(heading, parser.add_argument_group(heading))
        help_text = f.metadata.get("help", "")
        default = default_of(f)
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif with_defaults and default not in (None, ()):
            help_text += f" (default: {shown(default, flag=True)})"
        target.add_argument(flag_name(f), dest=flat_name(f), help=help_text.replace("%", "%%"),
                            **_argument(f, typing.get_type_hints(owner)[f.name]))


# Environment variables name a setting after its daemon: OFFRAMP_EDGE_MAX_BATCH, OFFRAMP_CLOUD_DEVICE.
ENV_PREFIXES = {"EdgeConfig": "OFFRAMP_EDGE_", "CloudConfig": "OFFRAMP_CLOUD_"}


def env_name(cls: type, f: dataclasses.Field) -> str | None:
    """The environment variable of a setting (None: the config takes none, or the setting is file-only)."""
    prefix = ENV_PREFIXES.get(cls.__name__)
    return None if prefix is None or f.metadata.get("file_only") else prefix + flat_name(f).upper()


def env_settings(cls: type, environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """The settings ``environ`` gives ``cls`` (by flat name), each read as its flag reads it (comma-separated
    lists; yes/no); an ``OFFRAMP_EDGE_*`` (``OFFRAMP_CLOUD_*``) variable naming no setting is an error, as a
    typo would be."""
    from offramp.core.errors import OfframpError

    prefix = ENV_PREFIXES.get(cls.__name__)
    if prefix is None:
        return {}
    fields = {env_name(cls, f): (f, owner) for _, f, owner in flat_settings(cls) if env_name(cls, f)}
    values: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(prefix):
            continue
        if name not in fields:
            raise OfframpError(f"unknown setting {name} in the environment (known: {', '.join(sorted(fields))})")
        f, owner = fields[name]
        kwargs = _argument(f, typing.get_type_hints(owner)[f.name])
        try:
            if kwargs.get("action") is argparse.BooleanOptionalAction:
                value: Any = boolean(text)
            elif kwargs.get("nargs") == "+":
                value = [w for w in text.replace(",", " ").split() if w]
            else:
                value = kwargs.get("type", str)(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise OfframpError(f"{name}={text!r}: {e}") from None
        if "choices" in kwargs and value not in kwargs["choices"]:
            raise OfframpError(f"{name}={text!r}: choose one of {', '.join(map(str, kwargs['choices']))}")
        values[flat_name(f)] = value
    return values


def config_from_args(cls: type[C], args: argparse.Namespace,
                     environ: typing.Mapping[str, str] | None = None) -> C:
    """``cls`` from ``--config``, then the environment (``OFFRAMP_EDGE_*``, ``OFFRAMP_CLOUD_*``), then the
    generated flags; ``-v`` asks for debug logs."""
    overrides = {flat_name(f): getattr(args, flat_name(f), None) for _, f, _ in flat_settings(cls)}  # file-only: none
    if getattr(args, "verbose", False) and "log_level" in overrides:
        overrides["log_level"] = "DEBUG"
    env = env_settings(cls, os.environ if environ is None else environ)
    return load_config(cls, args.config, overrides, env)


def _argument(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """``add_argument``'s keywords for a setting of type ``tp``."""
    tp = _required_type(tp)
    kwargs: dict[str, Any] = {}
    if typing.get_origin(tp) is Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    elif tp is bool:  # --x / --no-x, as every boolean flag of the command line
        kwargs.update(action=argparse.BooleanOptionalAction)
    elif typing.get_origin(tp) in (list, tuple):
        if f.metadata.get("words"):
            kwargs.update(nargs="+", action="extend")
        else:
            kwargs["type"] = {float: floats, int: ints}.get(typing.get_args(tp)[0], exit_names)
    elif tp in (int, float):
        kwargs["type"] = tp
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    return kwargs


def _required_type(tp: Any) -> Any:
    """``X`` for ``X | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp
