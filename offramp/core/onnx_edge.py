"""The edge half as ONNX graphs: ``export_onnx`` writes them, ``OnnxEdgeHalf`` runs them with onnxruntime.

One graph per stage the exit walk asks for, each with a dynamic batch axis,
so samples that leave at an exit drop out and the rest go on as a smaller
batch, exactly as on PyTorch:

* segments: the stem and the blocks up to the first stop, then the blocks
  from each stop to the next; the stops are the edge's exit positions, the
  split and the block before it (whose input gives the class token's
  attention for top-k token selection);
* one graph per exit up to the split: the representation after its
  position to its output;
* the class token's attention in block ``split - 1`` (ViTs only).

Each graph is what ``EdgeHalf`` computes for that stage, traced by
``torch.onnx.export``; the walk itself (``EdgeWalk.run``) is shared, not
rewritten. Beside the graphs go the checkpoint's card and ``onnx.json``,
the manifest: the fingerprint the graphs were made from, the split, the
representation's shape, and each graph's file and SHA-256. The edge refuses
an export whose fingerprint is not its checkpoint's, or whose files changed.

Audiovisual models (audio encoder, fused exits) are not exported: they run
on the PyTorch runtime.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from offramp.core.checkpoint import CARD, Card, load_checkpoint
from offramp.core.errors import OfframpError
from offramp.core.exit_rule import never_leave
from offramp.core.models import FeatureSpec, create_backbone_depth
from offramp.core.halves import EdgeHalf, EdgeWalk

MANIFEST = "onnx.json"
FORMAT_VERSION = 1
INPUT, OUTPUT = "x", "y"
# What the export's own check allows between onnxruntime and PyTorch on random inputs (float32).
EXPORT_TOLERANCE = 1e-3
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")


@dataclass(frozen=True)
class Graph:
    """One exported graph: ``file`` computes the representation after ``stop`` blocks from the one after
    ``start`` (None: from the raw input), or exit ``exit`` from the representation after its position."""

    file: str
    sha256: str
    start: int | None = None
    stop: int | None = None
    exit: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What ``onnx.json`` says about an export."""

    fingerprint: str
    split_block: int
    spec: FeatureSpec
    segments: tuple[Graph, ...]  # in order: the first starts from the input, each next from the previous stop
    exits: tuple[Graph, ...]  # one per exit up to the split, cheapest first
    split_attention: Graph | None  # class-token attention of block split-1 (ViTs with split >= 1)
    exporter: str
    max_abs_diff: float  # onnxruntime vs PyTorch on the export's own check

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {d.get('format_version')!r}")
        spec = d["spec"]
        attention = d.get("split_attention")
        return cls(fingerprint=str(d["fingerprint"]), split_block=int(d["split_block"]),
                   spec=FeatureSpec(spec["kind"], int(spec["channels"]), tuple(spec["grid"]), int(spec["num_prefix"])),
                   segments=tuple(Graph(**g) for g in d["segments"]), exits=tuple(Graph(**g) for g in d["exits"]),
                   split_attention=None if attention is None else Graph(**attention), exporter=str(d["exporter"]),
                   max_abs_diff=float(d["max_abs_diff"]))

    @property
    def graphs(self) -> list[Graph]:
        return [*self.segments, *self.exits, *([self.split_attention] if self.split_attention else [])]


def stops(half: EdgeWalk) -> list[int]:
    """Where the exported segments end: every visual exit's position, the split, and the block before the split
    where the class token's attention is read (ViTs)."""
    positions = {half.exit_configs[i].position for i in half.exit_ids if half.exit_configs[i].uses_visual}
    positions.add(half.split_block)
    if _has_split_attention(half):
        positions.add(half.split_block - 1)
    return sorted(positions)


def _has_split_attention(half: EdgeWalk) -> bool:
    """ViTs whose block before the split reads tokens (a staged hybrid's first transformer block reads its conv
    tokenizer's map, with no class token yet); an export says whether it holds that graph."""
    if isinstance(half, OnnxEdgeHalf):
        return half.manifest.split_attention is not None
    assert isinstance(half, EdgeHalf)
    return (half.spec.kind == "tokens" and half.split_block > 0
            and half.backbone.feature_spec(half.split_block - 1).kind == "tokens")


