"""Backbones split exactly; exits attach anywhere; costs are measured, not guessed."""
from __future__ import annotations

import pytest
import timm
import torch

from offramp.core.models import (EXIT_TYPES, ExitConfig, ModelConfig, MultiExitModel, create_backbone, create_exit,
                            parse_exits, variant_names)
from offramp.core.models.cost import count_macs, count_params
from offramp.core.models.layers import Block
from offramp.core.halves import CloudHalf, EdgeHalf

SHAPES = {"vit_tiny_spec": (1, 64, 64)}


def make(variant: str, exits: str = "", task: str = "classification") -> tuple[MultiExitModel, torch.Tensor]:
    c, h, w = SHAPES.get(variant, (3, 32, 32))
    torch.manual_seed(0)
    model = MultiExitModel(ModelConfig(backbone=variant, img_size=(h, w), in_chans=c, num_classes=10,
                                       task=task, exits=parse_exits(exits))).eval()
    return model, torch.randn(3, c, h, w)


@pytest.mark.parametrize("variant", variant_names())
def test_head_then_tail_equals_one_pass(variant: str) -> None:
    model, x = make(variant)
    bb = model.backbone
    with torch.no_grad():
        full = bb(x)
        for k in range(bb.num_blocks + 1):
            split = bb.tail(bb.head(x, until=k), start=k)
            assert (split - full).abs().max().item() < 1e-5, f"split at {k}"


