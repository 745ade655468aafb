"""Adding a learned bottleneck to a trained checkpoint (``offramp bottleneck``).

The model is frozen. Its tokens at the split are computed once per augmented
view (the same feature cache the exits train on), and the bottleneck learns
to carry them through its integer code so that the frozen tail answers as it
does on the original tokens: the loss is the tail's soft-label distillation
(KL to the original answer), plus a token reconstruction term that keeps the
decoder close to the tokens the tail was trained on, plus a rate term (mean
code magnitude) that pulls the integers towards zero, where zstd codes them
in the fewest bits. The backbone, the exits and the uncompressed path are
untouched, so the new checkpoint answers exactly as the old one does except
through the bottleneck.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zstandard
from torch.utils.data import TensorDataset

from offramp.core.checkpoint import Card, bottleneck_id, load_checkpoint, save_checkpoint
from offramp.core.data import load_data
from offramp.core.errors import OfframpError
from offramp.core.models import MultiExitModel
from offramp.core.models.bottleneck import BottleneckConfig
from offramp.core.precision import resolve_precision
from offramp.training.train import FeatureCache, Throughput, TrainConfig, _optimizer, batches, cache_features, copycat_loss, unpack

log = logging.getLogger(__name__)
DICTIONARY_SAMPLES = 5000  # codes a zstd dictionary is trained on; more gains nothing visible


@dataclass(frozen=True)
class BottleneckJob:
    """What to add, where, and how long to train it."""

    checkpoint: str
    out: str
    channels: int
    bits: int = 4
    hidden: int = 0
    position: int | None = None  # default: the checkpoint's split block
    epochs: int = 10
    lr: float = 2e-3
    rate_weight: float = 0.01  # per unit of mean |code|; higher: fewer bytes, more loss
    token_weight: float = 0.1  # reconstruction, relative to the tokens' variance
    views: int = 2  # augmented views of the training split whose tokens are cached
    dictionary_bytes: int = 1024  # zstd dictionary trained on its codes and shipped with it; 0: none
    batch_size: int = 256
    zstd_level: int = 3
    precision: str = "auto"
    device: str = "auto"
    limit: int | None = None  # quick runs: at most this many samples (before the split)
    seed: int = 0
    progress: bool = True


def add_bottleneck(job: BottleneckJob, channels: list[int] | None = None) -> list[dict[str, Any]]:
    """Train a bottleneck into a copy of ``job.checkpoint`` at ``job.out``; returns what it measured.

    With several ``channels``, one bottleneck per width is trained on the same cached tokens (the
    costly part is computed once) and written to ``job.out`` with ``{channels}`` replaced. With
    ``job.epochs`` 0 the checkpoint's own bottleneck is kept: only its zstd dictionary is (re)built.
    """
    widths = channels or [job.channels]
    if len(widths) > 1 and "{channels}" not in job.out:
        raise OfframpError("several widths need '{channels}' in --out, e.g. runs/bn/c{channels}")
    source, card = load_checkpoint(job.checkpoint)
    position = card.split_block if job.position is None else job.position
    if job.epochs == 0:
        have = source.config.bottleneck
        if have is None or have.position != position:
            raise OfframpError(f"--epochs 0 keeps the checkpoint's bottleneck, but '{job.checkpoint}' has none at "
                               f"block {position}")
        widths, models = [have.channels], [source]
    else:
        try:
            models = [with_bottleneck(source, BottleneckConfig(position, c, job.bits, job.hidden)) for c in widths]
        except ValueError as e:
            raise OfframpError(f"cannot add a bottleneck to '{job.checkpoint}': {e}") from None
    d = card.data
    if not d.get("spec"):
        raise OfframpError(f"'{job.checkpoint}': its card names no training data to distil on")
    splits = load_data(d["spec"], val_fraction=d.get("val_fraction", 0.1), seed=d.get("seed", 0),
                       limit=job.limit if job.limit is not None else d.get("limit"))
    start = time.perf_counter()
    train_data = splits.train if job.epochs else TensorDataset(*(t[:DICTIONARY_SAMPLES] for t in splits.train.tensors))
    cache = cache_tokens(models[0], train_data, job if job.epochs else dataclasses.replace(job, views=1), position)
    results = []
    for width, model in zip(widths, models):
        torch.manual_seed(job.seed)
        train_s = train(model, cache, dataclasses.replace(job, channels=width), position) if job.epochs else 0.0
        model = attach_dictionary(model, train_dictionary(model, cache.feats[position][0], job.dictionary_bytes))
        metrics = measure(model, splits.val, position, job.zstd_level)
        trained = ({"train_wall_s": round(train_s, 1), "epochs": job.epochs, "rate_weight": job.rate_weight}
                   if job.epochs else {k: card.metrics.get("bottleneck", {}).get(k)  # kept: how it was trained
                                       for k in ("train_wall_s", "epochs", "rate_weight")})
        metrics.update(id=bottleneck_id(model), **trained, train_samples=len(splits.train),
                       wall_s=round(time.perf_counter() - start, 1))
        out = Card(config=model.config, label_names=card.label_names, modality=card.modality,
                   input_shape=card.input_shape, split_block=position, data=card.data,
                   metrics={**card.metrics, "bottleneck": metrics})
        metrics["out"] = job.out.replace("{channels}", str(width))
        save_checkpoint(metrics["out"], model, out)
        results.append(metrics)
    return results


@torch.no_grad()
def train_dictionary(model: MultiExitModel, tokens: torch.Tensor, size: int) -> bytes | None:
    """A zstd dictionary of ``size`` bytes trained on the codes of (up to a few thousand) cached tokens."""
    if size <= 0:
        return None
    codes = torch.cat([model.bottleneck.encode(t.float()).to(torch.int8) for t in tokens[:DICTIONARY_SAMPLES].split(512)])
    try:
        return zstandard.train_dictionary(size, [c.numpy().tobytes() for c in codes]).as_bytes()
    except zstandard.ZstdError as e:  # too few or too uniform samples: plain zstd then
        log.warning("no zstd dictionary for the bottleneck's codes: %s", e)
        return None


def attach_dictionary(model: MultiExitModel, data: bytes | None) -> MultiExitModel:
    """The same model with ``data`` as its bottleneck's zstd dictionary (replacing any); unchanged for None."""
    if not data:
        return model
    config = dataclasses.replace(model.config.bottleneck, dictionary_bytes=len(data))
    state = {**model.state_dict(), "bottleneck.zstd_dictionary": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    new = MultiExitModel(dataclasses.replace(model.config, bottleneck=config))
    new.load_state_dict(state, strict=True)
    return new.eval()


def with_bottleneck(source: MultiExitModel, config: BottleneckConfig) -> MultiExitModel:
    """A copy of ``source`` with a fresh bottleneck (replacing any it had); every other weight kept."""
    model = MultiExitModel(dataclasses.replace(source.config, bottleneck=config))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("bottleneck.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("bottleneck.") for k in missing), (missing, unexpected)
    return model.eval()


def _train_config(job: BottleneckJob) -> TrainConfig:
    return TrainConfig(exit_views=job.views, batch_size=job.batch_size, lr=job.lr, weight_decay=0.01,
                       precision=job.precision, device=job.device, seed=job.seed, progress=job.progress)


def cache_tokens(model: MultiExitModel, data: TensorDataset, job: BottleneckJob, position: int) -> FeatureCache:
    """The frozen model's tokens after ``position`` and its answers, once per augmented view."""
    return cache_features(model, data, _train_config(job), only=[], positions=(position,))


def train(model: MultiExitModel, cache: FeatureCache, job: BottleneckJob, position: int) -> float:
    """Distil the frozen model through its bottleneck on cached tokens; returns the wall time."""
    cfg = _train_config(job)
    feats, final = cache.feats[position], cache.final  # (V, N, T, D) bf16, (V, N, outputs)
    prec = resolve_precision(cfg.precision, cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    bottleneck = model.bottleneck
    for p in bottleneck.parameters():
        p.requires_grad_(True)
    model.to(prec.device)
    bottleneck.train()
    views, n = final.shape[:2]
    steps = job.epochs * math.ceil(n / cfg.batch_size)
    opt, sched = _optimizer([{"params": list(bottleneck.parameters()), "lr": job.lr, "weight_decay": 0.01}], cfg,
                            steps)
    token_var = float(feats[0, : min(n, 2048)].float().var())
    g = torch.Generator().manual_seed(job.seed + 2)
    meter = Throughput(f"bottleneck {bottleneck.config.name} ({prec.name})", job.epochs * n, cfg.progress)
    try:
        for epoch in range(job.epochs):
            for idx in batches(n, cfg.batch_size, g):
                v = torch.randint(0, views, (len(idx),), generator=g)
                tokens = feats[v, idx].to(prec.device).float()
                target = final[v, idx].to(prec.device)
                with prec.autocast():
                    code = bottleneck.encode(tokens)
                    rebuilt = bottleneck.decode(code)
                    out = model.tail(rebuilt, position)
                distil = copycat_loss(out, target, model.config.task, "soft", 1.0)
                recon = F.mse_loss(rebuilt.float(), tokens) / token_var
                rate = code.float().abs().mean()
                loss = distil + job.token_weight * recon + job.rate_weight * rate
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                meter.update(len(idx), epoch=f"{epoch + 1}/{job.epochs}", distil=f"{distil.item():.3f}",
                             rate=f"{rate.item():.2f}")
            log.info("bottleneck epoch %d/%d: distil %.4f recon %.4f |code| %.3f", epoch + 1, job.epochs,
                     distil.item(), recon.item(), rate.item())
    finally:
        wall = meter.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval().cpu()
    return wall


@torch.no_grad()
def measure(model: MultiExitModel, data: TensorDataset, position: int, zstd_level: int = 3,
            batch_size: int = 256) -> dict[str, Any]:
    """On ``data``, in float32 as served: the final head's accuracy (or MAE) through the bottleneck
    and without it, and the bytes of each sample's code as the wire carries it."""
    from offramp.core.codec import encode_code, zstd_dictionary  # here: training alone needs no wire code (nor grpc)

    model.eval()
    x_all, _, y_all = unpack(data)
    name, dictionary = bottleneck_id(model), zstd_dictionary(model.bottleneck.dictionary())
    through, direct, sizes = [], [], []
    for idx in batches(len(x_all), batch_size, None):
        tokens = model.backbone.head(x_all[idx], position)
        code = model.bottleneck.encode(tokens)
        through.append(model.tail(model.bottleneck.decode(code), position))
        direct.append(model.tail(tokens, position))
        code8 = code.to(torch.int8)
        sizes += [encode_code(code8[i:i + 1], name, zstd_level, dictionary).ByteSize() for i in range(len(idx))]
    out_b, out_d = torch.cat(through), torch.cat(direct)
    result: dict[str, Any] = {"config": dataclasses.asdict(model.config.bottleneck), "samples": len(x_all),
                              "bytes_per_offload": float(np.mean(sizes)), "zstd_level": zstd_level,
                              "code_values": int(math.prod(model.bottleneck.code_shape)),
                              "dictionary_bytes": model.config.bottleneck.dictionary_bytes}
    if model.config.task == "classification":
        acc_b = float((out_b.argmax(-1) == y_all).float().mean())
        acc_d = float((out_d.argmax(-1) == y_all).float().mean())
        result.update(accuracy=acc_b, accuracy_without=acc_d, accuracy_loss_points=100 * (acc_d - acc_b),
                      agreement=float((out_b.argmax(-1) == out_d.argmax(-1)).float().mean()))
    else:
        mae_b = float((out_b[:, 0] - y_all.float()).abs().mean())
        mae_d = float((out_d[:, 0] - y_all.float()).abs().mean())
        result.update(mae=mae_b, mae_without=mae_d)
    return result


def describe(metrics: dict[str, Any]) -> str:
    """One paragraph for the terminal."""
    c = metrics["config"]
    head = (f"bottleneck {metrics['id']} ({c['channels']} values of {c['bits']} bits per token, after block "
            f"{c['position']}) written to {metrics['out']}")
    if "accuracy" in metrics:
        quality = (f"accuracy {100 * metrics['accuracy']:.2f}% through it vs {100 * metrics['accuracy_without']:.2f}% "
                   f"without ({metrics['accuracy_loss_points']:+.2f} points lost)")
    else:
        quality = f"MAE {metrics['mae']:.3f} through it vs {metrics['mae_without']:.3f} without"
    trained = "" if metrics.get("train_wall_s") is None else f"; trained in {metrics['train_wall_s']:.0f} s"
    return (f"{head}\n  {quality}, {metrics['bytes_per_offload']:.0f} bytes per offload on "
            f"{metrics['samples']} validation samples{trained}")
