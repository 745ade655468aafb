"""The edge half exported to ONNX: parity with PyTorch, the edge daemon on onnxruntime end to end, and the errors."""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort
import pytest
import torch
from helpers import LoopThread, edge_servers, wait_for

from edge_node.server import EdgeServer
from offramp.core.checkpoint import load_checkpoint, read_card, save_checkpoint
from offramp.cli import main
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.exit_rule import never_leave
from offramp.core.onnx_edge import MANIFEST, OnnxEdgeHalf, parity, read_manifest
from offramp.core.data.card_data import load_validation
from offramp.core.scores import confidence
from offramp.core.halves import EdgeHalf
from offramp.core.wire import pb, pb_grpc

EDGE_TEST_SETTINGS: dict[str, Any] = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.5, "grace_s": 2.0}
NEVER = never_leave("max_prob")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's edge half (exits at blocks 2 and 4, split after 4), exported by the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "edge"
    assert main(["export", str(tiny_checkpoint), "--onnx", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint: Path) -> torch.Tensor:
    val, _ = load_validation(read_card(tiny_checkpoint))
    return val.tensors[0]


@pytest.fixture(scope="module")
def halves(tiny_checkpoint: Path, exported: Path) -> tuple[EdgeHalf, OnnxEdgeHalf]:
    model, card = load_checkpoint(tiny_checkpoint)
    return EdgeHalf(model, card.split_block), OnnxEdgeHalf(exported, card, threads=1)


def test_export_writes_graphs_card_and_manifest(exported: Path, tiny_checkpoint: Path) -> None:
    card = read_card(tiny_checkpoint)
    manifest = read_manifest(exported)
    assert read_card(exported).fingerprint == manifest.fingerprint == card.fingerprint
    assert [(g.start, g.stop) for g in manifest.segments] == [(None, 2), (2, 3), (3, 4)]  # 3: top-k's attention
    assert [g.exit for g in manifest.exits] == ["slvit@2", "slvit@4"] and manifest.split_attention is not None
    assert manifest.max_abs_diff <= 1e-4
    for graph in manifest.graphs:  # every graph takes any batch
        (batch, *_), = (i.shape for i in ort.InferenceSession(exported / graph.file).get_inputs())
        assert isinstance(batch, str) or batch is None, graph.file


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_within_1e4(halves: tuple[EdgeHalf, OnnxEdgeHalf], inputs: torch.Tensor,
                                                batch: int) -> None:
    eager, onnx = halves
    x = inputs[:batch]
    assert parity(eager, onnx, x) <= 1e-4  # each exit's output on every sample, the split tokens, top-k's scores
    # The walk itself: samples leave at either exit or go on; both runtimes decide alike.
    for thresholds in ([NEVER, NEVER], [0.0, NEVER], [0.9, 0.9]):
        a = eager.run(x, thresholds, "max_prob", with_scores=True)
        b = onnx.run(x, thresholds, "max_prob", with_scores=True)
        assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.offload, b.offload)
        torch.testing.assert_close(b.output, a.output, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.tokens, a.tokens, atol=1e-4, rtol=0)
        assert (a.scores is None) == (b.scores is None)
        if a.scores is not None:
            torch.testing.assert_close(b.scores, a.scores, atol=1e-4, rtol=0)
    # An edge running a subset of the exported exits chains the segments between its own stops.
    subset = OnnxEdgeHalf(onnx.directory, read_card(onnx.directory), exits=["slvit@4"], threads=1)
    a = EdgeHalf(eager.model, eager.split_block, exits=["slvit@4"]).run(x, [NEVER], "max_prob")
    b = subset.run(x, [NEVER], "max_prob")
    torch.testing.assert_close(b.output, a.output, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.tokens, a.tokens, atol=1e-4, rtol=0)


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    with edge_servers(loop, tiny_checkpoint, EDGE_TEST_SETTINGS) as start:
        yield start


def tensor_requests(x: torch.Tensor) -> Iterator[pb.InferRequest]:
    return (pb.InferRequest(request_id=i, tensor=pb.RawTensor(shape=list(s.shape), data=s.numpy().tobytes()))
            for i, s in enumerate(x))


def answers(address: str, x: torch.Tensor) -> list[pb.InferReply]:
    with grpc.insecure_channel(address) as channel:
        replies = pb_grpc.EdgeStub(channel).InferStream(tensor_requests(x), timeout=30)
        return sorted(replies, key=lambda r: r.request_id)


