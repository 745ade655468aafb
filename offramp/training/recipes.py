"""Training recipes: what makes each backbone variant strong, as named overrides of ``TrainConfig``.

A recipe belongs to its variant: ``offramp train --model airbench_c10`` uses
the ``airbench_c10`` recipe unless ``--recipe`` names another; flags override
single settings. The numbers come from the CIFAR speed-run literature
(airbench: Nesterov SGD, a triangular schedule, label smoothing 0.2, fast
BatchNorm shifts, lookahead averaging) and from Compact Convolutional
Transformers and DeiT (AdamW, cosine, a CNN teacher's hard labels).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from offramp.core.errors import OfframpError
from offramp.training.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """Settings for one variant, and the teacher variant to distill from (trained first if not given)."""

    description: str
    settings: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None

    def config(self, **overrides: Any) -> TrainConfig:
        """The recipe's ``TrainConfig``; ``None`` overrides (flags left unset) are ignored."""
        return replace(TrainConfig(**self.settings), **{k: v for k, v in overrides.items() if v is not None})


# airbench94's hyperparameters (given per 1024 samples of a summed loss) restated for a mean
# loss over batches of 512, which run 1.7x faster than 1024 on a 2-core CPU (cache-bound):
# peak lr 11.5 / (1024 (1 + 1/(1 - 0.85))) per sample x 512, decoupled decay 0.0153 / 11.5 of it.
_AIRBENCH_BATCH = 512
_AIRBENCH_LR = 11.5 / (1024 * (1 + 1 / (1 - 0.85))) * _AIRBENCH_BATCH
_AIRBENCH = dict(
    epochs=16, batch_size=_AIRBENCH_BATCH, optimizer="sgd", lr=_AIRBENCH_LR, momentum=0.85, norm_lr_scale=64.0,
    weight_decay=0.0153 / 11.5, schedule="triangle", warmup=0.23,
    grad_clip=None, label_smoothing=0.2, averaging="lookahead", translate=2, tta=True,
)
_EXITS = dict(exit_epochs=30, copycat_epochs=15, exit_lr=2e-3, exit_views=2)

RECIPES: dict[str, Recipe] = {
    "default": Recipe("TrainConfig's defaults: a small ViT in minutes; no tricks"),
    "airbench_c10": Recipe("airbench94 on CIFAR-10: SGD-Nesterov, triangle schedule, lookahead, TTA",
                           {**_AIRBENCH, **_EXITS}),
    "cct_c10": Recipe("CCT on CIFAR-10: AdamW + cosine, distilled from airbench_c10's hard labels",
                      dict(epochs=30, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup=0.05,
                           label_smoothing=0.1, translate=4, tta=True, distill_weight=0.5, teacher_views=8, **_EXITS),
                      teacher="airbench_c10"),
    "hybrid_c10": Recipe("hybrid ViT on CIFAR-10: tokenizer from airbench_c10's first layers, AdamW + cosine, "
                         "distilled from its hard labels",
                         dict(epochs=16, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup=0.05,
                              label_smoothing=0.1, translate=2, tta=True, distill_weight=0.5, teacher_views=4,
                              tokenizer_from_teacher=True, tokenizer_lr_scale=0.1, **_EXITS),
                         teacher="airbench_c10"),
    "edge_c10": Recipe("edge-first hybrid ViT on CIFAR-10: hybrid_c10's recipe, the exits trained with the backbone "
                       "(a joint loss), then copycat on its answers",
                       dict(epochs=18, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup=0.05,
                            label_smoothing=0.1, translate=2, tta=True, distill_weight=0.5, teacher_views=4,
                            tokenizer_from_teacher=True, tokenizer_lr_scale=0.3, exit_loss_weight=1.0,
                            exit_epochs=0, copycat="hard", copycat_epochs=5, exit_lr=1e-3, exit_views=1),
                       teacher="airbench_c10"),
    "vit_tiny_spec": Recipe("FSDD spectrogram ViT: AdamW + cosine, longer, random shifts in time",
                            dict(epochs=60, batch_size=64, lr=1e-3, weight_decay=0.05, translate=6,
                                 translate_vertical=False, flip=False, label_smoothing=0.1, exit_epochs=30,
                                 copycat_epochs=15)),
}
_ = {f.name for f in fields(TrainConfig)}
for _name, _recipe in RECIPES.items():  # a typo in a recipe fails at import, not after an hour of training
    if unknown := set(_recipe.settings) - _:
        raise AssertionError(f"recipe {_name} sets unknown fields {sorted(unknown)}")


def recipe_for(variant: str, name: str | None = None) -> tuple[str, Recipe]:
    """The named recipe, else the variant's own, else ``default``."""
    if name is not None:
        if name not in RECIPES:
            raise OfframpError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
        return name, RECIPES[name]
    return (variant, RECIPES[variant]) if variant in RECIPES else ("default", RECIPES["default"])
