"""Train-and-save and load-and-evaluate, as the CLI and the benchmarks run them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from offramp.core.checkpoint import Card, load_checkpoint, save_checkpoint
from offramp.core.operating_points import DEFAULT_THRESHOLDS
from offramp.core.data import DataSplits, load_data
from offramp.core.data.card_data import load_validation
from offramp.core.errors import OfframpError
from offramp.core.exit_rule import edge_exit_ids
from offramp.core.models import (AudioConfig, ModelConfig, MultiExitModel, create_backbone_depth, is_variant,
                                 parse_exits, variant_names)
from offramp.training.report import evaluation_report
from offramp.core.scores import check_score, default_score
from offramp.training.train import HeadResult, TrainConfig, cache_features, evaluate, train_backbone, train_exits, unpack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """What to train on and where to put it."""

    data: str = "digits"
    model: str | None = None  # None: a default variant for the data's modality
    exits: str | None = None  # None: a default for the data's modality
    out: str = "runs/model"
    split_block: int | None = None  # None: after the last exit
    limit: int | None = None
    val_fraction: float = 0.1
    selection_fraction: float = 0.0  # held out of training for choosing thresholds (``offramp calibrate``)
    seed: int = 0
    teacher: str | None = None  # a checkpoint to distill from; None: the recipe's teacher, trained first
    init: str | None = None  # a safetensors state dict loaded into the backbone before training
    pretrained: bool = False  # timm variants: timm's own pretrained weights (needs its hub)


def default_variant(modality: str) -> str:
    return "vit_tiny_spec" if modality == "audio" else "vit_micro_32"


def default_variant_for(spec: str) -> str:
    """The default variant for a data spec, without loading the data."""
    return default_variant("audio" if spec.partition(":")[0].strip().lower() == "fsdd" else "image")


# The modality ladder: audio alone (no visual block), then visual, then fused, then the cloud.
DEFAULT_EXITS = {"audiovisual": "slvit@0:audio,slvit@2,slvit@2:fused,slvit@4:fused"}


def default_exits(modality: str) -> str:
    return DEFAULT_EXITS.get(modality, "slvit@2,slvit@4")


def split_block_of(job: TrainJob, exits: tuple, num_blocks: int) -> int:
    """The job's split block, or right after the last exit."""
    split = job.split_block if job.split_block is not None else max(
        (e.position for e in exits), default=num_blocks // 2)
    if not 0 <= split <= num_blocks:
        raise OfframpError(f"split block {split} is outside 0..{num_blocks}")
    return split


def build_model(job: TrainJob, data: DataSplits) -> tuple[MultiExitModel, int]:
    """Model config from the job and the data, and the split block; mistakes become one-line user errors.

    Audiovisual models fuse audio into the backbone right at the split, so the
    edge's exits and the cloud's tail both see both modalities.
    """
    variant = job.model or default_variant(data.modality)
    if not is_variant(variant):
        raise OfframpError(f"unknown model variant '{variant}'; choose from {', '.join(variant_names())}, or "
                           "timm:NAME for a timm VisionTransformer (e.g. timm:deit_tiny_patch16_224)")
    try:
        exits = parse_exits(job.exits or default_exits(data.modality))
        num_blocks = create_backbone_depth(variant)
        split = split_block_of(job, exits, num_blocks)
        audio = None
        if data.modality == "audiovisual":
            if split >= num_blocks:
                raise OfframpError(f"an audiovisual model fuses audio at the split: split block {split} must be "
                                   f"below {num_blocks}")
            audio = AudioConfig(input_shape=tuple(data.audio_shape), fuse_at=split)
        config = ModelConfig(
            backbone=variant,
            img_size=tuple(data.input_shape[1:]),
            in_chans=data.input_shape[0],
            num_classes=len(data.label_names),
            task=data.task,
            exits=exits,
            audio=audio,
            target_stats=target_stats(data) if data.task == "regression" else None,
        )
        return MultiExitModel(config), split
    except (ValueError, ImportError) as e:
        raise OfframpError(str(e)) from None


def target_stats(data: DataSplits) -> tuple[float, float]:
    """Mean and standard deviation of the training targets: the regression heads' units."""
    y = unpack(data.train)[2].float()
    return float(y.mean()), float(y.std().clamp_min(1e-6))


def default_thresholds(results: list[HeadResult], score: str) -> list[float]:
    """Thresholds for the exit-share table: fixed for bounded scores; for ``std``, which is in the
    target's units, the 10-90th percentiles of the exits' predicted deviations."""
    if score != "std" or len(results) < 2:
        return list(DEFAULT_THRESHOLDS)
    stds = np.concatenate([r.confidence for r in results[:-1]])
    return sorted({float(f"{q:.3g}") for q in np.percentile(stds, [10, 25, 50, 75, 90])})


def head_metrics(model: MultiExitModel, data: TensorDataset) -> dict[str, dict[str, float]]:
    return {r.name: r.summary() for r in evaluate(model, data)}


def data_settings(job: TrainJob, data: DataSplits, cfg: TrainConfig) -> TrainConfig:
    """Augmentations that fit the data: flips for natural images only, shifts in time only for sound."""
    if cfg.flip and not job.data.startswith("imagefolder"):
        cfg = replace(cfg, flip=False)  # digits and spectrograms are not mirror-symmetric
    if data.modality == "audio":
        cfg = replace(cfg, translate_vertical=False, tta=False)  # a shift in frequency changes the sound
    elif data.modality != "image":
        cfg = replace(cfg, augment=False, tta=False)  # shifting a crowd scene crops people out of the count
    return cfg


def teacher_saw_selection(teacher_data: dict[str, Any], job: TrainJob) -> bool:
    """Whether a teacher trained on ``teacher_data`` (its card's) learned from this job's selection split: the
    same data, validation carved alike, but the selection split not held out the same way."""
    if not job.selection_fraction:
        return False
    same_data = (teacher_data.get("spec"), teacher_data.get("seed"), teacher_data.get("val_fraction"),
                 teacher_data.get("limit")) == (job.data, job.seed, job.val_fraction, job.limit)
    return same_data and teacher_data.get("selection_fraction", 0.0) != job.selection_fraction


def obtain_teacher(job: TrainJob, teacher_variant: str | None, data: DataSplits, cfg: TrainConfig
                   ) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The teacher to distill from: ``job.teacher`` (a checkpoint, or ``none``), else the recipe's
    teacher variant, trained here first with its own recipe and saved beside the student."""
    from offramp.training.recipes import recipe_for

    if job.teacher == "none" or (job.teacher is None and teacher_variant is None):
        return None, {}
    if data.task != "classification":
        log.info("no teacher for regression: distillation uses hard labels")
        return None, {}
    if job.teacher is not None:
        teacher, card = load_checkpoint(job.teacher)
        if tuple(card.input_shape) != tuple(data.input_shape) or len(card.label_names) != len(data.label_names):
            raise OfframpError(f"teacher '{job.teacher}' was trained on other inputs or classes "
                               f"({card.input_shape}, {len(card.label_names)} classes)")
        saw = teacher_saw_selection(card.data, job)
        if saw:
            log.warning("teacher '%s' was trained on this job's selection split (it held none out): thresholds "
                        "chosen there will look better than they are; let the recipe train the teacher on this "
                        "split (no --teacher) for an honest selection split", job.teacher)
        return teacher.backbone, {"checkpoint": str(job.teacher), "fingerprint": card.fingerprint,
                                  **({"saw_selection_split": True} if saw else {})}
    out = str(Path(job.out) / "teacher")
    tjob = replace(job, model=teacher_variant, exits="none", out=out, teacher="none", init=None, pretrained=False)
    _, recipe = recipe_for(teacher_variant)
    tcfg = recipe.config(exit_epochs=0, copycat=None, precision=cfg.precision, device=cfg.device,
                         progress=cfg.progress, seed=cfg.seed)
    log.info("training the teacher %s first (into %s)", teacher_variant, out)
    report = run_training(tjob, tcfg, data)
    teacher, card = load_checkpoint(out)
    return teacher.backbone, {"checkpoint": out, "variant": teacher_variant, "fingerprint": card.fingerprint,
                              **card.metrics.get("training", {}), "val_accuracy": report["heads"][-1].get("accuracy")}


def run_training(job: TrainJob, cfg: TrainConfig, data: DataSplits | None = None,
                 teacher_variant: str | None = None) -> dict[str, Any]:
    """All training phases, checkpoint saved after them; returns the evaluation report."""
    from offramp.training.initial import load_initial_weights, load_tokenizer_from

    data = data or load_data(job.data, val_fraction=job.val_fraction, seed=job.seed, limit=job.limit,
                             selection_fraction=job.selection_fraction)
    cfg = data_settings(job, data, cfg)
    torch.manual_seed(job.seed)
    model, split = build_model(job, data)
    if job.init or job.pretrained:
        load_initial_weights(model.backbone, job.init, pretrained=job.pretrained, variant=model.config.backbone)
    teacher, teacher_info = obtain_teacher(job, teacher_variant, data, cfg)
    if cfg.tokenizer_from_teacher:
        load_tokenizer_from(model.backbone, teacher)
    torch.manual_seed(job.seed)
    log.info("training %s with exits %s on %s (%d train / %d val)", model.config.backbone,
             ",".join(model.exit_names) or "none", job.data, len(data.train), len(data.val))
    metrics: dict[str, Any] = {}
    loaded = job.init or job.pretrained or cfg.tokenizer_from_teacher
    timing = train_backbone(model, data.train, cfg, teacher=teacher, init_from_data=not loaded)
    if timing:
        metrics["training"] = {**timing, "epochs": cfg.epochs, **({"teacher": teacher_info} if teacher_info else {})}
        final = evaluate(model, data.val)[-1]
        metrics["backbone"] = final.summary()
        if timing["dtype"] == "bf16":  # trained in bf16, served in fp32: how much does that cost?
            metrics["backbone_bf16"] = evaluate(model, data.val, precision="bf16")[-1].summary()
        if cfg.tta:
            metrics["backbone_tta"] = evaluate(model, data.val, tta=True)[-1].summary()
        log.info("backbone on validation: %s%s", metrics["backbone"],
                 f", with test-time augmentation {metrics['backbone_tta']}" if cfg.tta else "")
    if model.exits and (cfg.exit_epochs > 0 or (cfg.copycat and cfg.copycat_epochs > 0)):
        cache = cache_features(model, data.train, cfg)
        train_exits(model, data.train, cfg, targets="labels", cache=cache)
        metrics["exits"] = head_metrics(model, data.val)
        if cfg.copycat:
            train_exits(model, data.train, cfg, targets=cfg.copycat, epochs=cfg.copycat_epochs, cache=cache)
            metrics["copycat"] = head_metrics(model, data.val)
        del cache
    else:
        metrics["exits"] = head_metrics(model, data.val)
    card = Card(
        config=model.config, label_names=data.label_names, modality=data.modality, input_shape=data.input_shape,
        split_block=split, metrics=metrics,
        data={"spec": job.data, "seed": job.seed, "val_fraction": job.val_fraction, "limit": job.limit,
              **({"selection_fraction": job.selection_fraction} if job.selection_fraction else {})},
    )
    save_checkpoint(job.out, model, card)
    results = evaluate(model, data.val)
    score = default_score(model.config.task)
    return evaluation_report(model, results, data.input_shape, score, default_thresholds(results, score))


def evaluate_checkpoint(directory: str | Path, data: str | None = None, score: str | None = None,
                        thresholds: list[float] | None = None, exits: list[str] | None = None, tta: bool = False,
                        precision: str = "fp32") -> dict[str, Any]:
    """Every exit and the final head on validation data; ``exits`` names a subset to walk, as an edge would."""
    model, card = load_checkpoint(directory)
    score = score or default_score(model.config.task)
    try:
        check_score(score, model.config.task)
    except ValueError as e:
        raise OfframpError(str(e)) from None
    val, input_shape = load_validation(card, data)
    if tuple(input_shape) != tuple(card.input_shape):
        raise OfframpError(f"data '{data}' has inputs of shape {input_shape}, the model expects {card.input_shape}")
    try:
        ids = None if exits is None else edge_exit_ids(model.exit_configs, model.num_blocks, exits)
    except ValueError as e:
        raise OfframpError(str(e)) from None
    if tta and card.modality != "image":
        raise OfframpError("--tta applies to images only (it mirrors and shifts the input)")
    results = evaluate(model, val, score=score, tta=tta, precision=precision)
    if ids is not None:
        results = [*(results[i] for i in ids), results[-1]]
    report = evaluation_report(model, results, card.input_shape, score, thresholds or default_thresholds(results, score),
                               ids)
    report["checkpoint"] = str(directory)
    report["fingerprint"] = card.fingerprint
    return report