def splitting_threshold(half: EdgeHalf, x: torch.Tensor) -> float:
    """A threshold that lets about half of ``x`` leave at the first exit, halfway between two confidences
    (so a rounding difference between runtimes cannot move a sample across it)."""
    with torch.no_grad():
        c = confidence(half.exit_output(0, half.advance(x, None, half.exit_configs[0].position), None), "max_prob")
    low, high = c.sort().values[len(c) // 2 - 1:len(c) // 2 + 1].tolist()
    return (low + high) / 2


def test_edge_on_onnxruntime_answers_like_the_pytorch_edge(
        cloud: tuple[str, Any], start_edge: Callable[..., EdgeServer], exported: Path, inputs: torch.Tensor,
        halves: tuple[EdgeHalf, OnnxEdgeHalf]) -> None:
    address, _ = cloud
    x = inputs[:24]
    thresholds = (splitting_threshold(halves[0], x), NEVER)  # half leave at the first exit, the rest go on
    policy = {"cloud": (address,), "thresholds": thresholds, "codec": "float32", "top_k": 8}
    onnx = start_edge(runtime="onnxruntime", onnx_dir=str(exported), **policy)
    eager = start_edge(**policy)
    for edge in (onnx, eager):
        wait_for(lambda: edge.engine.offload.connected_to == address, 10, what="the edge to pair with the cloud")
    assert type(onnx.engine.half) is OnnxEdgeHalf
    got, want = answers(onnx.address, x), answers(eager.address, x)
    assert [r.request_id for r in got] == list(range(len(x)))
    assert not any(r.degraded or r.status.code for r in got)
    assert [(r.decided_by, r.prediction) for r in got] == [(r.decided_by, r.prediction) for r in want]
    assert {r.decided_by for r in got} >= {"cloud", "exit:slvit@2"}  # both paths taken, top-k tokens offloaded
    torch.testing.assert_close(torch.tensor([list(r.output) for r in got]),
                               torch.tensor([list(r.output) for r in want]), atol=1e-4, rtol=0)


def test_edge_cli_runs_the_export(cloud: tuple[str, Any], tiny_checkpoint: Path, exported: Path,
                                  inputs: torch.Tensor) -> None:
    address, _ = cloud
    with DaemonProcess("edge", ["--checkpoint", str(tiny_checkpoint), "--runtime", "onnxruntime", "--onnx-dir",
                                str(exported), "--cloud", address, "--thresholds", "inf,inf"]) as edge:
        wait_for(lambda: all(r.decided_by == "cloud" for r in answers(edge.address, inputs[:2])), 20,
                 what="the edge to offload to the cloud", process=edge.proc)
        assert edge.stop() == 0


def user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``offramp ARGS`` prints when it exits with status 2."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offramp: error: ") and "\n" not in err, err
    return err


