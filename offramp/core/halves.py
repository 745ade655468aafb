"""The two halves of a split model, as the edge and cloud daemons run them.

``EdgeHalf`` runs the stem, the blocks up to the split and the exits on the
way, deciding per sample; survivors continue as a smaller batch and leave as
tokens. ``CloudHalf`` runs the remaining blocks and the final head on tokens
received from any number of edges.
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offramp.core.checkpoint import bottleneck_id
from offramp.core.exit_rule import edge_exit_ids, least_confident, passes, walk
from offramp.core.models import FeatureSpec, ModelConfig, MultiExitModel, head_outputs
from offramp.core.scores import confidence

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


def ready_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in eval mode on ``device``; on a CPU, convolution weights in channels-last layout.

    oneDNN computes a convolution with channels-last weights in that layout (the output follows): at batch 1
    on one core it makes ``edge_c10``'s conv tokenizer 24% faster and the whole model 17% (same results to
    1e-5). Every half and baseline prepares its model here, so their timings compare.
    """
    model = model.eval().to(device)
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


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


class EdgeWalk(ABC):
    """What every edge half shares, whatever computes it: the exits it runs and the walk over them.

    ``run`` walks the exits cheapest first and decides per sample; a subclass
    supplies the stages the walk asks for: the stem and blocks (``advance``),
    an exit's head (``exit_output``), the class token's attention at the
    split (``split_attention``) and the audio encoder (``encode_audio``).
    ``EdgeHalf`` computes them with the PyTorch model, ``OnnxEdgeHalf``
    (``offramp.core.onnx_edge``) with exported graphs.
    """

    def __init__(self, config: ModelConfig, split_block: int, spec: FeatureSpec, device: torch.device,
                 exits: Sequence[str] | None = None) -> None:
        self.split_block = split_block
        self.exit_configs = config.exits_in_order
        self.exit_ids = edge_exit_ids(self.exit_configs, split_block, exits)
        self.audiovisual = config.audio is not None
        if config.audio is not None and split_block > config.audio.fuse_at:
            raise ValueError(f"this audiovisual model fuses audio into the backbone before block "
                             f"{config.audio.fuse_at}; the edge must split there or earlier, not after block "
                             f"{split_block}")
        self.spec = spec
        self.device = device
        self.num_outputs = head_outputs(config.task, config.num_classes)
        self.bottleneck_id = ""  # the runtimes that run a bottleneck's encoder say which (EdgeHalf)
        self.code_dictionary: bytes | None = None  # and the zstd dictionary its codes compress with, if any
        self.num_blocks: int  # the whole backbone's, set by each runtime

    @property
    def num_exits(self) -> int:
        return len(self.exit_ids)

    @property
    def exit_names(self) -> list[str]:
        """Names of the exits this half runs, cheapest first."""
        return [self.exit_configs[i].name for i in self.exit_ids]

    @abstractmethod
    def advance(self, x: torch.Tensor, start: int | None, stop: int) -> torch.Tensor:
        """The representation after ``stop`` blocks, from ``x``: the representation after ``start``
        blocks, or with ``start`` None the raw input (the stem runs first)."""

    @abstractmethod
    def exit_output(self, index: int, feats: torch.Tensor | None, audio_tokens: torch.Tensor | None) -> torch.Tensor:
        """Exit ``index`` (into ``exit_configs``) on the representation after its position, (B, num_outputs)."""

    @abstractmethod
    def split_attention(self, feats: torch.Tensor) -> torch.Tensor:
        """Attention the class token pays each patch token in block ``split - 1``, given that block's input."""

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        raise ValueError("this edge half runs no audio encoder")

    def context(self) -> contextlib.AbstractContextManager:
        """The context the stages compute in (autocast for reduced precision)."""
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run(self, x: torch.Tensor, thresholds: list[float], score: str, with_scores: bool = False,
            audio: torch.Tensor | None = None) -> EdgeResult:
        """Walk the exits cheapest first; a sample leaves at the first exit confident enough.

        Audiovisual models encode ``audio`` and run visual blocks only once an
        exit (or the cloud) needs them: samples an audio-only exit answers cost
        no visual compute, samples a visual exit answers no audio encoding.
        """
        if len(thresholds) != self.num_exits:
            raise ValueError(f"{len(thresholds)} thresholds for {self.num_exits} edge exits")
        if self.audiovisual and audio is None:
            raise ValueError("this model is audiovisual: the edge needs the audio input")
        B = x.shape[0]
        need_scores = with_scores and self.split_block > 0
        on_edge = _Survivors(self, x, audio, keep_attention_input=need_scores)
        # What each exit said of the samples it saw. The per-sample bookkeeping is NumPy: at batch 1 a walk
        # is a few small decisions per exit, which torch's per-call cost would make a tenth of the edge's time.
        outputs = np.zeros((self.num_exits, B, self.num_outputs), np.float32)
        confidences = np.full((self.num_exits, B), math.nan, np.float32)
        with self.context():
            for k, (i, threshold) in enumerate(zip(self.exit_ids, thresholds)):
                e = self.exit_configs[i]
                out = self.exit_output(i, on_edge.tokens_after(e.position) if e.uses_visual else None,
                                       on_edge.encoded_audio() if e.uses_audio else None).float().cpu()
                c = confidence(out, score).numpy()
                outputs[k, on_edge.ids], confidences[k, on_edge.ids] = out.numpy(), c
                on_edge.keep(~passes(c, threshold, score))  # the confident leave here; ``walk`` below agrees
                if not len(on_edge):
                    break
            if len(on_edge):  # they go on at the split, with their audio tokens (the cloud fuses them)
                on_edge.tokens_after(self.split_block)
                on_edge.encoded_audio()
            scores = None
            if need_scores and on_edge.attention_input is not None and len(on_edge):
                scores = self.split_attention(on_edge.attention_input).float().cpu()

        walked = walk(confidences, thresholds, score)
        carried = np.where(walked.goes_on, walked.best, walked.leaves_at)  # whose answer each keeps
        answered = (carried >= 0).nonzero()[0]  # -1: no exit offered an answer (an edge without exits)
        output = np.zeros((B, self.num_outputs), np.float32)
        conf = np.full(B, least_confident(score), np.float32)
        output[answered] = outputs[carried[answered], answered]
        conf[answered] = confidences[carried[answered], answered]
        tokens = on_edge.tokens
        tokens = (torch.empty(0, *self.spec.shape) if tokens is None or not len(on_edge)
                  else tokens.float().cpu().contiguous())  # channels-last conv maps leave in the wire's order
        audio_tokens = None if on_edge.audio_tokens is None else on_edge.audio_tokens.float().cpu()
        return EdgeResult(torch.from_numpy(np.where(walked.goes_on, -1, walked.leaves_at)),
                          torch.from_numpy(walked.best), torch.from_numpy(output), torch.from_numpy(conf),
                          torch.from_numpy(on_edge.ids), tokens, scores, audio_tokens)


