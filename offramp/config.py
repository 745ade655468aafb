"""Daemon configuration: frozen dataclasses, read from TOML, with command-line flags on top.

Each daemon's settings are one frozen dataclass whose defaults say why they
are what they are. ``load_config`` reads a flat TOML table into it, checks
every key and type against the dataclass's annotations (so a typo or a
quoted number fails at start-up, naming the key and the file, instead of
deep inside the server), then applies the flags the user gave.

Relative paths in a file (fields marked with ``path_field``) are taken
relative to that file, as a config that names its checkpoint beside it
expects; paths from flags stay relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import OfframpError

__all__ = ["CloudConfig", "EdgeConfig", "load_config", "non_defaults", "path_field"]

C = TypeVar("C")
_PATH = "offramp.path"  # field metadata key: the value is a filesystem path
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def path_field(**kwargs: Any) -> Any:
    """A dataclass field holding a path, resolved against the config file's folder."""
    return dataclasses.field(metadata={_PATH: True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    """Settings of ``offramp cloud``: what to serve, where, and how hard to batch."""

    # Checkpoint directory (written by `offramp train`) whose tail the cloud runs.
    checkpoint: str = path_field()
    # Loopback by default so a first run exposes nothing; port 0 picks a free port.
    listen: str = "127.0.0.1:0"
    # "cpu", "cuda" or "cuda:N".
    device: str = "cpu"
    # Compute precision of the tail; reduced precision only pays off on GPUs.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Samples per forward pass across all streams: larger batches raise
    # throughput until the device saturates, and bound memory.
    max_batch: int = 32
    # 0: no timer. A batch is whatever queued while the previous one ran, so an
    # idle cloud starts a lone request at once and a busy one fills batches by
    # itself. Above 0, a batch also waits this long after its first request
    # for company (worth it on GPUs, where a fuller batch costs little more).
    max_wait_ms: float = 0.0
    # Torch intra-op threads; None: one per core. On a CPU shared with other
    # daemons, 1 avoids threads waiting on each other's time slices.
    threads: int | None = None
    # Samples waiting for a batch; beyond this requests are refused with
    # RESOURCE_EXHAUSTED at once, so edges fall back instead of queueing forever.
    max_queue: int = 1024
    # Requests one stream (one edge) may have in flight; more get RESOURCE_EXHAUSTED,
    # so a single busy edge cannot fill the queue the others share.
    max_in_flight_per_stream: int = 256
    # gRPC message limit, both directions: gRPC's 4 MiB default is too small for
    # uncompressed ViT-B tokens in a batch; anything larger is refused unread.
    max_message_mb: int = 64
    # Prometheus /metrics port on the listen host; None disables it, 0 picks a free port.
    metrics_port: int | None = None
    # Seconds a draining server gives in-flight requests before cancelling them.
    grace_s: float = 10.0
    # gRPC server reflection, so grpcurl and friends can list the services.
    reflection: bool = True
    # TLS: PEM certificate chain and private key; both or neither (plaintext, for loopback and tests).
    tls_cert: str | None = path_field(default=None)
    tls_key: str | None = path_field(default=None)
    # Mutual TLS: edges must present a certificate signed by this PEM CA bundle (needs tls_cert).
    tls_client_ca: str | None = path_field(default=None)
    # File holding a bearer token edges must send ("authorization: Bearer ...") on the Offload
    # service; a file, so the secret is never on a command line. Health and reflection stay open.
    token_file: str | None = path_field(default=None)
    log_level: LogLevel = "INFO"

    def __post_init__(self) -> None:
        _check_address(self.listen, "listen")
        _require((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together")
        _require(self.tls_client_ca is None or self.tls_cert is not None,
                 "tls_client_ca (mutual TLS) needs tls_cert and tls_key: client certificates ride on TLS")
        _require(self.max_batch >= 1, "max_batch must be at least 1")
        _require(self.max_wait_ms >= 0, "max_wait_ms must not be negative")
        _require(self.threads is None or self.threads >= 1, "threads must be at least 1 (or unset for one per core)")
        _require(self.max_queue >= 1, "max_queue must be at least 1")
        _require(self.max_in_flight_per_stream >= 1, "max_in_flight_per_stream must be at least 1")
        _require(self.max_message_mb >= 1, "max_message_mb must be at least 1")
        _require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535")
        _require(self.grace_s >= 0, "grace_s must not be negative")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """``cls`` from the TOML file at ``path`` (if any), then ``overrides`` (None values are skipped).

    Raises OfframpError naming the key and where it came from for unknown
    keys, wrong types, missing required keys and values out of range.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources: list[str] = []
    if path is not None:
        where = str(path)
        sources.append(where)
        for key, value in read_toml(Path(path)).items():
            checked = _checked(key, value, fields, hints, where)
            if fields[key].metadata.get(_PATH) and not Path(checked).is_absolute():
                checked = str(Path(path).parent / checked)
            values[key] = checked
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if given:
        sources.append("the command line")
        values.update({key: _checked(key, value, fields, hints, "the command line") for key, value in given.items()})
    origin = " and ".join(sources) + ": " if sources else ""
    missing = [name for name, f in fields.items() if name not in values and _default(f) is dataclasses.MISSING]
    if missing:
        raise OfframpError(f"{origin}missing required setting(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except ValueError as e:
        raise OfframpError(f"{origin}{e}") from None


def non_defaults(config: Any) -> dict[str, Any]:
    """Settings that differ from their defaults (required ones included), for the start-up log."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if _default(f) is dataclasses.MISSING or getattr(config, f.name) != _default(f)
    }


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """The table in a TOML file; a missing, unreadable or malformed file is one ``OfframpError`` naming it."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise OfframpError(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OfframpError(f"cannot read {what} '{path}': {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise OfframpError(f"{path} is not valid TOML: {e}") from None


class _Mismatch(Exception):
    """A value that does not fit its annotation (turned into an OfframpError by the caller)."""


def _checked(
    key: str, value: Any, fields: Mapping[str, dataclasses.Field], hints: Mapping[str, Any], where: str
) -> Any:
    """``value`` for setting ``key``, converted to its annotated type, or an OfframpError naming both and ``where``."""
    if key not in fields:
        raise OfframpError(f"{where}: unknown setting '{key}' (known: {', '.join(fields)})")
    try:
        return _convert(value, hints[key])
    except _Mismatch:
        raise OfframpError(
            f"{where}: '{key}' must be {_describe(hints[key])}, not {type(value).__name__} {value!r}"
        ) from None


def _convert(value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp``: ints widen to floats, lists become tuples where asked.

    Handles what TOML and flags produce: bool, int, float, str, ``X | None``,
    ``Literal[...]``, ``list[X]`` and ``tuple[X, ...]``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _Mismatch
    if origin in (list, tuple):  # list[X] or tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = [_convert(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Mismatch


_NOUNS: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
    bool: ("true or false", "booleans"),
}


def _describe(tp: Any, plural: bool = False) -> str:
    """``tp`` in words, for error messages: 'an integer', 'a list of strings', "one of 'a', 'b'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args if a is not type(None))
    if origin is Literal:
        return ("any of " if plural else "one of ") + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return "a list of " + _describe(args[0], plural=True)
    single, many = _NOUNS.get(tp, (str(tp), str(tp)))
    return many if plural else single


@dataclasses.dataclass(frozen=True)
class EdgeConfig:
    """Settings of ``offramp edge``: the model half it runs, when it asks the cloud, and which cloud."""

    # Checkpoint directory (written by `offramp train`); the edge runs its first blocks and exits.
    checkpoint: str = path_field()
    # Loopback by default: the local API is for applications on the same device.
    listen: str = "127.0.0.1:0"
    # Clouds as HOST:PORT, tried in order: the first is the primary, the rest
    # are failover. For an edge without a cloud, set offload_enabled = false:
    # otherwise samples no exit is sure of are answered degraded.
    cloud: tuple[str, ...] = ()
    # One confidence threshold per edge exit, cheapest first. None: a cautious
    # default per score (0.9 for max_prob) until `offramp calibrate` picks some.
    thresholds: tuple[float, ...] | None = None
    # max_prob, entropy or margin (classification), std (regression); None: the task's default.
    score: Literal["max_prob", "entropy", "margin", "std"] | None = None
    # False: the last exit answers whatever the earlier ones did not, and nothing goes upstream.
    offload_enabled: bool = True
    # Block after which the edge hands over; None: the card's. The cloud must resume there too.
    split_block: int | None = None
    # Exits the edge runs, by name ("slvit@2"), when the checkpoint holds more
    # than are worth running (e.g. several exit types per position); None: all
    # exits up to the split. `thresholds` has one value per exit run.
    exits: tuple[str, ...] | None = None
    # Offloaded tokens: int8 (per-token scale) is 4x smaller than float32 for
    # almost no accuracy; float16 halves them; float32 is lossless.
    codec: Literal["int8", "float16", "float32"] = "int8"
    # Send only the k patch tokens the class token attends to most; None sends all.
    top_k: int | None = None
    # zstd level; 0 disables compression (for links faster than the compressor).
    zstd_level: int = 3
    # How long a request waits for the cloud before its best exit answers (degraded).
    deadline_ms: int = 1000
    # Back-off between reconnection rounds: starts short so a blip costs little,
    # doubles up to the maximum so a dead cloud is not hammered.
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = 5.0
    # How long the edge waits for a cloud's Describe answer before trying the next one.
    connect_timeout_s: float = 5.0
    # TLS towards the clouds: the PEM CA bundle that signed their certificates (setting it turns
    # TLS on), and for mutual TLS this edge's own certificate chain and key.
    cloud_tls_ca: str | None = path_field(default=None)
    cloud_tls_cert: str | None = path_field(default=None)
    cloud_tls_key: str | None = path_field(default=None)
    # Name to check the cloud's certificate against when it differs from the address's host.
    cloud_tls_server_name: str | None = None
    # File holding the bearer token the clouds expect (see the cloud's token_file).
    cloud_token_file: str | None = path_field(default=None)
    # gRPC message limit, both on the local API (encoded files) and towards the cloud.
    max_message_mb: int = 64
    # "cpu", "cuda" or "cuda:N"; edge devices are usually CPUs.
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Torch intra-op threads; None: one per core. Set 1 when the CPU is shared
    # with other busy work: every parallel op then waits for all its threads to
    # get a time slice, which can cost more than the parallelism gains.
    threads: int | None = None
    # Samples run together when requests queue up; an idle edge never waits to fill a batch.
    max_batch: int = 16
    # Emulate a device this many times slower than this CPU: each local batch's
    # compute and encoding is followed by a sleep of (slowdown - 1) x its duration.
    slowdown: float = 1.0
    # Prometheus /metrics port on the listen host; None disables it, 0 picks a free port.
    metrics_port: int | None = None
    # Seconds a draining edge gives in-flight requests (offloads included) before cancelling them.
    grace_s: float = 5.0
    log_level: LogLevel = "INFO"

    def __post_init__(self) -> None:
        _check_address(self.listen, "listen")
        for address in self.cloud:
            _check_address(address, "cloud")
        _require(self.split_block is None or self.split_block >= 0, "split_block must not be negative")
        _require(self.top_k is None or self.top_k >= 1, "top_k must be at least 1 (or unset to send every token)")
        _require(self.zstd_level >= 0, "zstd_level must not be negative")
        _require(self.deadline_ms >= 1, "deadline_ms must be at least 1")
        _require(0 < self.reconnect_initial_s <= self.reconnect_max_s,
                 "reconnect_initial_s must be positive and at most reconnect_max_s")
        _require(self.connect_timeout_s > 0, "connect_timeout_s must be positive")
        _require((self.cloud_tls_cert is None) == (self.cloud_tls_key is None),
                 "cloud_tls_cert and cloud_tls_key go together")
        _require(self.cloud_tls_ca is not None or (self.cloud_tls_cert is None and self.cloud_tls_server_name is None),
                 "cloud_tls_cert and cloud_tls_server_name need cloud_tls_ca (they only mean something over TLS)")
        _require(self.max_message_mb >= 1, "max_message_mb must be at least 1")
        _require(self.max_batch >= 1, "max_batch must be at least 1")
        _require(self.slowdown >= 1.0, f"slowdown must be at least 1, not {self.slowdown}")
        _require(self.threads is None or self.threads >= 1, "threads must be at least 1 (or unset for one per core)")
        _require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535")
        _require(self.grace_s >= 0, "grace_s must not be negative")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20


def _check_address(address: str, key: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{key} must be HOST:PORT, not {address!r}")
