"""The ``offramp`` command: the layer on top, whose subcommands import their work lazily so ``--help`` stays fast.

The daemons' and the orchestrator's subcommands are defined beside them and
imported here; they import nothing back. User errors (bad paths, unknown
names, corrupt files) print one line and exit with status 2; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

import cloud_node.cli
import edge_node.cli
import orchestrator.cli

from offramp import __version__
from offramp.core.operating_points import DEFAULT_THRESHOLDS
from offramp.serving.flags import exit_names, floats, ints, shown
from offramp.netem import cli as netem_cli


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a backbone, its exits, and optionally copycat-fine-tune the exits",
                       description="Phase 1 trains the backbone; phase 2 trains the exits on the frozen backbone; "
                                   "--copycat adds phase 3 (CC-SL-ViT): exits imitate the backbone's answers.")
    p.add_argument("--data", default="digits",
                   help="digits | imagefolder:PATH | fsdd:PATH | crowd-av[:N] (synthetic audiovisual crowd counting, "
                        "a regression task) (default: digits)")
    p.add_argument("--model", default=None, help="backbone variant (default: vit_micro_32 for 32x32 inputs, "
                                                "vit_tiny_spec for audio); see 'offramp models'")
    p.add_argument("--exits", default=None,
                   help="exits as TYPE@BLOCK[:MODALITY], comma-separated; TYPE in slvit, mlp, cnn; MODALITY "
                        "(audiovisual data, slvit only) visual, audio or fused (default: slvit@2,slvit@4; for "
                        "crowd-av the ladder slvit@0:audio,slvit@2,slvit@2:fused,slvit@4:fused)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--split-block", type=int, default=None,
                   help="block after which the edge hands over to the cloud (default: the last exit's position)")
    p.add_argument("--recipe", default=None,
                   help="training recipe (default: the variant's own, e.g. airbench_c10, cct_c10; else 'default'); "
                        "flags below override single settings. See 'offramp models'")
    p.add_argument("--epochs", type=int, default=None, help="backbone epochs (0 to skip phase 1)")
    p.add_argument("--exit-epochs", type=int, default=None, help="exit epochs on labels (on cached features)")
    p.add_argument("--copycat", nargs="?", const="hard", choices=["hard", "soft"], default=None,
                   help="fine-tune the exits on the backbone's predictions (hard labels, or soft with --temperature)")
    p.add_argument("--copycat-epochs", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the backbone")
    p.add_argument("--exit-lr", type=float, default=None, help="peak learning rate of the exits")
    p.add_argument("--tokenizer-lr-scale", type=float, default=None, metavar="FACTOR",
                   help="learning-rate factor for a ViT's tokenizer (hybrid_c10's recipe: its teacher's first "
                        "layers); 0 freezes it")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="auto (default): bf16 autocast where the CPU (AMX, AVX512-BF16) or GPU runs it fast")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: cuda if present")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="also report the backbone's accuracy with flip/shift test-time augmentation")
    p.add_argument("--teacher", default=None, metavar="CHECKPOINT|none",
                   help="distill the backbone from this checkpoint's hard labels; 'none' turns off the recipe's "
                        "teacher (by default a recipe with a teacher trains it first, into OUT/teacher)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="load a safetensors state dict (or a checkpoint directory's backbone) before training; "
                        "strict: every key and shape must match")
    p.add_argument("--pretrained", action="store_true",
                   help="timm_* variants: start from timm's pretrained weights (needs timm's model hub)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples (quick runs)")
    p.add_argument("--exit-loss-weight", type=float, default=None, metavar="W",
                   help="train the exits with the backbone in phase 1, adding W x their mean loss to the final "
                        "head's (exit-aware backbone; edge_c10's recipe: 1); 0: exits train on the frozen backbone only")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--selection-fraction", type=float, default=0.0,
                   help="hold this share of the data out of training as well, for choosing thresholds on "
                        "('offramp calibrate --on selection'); validation stays the same split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (default: on; --no-progress hides them)")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json
    import shlex
    import time
    from pathlib import Path

    from offramp.training.pipeline import TrainJob, default_variant_for, run_training
    from offramp.training.recipes import recipe_for
    from offramp.training.report import format_report

    job = TrainJob(
        data=args.data, model=args.model, exits=args.exits, out=args.out, split_block=args.split_block,
        limit=args.limit, val_fraction=args.val_fraction, seed=args.seed, teacher=args.teacher, init=args.init,
        pretrained=args.pretrained, selection_fraction=args.selection_fraction,
    )
    variant = args.model or default_variant_for(args.data)
    name, recipe = recipe_for(variant, args.recipe)
    cfg = recipe.config(
        epochs=args.epochs, exit_epochs=args.exit_epochs, copycat=args.copycat, copycat_epochs=args.copycat_epochs,
        temperature=args.temperature, batch_size=args.batch_size, lr=args.lr, exit_lr=args.exit_lr,
        tokenizer_lr_scale=args.tokenizer_lr_scale, exit_loss_weight=args.exit_loss_weight, precision=args.precision, device=args.device, tta=args.tta, seed=args.seed,
        progress=None if args.progress else False,
    )
    logging.getLogger(__name__).info("recipe %s: %s", name, recipe.description)
    start = time.perf_counter()
    report = run_training(job, cfg, teacher_variant=recipe.teacher)
    wall = time.perf_counter() - start
    card_path = Path(args.out) / "card.json"  # how it was made, beside what it is (not fingerprinted)
    card = json.loads(card_path.read_text())
    card["metrics"].setdefault("training", {}).update(
        recipe=name, command="offramp " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        total_wall_s=round(wall, 1))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"checkpoint written to {args.out} ({wall:.0f} s)\n")
    print(format_report(report))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-exit accuracy, overhead and exit shares of a checkpoint",
                       description="Evaluates every exit and the final head on the checkpoint's validation split "
                                   "(or --data), with params and MACs measured by FlopCounterMode.")
    p.add_argument("checkpoint", help="checkpoint directory written by 'offramp train'")
    p.add_argument("--data", default=None, help="evaluate on this data spec instead of the card's validation split")
    p.add_argument("--score", default=None, help="max_prob (default), entropy or margin; std for regression")
    p.add_argument("--thresholds", type=floats, default=None,
                   help=f"confidence thresholds for the exit-share table (default {shown(DEFAULT_THRESHOLDS)})")
    p.add_argument("--exits", type=exit_names, default=None, metavar="NAME,NAME",
                   help="walk only these exits in the exit-share table, as 'offramp edge --exits' does "
                        "(e.g. slvit@2,slvit@4; default: all)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="test-time augmentation: average every head over mirrored and shifted copies (images)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="evaluate in float32 as the daemons serve (default), or in bf16 as training computed")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from offramp.training.pipeline import evaluate_checkpoint
    from offramp.training.report import format_report

    report = evaluate_checkpoint(args.checkpoint, data=args.data, score=args.score, thresholds=args.thresholds,
                                 exits=args.exits, tta=args.tta, precision=args.precision)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list backbone variants and exit types")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from offramp.core.models import EXIT_TYPES, variant_names
    from offramp.core.models.registry import _VARIANTS

    print("backbone variants:")
    for name in variant_names():
        print(f"  {name:18s} {(_VARIANTS[name].__doc__ or '').strip()}")
    from offramp.training.recipes import RECIPES

    print("training recipes (offramp train --recipe NAME; a variant uses its own by default):")
    for name, recipe in RECIPES.items():
        print(f"  {name:18s} {recipe.description}")
    print("exit types:")
    for name, cls in EXIT_TYPES.items():
        print(f"  {name:18s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the quick start: train on digits (or --data), then the split with exits "
                                    "over an emulated link, against cloud-only and edge-only")
    p.add_argument("--workdir", default="runs/demo", help="where the demo keeps its checkpoint (reused if present)")
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--data", default="digits",
                   help="digits | imagefolder:PATH | fsdd:PATH (default: digits); a checkpoint trained on other "
                        "data is retrained")
    p.add_argument("--model", default=None,
                   help="backbone variant (default: vit_micro_32 for 32x32 inputs, vit_tiny_spec for audio)")
    p.add_argument("--profile", default="lte", help="emulated link between edge and cloud (default: lte; "
                                                   "see 'offramp link --list')")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second, as a camera sends them "
                                                           "(default: 40)")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from offramp.cli.demo import run_demo

    return run_demo(args.workdir, retrain=args.retrain, data=args.data, model=args.model, profile=args.profile,
                    rate=args.rate)


def add_bottleneck(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bottleneck", help="add a learned bottleneck at the split to a trained checkpoint (fewer bytes per offload)",
        description="Trains a small per-token encoder (edge) and decoder (cloud) at the split by distilling the "
                    "frozen model, and writes a new checkpoint holding it. Edges then send its integer code "
                    "(--codec bottleneck) instead of quantized tokens; backbone, exits and the uncompressed path "
                    "are unchanged. Its size and accuracy on the validation split are printed and kept in the card.")
    p.add_argument("checkpoint", help="checkpoint directory written by 'offramp train' (ViT-family backbones)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (a copy with the bottleneck); with "
                                                "several --channels, a pattern such as runs/bn/c{channels}")
    p.add_argument("--channels", type=ints, required=True, metavar="C[,C...]",
                   help="code values per token (e.g. 4-32; fewer: smaller); several widths train one after the "
                        "other on the same cached tokens")
    p.add_argument("--bits", type=int, default=4, help="bits per code value, 2-8: integers in +-(2^(bits-1)-1) "
                                                      "(default: 4)")
    p.add_argument("--hidden", type=int, default=0, help="hidden width of encoder and decoder (default: token width)")
    p.add_argument("--split-block", type=int, default=None, help="where it sits (default: the checkpoint's split)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs over the cached tokens (default: 10); 0 keeps the checkpoint's own bottleneck and "
                        "only rebuilds its zstd dictionary")
    p.add_argument("--dictionary-bytes", type=int, default=1024,
                   help="size of the zstd dictionary trained on the codes and shipped in the checkpoint; small "
                        "messages shrink by about a quarter with one (default: 1024; 0: none)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--rate-weight", type=float, default=0.01,
                   help="weight of the mean code magnitude in the loss: higher trades accuracy for bytes "
                        "(default: 0.01)")
    p.add_argument("--views", type=int, default=2, help="augmented views of the training split to cache (default: 2)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples (quick runs)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (default: on; --no-progress hides them)")
    p.set_defaults(run=_run_bottleneck)


def _run_bottleneck(args: argparse.Namespace) -> int:
    from offramp.training.train_bottleneck import BottleneckJob, add_bottleneck, describe

    job = BottleneckJob(checkpoint=args.checkpoint, out=args.out, channels=args.channels[0], bits=args.bits,
                        hidden=args.hidden, position=args.split_block, epochs=args.epochs, lr=args.lr,
                        rate_weight=args.rate_weight, views=args.views, dictionary_bytes=args.dictionary_bytes,
                        precision=args.precision,
                        device=args.device, limit=args.limit, progress=args.progress)
    for metrics in add_bottleneck(job, args.channels):
        print(describe(metrics))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint's edge half as ONNX graphs, for 'offramp edge --runtime onnxruntime'",
        description="Writes the edge half (the stem, the blocks up to the split and the exits there) as ONNX "
                    "graphs with a dynamic batch axis: one per segment between exit positions and one per exit, so "
                    "samples that leave at an exit drop out of the batch as on PyTorch; for ViTs also the class "
                    "token's attention that top-k token selection reads. Beside them: the checkpoint's card and "
                    "onnx.json (the fingerprint the graphs were made from, each graph's SHA-256). Every graph is "
                    "checked against PyTorch with onnxruntime before the manifest is written. Needs the onnx "
                    "extra (pip install 'offramp[onnx]'). Audiovisual models are not exported: their edge runs "
                    "on PyTorch.")
    p.add_argument("checkpoint", help="checkpoint directory written by 'offramp train'")
    p.add_argument("--onnx", required=True, metavar="OUT_DIR",
                   help="directory to write the graphs, the card and onnx.json into: new, empty, or an earlier "
                        "export (replaced)")
    p.add_argument("--split-block", type=int, default=None, metavar="K",
                   help="export the edge of a split after block K (default: the checkpoint's); the edge and the "
                        "cloud must split there too")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import time

    from offramp.core.onnx_edge import export_onnx

    started = time.perf_counter()
    manifest = export_onnx(args.checkpoint, args.onnx, args.split_block,
                           log=lambda line: logging.getLogger(__name__).info("exported %s", line))
    print(f"edge half (split after block {manifest.split_block}, exits "
          f"{', '.join(g.exit for g in manifest.exits) or 'none'}) exported to {args.onnx} in "
          f"{time.perf_counter() - started:.0f} s: {len(manifest.graphs)} graphs, onnxruntime matches PyTorch "
          f"within {manifest.max_abs_diff:.1e}")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (e.g. 'offramp bench exits --quick')")
    p.add_argument("name", choices=["exits"], help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module(f"bench.{args.name}")
    except ModuleNotFoundError as e:
        from offramp.core.errors import OfframpError

        raise OfframpError(f"benchmark '{args.name}' is not importable ({e}); run it from a source checkout") from None
    return module.main(args.bench_args)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train, add_eval, add_bottleneck, add_export, add_models, add_demo, add_bench, cloud_node.cli.add_commands,
    edge_node.cli.add_commands,
    netem_cli.add_commands, orchestrator.cli.add_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offramp",
        description="Edge-cloud split inference for vision transformers with single-layer ViT early exits.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="log lines for people (text) or one JSON object per line for log collectors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """``-v`` after any subcommand too (``offramp edge -v``), as before it; SUPPRESS keeps an earlier -v."""
    for parser in sub.choices.values():
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        parser.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS,
                            help="log lines for people (text) or one JSON object per line")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    from offramp.serving.log import setup_logging

    from offramp.serving import DIE_WITH_PARENT

    if parent := os.environ.pop(DIE_WITH_PARENT, None):  # set by DaemonProcess(die_with_parent=True)
        from offramp.serving.daemon import die_with_parent

        die_with_parent(int(parent))

    args = build_parser().parse_args(argv)
    args.argv = argv
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    from offramp.core.errors import OfframpError

    try:
        return args.run(args)
    except OfframpError as e:
        print(f"offramp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