class _Stage(nn.Module):
    """One stage of an ``EdgeHalf`` as a module of one tensor, for the exporter (``model`` holds its weights)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _import_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter is built on it)
    except ImportError as e:
        raise OfframpError(f"ONNX export needs the onnx extra (pip install 'offramp[onnx]'): {e}") from None


def export_onnx(checkpoint: str | Path, out_dir: str | Path, split_block: int | None = None,
                log: Callable[[str], None] = lambda line: None) -> Manifest:
    """Export the edge half of ``checkpoint`` (split after ``split_block``, default the card's) into ``out_dir``,
    check every graph against PyTorch with onnxruntime, and write the manifest last (an export without one is
    refused by the edge)."""
    _import_exporter()
    model, card = load_checkpoint(checkpoint)
    split = card.split_block if split_block is None else split_block
    if model.audiovisual:
        raise OfframpError("ONNX export covers visual models; this one is audiovisual (an audio encoder and "
                           "audio exits): run its edge on the PyTorch runtime")
    try:
        half = EdgeHalf(model, split)
    except ValueError as e:
        raise OfframpError(f"cannot export '{checkpoint}': {e}") from None
    out = _prepare(Path(out_dir), Path(checkpoint))
    example = torch.randn(2, *card.input_shape)  # batch 2: a batch of 1 would let the tracer fix the axis
    segments, at, start = [], example, None
    for stop in stops(half):
        name, digest = _export(out, f"segment{len(segments)}.onnx",
                               _Stage(model, lambda x, a=start, b=stop: half.advance(x, a, b)), at, log)
        segments.append(Graph(name, digest, start=start, stop=stop))
        with torch.no_grad():
            at = half.advance(at, start, stop)
        start = stop
    exits = []
    for i in half.exit_ids:
        e = half.exit_configs[i]
        with torch.no_grad():
            feats = half.advance(example, None, e.position)
        name, digest = _export(out, f"exit{len(exits)}.onnx",
                               _Stage(model, lambda x, i=i: half.exit_output(i, x, None)), feats, log)
        exits.append(Graph(name, digest, exit=e.name))
    attention = None
    if _has_split_attention(half):
        with torch.no_grad():
            feats = half.advance(example, None, split - 1)
        name, digest = _export(out, "split_attention.onnx", _Stage(model, half.split_attention), feats, log)
        attention = Graph(name, digest)
    manifest = Manifest(card.fingerprint, split, half.spec, tuple(segments), tuple(exits), attention,
                        exporter=f"torch.onnx (torch {torch.__version__})", max_abs_diff=0.0)
    _write_manifest(out, manifest)  # the check below loads the export as the edge would
    diff = max(parity(half, OnnxEdgeHalf(out, card), torch.randn(b, *card.input_shape)) for b in (1, 3))
    if not diff <= EXPORT_TOLERANCE:
        (out / MANIFEST).unlink()
        raise OfframpError(f"the exported graphs differ from PyTorch by up to {diff:.3g} (more than "
                           f"{EXPORT_TOLERANCE:g}): not written")
    manifest = dataclasses.replace(manifest, max_abs_diff=diff)
    _write_manifest(out, manifest)
    return manifest


def _prepare(out: Path, checkpoint: Path) -> Path:
    """``out``, empty or holding an earlier export (whose files are removed), with the checkpoint's card in it."""
    if out.exists() and not out.is_dir():
        raise OfframpError(f"'{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise OfframpError(f"'{out}' is not empty and holds no ONNX export ({MANIFEST}): refusing to write "
                               "into it")
        try:
            old = read_manifest(out)
            for graph in old.graphs:
                (out / graph.file).unlink(missing_ok=True)
        except OfframpError:
            pass  # an unreadable manifest: its graphs are overwritten or left as they are
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint / CARD, out / CARD)
    return out


