"""Rate-accuracy of what an edge can send at the split, and of sending the picture instead.

On the validation split of a checkpoint: bytes per offload and accuracy for
the token codecs (float32, int8+zstd, top-k), for learned bottlenecks at
several widths (checkpoints made with ``offramp bottleneck``), and for the
input re-encoded as JPEG at several qualities and answered by the whole model
in the cloud (the honest competitor: offloading must cost fewer bytes than
the picture, or it does not pay). For each bottleneck, what each entropy
coding step buys (raw int8 code, zstd, zstd with the dictionary the checkpoint
ships, trained on training-split codes, and the empirical entropy of the code
values, the bound a learned factorised prior would approach), and the edge's
encode time against its own compute for the sample.

    python -m bench.bottleneck --checkpoint runs/bench-exits/cifar10-hybrid --bottlenecks runs/bn/c4 runs/bn/c8
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from offramp.core.hostinfo import cpu_name
from orchestrator.codec_table import run as codec_rows
from orchestrator.loadgen import write_result
from offramp.core.checkpoint import bottleneck_id, load_checkpoint
from offramp.core.codec import DecodeLimits, decode, encode_code, zstd_dictionary
from offramp.core.exit_rule import never_leave
from offramp.core.data.card_data import load_validation
from offramp.training.plots import pyplot
from offramp.core.tables import format_table
from offramp.core.halves import CloudHalf, EdgeHalf

RESULTS = Path(__file__).parent / "results"
TIMED = 300  # samples timed one by one at batch 1 (encode, decode, edge compute)
log = logging.getLogger("bench.bottleneck")


def _ms(f: Callable[[int], object], n: int) -> float:
    """Median milliseconds of ``f(i)`` over samples 0..n-1."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        f(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def entropy_bytes(codes: np.ndarray) -> float:
    """Mean bytes per sample at the empirical entropy of each code channel's values (a factorised prior)."""
    n, tokens, channels = codes.shape
    bits = 0.0
    for c in range(channels):
        _, counts = np.unique(codes[:, :, c], return_counts=True)
        p = counts / counts.sum()
        bits += float(-(p * np.log2(p)).sum()) * tokens
    return bits / 8


def bottleneck_row(directory: str, x: torch.Tensor, y: torch.Tensor, reference_acc: float) -> dict[str, Any]:
    model, card = load_checkpoint(directory)
    split, name = card.split_block, bottleneck_id(model)
    edge, cloud = EdgeHalf(model, split), CloudHalf(model, split)
    never = [never_leave("max_prob")] * edge.num_exits
    tokens = edge.run(x, never, "max_prob").tokens
    codes = edge.to_code(tokens)  # (S, N, C) int8
    dictionary = zstd_dictionary(edge.code_dictionary)  # shipped in the checkpoint, if it has one
    messages = [encode_code(codes[i:i + 1], name, dictionary=dictionary) for i in range(len(x))]
    limits = DecodeLimits(expected_shape=(None, *cloud.code_shape))
    decoded = torch.cat([cloud.from_code(torch.from_numpy(decode(m, limits, dictionary)))
                         for m in messages])
    pred = torch.cat([cloud.run(chunk).argmax(-1) for chunk in decoded.split(256)])
    acc = float((pred == y).float().mean())

    raw = codes.numpy()
    plain = [encode_code(codes[i:i + 1], name) for i in range(len(x))]
    header = plain[0].ByteSize() - len(plain[0].payload)  # the message's fields around the payload
    coding = {
        "int8_code": float(raw[0].size) + header,
        "zstd": float(np.mean([m.ByteSize() for m in plain])),
        "zstd_dictionary": float(np.mean([m.ByteSize() for m in messages])) if dictionary is not None else None,
        "entropy_bound": entropy_bytes(raw) + header,
    }
    timed = min(TIMED, len(x))
    encode_ms = _ms(lambda i: encode_code(edge.to_code(tokens[i:i + 1]), name, dictionary=dictionary), timed)
    decode_ms = _ms(lambda i: cloud.from_code(torch.from_numpy(decode(messages[i], limits, dictionary))),
                    timed)
    edge_ms = _ms(lambda i: edge.run(x[i:i + 1], never, "max_prob"), timed)
    c = card.config.bottleneck
    return {"codec": f"bottleneck c{c.channels}b{c.bits}", "kind": "bottleneck", "checkpoint": directory, "id": name,
            "channels": c.channels, "bits": c.bits, "bytes": float(np.mean([m.ByteSize() for m in messages])),
            "accuracy": acc,
            "accuracy_change_points": 100 * (acc - reference_acc), "encode_ms": encode_ms, "decode_ms": decode_ms,
            "edge_compute_ms": edge_ms, "encode_share_of_edge_compute": encode_ms / edge_ms,
            "entropy_coding_bytes": coding, "mean_abs_code": float(np.abs(raw).mean()),
            "training": card.metrics.get("bottleneck", {})}


