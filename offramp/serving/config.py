"""Daemon configuration: frozen dataclasses whose fields declare each setting once.

Each daemon's settings are one frozen dataclass. A field's metadata (see
``setting``) carries its help text; from it ``offramp.serving.flags`` generates the
command-line flags, ``offramp.serving.config_text`` the commented TOML file that
``offramp calibrate`` writes and the README's settings tables.

``load_config`` reads a flat TOML table into such a dataclass, checks every
key and type against the annotations (so a typo or a quoted number fails at
start-up, naming the key and the file, instead of deep inside the server),
then applies the flags the user gave. ``build`` does the same for documents
with nested tables (experiment files). Relative paths in a file (fields
declared with ``path=True``) are taken relative to that file, as a config
that names its checkpoint beside it expects; paths from flags stay relative
to the working directory.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from offramp.core.codec.names import CodecName
from offramp.core.codec.settings import CodecConfig
from offramp.core.errors import OfframpError
from offramp.core.settings import flat_name, is_group, require, setting, settings_group
from offramp.core.operating_points import CalibrationPoint, CalibrationTable, InputRouteCalibration

# The shortest interval between a peer's keepalive pings that the daemons accept (edges ping their
# cloud every ``keepalive_s``, which may not go below it).
MIN_KEEPALIVE_S = 1

__all__ = ["CalibrationPoint", "CalibrationTable", "InputRouteCalibration", "CloudConfig", "CodecName", "EdgeConfig", "build",
           "flat_settings", "load_config", "non_defaults", "read_toml", "replace_settings", "require", "setting",
           "settings_group"]

C = TypeVar("C")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Dtype = Literal["float32", "float16", "bfloat16"]


def _check_splits(splits: tuple[int, ...] | None) -> None:
    require(splits is None or len(splits) > 0, "split_blocks must name at least one block (or be unset)")
    require(splits is None or all(s >= 0 for s in splits), "split_blocks must not be negative")
    require(splits is None or len(set(splits)) == len(splits), "split_blocks lists a block twice")


def _check_address(address: str, key: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{key} must be HOST:PORT, not {address!r}")


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    """Settings of ``offramp cloud``: what to serve, where, and how hard to batch."""

    checkpoint: str = setting("Checkpoint directory (written by `offramp train`) whose tail the cloud runs.",
                              metavar="DIR", path=True, group="model")
    model_name: str | None = setting(
        "Name Open Inference Protocol clients (Triton's, KServe's) address the model by; unset: the checkpoint "
        "directory's name, as a Triton model is named after its directory in the model repository.", None,
        metavar="NAME", example="cifar10-vit", group="model")
    listen: str = setting("Address to bind, HOST:PORT. Loopback by default so a first run exposes nothing; "
                          "port 0 picks a free port.", "127.0.0.1:0", metavar="HOST:PORT", group="process")
    split_blocks: tuple[int, ...] | None = setting(
        "Split blocks whose tails the cloud serves (2,4): an edge may hand over after any of them, e.g. earlier "
        "when the link is fast and the cloud idle, later when the link is slow. Each has its own batches (tokens "
        "of different blocks never share one). Unset: the checkpoint's split block.", None, metavar="K,K",
        example=[2, 4], group="model")
    take_inputs: bool = setting(
        "Also run the whole model on inputs edges send as they are (the input route: over a fast link with a "
        "slow device, sending the picture beats computing on the edge). Their batches are their own.", True,
            group="model")
    device: str = setting('"cpu", "cuda" or "cuda:N".', "cpu", group="model")
    dtype: Dtype = setting("Compute precision of the tail; reduced precision only pays off on GPUs.", "float32",
        group="model")
    max_batch: int = setting("Samples per forward pass across all edges: larger batches raise throughput until "
                             "the device saturates, and bound memory.", 32, metavar="N", group="batching")
    max_wait_ms: float = setting(
        "0: no timer. A batch is whatever queued while the previous one ran, so an idle cloud starts a lone "
        "request at once and a busy one fills batches by itself. Above 0, a batch also waits this long after its "
        "first request for company (worth it on GPUs, where a fuller batch costs little more).", 0.0, metavar="MS",
            group="batching")
    threads: int | None = setting("Torch intra-op threads; unset: one per core. On a CPU shared with other "
                                  "daemons, 1 avoids threads waiting on each other's time slices.", None,
                                  metavar="N", example=1, group="model")
    max_queue: int = setting("Samples waiting for a batch; beyond this requests are refused with "
                             "RESOURCE_EXHAUSTED at once, so edges fall back instead of queueing forever.",
                             1024, metavar="N", group="batching")
    max_in_flight_per_stream: int = setting(
        "Requests one stream (one edge) may have in flight; more get RESOURCE_EXHAUSTED, so a single busy edge "
        "cannot fill the queue the others share.", 256, metavar="N", group="batching")
    max_message_mb: int = setting("gRPC message limit in MiB, both directions: gRPC's 4 MiB default is too small "
                                  "for uncompressed ViT-B tokens in a batch; anything larger is refused unread.",
                                  64, metavar="MIB", group="batching")
    rest_port: int | None = setting(
        "Also serve the Open Inference Protocol over HTTP/REST (KServe v2: health, metadata, infer) on this port of "
        "the listen host, feeding the same batches; 0 picks a free port; unset: gRPC only. Needs aiohttp "
        "(offramp[rest]). Workers share it.", None, metavar="PORT", example=8000, group="process")
    workers: int = setting(
        "Worker processes serving the one port, each with its own batches (the kernel spreads edge connections "
        "over them: SO_REUSEPORT). Per-request Python work, not the model, bounds one process. Each worker "
        "takes cores/workers threads unless threads is set; worker i serves metrics on metrics_port + i.",
        1, metavar="N", group="process")
    metrics_port: int | None = setting("Serve Prometheus /metrics on this port of the listen host; 0 picks a free "
                                       "port; unset: no metrics.", None, metavar="PORT", example=9100, group="process")
    grace_s: float = setting("Seconds a draining server (SIGTERM) gives in-flight requests before cancelling "
                             "them.", 10.0, metavar="S", group="process")
    reflection: bool = setting("gRPC server reflection, so grpcurl and friends can list the services.", True,
        group="process")
    tls_cert: str | None = setting("Serve TLS with this PEM certificate chain (needs tls_key); unset: plaintext, "
                                   "for loopback and tests.", None, metavar="PEM", example="cloud.pem", path=True,
                                       group="TLS and tokens")
    tls_key: str | None = setting("PEM private key of tls_cert.", None, metavar="PEM", example="cloud.key",
                                  path=True, group="TLS and tokens")
    tls_client_ca: str | None = setting("Mutual TLS: accept only edges presenting a certificate signed by this PEM "
                                        "CA bundle (needs tls_cert).", None, metavar="PEM", example="ca.pem",
                                        path=True, group="TLS and tokens")
    token_file: str | None = setting(
        'File holding a bearer token clients must send ("authorization: Bearer ...") on the Offload and '
        "inference services; a file, so the secret is never on a command line. Health and reflection stay open.",
        None, metavar="PATH", example="token", path=True, group="TLS and tokens")
    log_level: LogLevel = setting("Log verbosity (-v sets DEBUG).", "INFO", group="process")

    def __post_init__(self) -> None:
        _check_address(self.listen, "listen")
        require((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together")
        require(self.tls_client_ca is None or self.tls_cert is not None,
                "tls_client_ca (mutual TLS) needs tls_cert and tls_key: client certificates ride on TLS")
        require(self.threads is None or self.threads >= 1, "threads must be at least 1 (or unset for one per core)")
        require(self.max_batch >= 1, "max_batch must be at least 1")
        require(self.max_wait_ms >= 0, "max_wait_ms must not be negative")
        require(self.max_queue >= 1, "max_queue must be at least 1")
        require(self.max_in_flight_per_stream >= 1, "max_in_flight_per_stream must be at least 1")
        require(self.max_message_mb >= 1, "max_message_mb must be at least 1")
        require(self.rest_port is None or 0 <= self.rest_port <= 65535, "rest_port must be in 0..65535")
        require(self.workers >= 1, f"workers must be at least 1, not {self.workers}")
        require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535")
        require(not self.metrics_port or self.metrics_port + self.workers - 1 <= 65535,
                "metrics_port + workers - 1 must be a port (worker i serves metrics on metrics_port + i)")
        require(self.grace_s >= 0, "grace_s must not be negative")
        require(self.model_name is None or (self.model_name.strip() == self.model_name != ""),
                "model_name must not be empty nor start or end with spaces")
        _check_splits(self.split_blocks)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def served_model_name(self) -> str:
        """The model's name on the Open Inference Protocol: ``model_name``, else the checkpoint directory's."""
        return self.model_name or Path(self.checkpoint).resolve().name


@dataclasses.dataclass(frozen=True)
class CloudConnection:
    """How an edge keeps its streams to the clouds: back-off, pairing, keepalive, failback (``[connection]``).
    The offload client takes it as it is."""

    reconnect_initial_s: float = setting("First back-off after losing the cloud: short, so a blip costs little.",
                                         0.1, metavar="S", group="clouds")
    reconnect_max_s: float = setting("Longest back-off: it doubles up to this, so a dead cloud is not hammered.",
                                     5.0, metavar="S", group="clouds")
    connect_timeout_s: float = setting("How long the edge waits for a cloud's Describe answer before trying the "
                                       "next one.", 5.0, metavar="S", group="clouds")
    keepalive_s: float = setting("The edge pings its cloud this often: a cloud gone without closing the connection "
                                 "(power loss, a NAT that forgot the flow, a half-open peer) is noticed within "
                                 "keepalive_s + keepalive_timeout_s, not at every request's deadline.", 20.0,
                                 metavar="S", group="clouds")
    keepalive_timeout_s: float = setting("How long a keepalive ping may go unanswered before the edge gives the "
                                         "connection up and reconnects.", 10.0, metavar="S", group="clouds")
    failback_check_s: float = setting("While a secondary cloud serves, how often the edge asks the clouds listed "
                                      "before it whether they are back (it returns to the first that pairs); 0: "
                                      "stay on the secondary.", 2.0, metavar="S", group="clouds")
    probe_interval_s: float = setting(
        "How often the edge times a health check on its stream's connection: the round trip the latency "
        "controller plans with, measured even while nothing is offloaded; 0: never.", 0.5, metavar="S",
        group="clouds")

    def __post_init__(self) -> None:
        require(0 < self.reconnect_initial_s <= self.reconnect_max_s,
                "reconnect_initial_s must be positive and at most reconnect_max_s")
        require(self.connect_timeout_s > 0, "connect_timeout_s must be positive")
        require(self.keepalive_s >= MIN_KEEPALIVE_S, f"keepalive_s must be at least {MIN_KEEPALIVE_S} (clouds refuse "
                "pings more often than that)")
        require(self.keepalive_timeout_s > 0, "keepalive_timeout_s must be positive")
        require(self.failback_check_s >= 0, "failback_check_s must not be negative (0 turns failback off)")
        require(self.probe_interval_s >= 0, "probe_interval_s must not be negative (0 turns the probe off)")


@dataclasses.dataclass(frozen=True)
class CloudTLS:
    """TLS and the bearer token towards the clouds (``[cloud_tls]``); unset: plaintext, no token."""

    ca: str | None = setting("Use TLS towards the clouds, trusting this PEM CA bundle.", None, flat="cloud_tls_ca",
                             metavar="PEM", example="ca.pem", path=True, group="TLS and tokens")
    cert: str | None = setting("Mutual TLS: this edge's PEM certificate chain (needs cloud_tls_key).", None,
                               flat="cloud_tls_cert", metavar="PEM", example="edge.pem", path=True,
                               group="TLS and tokens")
    key: str | None = setting("PEM private key of cloud_tls_cert.", None, flat="cloud_tls_key", metavar="PEM",
                              example="edge.key", path=True, group="TLS and tokens")
    server_name: str | None = setting("Name to check the cloud's certificate against when it differs from the "
                                      "address's host.", None, flat="cloud_tls_server_name", metavar="NAME",
                                      example="cloud.example.org", group="TLS and tokens")
    token_file: str | None = setting("File holding the bearer token the clouds expect (see the cloud's "
                                     "token_file).", None, flat="cloud_token_file", metavar="PATH", example="token",
                                     path=True, group="TLS and tokens")

    def __post_init__(self) -> None:
        require((self.cert is None) == (self.key is None), "cloud_tls_cert and cloud_tls_key go together")
        require(self.ca is not None or (self.cert is None and self.server_name is None),
                "cloud_tls_cert and cloud_tls_server_name need cloud_tls_ca (they only mean something over TLS)")


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
    """The latency controller's target and how it is judged (``[controller]``); the edge's controller takes
    it as it is. Unset target: no controller."""

    latency_slo_ms: float | None = setting(
        "p95 latency target. Set: the edge measures its link and the cloud as it offloads and chooses, batch by "
        "batch, the calibrated thresholds of the best expected accuracy whose predicted p95 meets the target; "
        "when none does it answers locally (not degraded) and says so in its metrics. Needs the calibration "
        "table `offramp calibrate` writes; `offramp policy set` pins thresholds. Unset: thresholds stay as set.",
        None, metavar="P95_MS", example=100, group="latency controller")
    slo_window_s: float = setting(
        "How the latency target is judged: the p95 of each window this long must meet it in 95% of windows, so "
        "the controller allows fewer slow answers when a window holds few requests (at 10 per window, 0.5%). "
        "0: the p95 over all requests.", 1.0, metavar="S", group="latency controller")
    accuracy_slack_points: float = setting(
        "With latency_slo_ms: expected accuracy (points) the controller may give up for speed. Options within it "
        "of the most accurate one that meets the target count as equally good and the fastest on average "
        "(predicted mean latency; the p95 stays the constraint) is taken: "
        "calibration's accuracies carry the noise of the split they were measured on, and a route a few tenths "
        "of a point behind on paper can be several times faster (0: always the most accurate).", 0.0,
        metavar="POINTS", example=0.5, group="latency controller")

    def __post_init__(self) -> None:
        require(self.latency_slo_ms is None or self.latency_slo_ms > 0, "latency_slo_ms must be positive")
        require(self.slo_window_s >= 0, "slo_window_s must be 0 (all requests) or positive")
        require(0 <= self.accuracy_slack_points <= 100, "accuracy_slack_points must be in 0..100")


@dataclasses.dataclass(frozen=True)
class EdgeConfig:
    """Settings of ``offramp edge``: the model half it runs, when it asks the cloud, and which cloud."""

    checkpoint: str = setting("Checkpoint directory (written by `offramp train`); the edge runs its first blocks "
                              "and exits.", metavar="DIR", path=True, group="model")
    listen: str = setting("Address of the local API, HOST:PORT. Loopback by default: it is for applications on "
                          "the same device; port 0 picks a free port.", "127.0.0.1:0", metavar="HOST:PORT", group="API")
    cloud: tuple[str, ...] = setting(
        "Clouds as HOST:PORT, tried in order: the first is the primary, the rest are failover (see cloud_balance "
        "for a pool instead; there, dns:HOST:PORT stands for every address the name resolves to). For an edge "
        "without a cloud, turn offload off: otherwise samples no exit is sure of are answered degraded.",
        (), metavar="HOST:PORT", words=True, group="clouds")
    cloud_balance: Literal["failover", "least_outstanding", "round_robin"] = setting(
        "How offloads use the clouds: failover (all to the first that pairs, the others standing by), or spread "
        "over every cloud that pairs as a pool of replicas, each request to the one with the fewest requests "
        "outstanding, or to each in turn. In a pool a request whose replica is lost is sent to another within "
        "its deadline.", "failover", group="clouds")
    connection: CloudConnection = settings_group(CloudConnection, "How the edge keeps its streams to the clouds.")
    cloud_tls: CloudTLS = settings_group(CloudTLS, "TLS and the bearer token towards the clouds.")
    cloud_resolve_s: float = setting("In a pool, how often dns: names are resolved again: replicas that appear "
                                     "join, those that vanish leave.", 10.0, metavar="S", group="clouds")
    thresholds: tuple[float, ...] | None = setting(
        "One confidence threshold per edge exit, cheapest first (inf: never leave, -inf: always). Unset: a "
        "cautious default per score (0.9 for max_prob) until `offramp calibrate` picks some.", None,
        metavar="T1,T2", example=[0.9, 0.9], group="exits and offload")
    score: Literal["max_prob", "entropy", "margin", "std"] | None = setting(
        "Confidence score the thresholds apply to: max_prob, entropy or margin (classification), std "
        "(regression); unset: the task's default.", None, example="max_prob", group="exits and offload")
    offload_enabled: bool = setting("Off: the last exit answers whatever the earlier ones did not, and nothing "
                                    "goes upstream.", True, flag="offload", group="exits and offload")
    route: Literal["split", "input", "local"] | None = setting(
        "How requests are answered: split (exits on the edge, tokens to the cloud for the rest), input (every "
        "input to the cloud as it came, which runs the whole model; the exits answer only when the cloud "
        "cannot) or local (the exits answer everything). Unset: split, or with latency_slo_ms whichever route "
        "the controller predicts best; set with latency_slo_ms, the controller keeps to that route.", None,
        example="input", group="exits and offload")
    input_quality: int = setting("JPEG quality at which the input route sends images given as tensors (files go "
                                 "as they came).", 90, metavar="Q", group="exits and offload")
    split_block: int | None = setting("Block after which the edge hands over; unset: the checkpoint's. The cloud "
                                      "must resume there too.", None, metavar="K", example=4, group="model")
    split_blocks: tuple[int, ...] | None = setting(
        "Split blocks the latency controller may hand over after (2,4), split_block among them; each needs its "
        "calibration table and the clouds must serve every one. It picks per batch, as its measurements "
        "favour: an earlier split when the link is fast and the cloud idle, a later one when the link is slow. "
        "Unset: split_block alone.", None, metavar="K,K", example=[2, 4], group="model")
    exits: tuple[str, ...] | None = setting(
        "Exits the edge runs, by name (slvit@2,slvit@4), when the checkpoint holds more than are worth running "
        "(e.g. several exit types per position); unset: every exit up to the split. thresholds has one value "
        "per exit run: re-run `offramp calibrate` after changing it.", None, metavar="NAME,NAME",
        example=["slvit@2", "slvit@4"], group="model")
    codec: CodecConfig = settings_group(CodecConfig, "How the edge encodes the tokens it offloads.")
    deadline_ms: int = setting("How long a request waits for the cloud before its best exit answers (marked "
                               "degraded).", 1000, metavar="MS", group="exits and offload")
    controller: ControllerSettings = settings_group(
        ControllerSettings, "The latency controller: the target it keeps and how it judges it.")
    admin_token_file: str | None = setting(
        "File holding a bearer token the policy RPCs (GetPolicy, SetPolicy: `offramp policy`) require. Unset: "
        "open on loopback, refused (UNAUTHENTICATED) when the edge listens beyond it, since whoever sets the "
        "thresholds decides what the edge answers alone.", None, metavar="PATH", example="admin-token", path=True,
            group="API")
    max_message_mb: int = setting("gRPC message limit in MiB, on the local API (encoded files) and towards the "
                                  "cloud.", 64, metavar="MIB", group="codec")
    device: str = setting('"cpu", "cuda" or "cuda:N"; edge devices are usually CPUs.', "cpu", group="model")
    dtype: Dtype = setting("Compute precision (autocast).", "float32", group="model")
    runtime: Literal["torch", "onnxruntime"] = setting(
        "What computes the edge half: torch runs the checkpoint's PyTorch model; onnxruntime runs the graphs "
        "`offramp export CHECKPOINT --onnx DIR` wrote into onnx_dir (float32 on the CPU, visual models only; "
        "needs the onnx extra), reading only the checkpoint's card, whose fingerprint the export must carry.",
        "torch", group="model")
    onnx_dir: str | None = setting("The export directory runtime onnxruntime runs (see runtime).", None,
                                   metavar="DIR", example="edge-onnx", path=True, group="model")
    threads: int | None = setting(
        "Torch intra-op threads (onnxruntime's too, with that runtime); unset: one per core. 1 by default: an edge shares its CPU with the application, "
        "and batch-1 ops gain little from a second thread that must wait for a time slice (measured through "
        "both daemons on 2 shared cores: 9.9 ms p50 with 1 thread, 13.2 ms with 2).", 1, metavar="N", group="model")
    max_batch: int = setting("Samples run together when requests queue up; an idle edge never waits to fill a "
                             "batch.", 16, metavar="N", group="model")
    slowdown: float = setting("Emulate a device this many times slower than this CPU: each local batch's compute "
                              "and encoding is followed by a sleep, so that it lasts slowdown x its time here (its "
                              "thread's CPU time with threads = 1, so that time taken by other processes on a "
                              "shared core is not multiplied).", 1.0,
                              metavar="FACTOR", group="model")
    device_costs: str | None = setting("With slowdown: a JSON table of what each segment of the edge walk costs "
                                       "per batch size (measured at start-up and added there where it holds "
                                       "none for the edge's splits); each local batch then lasts slowdown x the cost of the work it did, "
                                       "the same in every process, instead of slowdown x this process's own CPU "
                                       "time, which differs by up to 15% between fresh processes.", None,
                                       metavar="FILE", example="device_costs.json", path=True, group="model")
    metrics_port: int | None = setting("Serve Prometheus /metrics on this port of the listen host; 0 picks a free "
                                       "port; unset: no metrics.", None, metavar="PORT", example=9100, group="API")
    grace_s: float = setting("Seconds a draining edge (SIGTERM) gives in-flight requests, offloads included, "
                             "before cancelling them.", 5.0, metavar="S", group="API")
    log_level: LogLevel = setting("Log verbosity (-v sets DEBUG).", "INFO", group="API")
    calibration: tuple[CalibrationTable, ...] = setting(
        "Operating points per split block (thresholds, expected accuracy and offload share) that `offramp "
        "calibrate` measures and writes at the end of this file as [[calibration]] tables, for latency_slo_ms.",
        (), file_only=True, group="tables")
    input_route: InputRouteCalibration | None = setting(
        "The input route's accuracy and bytes per request, which `offramp calibrate --input-route` measures and "
        "writes as an [input_route] table: with it the controller can choose to send inputs as they are.",
        None, file_only=True, group="tables")

    def __post_init__(self) -> None:
        _check_address(self.listen, "listen")
        for address in self.cloud:
            _check_address(address.removeprefix("dns:").removeprefix("///"), "cloud")
        require(self.cloud_balance != "failover" or not any(a.startswith("dns:") for a in self.cloud),
                "a dns: cloud names a pool of replicas: set cloud_balance to least_outstanding or round_robin")
        require(self.cloud_resolve_s > 0, "cloud_resolve_s must be positive")
        require(self.split_block is None or self.split_block >= 0, "split_block must not be negative")
        _check_splits(self.split_blocks)
        require(self.split_blocks is None or self.split_block is None or self.split_block in self.split_blocks,
                "split_block must be one of split_blocks")
        require(self.split_blocks is None or len(self.split_blocks) == 1 or self.controller.latency_slo_ms is not None,
                "several split_blocks need latency_slo_ms: the latency controller is what chooses among them")
        require(self.exits is None or len(self.exits) > 0, "exits must name at least one exit (or be unset)")
        require(self.deadline_ms >= 1, "deadline_ms must be at least 1")
        require(self.max_message_mb >= 1, "max_message_mb must be at least 1")
        require(self.max_batch >= 1, "max_batch must be at least 1")
        require(self.slowdown >= 1.0, f"slowdown must be at least 1, not {self.slowdown}")
        require(self.device_costs is None or self.slowdown > 1.0, "device_costs charges an emulated device: set "
                "slowdown above 1 too")
        require(self.threads is None or self.threads >= 1, "threads must be at least 1 (or unset for one per core)")
        require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port must be in 0..65535")
        require(self.grace_s >= 0, "grace_s must not be negative")
        if self.runtime == "onnxruntime":
            require(self.onnx_dir is not None, "runtime onnxruntime needs onnx_dir, the directory 'offramp export "
                    "CHECKPOINT --onnx DIR' wrote")
            require(self.device == "cpu" and self.dtype == "float32", "runtime onnxruntime runs the exported "
                    f"float32 graphs on the CPU: device must be cpu and dtype float32, not {self.device} and "
                    f"{self.dtype}")
        else:
            require(self.onnx_dir is None, "onnx_dir is read by runtime onnxruntime only: set runtime = "
                    "\"onnxruntime\" (--runtime onnxruntime) or leave onnx_dir unset")
        require(self.controller.latency_slo_ms is None or self.offload_enabled,
                "latency_slo_ms chooses how much to offload: it needs offload on")
        require(self.route not in ("split", "input") or self.offload_enabled,
                f"route {self.route} sends to the cloud: it needs offload on (or route local)")
        require(1 <= self.input_quality <= 95, "input_quality must be a JPEG quality in 1..95")
        splits = [t.split_block for t in self.calibration]
        require(len(set(splits)) == len(splits), "one calibration table per split block")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                environment: Mapping[str, Any] | None = None) -> C:
    """``cls`` from the TOML file at ``path`` (if any), then ``environment`` (settings from environment
    variables, already parsed), then ``overrides`` (None values are skipped): flags > environment > file >
    defaults.

    Raises OfframpError naming the key and where it came from for unknown
    keys, wrong types, missing required keys and values out of range.
    """
    values: dict[str, Any] = {}
    sources: list[str] = []
    if path is not None:
        path = Path(path)
        sources.append(str(path))
        _merge(values, _checked(cls, read_toml(path), str(path), path.parent))
    if environment:
        sources.append("the environment")
        _merge(values, _checked(cls, environment, "the environment", Path.cwd()))
    given = _given(overrides or {})
    if given:
        sources.append("the command line")
        _merge(values, _checked(cls, given, "the command line", None))
    return _made(cls, values, " and ".join(sources))


def _given(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that say something: None values (a flag not given) and empty groups left out."""
    given = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            value = _given(value) or None
        if value is not None:
            given[key] = value
    return given


