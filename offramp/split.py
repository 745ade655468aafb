"""The two halves of a split model, as the edge and cloud daemons run them.

``EdgeHalf`` runs the stem, the blocks up to the split and the exits on the
way, deciding per sample; survivors continue as a smaller batch and leave as
tokens. ``CloudHalf`` runs the remaining blocks and the final head on tokens
received from any number of edges.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import MultiExitModel, head_outputs
from .scores import HIGHER_IS_CONFIDENT, confidence

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def compute_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision; plain float32 otherwise."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def cls_attention(block: nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention the class token pays to each patch token in ``block`` (mean over heads), (B, N - prefix).

    Works for any pre-norm block with ``norm1`` and ``attn.qkv`` / ``attn.num_heads``
    (ours and timm's): the tokens the model itself looks at most are worth sending.
    """
    attn = block.attn
    B, N, C = x.shape
    h = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k = qkv[0][:, :, :1], qkv[1]  # (B, h, 1, Dh), (B, h, N, Dh)
    probs = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(dim=-1)  # (B, h, 1, N)
    return probs.mean(dim=1)[:, 0, num_prefix:]


@dataclass
class EdgeResult:
    """Per-sample outcome of the edge half on a batch of B inputs.

    ``exit_index[i]`` is the exit that answered sample i, or -1 if it must go on.
    ``output``/``confidence`` hold, for answered samples, that exit's answer and,
    for the others, their best exit's (the degraded fallback).
    ``offload`` lists the sample indices that go on; ``tokens`` (len(offload), ...)
    their representation at the split, ``scores`` the class-token attention
    (for top-k token selection) when asked for, ``audio_tokens`` (audiovisual
    models) their audio tokens, which the cloud fuses too.
    """

    exit_index: torch.Tensor
    best_exit: torch.Tensor
    output: torch.Tensor
    confidence: torch.Tensor
    offload: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor | None
    audio_tokens: torch.Tensor | None = None


def edge_exit_ids(model: MultiExitModel, split_block: int, names: Sequence[str] | None = None) -> list[int]:
    """Indices of the exits an edge runs: all those up to the split, or the named subset.

    A checkpoint may hold several exit types at one position (to compare
    them); a deployment runs only the ones worth their cost.
    """
    before = [i for i, e in enumerate(model.exit_configs) if e.position <= split_block]
    if names is None:
        return before
    by_name = {model.exit_configs[i].name: i for i in before}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"no exit {', '.join(unknown)} up to block {split_block}; "
                         f"the checkpoint has {', '.join(by_name) or 'none there'}")
    if len(set(names)) != len(names):
        raise ValueError(f"exits listed twice in {', '.join(names)}")
    return sorted(by_name[n] for n in names)