def test_bad_runtime_settings_are_one_line_errors(tiny_checkpoint: Path, exported: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    edge = ["edge", "--checkpoint", str(tiny_checkpoint)]
    onnx = [*edge, "--runtime", "onnxruntime"]
    assert "runtime onnxruntime needs onnx_dir" in user_error(onnx, capsys)
    assert "onnx_dir is read by runtime onnxruntime only" in user_error([*edge, "--onnx-dir", str(exported)], capsys)
    assert "dtype float32" in user_error([*onnx, "--onnx-dir", str(exported), "--dtype", "bfloat16"], capsys)
    assert "does not exist" in user_error([*onnx, "--onnx-dir", str(tmp_path / "missing")], capsys)
    assert f"{MANIFEST} is missing" in user_error([*onnx, "--onnx-dir", str(tiny_checkpoint)], capsys)
    assert "splits after block 4, not 2" in user_error([*onnx, "--onnx-dir", str(exported), "--split-block", "2"],
                                                       capsys)

    # An export made from another checkpoint: same architecture, other weights.
    model, card = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        next(model.exits[0].parameters()).add_(1.0)
    other = tmp_path / "other"
    save_checkpoint(other, model, card)
    err = user_error(["edge", "--checkpoint", str(other), "--runtime", "onnxruntime", "--onnx-dir", str(exported)],
                     capsys)
    assert "was made from another checkpoint" in err

    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    graph = tampered / "exit1.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    assert "exit1.onnx was modified since the export" in user_error([*onnx, "--onnx-dir", str(tampered)], capsys)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert "needs the onnxruntime package" in user_error([*onnx, "--onnx-dir", str(exported)], capsys)


def test_bad_exports_are_one_line_errors(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "refusing to write into it" in user_error(["export", str(tiny_checkpoint), "--onnx", str(busy)], capsys)
    assert "does not exist" in user_error(["export", str(tmp_path / "nope"), "--onnx", str(tmp_path / "o")], capsys)
    manifest = tmp_path / "broken"
    manifest.mkdir()
    (manifest / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(Exception, match="unsupported format_version 99"):
        read_manifest(manifest)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert "needs the onnx extra" in user_error(["export", str(tiny_checkpoint), "--onnx", str(tmp_path / "o")],
                                                capsys)
    with pytest.raises(SystemExit) as exited:  # --onnx is required: argparse's usage error, status 2
        main(["export", str(tiny_checkpoint)])
    assert exited.value.code == 2


def test_audiovisual_models_are_not_exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from offramp.core.checkpoint import Card
    from offramp.core.models import AudioConfig, ModelConfig, MultiExitModel, parse_exits

    config = ModelConfig("vit_micro_32", (32, 32), 3, 1, task="regression", exits=parse_exits("slvit@2:fused"),
                         audio=AudioConfig((1, 64, 64), fuse_at=2))
    save_checkpoint(tmp_path / "av", MultiExitModel(config), Card(config, [], "image", (3, 32, 32), 2))
    assert "audiovisual" in user_error(["export", str(tmp_path / "av"), "--onnx", str(tmp_path / "o")], capsys)


def test_bench_records_batch1_latency_of_both_runtimes(tiny_checkpoint: Path, exported: Path, tmp_path: Path) -> None:
    from bench import onnx_edge

    out = tmp_path / "onnx_edge.json"
    assert onnx_edge.main(["--checkpoint", str(tiny_checkpoint), "--onnx", str(exported), "--rounds", "2",
                           "--seconds", "0.05", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == 1 and result["max_abs_diff"] <= 1e-4 and result["machine"]["threads"] == 1
    rows = {(r["runtime"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {(runtime, path) for runtime in ("pytorch eager", "onnxruntime")
                         for path in ("all exits", "first exit")}
    assert all(r["calls"] > 0 and r["latency_ms"]["p50"] > 0 for r in rows.values())


def test_the_edge_only_baseline_runs_the_whole_model_on_onnxruntime(tiny_checkpoint: Path, tmp_path: Path,
                                                                     exported: Path, inputs: torch.Tensor) -> None:
    """Edges on onnxruntime are compared with an edge-only baseline on the same runtime: the whole model
    exported, its head PyTorch's; the same answers as the PyTorch model."""
    from offramp.core.errors import OfframpError
    from orchestrator.baselines import FullModelServer
    from orchestrator.config import load_experiment

    model, _ = load_checkpoint(tiny_checkpoint)
    blocks = model.backbone.num_blocks
    assert main(["export", str(tiny_checkpoint), "--onnx", str(tmp_path / "full"), "--split-block", str(blocks)]) == 0
    onnx = FullModelServer(str(tiny_checkpoint), "edge", onnx_dir=str(tmp_path / "full"))
    torch_only = FullModelServer(str(tiny_checkpoint), "edge")
    assert (onnx._run_model(inputs, None) - torch_only._run_model(inputs, None)).abs().max() < 1e-4
    with pytest.raises(OfframpError, match="splits after block"):  # an edge half is not the whole model
        FullModelServer(str(tiny_checkpoint), "edge", onnx_dir=str(exported))
    experiment = tmp_path / "e.toml"
    experiment.write_text(f'checkpoint = "{tiny_checkpoint}"\n[edge]\nruntime = "onnxruntime"\nonnx_dir = "x"\n'
                          '[baselines]\nrun = ["edge_only"]\n')
    with pytest.raises(OfframpError, match="edge-only baseline needs baselines.edge_onnx_dir"):
        load_experiment(experiment)


def test_no_split_attention_where_the_block_before_the_split_reads_a_conv_map() -> None:
    """A staged hybrid's first transformer block reads its tokenizer's conv map (no class token yet): an export
    split right after it has no attention graph; one block later it has."""
    from offramp.core.models import ModelConfig, MultiExitModel
    from offramp.core.onnx_edge import _has_split_attention

    model = MultiExitModel(ModelConfig(backbone="edge_c10", img_size=(32, 32), in_chans=3, num_classes=10))
    assert not _has_split_attention(EdgeHalf(model, 5)) and _has_split_attention(EdgeHalf(model, 6))