class EdgeHalf(EdgeWalk):
    """Stem, blocks ``[0, split)`` and the exits placed there, computed by the PyTorch model."""

    def __init__(self, model: MultiExitModel, split_block: int, device: str = "cpu", dtype: str = "float32",
                 exits: Sequence[str] | None = None) -> None:
        self.backbone = model.backbone
        self.backbone.check_position(split_block)
        self.num_blocks = self.backbone.num_blocks
        super().__init__(model.config, split_block, self.backbone.feature_spec(split_block), resolve_device(device),
                         exits)
        self.dtype = dtype
        compute_context(self.device, dtype)  # validate once
        self.model = ready_for_inference(model, self.device)
        self.bottleneck_id = _bottleneck_at(model, split_block)
        self.code_dictionary = model.bottleneck.dictionary() if self.bottleneck_id else None  # zstd, raw bytes

    @torch.inference_mode()
    def to_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens at the split -> the bottleneck's (B, N, channels) int8 code."""
        if not self.bottleneck_id:
            raise ValueError(f"this checkpoint has no bottleneck at split block {self.split_block}")
        return self.model.bottleneck.encode(tokens.to(self.device, torch.float32)).to(torch.int8).cpu()

    def advance(self, x: torch.Tensor, start: int | None, stop: int) -> torch.Tensor:
        if start is None:
            x, start = self.backbone.embed(x.to(self.device)), 0
        return self.backbone.forward_blocks(x, start, stop)

    def exit_output(self, index: int, feats: torch.Tensor | None, audio_tokens: torch.Tensor | None) -> torch.Tensor:
        return self.model.run_exit(index, feats, audio_tokens)

    def split_attention(self, feats: torch.Tensor) -> torch.Tensor:
        return cls_attention(self.backbone.transformer_block(self.split_block - 1), feats, self.spec.num_prefix)

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model.encode_audio(audio.to(self.device))

    def context(self) -> contextlib.AbstractContextManager:
        return compute_context(self.device, self.dtype)


