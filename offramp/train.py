"""The three training phases of the paper.

1. Train the backbone with its final head.
2. Freeze the backbone and train the exits on the labels.
3. Copycat fine-tuning (CC-SL-ViT): keep training the exits on the backbone's
   own answers — hard pseudo-labels, or soft targets with a temperature — so
   they learn to imitate the full model; no labels are needed for this phase.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .models import MultiExitModel
from .scores import confidence, default_score, prediction

log = logging.getLogger(__name__)
Targets = Literal["labels", "hard", "soft"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults fit a small ViT on 2 CPU cores in minutes."""

    epochs: int = 10  # backbone epochs
    exit_epochs: int = 5  # exits on labels, backbone frozen
    copycat_epochs: int = 3  # exits on the backbone's answers (only with copycat set)
    copycat: Literal["hard", "soft"] | None = None
    temperature: float = 2.0  # soft copycat: softmax temperature of the distillation targets
    batch_size: int = 128
    lr: float = 2e-3
    exit_lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1  # backbone only; exits learn the plain targets
    # Audiovisual backbones: share of phase-1 batches trained on the picture alone, so that
    # the visual pathway (what visual exits see) must solve the task by itself too rather
    # than lean on the easier modality. Off by default: on crowd-av it has not paid off yet.
    modality_dropout: float = 0.0
    augment: bool = True  # random shifts (and flips for natural images)
    flip: bool = True
    seed: int = 0
    progress: bool = True


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` samples, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def augment_batch(x: torch.Tensor, g: torch.Generator, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and optional horizontal flip."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    out = padded[:, :, dy:dy + H, dx:dx + W]
    if flip:
        mask = torch.rand(B, generator=g) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


def unpack(data: TensorDataset) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(inputs, audio or None, targets)`` of a dataset: (x, y) or, audiovisual, (x, audio, y)."""
    tensors = data.tensors
    if len(tensors) == 2:
        return tensors[0], None, tensors[1]
    if len(tensors) == 3:
        return tensors
    raise ValueError(f"expected a dataset of (x, y) or (x, audio, y), got {len(tensors)} tensors")


def _take(audio: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if audio is None else audio[idx]


def task_loss(output: torch.Tensor, target: torch.Tensor, task: str, label_smoothing: float = 0.0) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output, target, label_smoothing=label_smoothing)
    return F.gaussian_nll_loss(output[:, 0], target.float(), output[:, 1].exp())


def copycat_loss(output: torch.Tensor, teacher: torch.Tensor, task: str, mode: Targets, temperature: float) -> torch.Tensor:
    """Loss against the backbone's own answer (CC-SL-ViT)."""
    if task == "regression":  # imitate the teacher's value; keep the exit's own uncertainty
        return F.gaussian_nll_loss(output[:, 0], teacher[:, 0], output[:, 1].exp())
    if mode == "hard":
        return F.cross_entropy(output, teacher.argmax(dim=-1))
    t = temperature
    return F.kl_div(F.log_softmax(output / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t


def _optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def train_backbone(model: MultiExitModel, data: TensorDataset, cfg: TrainConfig) -> None:
    """Phase 1: the backbone and its final head (and the audio encoder, audiovisual), exits untouched."""
    if cfg.epochs <= 0:
        return
    task = model.config.task
    x_all, a_all, y_all = unpack(data)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(len(x_all) / cfg.batch_size)
    params = model.trunk_parameters()
    opt, sched = _optimizer(params, cfg.lr, cfg.weight_decay, steps)
    model.train()
    for epoch in range(cfg.epochs):
        bar = tqdm(list(batches(len(x_all), cfg.batch_size, g)), desc=f"backbone {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        total = 0.0
        for idx in bar:
            x, y = x_all[idx], y_all[idx]
            if cfg.augment:
                x = augment_batch(x, g, cfg.flip)
            drop = a_all is not None and torch.rand((), generator=g).item() < cfg.modality_dropout
            loss = task_loss(model.final(x, _take(a_all, idx), drop_audio=drop), y, task, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log.info("backbone epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, total / len(x_all))
    model.eval()


def train_exits(model: MultiExitModel, data: TensorDataset, cfg: TrainConfig, targets: Targets = "labels",
                epochs: int | None = None, only: list[int] | None = None) -> None:
    """Phases 2 and 3: exits on a frozen backbone, against labels or the backbone's answers.

    The exits share no parameters, so one optimiser over all of them on the sum
    of their losses trains each exactly as if it were trained alone.
    """
    epochs = cfg.exit_epochs if epochs is None else epochs
    chosen = list(range(len(model.exits))) if only is None else only
    if epochs <= 0 or not chosen:
        return
    task = model.config.task
    x_all, a_all, y_all = unpack(data)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for i in chosen for p in model.exits[i].parameters()]
    steps = epochs * math.ceil(len(x_all) / cfg.batch_size)
    opt, sched = _optimizer(params, cfg.exit_lr, cfg.weight_decay, steps)
    trunk = model.trunk_parameters()
    model.eval()
    for p in trunk:
        p.requires_grad_(False)
    for i in chosen:
        model.exits[i].train()
    phase = "exits" if targets == "labels" else f"copycat-{targets}"
    try:
        for epoch in range(epochs):
            bar = tqdm(list(batches(len(x_all), cfg.batch_size, g)), desc=f"{phase} {epoch + 1}/{epochs}",
                       disable=not cfg.progress, leave=False)
            for idx in bar:
                x, y = x_all[idx], y_all[idx]
                if cfg.augment:
                    x = augment_batch(x, g, cfg.flip)
                with torch.no_grad():
                    feats_at, audio_tokens, final = _backbone_pass(model, x, _take(a_all, idx), chosen)
                losses = []
                for i in chosen:
                    out = model.run_exit(i, feats_at[i], audio_tokens)
                    if targets == "labels":
                        losses.append(task_loss(out, y, task))
                    else:
                        losses.append(copycat_loss(out, final, task, targets, cfg.temperature))
                loss = torch.stack(losses).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item() / len(chosen):.3f}")
            log.info("%s epoch %d/%d done", phase, epoch + 1, epochs)
    finally:
        for p in trunk:
            p.requires_grad_(True)
        model.eval()


def _backbone_pass(model: MultiExitModel, x: torch.Tensor, audio: torch.Tensor | None, chosen: list[int]
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Backbone representation at each chosen exit's position, the audio tokens, and the final head's output."""
    audio_tokens = model.encode_audio(audio)
    feats, pos, at = model.backbone.embed(x), 0, {}
    for i, e in enumerate(model.exit_configs):
        feats, pos = model.forward_blocks(feats, pos, e.position, audio_tokens), e.position
        if i in chosen:
            at[i] = feats
    return at, audio_tokens, model.tail(feats, pos, audio_tokens)


@dataclass
class HeadResult:
    """Per-sample results of one head (an exit or the final head) on a dataset."""

    name: str
    pred: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray | None  # classification only
    error: np.ndarray | None  # regression only: |pred - target|

    def summary(self) -> dict[str, float]:
        if self.correct is not None:
            return {"accuracy": float(self.correct.mean())}
        return {"mae": float(self.error.mean()), "rmse": float(np.sqrt((self.error ** 2).mean()))}


@torch.no_grad()
def evaluate(model: MultiExitModel, data: TensorDataset, batch_size: int = 256, score: str | None = None) -> list[HeadResult]:
    """Every exit and the final head on ``data``: predictions, confidences, correctness."""
    model.eval()
    task = model.config.task
    score = score or default_score(task)
    x_all, a_all, y_all = unpack(data)
    outs: list[list[torch.Tensor]] = [[] for _ in range(len(model.exits) + 1)]
    for idx in batches(len(x_all), batch_size, None):
        exit_outs, final = model(x_all[idx], _take(a_all, idx))
        for i, o in enumerate([*exit_outs, final]):
            outs[i].append(o)
    names = [*model.exit_names, "final"]
    results = []
    for name, chunks in zip(names, outs):
        out = torch.cat(chunks)
        pred = prediction(out, task)
        conf = confidence(out, score)
        if task == "classification":
            results.append(HeadResult(name, pred.numpy(), conf.numpy(), (pred == y_all).numpy(), None))
        else:
            results.append(HeadResult(name, pred.numpy(), conf.numpy(), None, (pred - y_all.float()).abs().numpy()))
    return results