def jpeg_rows(model_dir: str, x: torch.Tensor, y: torch.Tensor, qualities: list[int],
              reference_acc: float) -> list[dict[str, Any]]:
    """The picture itself, re-encoded at each quality, answered by the whole model (cloud-only)."""
    model, _ = load_checkpoint(model_dir)
    pixels = ((x * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    rows = []
    for q in qualities:
        sizes, back = [], []
        for p in pixels:
            buf = io.BytesIO()
            Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p).save(buf, format="JPEG", quality=q)
            sizes.append(buf.tell())
            buf.seek(0)
            back.append(np.asarray(Image.open(buf)).reshape(p.shape))
        xq = torch.from_numpy(np.stack(back)).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        pred = torch.cat([model.backbone(chunk).argmax(-1) for chunk in xq.split(256)])
        acc = float((pred == y).float().mean())
        rows.append({"codec": f"JPEG q{q} (cloud-only)", "kind": "jpeg", "quality": q, "bytes": float(np.mean(sizes)),
                     "accuracy": acc, "accuracy_change_points": 100 * (acc - reference_acc)})
    return rows


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.bottleneck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-hybrid",
                    help="the model without a bottleneck (token codecs and the JPEG rows run on it)")
    ap.add_argument("--bottlenecks", nargs="*", default=[], metavar="DIR",
                    help="checkpoints made from it with 'offramp bottleneck'")
    ap.add_argument("--samples", type=int, default=0, help="validation samples (default: all)")
    ap.add_argument("--jpeg-qualities", default="10,30,50,70,90")
    ap.add_argument("--out", default=str(RESULTS / "bottleneck.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    base, card = load_checkpoint(args.checkpoint)
    val, _ = load_validation(card)
    samples = args.samples or len(val)
    x, y = val.tensors[0][:samples], val.tensors[1][:samples]
    log.info("token codecs on %d samples", samples)
    codecs = codec_rows(args.checkpoint, samples)
    reference = codecs["float32_accuracy"]
    rows = [{**r, "kind": "tokens", "bytes": r["bytes"]} for r in codecs["rows"]]
    for directory in args.bottlenecks:
        log.info("bottleneck %s", directory)
        rows.append(bottleneck_row(directory, x, y, reference))
    log.info("JPEG")
    rows += jpeg_rows(args.checkpoint, x, y, [int(q) for q in args.jpeg_qualities.split(",")], reference)
    jpeg90 = codecs["jpeg_bytes"]
    for r in rows:
        r["vs_jpeg_q90"] = r["bytes"] / jpeg90
    within = [r for r in rows if r["kind"] != "jpeg" and -r["accuracy_change_points"] <= 1.0]
    cheapest = min(within, key=lambda r: r["bytes"])
    best = {"setting": cheapest["codec"], "bytes_per_offload": cheapest["bytes"], "jpeg_q90_bytes": jpeg90,
            "accuracy_loss_points": -cheapest["accuracy_change_points"],
            "encode_ms": cheapest["encode_ms"], "edge_compute_ms": cheapest.get("edge_compute_ms"),
            "x_below_jpeg_q90": jpeg90 / cheapest["bytes"]}
    print(f"{samples} validation samples of {args.checkpoint}; float32 tokens {100 * reference:.2f}%, "
          f"input JPEG q90 {jpeg90:.0f} B")
    print(format_table(["setting", "bytes", "vs JPEG q90", "accuracy", "change (pts)", "encode ms", "decode ms"],
                       [[r["codec"], round(r["bytes"]), r["vs_jpeg_q90"], r["accuracy"], r["accuracy_change_points"],
                         r.get("encode_ms", "-"), r.get("decode_ms", "-")] for r in rows]))
    bn = [r for r in rows if r["kind"] == "bottleneck"]
    if bn:
        print("\nentropy coding of the codes (bytes per offload) and the encoder's cost")
        print(format_table(["bottleneck", "int8 code", "zstd", "zstd+dictionary", "entropy bound", "mean |code|",
                            "encode ms", "edge compute ms", "share"],
                           [[r["codec"], *("-" if v is None else round(v) for v in r["entropy_coding_bytes"].values()),
                             r["mean_abs_code"],
                             r["encode_ms"], r["edge_compute_ms"], r["encode_share_of_edge_compute"]] for r in bn]))
    print(f"\nbest within 1 point: {best}")
    result = {"command": "python -m bench.bottleneck " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "wall_s": round(time.perf_counter() - start, 1), "checkpoint": args.checkpoint,
              "split_block": codecs["split_block"], "token_shape": codecs["token_shape"], "samples": samples,
              "float32_accuracy": reference, "jpeg_q90_bytes": jpeg90, "rows": rows, "best": best}
    out = write_result(result, args.out)
    plot(result, out.with_suffix(".png"))
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"tokens": ("o", "token codecs"), "bottleneck": ("s", "learned bottleneck"),
              "jpeg": ("^", "JPEG to a cloud-only model")}
    for kind, (marker, label) in styles.items():
        rows = sorted((r for r in result["rows"] if r["kind"] == kind), key=lambda r: r["bytes"])
        if not rows:
            continue
        ax.plot([r["bytes"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker, label=label,
                linestyle="-" if kind != "tokens" else "none")
        for r in rows:
            ax.annotate(r["codec"].replace(" (cloud-only)", "").replace("bottleneck ", ""),
                        (r["bytes"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(result["jpeg_q90_bytes"], color="grey", linestyle=":", label="input JPEG q90")
    ax.axhline(100 * result["float32_accuracy"] - 1, color="grey", linestyle="--", linewidth=0.8,
               label="float32 tokens - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per offload (log)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"What the edge sends: {Path(result['checkpoint']).name}, split after block {result['split_block']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
