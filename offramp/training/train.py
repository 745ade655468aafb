"""The three training phases of the paper.

1. Train the backbone with its final head (optionally distilled from a
   teacher's hard labels, DeiT-style).
2. Freeze the backbone and train the exits on the labels.
3. Copycat fine-tuning (CC-SL-ViT): keep training the exits on the backbone's
   own answers — hard pseudo-labels, or soft targets with a temperature — so
   they learn to imitate the full model; no labels are needed for this phase.

Speed comes from the CIFAR speed-run literature (airbench): bfloat16
autocast, channels_last, per-sample flip/translate done on whole batches,
weight averaging; and from never computing the same thing twice: the frozen
backbone's features (phases 2-3) and a teacher's answers are computed once
per augmented view and reused every epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from offramp.core.models import MultiExitModel
from offramp.core.models.cost import StepFlops, count_macs
from offramp.core.precision import Precision, resolve_precision
from offramp.core.scores import confidence, default_score, prediction

log = logging.getLogger(__name__)
Targets = Literal["labels", "hard", "soft"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. These defaults fit a small ViT on 2 CPU cores in minutes; each
    backbone variant's recipe (``offramp.training.recipes``) overrides them with what makes it strong."""

    epochs: int = 10  # backbone epochs
    exit_epochs: int = 5  # exits on labels, backbone frozen
    copycat_epochs: int = 3  # exits on the backbone's answers (only with copycat set)
    copycat: Literal["hard", "soft"] | None = None
    temperature: float = 2.0  # soft copycat: softmax temperature of the distillation targets
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: Nesterov momentum, as airbench trains its CNN
    lr: float = 2e-3
    momentum: float = 0.9  # sgd only
    norm_lr_scale: float = 1.0  # learning-rate factor for normalisation layers (airbench: their shifts learn fast)
    schedule: Literal["cosine", "triangle"] = "cosine"  # triangle: linear up to the peak, then down (airbench)
    warmup: float = 0.05  # share of the steps before the peak learning rate
    grad_clip: float | None = 1.0
    exit_lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1  # backbone only; exits learn the plain targets
    averaging: Literal["none", "lookahead"] = "none"  # lookahead: pull the weights to their running average
    # Audiovisual backbones: share of phase-1 batches trained on the picture alone, so that
    # the visual pathway (what visual exits see) must solve the task by itself too rather
    # than lean on the easier modality. Off by default: on crowd-av it has not paid off yet.
    modality_dropout: float = 0.0
    augment: bool = True  # random translation (and flips for natural images)
    flip: bool = True
    translate: int = 4  # pixels, reflect-padded, drawn per sample
    translate_vertical: bool = True  # False: shift along the last axis only (time, for spectrograms)
    distill_weight: float = 0.5  # with a teacher: share of the loss on its hard labels (DeiT), rest on the labels
    teacher_views: int = 8  # augmented views whose teacher answers are computed once and cycled through
    tokenizer_from_teacher: bool = False  # hybrid ViTs: the tokenizer starts as the teacher CNN's first layers
    tokenizer_lr_scale: float = 1.0  # learning-rate factor for the ViT's tokenizer; 0 freezes it (BN statistics too)
    # Phase 1 trains the exits with the backbone when > 0: the loss adds this weight times the exits' mean
    # loss (each on the same targets as the final head), so early layers learn to answer early (multi-exit
    # networks' joint training). Phases 2-3 may still refine the exits on the frozen result.
    exit_loss_weight: float = 0.0
    exit_views: int = 2  # augmented views of the frozen backbone's features cached for phases 2-3
    tta: bool = False  # evaluate on flipped and shifted copies too and average (reported beside the plain score)
    precision: str = "auto"  # auto | bf16 | fp32: bf16 autocast where the hardware runs it fast
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    progress: bool = True


