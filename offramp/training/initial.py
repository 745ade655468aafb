"""Weights from elsewhere: a state dict loaded into a backbone before training (``--init``).

Only safetensors files are read (or an Offramp checkpoint directory, whose
backbone is taken): never pickle. Keys may be the backbone's own, prefixed
with ``backbone.`` (an Offramp checkpoint), or timm's (for ``timm_*``
variants, whose adapter holds the timm model as ``model``).
"""
from __future__ import annotations

import contextlib
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from offramp.core.errors import OfframpError
from offramp.core.models import SplittableBackbone

PREFIXES = ("", "backbone.", "model.")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise OfframpError(f"--init: '{path}' does not exist; pass a .safetensors file or a checkpoint directory")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise OfframpError(f"--init: '{path}' is not a safetensors file ({str(e).splitlines()[0]}); convert "
                           "other formats with safetensors.torch.save_file") from None


def _align(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's keys renamed to the backbone's, by the one prefix rule that matches most keys."""
    best: dict[str, torch.Tensor] = {}
    for strip in PREFIXES:
        for add in PREFIXES:
            renamed = {add + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
            if len(set(renamed) & set(own)) > len(set(best) & set(own)):
                best = renamed
    return best


def load_state(backbone: SplittableBackbone, state: dict[str, torch.Tensor], strict: bool = True,
               what: str = "--init") -> None:
    """Copy ``state`` into ``backbone``; a mismatch is one line naming the first offending keys."""
    own = backbone.state_dict()
    state = _align(state, own)
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shape:
        problems.append(f"shape mismatch: {', '.join(shape[:3])}" + (f" (+{len(shape) - 3} more)" if len(shape) > 3 else ""))
    if strict and missing:
        problems.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise OfframpError(f"{what}: weights do not fit this variant: {'; '.join(problems)}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_tokenizer_from(backbone: SplittableBackbone, teacher: torch.nn.Module | None) -> None:
    """A hybrid ViT's tokenizer starts as the teacher CNN's stem and first conv layers (same parameter
    names); only its projection to the ViT's width, if any, stays freshly initialised."""
    from offramp.core.models.airbench import AirbenchTokenizer

    tokenizer = getattr(backbone, "patch_embed", None)
    if not isinstance(tokenizer, AirbenchTokenizer):
        raise OfframpError("tokenizer_from_teacher: this variant has no airbench tokenizer to load; "
                           "use a hybrid variant such as hybrid_c10, or another recipe")
    if teacher is None:
        raise OfframpError("tokenizer_from_teacher needs a teacher: pass --teacher CHECKPOINT (an airbench CNN) "
                           "rather than --teacher none")
    source = teacher.state_dict()
    own = tokenizer.state_dict()
    state = {k: source[k] for k in own if k in source}
    if missing := [k for k in own if k not in state and not k.startswith("proj.")]:
        raise OfframpError(f"tokenizer from the teacher: the teacher has no {', '.join(missing[:3])}; "
                           "it must be an airbench CNN at least as deep as the tokenizer")
    load_state(tokenizer, state, strict=False, what="tokenizer from the teacher")


@contextlib.contextmanager
def _cache_only_unless_hub_answers(timeout_s: float = 3.0) -> Iterator[None]:
    """huggingface_hub in offline mode (weights from its local cache only) while its hub does not accept a
    connection within ``timeout_s``: its client would otherwise retry for about 45 s before failing."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        reachable = True
    except OSError:
        reachable = False
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def load_initial_weights(backbone: SplittableBackbone, path: str | None, pretrained: bool = False,
                         variant: str = "") -> None:
    """``--init PATH`` (strict), or ``--pretrained`` through timm's own loader for timm variants."""
    if path is not None:
        load_state(backbone, _read(Path(path).expanduser()))
        return
    if not pretrained:
        return
    model = getattr(backbone, "model", None)
    if model is None or not variant.startswith(("timm_", "timm:")):
        raise OfframpError(f"--pretrained works for timm models only (timm:NAME, timm_*), not '{variant}'; use "
                           "--init PATH")
    import timm

    name = model.default_cfg.get("architecture", "")
    try:
        with _cache_only_unless_hub_answers():
            source = timm.create_model(name, pretrained=True)
    except Exception as e:  # no hub, no cache, no weights for that name: all end the same way for the user
        raise OfframpError(f"--pretrained: timm could not load weights for '{name}' ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}); the model hub is not reachable from here, so "
                           "download the weights elsewhere and pass them with --init PATH") from None
    load_state(backbone, {f"model.{k}": v for k, v in source.state_dict().items()}, strict=False, what="--pretrained")