def _export(out: Path, name: str, stage: nn.Module, example: torch.Tensor,
            log: Callable[[str], None]) -> tuple[str, str]:
    """Trace ``stage`` on ``example`` into ``out/name`` with a dynamic batch axis; returns (name, SHA-256)."""
    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), _quiet(*EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's business
        torch.onnx.export(stage.eval(), (example,), str(out / name), dynamo=True, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes={"x": {0: batch}}, external_data=False,
                          optimize=True, verbose=False)
    log(f"{name}: {time.perf_counter() - started:.1f} s")
    return name, _sha256(out / name)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only warnings and errors from these loggers while the block runs (the exporter's passes log each step)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_manifest(out: Path, manifest: Manifest) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an export directory; a missing or malformed one is an ``OfframpError``."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise OfframpError(f"ONNX export directory '{directory}' does not exist (write one with 'offramp export "
                           "CHECKPOINT --onnx DIR')")
    if not path.is_file():
        raise OfframpError(f"'{directory}' is not an ONNX export: {MANIFEST} is missing (write one with "
                           "'offramp export CHECKPOINT --onnx DIR')")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise OfframpError(f"{path} is not a valid ONNX export manifest: {e}") from None


def parity(torch_half: EdgeWalk, other: EdgeWalk, x: torch.Tensor) -> float:
    """Largest difference between two edge halves on ``x``: every exit's output (on every sample) and the
    representation at the split."""
    worst = 0.0
    with torch.no_grad():
        for i in torch_half.exit_ids:
            e = torch_half.exit_configs[i]
            a = torch_half.exit_output(i, torch_half.advance(x, None, e.position), None)
            b = other.exit_output(i, other.advance(x, None, e.position), None)
            worst = max(worst, float((a - b).abs().max()))
        never = [never_leave("max_prob")] * torch_half.num_exits
        a, b = (half.run(x, never, "max_prob", with_scores=_has_split_attention(torch_half))
                for half in (torch_half, other))
        worst = max(worst, float((a.tokens - b.tokens).abs().max()))
        if a.scores is not None:
            worst = max(worst, float((a.scores - b.scores).abs().max()))
    return worst


class OnnxEdgeHalf(EdgeWalk):
    """The edge half from an export directory, run by onnxruntime on the CPU in float32.

    ``card`` is the checkpoint's (the one the edge announces to its cloud):
    the export must have been made from it. The weights are not read.
    """

    def __init__(self, directory: str | Path, card: Card, split_block: int | None = None,
                 exits: Sequence[str] | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OfframpError("runtime onnxruntime needs the onnxruntime package (pip install "
                               "'offramp[onnx]')") from None
        directory = Path(directory)
        if card.config.audio is not None:
            raise OfframpError("runtime onnxruntime runs visual models only; this one is audiovisual: run its edge "
                               "on the torch runtime")
        manifest = read_manifest(directory)
        if manifest.fingerprint != card.fingerprint:
            raise OfframpError(f"ONNX export '{directory}' was made from another checkpoint (fingerprint "
                               f"{manifest.fingerprint[:12]}, the checkpoint's is {card.fingerprint[:12]}): export "
                               "this checkpoint again")
        if split_block is not None and split_block != manifest.split_block:
            raise OfframpError(f"ONNX export '{directory}' splits after block {manifest.split_block}, not "
                               f"{split_block}: export with --split-block {split_block}")
        super().__init__(card.config, manifest.split_block, manifest.spec, torch.device("cpu"), exits)
        self.num_blocks = create_backbone_depth(card.config.backbone)
        self.directory, self.manifest = directory, manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL

        def session(graph: Graph) -> Any:
            path = directory / graph.file
            try:
                data = path.read_bytes()
            except OSError as e:
                raise OfframpError(f"ONNX export '{directory}': cannot read {graph.file}: {e.strerror}") from None
            if hashlib.sha256(data).hexdigest() != graph.sha256:
                raise OfframpError(f"ONNX export '{directory}': {graph.file} was modified since the export "
                                   "(SHA-256 mismatch)")
            try:
                return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types for unloadable graphs
                raise OfframpError(f"ONNX export '{directory}': onnxruntime cannot load {graph.file}: "
                                   f"{str(e).splitlines()[0]}") from None

        self._stops = [g.stop for g in manifest.segments]
        starts = [g.start for g in manifest.segments]
        if starts != [None, *self._stops[:-1]] or not set(stops(self)) <= set(self._stops):
            raise OfframpError(f"ONNX export '{directory}': its segments do not chain up to the stops "
                               f"{stops(self)} this edge needs")
        self._segments = [session(g) for g in manifest.segments]
        by_name = {g.exit: g for g in manifest.exits}
        missing = [n for n in self.exit_names if n not in by_name]
        if missing:
            raise OfframpError(f"ONNX export '{directory}' holds no exit {', '.join(missing)}")
        self._exits = {i: session(by_name[self.exit_configs[i].name]) for i in self.exit_ids}
        self._attention = None if manifest.split_attention is None else session(manifest.split_attention)

    def advance(self, x: torch.Tensor, start: int | None, stop: int) -> torch.Tensor:
        first = 0 if start is None else self._stops.index(start) + 1
        for k in range(first, self._stops.index(stop) + 1):
            x = _run(self._segments[k], x)
        return x

    def exit_output(self, index: int, feats: torch.Tensor | None, audio_tokens: torch.Tensor | None) -> torch.Tensor:
        return _run(self._exits[index], feats)

    def split_attention(self, feats: torch.Tensor) -> torch.Tensor:
        if self._attention is None:
            raise ValueError("this export has no class-token attention graph (top-k needs a ViT split after "
                             "block 1 or later)")
        return _run(self._attention, feats)


def _run(session: Any, x: torch.Tensor) -> torch.Tensor:
    (y,) = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.detach().to(torch.float32).numpy())})
    return torch.from_numpy(y)


__all__ = ["MANIFEST", "Manifest", "OnnxEdgeHalf", "export_onnx", "parity", "read_manifest"]