def batches(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` samples, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    chunks = order.split(batch_size)
    if drop_last and len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    yield from chunks


@dataclass(frozen=True)
class Views:
    """One augmented view of every sample: a horizontal flip and a translation (dy, dx) each."""

    flip: torch.Tensor  # (N,) bool
    shift: torch.Tensor  # (N, 2) int64


def epoch_views(n: int, epoch: int, cfg: TrainConfig) -> Views:
    """The views of an epoch. Flips alternate (each sample is mirrored in every other epoch,
    from a random start: airbench's alternating flip); shifts are drawn anew per epoch."""
    flip = torch.zeros(n, dtype=torch.bool)
    shift = torch.zeros(n, 2, dtype=torch.int64)
    if cfg.augment and cfg.flip:
        flip = (torch.rand(n, generator=torch.Generator().manual_seed(cfg.seed)) < 0.5) ^ bool(epoch % 2)
    if cfg.augment and cfg.translate > 0:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1)
        shift = torch.randint(-cfg.translate, cfg.translate + 1, (n, 2), generator=g)
        if not cfg.translate_vertical:
            shift[:, 0] = 0
    return Views(flip, shift)


def apply_views(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """Flip and translate a batch, each sample its own way; borders are reflected."""
    flip, shift = flip.to(x.device), shift.to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if pad <= 0 or not bool(shift.any()):
        return x
    H, W = x.shape[-2:]
    pad = min(pad, H - 1, W - 1)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for dy, dx in torch.unique(shift.clamp(-pad, pad), dim=0).tolist():
        m = (shift[:, 0] == dy) & (shift[:, 1] == dx)
        out[m] = padded[m, :, pad + dy:pad + dy + H, pad + dx:pad + dx + W]
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
    output = output.float()
    if task == "classification":
        return F.cross_entropy(output, target, label_smoothing=label_smoothing)
    return F.gaussian_nll_loss(output[:, 0], target.float(), output[:, 1].exp())


def copycat_loss(output: torch.Tensor, teacher: torch.Tensor, task: str, mode: Targets, temperature: float) -> torch.Tensor:
    """Loss against the backbone's own answer (CC-SL-ViT)."""
    output, teacher = output.float(), teacher.float()
    if task == "regression":  # imitate the teacher's value; keep the exit's own uncertainty
        return F.gaussian_nll_loss(output[:, 0], teacher[:, 0], output[:, 1].exp())
    if mode == "hard":
        return F.cross_entropy(output, teacher.argmax(dim=-1))
    t = temperature
    return F.kl_div(F.log_softmax(output / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t


def _head_loss(out: torch.Tensor, y: torch.Tensor, teacher_hard: torch.Tensor | None, task: str,
               cfg: TrainConfig) -> torch.Tensor:
    """Phase 1's loss of one head: the labels, mixed with a teacher's hard labels when there is one (DeiT)."""
    loss = task_loss(out, y, task, cfg.label_smoothing)
    if teacher_hard is None:
        return loss
    return (1 - cfg.distill_weight) * loss + cfg.distill_weight * F.cross_entropy(out.float(), teacher_hard)


def lr_factor(step: int, steps: int, schedule: str, warmup: float) -> float:
    """Multiplier of the peak learning rate at ``step``."""
    peak = max(1, int(steps * warmup))
    if schedule == "triangle":  # airbench: 0.2 -> 1 at the peak -> 0.07 at the end
        if step < peak:
            return 0.2 + 0.8 * step / peak
        return 1.0 - 0.93 * min(1.0, (step - peak) / max(1, steps - peak))
    return min(1.0, (step + 1) / peak) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))


def norm_aware_groups(modules: list[nn.Module], cfg: TrainConfig, lr: float) -> list[dict]:
    """Parameter groups: normalisation layers get ``norm_lr_scale`` times the rate (and the weight
    decay divided by it, so the decay per step stays the same), everything else ``lr``."""
    norm = {id(p) for m in modules for sub in m.modules() if _is_norm(sub) for p in sub.parameters(recurse=False)}
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    s = cfg.norm_lr_scale
    groups = [{"params": [p for p in params if id(p) in norm], "lr": lr * s, "weight_decay": cfg.weight_decay / s},
              {"params": [p for p in params if id(p) not in norm], "lr": lr, "weight_decay": cfg.weight_decay}]
    return [g for g in groups if g["params"]]


def slower_groups(groups: list[dict], module: nn.Module, scale: float) -> list[dict]:
    """``groups`` with ``module``'s parameters moved to groups of ``scale`` times the rate; at 0 they
    leave the optimiser and stop requiring gradients (nothing is computed for them)."""
    inside = {id(p) for p in module.parameters()}
    if scale == 0:
        module.requires_grad_(False)
    out = []
    for g in groups:
        out.append({**g, "params": [p for p in g["params"] if id(p) not in inside]})
        if scale > 0:
            out.append({**g, "params": [p for p in g["params"] if id(p) in inside], "lr": g["lr"] * scale})
    return [g for g in out if g["params"]]


def _optimizer(groups: list[dict], cfg: TrainConfig, steps: int):
    """AdamW or Nesterov SGD over ``groups``, with the configured schedule."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.schedule, cfg.warmup))
    return opt, sched


class Lookahead:
    """airbench's weight averaging: every few steps the weights move to an exponential average of
    themselves, whose decay grows over training (cubically), and end exactly on it."""

    def __init__(self, module: nn.Module, total_steps: int, every: int = 5, decay: float = 0.95) -> None:
        self.module, self.total, self.every, self.decay = module, max(1, total_steps), every, decay
        self.average = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        if step % self.every == 0:
            self._pull(self.decay ** self.every * (step / self.total) ** 3)

    @torch.no_grad()
    def finish(self) -> None:
        self._pull(1.0)

    def _pull(self, decay: float) -> None:
        state = self.module.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)


class Throughput:
    """A tqdm bar over samples (so it shows img/s) and the wall time of a phase."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=not enabled, leave=False,
                        dynamic_ncols=True)
        self.start = time.perf_counter()
        self.count = 0

    def update(self, n: int, **postfix: str) -> None:
        self.count += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


def _prepare(model: nn.Module, prec: Precision) -> None:
    model.to(prec.device)
    model.to(memory_format=torch.channels_last)  # conv weights only; faster convolutions in bf16


def _release(model: nn.Module) -> None:
    """Back to CPU and contiguous tensors, as checkpoints and serving expect."""
    model.to(memory_format=torch.contiguous_format)
    model.cpu()


def _to_input(x: torch.Tensor, prec: Precision) -> torch.Tensor:
    x = x.to(prec.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def teacher_answers(teacher: nn.Module, x_all: torch.Tensor, cfg: TrainConfig, prec: Precision) -> torch.Tensor:
    """The teacher's hard labels on each of the first ``teacher_views`` epochs' views: (V, N)."""
    teacher.eval()
    _prepare(teacher, prec)
    n, views = len(x_all), max(1, cfg.teacher_views)
    labels = torch.empty(views, n, dtype=torch.int64)
    meter = Throughput("teacher", views * n, cfg.progress)
    for v in range(views):
        view = epoch_views(n, v, cfg)
        for idx in batches(n, 1024, None):
            x = _to_input(apply_views(x_all[idx], view.flip[idx], view.shift[idx], cfg.translate), prec)
            with prec.autocast():
                labels[v, idx] = teacher(x).float().argmax(-1).cpu()
            meter.update(len(idx))
    log.info("teacher answers for %d views x %d samples in %.1f s", views, n, meter.close())
    _release(teacher)
    return labels


def train_backbone(model: MultiExitModel, data: TensorDataset, cfg: TrainConfig,
                   teacher: nn.Module | None = None, init_from_data: bool = True) -> dict[str, float]:
    """Phase 1: the backbone and its final head (and the audio encoder, audiovisual), exits untouched.

    With a ``teacher`` (anything mapping inputs to logits), a ``distill_weight``
    share of the loss is on the teacher's hard labels for the same view.
    ``init_from_data=False`` keeps loaded weights' data-dependent parts (a
    whitening stem) as they are. Returns the phase's wall time and throughput.
    """
    if cfg.epochs <= 0:
        return {}
    task = model.config.task
    prec = resolve_precision(cfg.precision, cfg.device)
    x_all, a_all, y_all = unpack(data)
    n = len(x_all)
    taught = teacher is not None and task == "classification"
    teacher_labels = teacher_answers(teacher, x_all, cfg, prec) if taught else None
    g = torch.Generator().manual_seed(cfg.seed)
    drop_last = n >= 4 * cfg.batch_size  # keep batch statistics steady; small sets keep every sample
    steps = cfg.epochs * (n // cfg.batch_size if drop_last else math.ceil(n / cfg.batch_size))
    _prepare(model, prec)
    if init_from_data:
        model.backbone.init_from_data(x_all[:5000].to(prec.device))
    joint = cfg.exit_loss_weight > 0 and len(model.exits) > 0
    trunk = [m for name, m in model.named_children() if joint or name != "exits"]
    groups = norm_aware_groups(trunk, cfg, cfg.lr)
    tokenizer = getattr(model.backbone, "patch_embed", None) if cfg.tokenizer_lr_scale != 1.0 else None
    if tokenizer is not None:
        groups = slower_groups(groups, tokenizer, cfg.tokenizer_lr_scale)
    opt, sched = _optimizer(groups, cfg, steps)
    params = [p for g_ in opt.param_groups for p in g_["params"]]
    averaging = Lookahead(model, steps) if cfg.averaging == "lookahead" else None
    model.train()
    if not joint:
        model.exits.eval()
    if tokenizer is not None and cfg.tokenizer_lr_scale == 0:
        tokenizer.eval()  # frozen: its BatchNorms keep the statistics it came with
    meter = Throughput(f"backbone ({prec.name})", cfg.epochs * n, cfg.progress)
    step = 0
    for epoch in range(cfg.epochs):
        model.backbone.start_epoch(epoch)
        view = epoch_views(n, epoch % cfg.teacher_views if taught else epoch, cfg)
        total, seen = 0.0, 0
        for idx in batches(n, cfg.batch_size, g, drop_last):
            x = _to_input(apply_views(x_all[idx], view.flip[idx], view.shift[idx], cfg.translate), prec)
            y = y_all[idx].to(prec.device)
            drop = a_all is not None and torch.rand((), generator=g).item() < cfg.modality_dropout
            audio = None if a_all is None else a_all[idx].to(prec.device)
            counting = StepFlops() if step == 0 else contextlib.nullcontext()
            with counting, prec.autocast():
                if joint:
                    exit_outs, out = model(x, None if drop else audio)
                else:
                    exit_outs, out = [], model.final(x, audio, drop_audio=drop)
            hard = teacher_labels[epoch % cfg.teacher_views, idx].to(prec.device) if taught else None
            loss = _head_loss(out, y, hard, task, cfg)
            if exit_outs:
                loss = loss + cfg.exit_loss_weight * torch.stack([_head_loss(o, y, hard, task, cfg)
                                                                  for o in exit_outs]).mean()
            opt.zero_grad(set_to_none=True)
            with counting:
                loss.backward()
            if step == 0:
                step_flops = counting.per_sample(len(idx))
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if averaging is not None:
                averaging.step(step)
            total += loss.item() * len(idx)
            seen += len(idx)
            meter.update(len(idx), epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}")
        log.info("backbone epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, total / max(1, seen))
    if averaging is not None:
        averaging.finish()
    wall = meter.close()
    model.eval()
    _release(model)
    log.info("backbone trained in %.1f s (%.0f img/s, %s on %s)", wall, meter.count / wall, prec.name, prec.device)
    flops = {"flops": step_flops * meter.count, "flops_per_sample_step": step_flops}
    if teacher_labels is not None:
        flops["teacher_answer_flops"] = 2 * count_macs(teacher, x_all[:2]) * teacher_labels.numel()
    return {"wall_s": wall, "img_per_s": meter.count / wall, "dtype": prec.name, "device": str(prec.device), **flops}


@dataclass
class FeatureCache:
    """The frozen backbone's outputs for every sample under a few augmented views, computed once.

    ``feats[p]`` is (V, N, ...) in bfloat16 after block ``p`` (one copy however many exits sit there);
    ``final`` (V, N, outputs) the final head's
    answers (copycat targets); ``audio`` (V, N, T, D) the audio tokens of audiovisual models.
    """

    feats: dict[int, torch.Tensor]
    audio: torch.Tensor | None
    final: torch.Tensor
    targets: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [*self.feats.values(), self.final, *([] if self.audio is None else [self.audio])]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def cache_features(model: MultiExitModel, data: TensorDataset, cfg: TrainConfig,
                   only: list[int] | None = None, positions: tuple[int, ...] = ()) -> FeatureCache:
    """Run the frozen backbone once per view (plain, mirrored, then shifted) and keep what the exits need
    (and the representation after each of ``positions``, for a bottleneck there)."""
    chosen = list(range(len(model.exits))) if only is None else only
    prec = resolve_precision(cfg.precision, cfg.device)
    x_all, a_all, y_all = unpack(data)
    n = len(x_all)
    views = max(1, cfg.exit_views) if cfg.augment else 1
    model.eval()
    _prepare(model, prec)
    wanted = sorted({*positions, *(model.exit_configs[i].position for i in chosen
                                   if model.exit_configs[i].uses_visual)})
    feats: dict[int, torch.Tensor] = {}
    audio = final = None
    meter = Throughput("caching features", views * n, cfg.progress)
    for v in range(views):
        flip = torch.full((n,), v % 2 == 1 and cfg.flip, dtype=torch.bool)
        shifted = v >= 2 or (v == 1 and not cfg.flip)  # view 0 is the plain input; 1 its mirror where flips apply
        shift = epoch_views(n, v, cfg).shift if shifted else torch.zeros(n, 2, dtype=torch.int64)
        for idx in batches(n, 512, None):
            x = _to_input(apply_views(x_all[idx], flip[idx], shift[idx], cfg.translate), prec)
            a = None if a_all is None else a_all[idx].to(prec.device)
            with prec.autocast():
                at, tokens, out = _backbone_pass(model, x, a, wanted)
            for p in wanted:
                if p not in feats:
                    feats[p] = torch.empty((views, n, *at[p].shape[1:]), dtype=torch.bfloat16)
                feats[p][v, idx] = at[p].to(torch.bfloat16).cpu()
            if tokens is not None:
                if audio is None:
                    audio = torch.empty((views, n, *tokens.shape[1:]), dtype=torch.bfloat16)
                audio[v, idx] = tokens.to(torch.bfloat16).cpu()
            if final is None:
                final = torch.empty((views, n, out.shape[1]), dtype=torch.float32)
            final[v, idx] = out.float().cpu()
            meter.update(len(idx))
    wall = meter.close()
    _release(model)
    cache = FeatureCache(feats, audio, final, y_all)
    log.info("cached the frozen backbone's features: %d views x %d samples at %d positions, %.2f GB, %.1f s",
             views, n, len(feats), cache.nbytes / 1e9, wall)
    return cache


def train_exits(model: MultiExitModel, data: TensorDataset, cfg: TrainConfig, targets: Targets = "labels",
                epochs: int | None = None, only: list[int] | None = None, cache: FeatureCache | None = None,
                lr: float | dict[int, float] | None = None) -> None:
    """Phases 2 and 3: exits on a frozen backbone, against labels or the backbone's answers.

    The backbone runs once per view (``cache_features``), not once per epoch,
    so exits can train for many epochs. The exits share no parameters, so one
    optimiser over all of them on the sum of their losses trains each exactly
    as if it were trained alone; ``lr`` may give each exit its own rate.
    """
    epochs = cfg.exit_epochs if epochs is None else epochs
    chosen = list(range(len(model.exits))) if only is None else only
    if epochs <= 0 or not chosen:
        return
    cache = cache or cache_features(model, data, cfg, chosen)
    missing = [model.exit_names[i] for i in chosen
               if model.exit_configs[i].uses_visual and model.exit_configs[i].position not in cache.feats]
    if missing:
        raise ValueError(f"the feature cache holds nothing for exits {', '.join(missing)}")
    task = model.config.task
    prec = resolve_precision(cfg.precision, cfg.device)
    views, n = cache.final.shape[:2]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    exits = [model.exits[i] for i in chosen]
    steps = epochs * math.ceil(n / cfg.batch_size)
    rates = lr if isinstance(lr, dict) else {i: cfg.exit_lr if lr is None else lr for i in chosen}
    groups = [{"params": list(model.exits[i].parameters()), "lr": rates[i], "weight_decay": cfg.weight_decay}
              for i in chosen]  # one group per exit, each at its own rate
    opt, sched = _optimizer(groups, cfg, steps)
    for e in exits:
        e.to(prec.device).to(memory_format=torch.channels_last).train()
    phase = "exits" if targets == "labels" else f"copycat-{targets}"
    meter = Throughput(f"{phase} ({prec.name})", epochs * n, cfg.progress)
    try:
        for epoch in range(epochs):
            for idx in batches(n, cfg.batch_size, g):
                v = torch.randint(0, views, (len(idx),), generator=g)
                y = cache.targets[idx].to(prec.device)
                final = cache.final[v, idx].to(prec.device)
                tokens = None if cache.audio is None else cache.audio[v, idx].to(prec.device).float()
                losses = []
                with prec.autocast():
                    gathered = {p: t[v, idx].to(prec.device).float() for p, t in cache.feats.items()
                                if any(model.exit_configs[i].position == p for i in chosen)}
                    for i in chosen:
                        feats = gathered.get(model.exit_configs[i].position) if model.exit_configs[i].uses_visual else None
                        if feats is not None and feats.dim() == 4:
                            feats = feats.contiguous(memory_format=torch.channels_last)
                        out = model.run_exit(i, feats, tokens)
                        losses.append(task_loss(out, y, task) if targets == "labels"
                                      else copycat_loss(out, final, task, targets, cfg.temperature))
                loss = torch.stack(losses).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                meter.update(len(idx), epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item() / len(chosen):.3f}")
            log.info("%s epoch %d/%d done", phase, epoch + 1, epochs)
    finally:
        meter.close()
        for e in exits:
            e.eval().to(memory_format=torch.contiguous_format).cpu()
        model.eval()


def _backbone_pass(model: MultiExitModel, x: torch.Tensor, audio: torch.Tensor | None, positions: list[int]
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Backbone representation after each of ``positions`` (ascending), the audio tokens, and the final
    head's output."""
    audio_tokens = model.encode_audio(audio)
    feats, pos, at = model.backbone.embed(x), 0, {}
    for p in positions:
        feats, pos = model.forward_blocks(feats, pos, p, audio_tokens), p
        at[p] = feats
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


def _tta_views(x: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """Weighted views for test-time augmentation (airbench's level 2): the input and its mirror,
    and both shifted one pixel up-left and down-right."""
    B = x.shape[0]
    views = []
    for weight, shift in ((0.25, (0, 0)), (0.125, (-1, -1)), (0.125, (1, 1))):
        shifted = apply_views(x, torch.zeros(B, dtype=torch.bool), torch.tensor([shift] * B), 1)
        views += [(weight, shifted), (weight, shifted.flip(-1))]
    return views


@torch.no_grad()
def evaluate(model: MultiExitModel, data: TensorDataset, batch_size: int = 256, score: str | None = None,
             tta: bool = False, precision: str = "fp32", device: str = "cpu") -> list[HeadResult]:
    """Every exit and the final head on ``data``: predictions, confidences, correctness.

    Runs in float32 on the CPU by default, as the daemons serve;
    ``precision="bf16"`` evaluates as training computed, ``device="cuda"``
    on a GPU (the model comes back to the CPU). ``tta`` averages the outputs
    over mirrored and shifted copies (images only).
    """
    model.eval()
    task = model.config.task
    score = score or default_score(task)
    prec = resolve_precision(precision, device)
    model.to(prec.device)
    x_all, a_all, y_all = unpack(data)
    outs: list[list[torch.Tensor]] = [[] for _ in range(len(model.exits) + 1)]
    for idx in batches(len(x_all), batch_size, None):
        x, a = x_all[idx], _take(a_all, idx)
        views = _tta_views(x) if tta else [(1.0, x)]
        summed: list[torch.Tensor] | None = None
        for weight, view in views:
            with prec.autocast():
                exit_outs, final = model(view.to(prec.device), None if a is None else a.to(prec.device))
            heads = [o.float().cpu() * weight for o in [*exit_outs, final]]
            summed = heads if summed is None else [s_ + h for s_, h in zip(summed, heads)]
        for i, o in enumerate(summed):
            outs[i].append(o)
    model.cpu()
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
