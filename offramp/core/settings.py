"""How a setting is declared: once, with what it is for, so that flags, files, environment variables and docs
can all be generated from it (``offramp.serving.flags``, ``offramp.serving.config_text``).

A daemon's config is a frozen dataclass of settings; related settings form a *group*, a dataclass of its own
that the config holds as one field (``settings_group``) and hands, as it is, to the runtime type that uses it
(the codec's settings to the codec, the controller's to the controller). Each setting keeps one *flat name*,
unique across its config: its flag (``--top-k``), its environment variable (``OFFRAMP_EDGE_TOP_K``) and the
key a config file may give at the top level (``top_k = 32``, as well as ``[codec] top_k = 32``).
"""
from __future__ import annotations

import dataclasses
from typing import Any


def setting(help: str, default: Any = dataclasses.MISSING, *, flag: str | None = None, flat: str | None = None,
            metavar: str | None = None, example: Any = None, path: bool = False, words: bool = False,
            file_only: bool = False, group: str | None = None) -> Any:
    """A config field that says what it is for.

    ``help`` explains the setting wherever it appears; ``flat``: its flat name, where a group's field name
    differs from it (the codec group's ``dtype`` is ``codec``: ``--codec``, ``OFFRAMP_EDGE_CODEC``); ``flag``
    renames its flag alone (``offload_enabled`` is ``--offload``); ``metavar`` names its value in ``--help``;
    ``example`` is written, commented out, into generated files for a setting unset by default; ``path``: a
    filesystem path, relative to the file that names it; ``words``: a list given as separate words on the
    command line (``--cloud A B``) rather than comma-separated; ``file_only``: data a tool writes into the
    file (tables), with no flag; ``group``: the heading it is listed under in ``--help`` and the README.
    """
    metadata = {"help": help, "flag": flag, "flat": flat, "metavar": metavar, "example": example, "path": path, "words": words,
                "file_only": file_only, "group": group}
    return dataclasses.field(default=default, metadata=metadata)


def settings_group(cls: type, help: str) -> Any:
    """A config field holding the group of settings ``cls`` (a frozen dataclass of ``setting`` fields), written
    ``[name]`` in a config file; its settings keep their flat names for flags and the environment (and its
    own checks' messages name them so)."""
    cls.__settings_group__ = True  # type: ignore[attr-defined]
    return dataclasses.field(default_factory=cls, metadata={"help": help, "settings_group": True})


def is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("settings_group"))


def flat_name(f: dataclasses.Field) -> str:
    """The setting's name as environment variables and top-level file keys spell it (and flags, unless
    ``flag`` renames them)."""
    return f.metadata.get("flat") or f.name


def require(condition: bool, message: str) -> None:
    """A config's own check in ``__post_init__``: the loaders turn the ValueError into a user error."""
    if not condition:
        raise ValueError(message)