class _Survivors:
    """The samples of a batch still on the edge, and what has been computed for them so far.

    Nothing is computed before it is asked for, and samples that leave are
    dropped from everything at once: the rest go on as a smaller batch.
    """

    def __init__(self, half: EdgeWalk, x: torch.Tensor, audio: torch.Tensor | None,
                 keep_attention_input: bool) -> None:
        self.half, self.x, self.audio = half, x, audio
        self.ids = np.arange(x.shape[0])  # their indices in the batch
        self.tokens: torch.Tensor | None = None  # their visual representation after `position` blocks
        self.position = 0
        self.keep_attention_input = keep_attention_input
        self.attention_input: torch.Tensor | None = None  # input of block split-1, for class-token attention
        self.audio_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def tokens_after(self, position: int) -> torch.Tensor:
        """Their visual representation after ``position`` blocks, running only the blocks not yet run."""
        split = self.half.split_block
        if self.keep_attention_input and self.position < split <= position:
            self._advance(split - 1)
            self.attention_input = self.tokens
        return self._advance(position)

    def _advance(self, position: int) -> torch.Tensor:
        if self.tokens is None:
            self.tokens = self.half.advance(self._mine(self.x), None, position)
        elif position != self.position:
            self.tokens = self.half.advance(self.tokens, self.position, position)
        self.position = position
        return self.tokens

    def encoded_audio(self) -> torch.Tensor | None:
        """Their audio tokens (None without audio), encoded the first time they are asked for."""
        if self.half.audiovisual and self.audio_tokens is None:
            self.audio_tokens = self.half.encode_audio(self._mine(self.audio))
        return self.audio_tokens

    def _mine(self, batch: torch.Tensor) -> torch.Tensor:
        """The survivors' rows of a whole-batch input (the input itself while none has left)."""
        return batch if len(self.ids) == len(batch) else batch[torch.from_numpy(self.ids)]

    def keep(self, stay: np.ndarray) -> None:
        """Keep only the samples ``stay`` marks (a boolean mask over the survivors)."""
        if stay.all():
            return
        if not stay.any():  # all leave: nothing more is computed for this batch
            self.tokens = self.attention_input = self.audio_tokens = None
            self.ids = self.ids[:0]
            return
        rows = torch.from_numpy(stay.nonzero()[0]).to(self.half.device)

        def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        self.tokens, self.attention_input = rows_of(self.tokens), rows_of(self.attention_input)
        self.audio_tokens = rows_of(self.audio_tokens)
        self.ids = self.ids[stay]


class CloudHalf:
    """Blocks ``[split, L)`` and the final head, on tokens from the wire.

    Audiovisual models also take the edge's audio tokens, which the tail
    fuses into the backbone at the model's fusion block.
    """

    def __init__(self, model: MultiExitModel, split_block: int, device: str = "cpu", dtype: str = "float32") -> None:
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
        self.model = ready_for_inference(model, self.device)
        self.spec = self.backbone.feature_spec(split_block)
        self.num_audio_tokens = model.num_audio_tokens
        self.num_outputs = head_outputs(model.config.task, model.config.num_classes)
        self.bottleneck_id = _bottleneck_at(model, split_block)
        self.code_shape = model.bottleneck.code_shape if self.bottleneck_id else None  # (N, channels)
        self.code_dictionary = model.bottleneck.dictionary() if self.bottleneck_id else None  # zstd, raw bytes

    @property
    def audio_shape(self) -> tuple[int, int] | None:
        """(tokens, width) of the audio tokens the tail expects, or None without audio."""
        if not self.num_audio_tokens:
            return None
        return (self.num_audio_tokens, self.model.audio_encoder.dim)

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *token_shape) tokens [and (B, audio tokens, width) for audiovisual models] -> (B, num_outputs)
        float32 on the CPU."""
        if (audio is None) != (not self.num_audio_tokens):
            raise ValueError("audiovisual tails need the audio tokens beside the visual ones, others none")
        with compute_context(self.device, self.dtype):
            return self.model.tail(tokens.to(self.device), self.split_block,
                                   None if audio is None else audio.to(self.device)).float().cpu()

    @torch.inference_mode()
    def from_code(self, code: torch.Tensor) -> torch.Tensor:
        """A (B, N, channels) bottleneck code, as decoded from the wire -> (B, N, D) tokens for ``run``.

        Values outside the code's range cannot come from the bottleneck: refused, not clamped.
        """
        levels = self.model.config.bottleneck.levels
        if code.numel() and float(code.abs().max()) > levels:
            raise ValueError(f"code values beyond +-{levels}, the range of bottleneck {self.bottleneck_id}")
        with compute_context(self.device, self.dtype):
            return self.model.bottleneck.decode(code.to(self.device)).float().cpu()


class WholeModel:
    """Every block and the final head, on the input itself: what the cloud runs for the input route, where
    the edge sends the picture or clip rather than its tokens."""

    def __init__(self, model: MultiExitModel, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = resolve_device(device)
        self.dtype = dtype
        compute_context(self.device, dtype)
        self.model = ready_for_inference(model, self.device)
        self.num_outputs = head_outputs(model.config.task, model.config.num_classes)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) inputs [and (B, 1, mels, frames) audio] -> (B, num_outputs) float32 on the CPU."""
        with compute_context(self.device, self.dtype):
            return self.model.final(x.to(self.device), None if audio is None else audio.to(self.device)).float().cpu()


def _bottleneck_at(model: MultiExitModel, split_block: int) -> str:
    """The identity of the model's bottleneck if it sits at ``split_block``; "" otherwise."""
    b = model.config.bottleneck
    return bottleneck_id(model) if b is not None and b.position == split_block else ""