def _merge(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    """``more`` over ``into``, group by group: a flag setting one codec setting keeps the file's others."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def flat_settings(cls: type) -> list[tuple[str | None, dataclasses.Field, type]]:
    """Every setting of ``cls`` as (its group's field name or None, the field, the class declaring it), groups
    opened in place: what flags, environment variables and the README list, one per flat name."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str | None, dataclasses.Field, type]] = []
    for f in dataclasses.fields(cls):
        if is_group(f):
            out += [(f.name, sub, hints[f.name]) for sub in dataclasses.fields(hints[f.name])]
        else:
            out.append((None, f, cls))
    return out


def flat_values(config: Any) -> dict[str, Any]:
    """``config``'s settings by flat name (``top_k``, not ``codec.top_k``)."""
    return {flat_name(f): getattr(getattr(config, group) if group else config, f.name)
            for group, f, _ in flat_settings(type(config))}


def replace_settings(config: C, **flat: Any) -> C:
    """``dataclasses.replace`` by flat names: ``replace_settings(edge, top_k=8, latency_slo_ms=100)``."""
    where = {flat_name(f): (group, f.name) for group, f, _ in flat_settings(type(config))}
    unknown = sorted(set(flat) - set(where))
    if unknown:
        raise TypeError(f"{type(config).__name__} has no setting(s) {', '.join(unknown)}")
    top = {name: v for key, v in flat.items() for group, name in [where[key]] if group is None}
    for group in {where[key][0] for key in flat} - {None}:
        changes = {where[key][1]: v for key, v in flat.items() if where[key][0] == group}
        top[group] = dataclasses.replace(getattr(config, group), **changes)
    return dataclasses.replace(config, **top)


def build(cls: type[C], table: Mapping[str, Any], where: str, base_dir: Path | None = None) -> C:
    """``cls`` from a TOML table whose nested tables fill nested dataclasses; errors name ``where`` and the key
    (``sweep.codecs[1]``). Relative paths are taken relative to ``base_dir``."""
    return _made(cls, _checked(cls, table, where, base_dir), where)


def non_defaults(config: Any) -> dict[str, Any]:
    """Settings that differ from their defaults (required ones included), by flat name: for the start-up log,
    and all a config file needs to say."""
    values = flat_values(config)
    return {flat_name(f): values[flat_name(f)] for _, f, _ in flat_settings(type(config))
            if default_of(f) is dataclasses.MISSING or values[flat_name(f)] != default_of(f)}


def default_of(f: dataclasses.Field) -> Any:
    """The field's default, or ``dataclasses.MISSING`` for a required setting."""
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


class _Invalid(Exception):
    """A key that is unknown, missing, mistyped or out of range; the message starts with its full name."""


def _checked(cls: type, table: Mapping[str, Any], where: str, base_dir: Path | None) -> dict[str, Any]:
    try:
        return _values(cls, table, "", base_dir)
    except _Invalid as e:
        raise OfframpError(f"{where}: {e}") from None


def _made(cls: type[C], values: dict[str, Any], origin: str) -> C:
    try:
        return _instance(cls, values, "")
    except _Invalid as e:
        raise OfframpError(f"{origin}: {e}" if origin else str(e)) from None


def _values(cls: type, table: Mapping[str, Any], prefix: str, base_dir: Path | None) -> dict[str, Any]:
    """Each key of ``table`` checked against ``cls``'s fields and converted to its annotated type; nested
    tables stay dicts (``_instance`` builds them), so that files, environment and flags merge group by group."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in _grouped(cls, table, prefix).items():
        name = prefix + key
        if key not in fields:
            raise _Invalid(f"unknown setting '{name}' (known: {', '.join(prefix + k for k in fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise _Invalid(f"'{name}' must be a table ([{name}])")
            value = _values(tp, value, f"{name}.", base_dir)
        else:
            value = _convert(value, tp, name)
            if fields[key].metadata.get("path") and base_dir is not None and not Path(value).is_absolute():
                value = str(base_dir / value)
        values[key] = value
    return values


def _grouped(cls: type, table: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``table`` with each top-level key that is a group's setting by its flat name (``top_k = 32``, as files
    said before the groups) moved into that group's table (``codec.top_k``)."""
    hints = typing.get_type_hints(cls)
    groups = {f.name for f in dataclasses.fields(cls) if is_group(f)}
    where = {flat_name(sub): (g, sub.name) for g in groups for sub in dataclasses.fields(hints[g])}
    out: dict[str, Any] = {}
    moved: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, value in table.items():
        if key in where and not (key in groups and isinstance(value, Mapping)):
            group, name = where[key]
            moved.setdefault(group, {})[name] = (key, value)
        else:
            out[key] = value
    for group, settings in moved.items():
        table_given = out.get(group, {})
        merged = dict(table_given) if isinstance(table_given, Mapping) else {}
        for name, (key, value) in settings.items():
            if name in merged:
                raise _Invalid(f"'{prefix}{key}' and '{prefix}{group}.{name}' are the same setting: give it once")
            merged[name] = value
        out[group] = merged
    return out


def _instance(cls: type[C], values: dict[str, Any], prefix: str) -> C:
    hints = typing.get_type_hints(cls)
    missing = [prefix + f.name for f in dataclasses.fields(cls)
               if f.name not in values and default_of(f) is dataclasses.MISSING]
    if missing:
        raise _Invalid(f"missing required setting(s) {', '.join(missing)}")
    values = {key: _instance(hints[key], value, f"{prefix}{key}.")
              if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) else value
              for key, value in values.items()}
    try:
        return cls(**values)
    except ValueError as e:  # a group's own checks name its settings by their flat names
        raise _Invalid(f"{'' if getattr(cls, '__settings_group__', False) else prefix}{e}") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``: ints widen to floats, lists become tuples where asked.

    Handles what TOML and flags produce: bool, int, float, str, ``X | None``,
    ``Literal[...]``, ``list[X]`` and ``tuple[X, ...]``; errors name ``key``
    (and the item: ``codecs[1]``).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        listed = []
        for arg in args:
            try:
                return _convert(value, arg, key)
            except _Invalid as e:
                if typing.get_origin(arg) in (list, tuple):
                    listed.append(e)
        if isinstance(value, (list, tuple)) and listed:  # the list's own error names the item that is wrong
            raise listed[0]
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, dict):
            return _instance(tp, _values(tp, value, f"{key}.", None), f"{key}.")
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Invalid(f"'{key}' must be {_describe(tp)}, not {type(value).__name__} {value!r}")


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
    if dataclasses.is_dataclass(tp):
        return "tables" if plural else "a table"
    single, many = _NOUNS.get(tp, (str(tp), str(tp)))
    return many if plural else single
