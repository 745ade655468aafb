"""Writing calibrated thresholds into an edge's TOML config.

An existing file is edited in place, line by line: only ``thresholds`` and
``score`` change (thresholds mean nothing without the score they apply to),
and the user's comments, order and other keys stay as they were. A missing
file is created as a complete, commented config that ``offramp edge`` loads.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import tomllib
from pathlib import Path

from offramp.errors import OfframpError

TEMPLATE = """\
# Edge daemon settings for `offramp edge --config {name}`.
# Command-line flags override what is set here. Written by `offramp calibrate`;
# re-running it updates `thresholds` and `score` and leaves everything else alone.

# Checkpoint directory (relative paths are relative to this file).
checkpoint = {checkpoint}
# Local API address; port 0 picks a free port.
listen = "127.0.0.1:0"
# Clouds as HOST:PORT, tried in order: the first is the primary, the rest failover.
# Without a cloud, set offload_enabled = false (or uncertain samples are answered degraded).
cloud = []

# One threshold per edge exit, cheapest first, on the score below.
{thresholds_line}
{score_line}
# false: the last exit answers what the earlier ones did not; nothing goes upstream.
offload_enabled = true
# Block after which the edge hands over to the cloud (default: the checkpoint's).
# split_block = 4
# Run only these exits (names as `offramp eval` prints them; default: all up to the split).
# Re-run `offramp calibrate` after changing it: thresholds follow this list.
# exits = ["slvit@2", "slvit@4"]

# Codec for offloaded tokens: "int8" (4x smaller than float32), "float16" or "float32".
codec = "int8"
# Send only the k most attended patch tokens (default: all of them).
# top_k = 32
# zstd level; 0 disables compression.
zstd_level = 3

# Milliseconds a request waits for the cloud before its best exit answers (marked degraded).
deadline_ms = 1000
# Reconnection back-off after losing the cloud, doubling from initial to max.
reconnect_initial_s = 0.1
reconnect_max_s = 5.0
connect_timeout_s = 5.0
# gRPC message limit in MiB, on the local API and towards the cloud.
max_message_mb = 64

device = "cpu"
dtype = "float32"
# Torch threads (default: one per core); 1 keeps latency steady on a CPU shared with busy work.
# threads = 1
# Samples run together when requests queue up (an idle edge never waits).
max_batch = 16
# Prometheus /metrics port (0 picks one); unset disables metrics.
# metrics_port = 9100
# Seconds a draining edge gives in-flight requests on SIGTERM.
grace_s = 5.0
log_level = "INFO"
"""


def toml_float(value: float) -> str:
    """A TOML float: ``repr`` round-trips exactly, and TOML spells infinities as Python does."""
    return repr(float(value))


def thresholds_line(thresholds: tuple[float, ...]) -> str:
    return f"thresholds = [{', '.join(toml_float(t) for t in thresholds)}]"


def write_thresholds(path: str | Path, checkpoint: str | Path, thresholds: tuple[float, ...], score: str) -> bool:
    """Set ``thresholds`` and ``score`` in the edge config at ``path``; True if the file was created."""
    path = Path(path)
    lines = {"thresholds": thresholds_line(thresholds), "score": f'score = "{score}"'}
    check_checkpoint(path, checkpoint)
    if path.exists():
        text = path.read_text()
        for key, line in lines.items():
            text = _set_key(text, key, line)
        created = False
    else:
        checkpoint_rel = os.path.relpath(Path(checkpoint).resolve(), path.resolve().parent)
        text = TEMPLATE.format(name=path.name, checkpoint=json.dumps(checkpoint_rel),
                               thresholds_line=lines["thresholds"], score_line=lines["score"])
        created = True
    parsed = tomllib.loads(text)  # never write a file the edge cannot read
    if parsed.get("thresholds") != list(thresholds) or parsed.get("score") != score:
        raise OfframpError(f"could not update {path}: keep thresholds and score as top-level keys")
    _atomic_write(path, text)
    return created


def _set_key(text: str, key: str, line: str) -> str:
    """Replace the top-level ``key = ...`` (arrays may span lines), or add it before the first table."""
    pattern = re.compile(rf"^{key}\s*=\s*(\[[^\]]*\]|[^\n]*)[^\n]*$", re.M)
    if pattern.search(text):
        return pattern.sub(lambda _: line, text, count=1)
    table = re.search(r"^\[", text, re.M)
    at = table.start() if table else len(text)
    prefix = text[:at] if not text[:at] or text[:at].endswith("\n") else text[:at] + "\n"
    return prefix + line + "\n" + text[at:]


def check_checkpoint(path: str | Path, checkpoint: str | Path) -> None:
    """Refuse to touch an existing edge config that serves another checkpoint."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        named = tomllib.loads(path.read_text()).get("checkpoint")
    except tomllib.TOMLDecodeError as e:
        raise OfframpError(f"{path} is not valid TOML: {e}") from None
    if named is not None and (path.parent / named).resolve() != Path(checkpoint).resolve():
        raise OfframpError(f"{path} configures checkpoint '{named}', not '{checkpoint}': thresholds calibrated for "
                           "one model are meaningless for another (pass another --out)")


def _atomic_write(path: Path, text: str) -> None:
    """Write beside the target and rename, so a running edge never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
