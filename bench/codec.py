"""Bytes per offload vs accuracy for each token codec, with the input's own JPEG/PNG size as yardstick
(the measurement itself is ``orchestrator.codec_table``).

    python -m bench.codec --checkpoint runs/bench-exits/cifar10-vit
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from offramp.core.tables import format_table
from orchestrator.codec_table import run

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()  # scoped: main() also runs inside test processes
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.codec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit", help="checkpoint directory")
    ap.add_argument("--samples", type=int, default=1000, help="validation samples to measure")
    ap.add_argument("--out", default=str(RESULTS / "codec.json"))
    args = ap.parse_args(argv)
    result = run(args.checkpoint, args.samples)
    print(f"{result['samples']} samples of {args.checkpoint}, split after block {result['split_block']}, "
          f"tokens {result['token_shape']}; input JPEG q90 {result['jpeg_bytes']:.0f} B, PNG {result['png_bytes']:.0f} B")
    print(format_table(["codec", "bytes", "x smaller", "vs JPEG", "encode ms", "decode ms", "accuracy", "change (pts)"],
                       [[r["codec"], round(r["bytes"]), r["x_smaller_than_float32"], r["vs_jpeg"], r["encode_ms"],
                         r["decode_ms"], r["accuracy"], r["accuracy_change_points"]] for r in result["rows"]]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python -m bench.codec " + " ".join(argv or sys.argv[1:]), **result},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