def test_timm_adapter_matches_timm_forward() -> None:
    bb = create_backbone("timm_vit_tiny_32", img_size=(32, 32), in_chans=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = bb.model(x)  # timm's own forward
        for k in (0, 2, bb.num_blocks):
            assert (bb.tail(bb.head(x, until=k), start=k) - reference).abs().max().item() < 1e-5


def test_timm_adapter_builds_any_timm_vit_without_download() -> None:
    bb = create_backbone("timm_vit_tiny_32", model_name="deit_tiny_patch16_224", img_size=(32, 32), in_chans=3,
                         num_classes=5, depth=2)
    assert bb.num_blocks == 2 and bb(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert isinstance(bb.model, timm.models.vision_transformer.VisionTransformer)


@pytest.mark.parametrize("variant", ["vit_tiny_32", "resnet_tiny_32", "vit_tiny_spec"])
@pytest.mark.parametrize("kind", sorted(EXIT_TYPES))
def test_exit_attaches_after_any_block(variant: str, kind: str) -> None:
    model, x = make(variant)
    for pos in range(1, model.num_blocks + 1):
        spec = model.backbone.feature_spec(pos)
        head = create_exit(kind, spec, 10)
        feats = model.backbone.head(x, until=pos)
        assert tuple(feats.shape[1:]) == spec.shape
        assert head(model.backbone.to_grid(feats, pos)).shape == (3, 10)


def test_multi_exit_forward_matches_backbone() -> None:
    model, x = make("vit_tiny_32", "slvit@4,mlp@2,cnn@2")
    assert model.exit_names == ["mlp@2", "cnn@2", "slvit@4"]  # ordered by position, cheapest first
    with torch.no_grad():
        outs, final = model(x)
        assert torch.allclose(final, model.backbone(x), atol=1e-6)
        feats = model.backbone.head(x, until=4)
        assert torch.allclose(outs[2], model.run_exit(2, feats), atol=1e-6)


def test_slvit_is_one_encoder_layer_with_its_own_class_token() -> None:
    model, _ = make("vit_tiny_32", "slvit@2")
    ex = model.exits[0]
    blocks = [m for m in ex.modules() if type(m).__name__ == "Block"]
    assert len(blocks) == 1
    assert ex.cls_token.shape == (1, 1, 64) and ex.pos_embed.shape == (1, 65, 64)


def test_slvit_exit_computes_only_its_class_token_and_answers_as_the_whole_layer() -> None:
    torch.manual_seed(0)
    block = Block(64, 4, 2.0).eval()
    x = torch.randn(3, 65, 64)
    with torch.no_grad():
        assert torch.allclose(block.forward_class_token(x), block(x)[:, :1], atol=1e-5)
    model, x = make("vit_tiny_32", "slvit@2")
    ex = model.exits[0]
    grid = model.backbone.to_grid(model.backbone.head(x, 2), 2)
    with torch.no_grad():
        tokens = torch.cat([ex.cls_token.expand(3, -1, -1), ex.proj(grid).flatten(2).transpose(1, 2)], 1) + ex.pos_embed
        assert torch.allclose(ex(grid), ex.head(ex.norm(ex.block(tokens))[:, 0]), atol=1e-5)


def test_slvit_on_cnn_feature_map_patchifies() -> None:
    model, x = make("resnet_tiny_32", "slvit@2")
    ex = model.exits[0]
    assert ex.patch_size == 4  # 32x32 map -> 8x8 = 64 tokens
    assert ex.pos_embed.shape[1] == 65


def test_costs_are_measured_and_slvit_is_cheaper_than_cnn_exit() -> None:
    for variant in ("vit_tiny_32", "resnet_tiny_32"):
        model, x = make(variant, "mlp@2,cnn@2,slvit@2")
        grid = model.backbone.to_grid(model.backbone.head(x, 2), 2)
        macs = {e.type: count_macs(model.exits[i], grid) for i, e in enumerate(model.exit_configs)}
        assert 0 < macs["mlp"] < macs["slvit"] <= macs["cnn"]
    lin = torch.nn.Linear(10, 20)
    assert count_macs(lin, torch.randn(4, 10)) == 200 and count_params(lin) == 220


def test_regression_exits_predict_value_and_uncertainty() -> None:
    model, x = make("vit_tiny_32", "slvit@2,cnn@3,mlp@4", task="regression")
    outs, final = model(x)
    assert all(o.shape == (3, 2) for o in [*outs, final])
    from offramp.core.scores import confidence
    from offramp.training.train import task_loss

    std = confidence(outs[0], "std")
    assert (std > 0).all()
    target = torch.tensor([1.0, 5.0, 30.0])
    loss = task_loss(outs[0], target, "regression")
    loss.backward()
    assert loss.isfinite() and model.exits[0].head.weight.grad is not None


def test_bad_names_are_rejected_with_choices() -> None:
    with pytest.raises(ValueError, match="unknown model variant 'nope'.*vit_tiny_32"):
        create_backbone("nope")
    with pytest.raises(ValueError, match="unknown exit type 'foo'"):
        parse_exits("foo@2")
    with pytest.raises(ValueError, match="needs a block position"):
        parse_exits("slvit")
    with pytest.raises(ValueError, match="position must be in 1..6"):
        MultiExitModel(ModelConfig("vit_tiny_32", (32, 32), 3, 10, exits=(ExitConfig("slvit", 9),)))


def test_edge_and_cloud_halves_compose_to_the_full_model() -> None:
    model, x = make("vit_tiny_32", "slvit@2,mlp@3")
    edge, cloud = EdgeHalf(model, 4), CloudHalf(model, 4)
    never = edge.run(x, [2.0, 2.0], "max_prob", with_scores=True)  # no exit is ever that sure
    assert (never.exit_index == -1).all() and never.scores.shape == (3, 64)
    with torch.no_grad():
        assert (cloud.run(never.tokens) - model.backbone(x)).abs().max() < 1e-5
    always = edge.run(x, [0.0, 0.0], "max_prob")
    assert (always.exit_index == 0).all() and len(always.offload) == 0


def test_conv_halves_run_channels_last_with_the_same_answers() -> None:
    """The edge prepares conv models channels-last (faster at batch 1 on CPUs); answers stay the model's, and
    tokens at a split inside the conv tokenizer leave in the wire's (contiguous) order."""
    model, x = make("edge_c10", "slvit@2")
    with torch.no_grad():
        reference = model.backbone(x)
    edge, cloud = EdgeHalf(model, 3), CloudHalf(model, 3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    tokens = edge.run(x, [2.0], "max_prob").tokens  # no exit answers: all go on at the split
    assert tokens.dim() == 4 and tokens.is_contiguous()
    assert (cloud.run(tokens) - reference).abs().max() < 1e-4