class EdgeHalf:
    """Stem, blocks ``[0, split)`` and the exits placed there."""

    def __init__(self, model: MultiExitModel, split_block: int, device: str = "cpu", dtype: str = "float32",
                 exits: Sequence[str] | None = None) -> None:
        self.model = model.eval()
        self.backbone = model.backbone
        self.split_block = split_block
        self.backbone.check_position(split_block)
        self.device = resolve_device(device)
        self.dtype = dtype
        compute_context(self.device, dtype)  # validate once
        self.model.to(self.device)
        self.exit_ids = edge_exit_ids(model, split_block, exits)
        audio = model.config.audio
        if audio is not None and split_block > audio.fuse_at:
            raise ValueError(f"this audiovisual model fuses audio into the backbone before block {audio.fuse_at}; "
                             f"the edge must split there or earlier, not after block {split_block}")
        self.spec = self.backbone.feature_spec(split_block)
        self.num_outputs = head_outputs(model.config.task, model.config.num_classes)

    @property
    def num_exits(self) -> int:
        return len(self.exit_ids)

    @torch.no_grad()
    def run(self, x: torch.Tensor, thresholds: list[float], score: str, with_scores: bool = False,
            audio: torch.Tensor | None = None) -> EdgeResult:
        """Walk the exits cheapest first; a sample leaves at the first exit confident enough.

        Audiovisual models encode ``audio`` and run visual blocks only once an
        exit (or the cloud) needs them: samples an audio-only exit answers cost
        no visual compute, samples a visual exit answers no audio encoding.
        """
        if len(thresholds) != self.num_exits:
            raise ValueError(f"{len(thresholds)} thresholds for {self.num_exits} edge exits")
        bb, B = self.backbone, x.shape[0]
        higher = HIGHER_IS_CONFIDENT[score]
        exit_index = torch.full((B,), -1, dtype=torch.long)
        best_exit = torch.full((B,), -1, dtype=torch.long)
        output = torch.zeros(B, self.num_outputs)
        conf = torch.full((B,), float("-inf") if higher else float("inf"))
        alive = torch.arange(B)  # sample ids still on the edge
        feats: torch.Tensor | None = None  # visual representation of the alive samples after `pos` blocks
        pos = 0
        last_in = None  # input of block split-1, kept for class-token attention scores
        need_scores = with_scores and self.split_block > 0

        def advance(stop: int) -> None:
            nonlocal feats, pos, last_in
            if feats is None:
                feats = bb.embed(x[alive].to(self.device))
            if need_scores and pos < self.split_block <= stop:
                feats = bb.forward_blocks(feats, pos, self.split_block - 1)
                last_in = feats
                pos = self.split_block - 1
            feats, pos = bb.forward_blocks(feats, pos, stop), stop

        if self.model.audiovisual and audio is None:
            raise ValueError("this model is audiovisual: the edge needs the audio input")
        audio_tokens: torch.Tensor | None = None  # of the alive samples, once an exit or the cloud needs them

        def encode_audio() -> None:
            nonlocal audio_tokens
            if self.model.audiovisual and audio_tokens is None:
                audio_tokens = self.model.encode_audio(audio[alive].to(self.device))

        with compute_context(self.device, self.dtype):
            for k, (i, t) in enumerate(zip(self.exit_ids, thresholds)):
                e = self.model.exit_configs[i]
                if e.uses_visual:
                    advance(e.position)
                if e.uses_audio:
                    encode_audio()
                out = self.model.run_exit(i, feats if e.uses_visual else None, audio_tokens).float().cpu()
                c = confidence(out, score)
                better = c > conf[alive] if higher else c < conf[alive]
                upd = alive[better]
                output[upd], conf[upd], best_exit[upd] = out[better], c[better], k
                leave = c >= t if higher else c <= t
                left = alive[leave]  # answered here, with this exit's answer (not an earlier, surer one's)
                exit_index[left], output[left], conf[left] = k, out[leave], c[leave]
                stay = ~leave.to(self.device)
                feats = None if feats is None else feats[stay]
                audio_tokens = None if audio_tokens is None else audio_tokens[stay]
                last_in = None if last_in is None else last_in[stay]
                alive = alive[~leave]
                if len(alive) == 0:
                    break
            if len(alive):
                advance(self.split_block)
                encode_audio()  # the cloud fuses them
            scores = None
            if need_scores and last_in is not None and len(alive):
                scores = cls_attention(bb.blocks[self.split_block - 1], last_in, self.spec.num_prefix).float().cpu()
        tokens = torch.empty(0, *self.spec.shape) if feats is None or not len(alive) else feats.float().cpu()
        audio_out = None if audio_tokens is None else audio_tokens.float().cpu()
        return EdgeResult(exit_index, best_exit, output, conf, alive, tokens, scores, audio_out)


class CloudHalf:
    """Blocks ``[split, L)`` and the final head, on tokens from the wire.

    Audiovisual models also take the edge's audio tokens, which the tail
    fuses into the backbone at the model's fusion block.
    """

    def __init__(self, model: MultiExitModel, split_block: int, device: str = "cpu", dtype: str = "float32") -> None:
        self.model = model.eval()
        self.backbone = model.backbone
        self.split_block = split_block
        self.backbone.check_position(split_block)
        audio = model.config.audio
        if audio is not None and split_block > audio.fuse_at:
            raise ValueError(f"this audiovisual model fuses audio before block {audio.fuse_at}; the cloud must "
                             f"resume there or earlier, not after block {split_block}")
        self.device = resolve_device(device)
        self.dtype = dtype
        compute_context(self.device, dtype)
        self.model.to(self.device)
        self.spec = self.backbone.feature_spec(split_block)
        self.num_audio_tokens = model.num_audio_tokens

    @property
    def audio_shape(self) -> tuple[int, int] | None:
        """(tokens, width) of the audio tokens the tail expects, or None without audio."""
        if not self.num_audio_tokens:
            return None
        return (self.num_audio_tokens, self.model.audio_encoder.dim)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *token_shape) tokens [and (B, audio tokens, width) for audiovisual models] -> (B, num_outputs)
        float32 on the CPU."""
        if (audio is None) != (not self.num_audio_tokens):
            raise ValueError("audiovisual tails need the audio tokens beside the visual ones, others none")
        with compute_context(self.device, self.dtype):
            return self.model.tail(tokens.to(self.device), self.split_block,
                                   None if audio is None else audio.to(self.device)).float().cpu()
