"""Bytes per offload vs accuracy for each token codec, with the input's own JPEG/PNG size as yardstick.

For validation samples of a checkpoint, the tokens at the split are encoded
with each codec, decoded, and finished by the cloud half; accuracy is compared
with float32 tokens (lossless), and encode/decode times are measured per sample.
``bench.codec`` prints it; the offload and bottleneck benchmarks include it.
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from offramp.core.checkpoint import load_checkpoint
from offramp.core.codec import CodecConfig, DecodeLimits, decode, encode
from offramp.core.exit_rule import never_leave
from offramp.core.data.card_data import load_validation
from offramp.core.halves import CloudHalf, EdgeHalf

CODECS: list[tuple[str, CodecConfig]] = [
    ("float32", CodecConfig(dtype="float32", zstd_level=0)),
    ("float32+zstd", CodecConfig(dtype="float32", zstd_level=3)),
    ("float16+zstd", CodecConfig(dtype="float16", zstd_level=3)),
    ("int8", CodecConfig(dtype="int8", zstd_level=0)),
    ("int8+zstd", CodecConfig(dtype="int8", zstd_level=3)),
    ("int8+zstd+top32", CodecConfig(dtype="int8", zstd_level=3, top_k=32)),
    ("int8+zstd+top16", CodecConfig(dtype="int8", zstd_level=3, top_k=16)),
]


def image_sizes(x: torch.Tensor) -> tuple[float, float]:
    """Mean JPEG (quality 90) and PNG size of the inputs, re-encoded from their pixels."""
    jpeg, png = [], []
    for sample in x:
        pixels = ((sample * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        for fmt, sink, opts in (("JPEG", jpeg, {"quality": 90}), ("PNG", png, {})):
            buf = io.BytesIO()
            img.save(buf, format=fmt, **opts)
            sink.append(buf.tell())
    return float(np.mean(jpeg)), float(np.mean(png))


def run(checkpoint: str, samples: int) -> dict[str, Any]:
    model, card = load_checkpoint(checkpoint)
    val, _ = load_validation(card)
    x, y = val.tensors[0][:samples], val.tensors[1][:samples]
    split = card.split_block
    edge, cloud = EdgeHalf(model, split), CloudHalf(model, split)
    never = [never_leave("max_prob")] * edge.num_exits  # every sample goes on to the split
    res = edge.run(x, never, "max_prob", with_scores=True)
    tokens, scores = res.tokens, res.scores
    num_prefix = edge.spec.num_prefix
    reference = cloud.run(tokens).argmax(-1)
    ref_acc = float((reference == y).float().mean())
    rows = []
    for name, cfg in CODECS:
        if cfg.top_k and (scores is None or cfg.top_k >= scores.shape[1]):
            continue  # top-k needs patch tokens, and fewer kept than there are
        sizes, t_enc, t_dec, decoded = [], 0.0, 0.0, []
        for i in range(len(x)):
            t0 = time.perf_counter()
            msg = encode(tokens[i:i + 1], cfg, scores=scores[i:i + 1] if cfg.top_k else None, num_prefix=num_prefix)
            wire = msg.SerializeToString()
            t1 = time.perf_counter()
            arr = decode(type(msg).FromString(wire), DecodeLimits())
            t2 = time.perf_counter()
            sizes.append(len(wire))
            t_enc, t_dec = t_enc + (t1 - t0), t_dec + (t2 - t1)
            decoded.append(torch.from_numpy(arr))
        by_shape: dict[tuple, list[int]] = {}
        for i, d in enumerate(decoded):
            by_shape.setdefault(tuple(d.shape), []).append(i)
        pred = torch.empty(len(x), dtype=torch.long)
        for idx in by_shape.values():
            pred[idx] = cloud.run(torch.cat([decoded[i] for i in idx])).argmax(-1)
        acc = float((pred == y).float().mean())
        rows.append({"codec": name, "bytes": float(np.mean(sizes)), "encode_ms": 1e3 * t_enc / len(x),
                     "decode_ms": 1e3 * t_dec / len(x), "accuracy": acc, "accuracy_change_points": 100 * (acc - ref_acc),
                     "agreement_with_float32": float((pred == reference).float().mean())})
    jpeg, png = image_sizes(x)
    f32 = rows[0]["bytes"]
    for r in rows:
        r["x_smaller_than_float32"] = f32 / r["bytes"]
        r["vs_jpeg"] = r["bytes"] / jpeg
    return {"checkpoint": checkpoint, "split_block": split, "token_shape": list(edge.spec.shape), "samples": len(x),
            "float32_accuracy": ref_acc, "jpeg_bytes": jpeg, "png_bytes": png, "rows": rows}
