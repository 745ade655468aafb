"""Writing calibrated thresholds into an edge's TOML config.

An existing file is edited in place with tomlkit, which keeps the user's
comments, order, layout and other keys as they were: only ``thresholds`` and
``score`` change (thresholds mean nothing without the score they apply to). A missing
file is created as a complete config, each setting under its help as in
``EdgeConfig``, that ``offramp edge`` loads. The calibration table of the
split calibrated (``[[calibration]]``, for ``latency_slo_ms``) goes at the
end, replacing the one of the same split; tables of other splits stay. So does
the input route's calibration (``[input_route]``), where it was measured.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import tomlkit

from offramp.serving.config import CalibrationTable, EdgeConfig, InputRouteCalibration
from offramp.serving.config_text import commented_toml, toml_value
from offramp.core.errors import OfframpError

if TYPE_CHECKING:
    from offramp.training.calibrate import Calibration, Target

HEADER = """\
Edge daemon settings for `offramp edge --config {name}`.
Command-line flags override what is set here; relative paths are relative to this file.
Written by `offramp calibrate`: re-running it updates `thresholds`, `score` and the [[calibration]] table of the
split and leaves everything else alone."""


def calibrate_into(path: str | Path, checkpoint: str | Path, target: Target, score: str | None = None,
                   data: str | None = None, on: str = "validation", input_quality: int | None = None
                   ) -> tuple[Calibration, InputRouteCalibration | None, bool]:
    """Calibrate ``checkpoint``'s edge exits and write the thresholds into the edge config at ``path``; with
    ``input_quality``, the input route too (images as JPEG at that quality).

    Returns the calibration, the input route's, and whether the file was created.
    """
    from offramp.training.calibrate import calibrate_checkpoint, calibrate_input_route

    check_checkpoint(path, checkpoint)  # before the evaluation, not after it
    result = calibrate_checkpoint(checkpoint, target, score=score, data=data, edge_toml=path, on=on)
    route = None if input_quality is None else calibrate_input_route(checkpoint, input_quality, data=data, on=on)
    return result, route, write_thresholds(path, checkpoint, result.chosen.thresholds, result.score, result.tables,
                                           route)


def write_thresholds(path: str | Path, checkpoint: str | Path, thresholds: tuple[float, ...], score: str,
                     tables: tuple[CalibrationTable, ...] = (), input_route: InputRouteCalibration | None = None
                     ) -> bool:
    """Set ``thresholds`` and ``score`` (and calibration ``tables``, and the ``input_route``'s) in the edge
    config at ``path``; True if the file was created."""
    path, thresholds = Path(path), tuple(float(t) for t in thresholds)  # numpy scalars are not TOML
    check_checkpoint(path, checkpoint)
    if path.exists():
        text, created = _edited(path.read_text(), thresholds, score, tables, input_route is not None), False
    else:
        checkpoint_rel = os.path.relpath(Path(checkpoint).resolve(), path.resolve().parent)
        text = commented_toml(EdgeConfig, {"checkpoint": checkpoint_rel, "thresholds": thresholds, "score": score},
                              HEADER.format(name=path.name))
        text, created = _with_tables(text, tables), True
    if input_route is not None:
        text = text.rstrip("\n") + "\n\n" + input_route_text(input_route)
    parsed = tomllib.loads(text)  # never write a file the edge cannot read
    if parsed.get("thresholds") != list(thresholds) or parsed.get("score") != score:
        raise OfframpError(f"could not update {path}: keep thresholds and score as top-level keys")
    written = {t["split_block"] for t in parsed.get("calibration", []) if isinstance(t, dict)}
    if not written >= {t.split_block for t in tables}:
        raise OfframpError(f"could not update {path}: keep calibration as [[calibration]] tables")
    if input_route is not None and parsed.get("input_route", {}).get("fingerprint") != input_route.fingerprint:
        raise OfframpError(f"could not update {path}: keep the input route's calibration as an [input_route] table")
    _atomic_write(path, text)
    return created


def table_text(table: CalibrationTable) -> str:
    """One ``[[calibration]]`` table: a point per line, fewest offloads first."""
    lines = ["[[calibration]]",
             "# Operating points on the validation data, for latency_slo_ms; written by `offramp calibrate`.",
             *(f"{f.name} = {toml_value(getattr(table, f.name))}" for f in dataclasses.fields(table)
               if f.name != "points"),
             "points = [", *(f"  {toml_value(p)}," for p in table.points), "]"]
    return "\n".join(lines) + "\n"


def input_route_text(route: InputRouteCalibration) -> str:
    """The ``[input_route]`` table."""
    return "\n".join(["[input_route]", "# The input route on the same data, for latency_slo_ms; written by `offramp "
                      "calibrate --input-route`.",
                      *(f"{f.name} = {toml_value(getattr(route, f.name))}" for f in dataclasses.fields(route))]) + "\n"


def _edited(text: str, thresholds: tuple[float, ...], score: str, tables: tuple[CalibrationTable, ...],
            new_input_route: bool = False) -> str:
    """``text`` with the new thresholds and score, each of ``tables`` replacing its split's table, and without
    its input route's table where a new one comes."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as e:
        raise OfframpError(f"the edge config is not valid TOML: {e}") from None
    doc["thresholds"] = list(thresholds)
    doc["score"] = score
    if new_input_route and "input_route" in doc:
        del doc["input_route"]
    splits = {t.split_block for t in tables}
    if splits and isinstance(doc.get("calibration"), list):
        stored = doc["calibration"]
        for i in reversed(range(len(stored))):
            if isinstance(stored[i], dict) and stored[i].get("split_block") in splits:
                del stored[i]
        if not len(stored):
            del doc["calibration"]
    return _with_tables(tomlkit.dumps(doc), tables)


def _with_tables(text: str, tables: tuple[CalibrationTable, ...]) -> str:
    """``tables`` appended at the end of ``text``, one per split, as ``table_text`` writes them."""
    if not tables:
        return text
    body = text.rstrip("\n") + "\n"
    return body + "".join("\n" + table_text(t) for t in sorted(tables, key=lambda t: t.split_block))


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
