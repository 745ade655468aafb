"""``offramp edge``, ``infer``, ``policy`` and ``calibrate``: the edge's subcommands.

Only argparse and the edge's config (whose fields generate the ``edge``
flags) are imported up front; each command imports what it needs when it
runs, so ``offramp --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from offramp.serving.config import EdgeConfig
from offramp.serving.flags import add_config_flags, choices, config_from_args

if TYPE_CHECKING:
    import grpc

    from offramp.core.wire import pb


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the edge's subcommands to the ``offramp`` command's subparsers."""
    _add_edge(sub)
    _add_infer(sub)
    _add_policy(sub)
    _add_calibrate(sub)


def _add_edge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "edge", help="run the edge daemon: early exits on the device, the rest offloaded to a cloud",
        description="Serves the local Edge API (gRPC). Each input runs through the first blocks and the exits; "
                    "confident samples are answered at once, the others are compressed and sent to the cloud, "
                    "and answered from their best exit (marked degraded) when the cloud is down or late. "
                    "Settings come from --config, then the flags. SIGTERM or SIGINT drains it.",
    )
    p.add_argument("--config", metavar="TOML",
                   help="settings file: the flags below as keys (max_batch = 16); see 'offramp calibrate --out' "
                        "for a complete, commented one")
    add_config_flags(p, EdgeConfig)
    p.add_argument("--port-file", metavar="PATH", help="write the bound gRPC port here once serving")
    p.set_defaults(run=_run_edge)


def _run_edge(args: argparse.Namespace) -> int:
    from offramp.serving.daemon import StartupLog, announce

    StartupLog("edge").step("importing the serving code (torch, gRPC)")
    from .server import run

    config = config_from_args(EdgeConfig, args)
    return run(config, ready=lambda server: announce("edge", server.address, server.port, args.port_file))


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="send image or audio files to a running edge and print its answers",
                       description="One line per file: the answer, where it was decided, its confidence, whether "
                                   "it is degraded (and why), and the end-to-end latency at the edge.")
    p.add_argument("--edge", required=True, metavar="HOST:PORT", help="the edge's local API address")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="JPEG/PNG images or WAV files; a folder stands for the files in it, in name order")
    p.add_argument("--audio", nargs="+", action="extend", metavar="WAV",
                   help="audiovisual models: one WAV clip per FILE, in the same order (the scene's sound)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for all answers (default 30)")
    p.add_argument("--json", action="store_true", help="print each reply as one JSON line")
    p.set_defaults(run=_run_infer)


def _run_infer(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from offramp.core.errors import OfframpError
    from offramp.client import EdgeClient

    args.files = expand_folders(args.files)
    if args.audio is not None:
        args.audio = expand_folders(args.audio)
    if args.audio is not None and len(args.audio) != len(args.files):
        raise OfframpError(f"--audio names {len(args.audio)} clips for {len(args.files)} files: give one per file")

    with EdgeClient(args.edge, timeout_s=args.timeout) as edge:
        answers = edge.infer(args.files, args.audio)
    failed = False
    for name, answer in zip(args.files, answers):
        failed |= not answer.ok
        if answer.reply is None:
            print(f"{name}: no answer", file=sys.stderr)
        elif args.json:
            print(MessageToJson(answer.reply, indent=None))
        elif not answer.ok:
            print(f"{name}: error {answer.error}")
        else:
            print(f"{name}: {describe_reply(answer.reply)}")
    return 1 if failed else 0


INPUT_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".wav"}


def expand_folders(paths: list[str]) -> list[str]:
    """Each folder replaced by the image and WAV files directly in it, sorted by name."""
    from offramp.core.errors import OfframpError

    out = []
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            out.append(name)
            continue
        found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
        if not found:
            raise OfframpError(f"folder '{name}' holds no image or WAV files")
        out += found
    return out


def describe_reply(reply: pb.InferReply) -> str:
    """``7 ("seven") by exit:slvit@2, confidence 0.973, 2.1 ms`` and the degradation, if any."""
    answer = f'{reply.prediction} ("{reply.label}")' if reply.prediction >= 0 else f"{reply.value:.4g}"
    text = f"{answer} by {reply.decided_by}, confidence {reply.confidence:.3f}, {reply.stage_ms['total']:.1f} ms"
    if reply.degraded:
        text += f", DEGRADED: {reply.degraded_reason}"
    return text


def _add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="show or change a running edge's exit policy",
                       description="'get' prints the policy in force and what the edge measures (on an edge with "
                                   "a latency target, the controller's choice and why); 'set' changes the given "
                                   "parts and keeps the rest, pinning them where a controller chooses; 'unpin' "
                                   "hands the choice back to it. Changes apply from the next batch on.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = actions.add_parser("get", help="print the policy in force and the measurements behind it")
    put = actions.add_parser("set", help="change (and pin) thresholds, score or offload switch")
    unpin = actions.add_parser("unpin", help="hand the thresholds back to the latency controller")
    unpin.set_defaults(run=_run_policy)
    for action in (get, put, unpin):
        action.add_argument("--edge", required=True, metavar="HOST:PORT")
        action.add_argument("--admin-token-file", metavar="PATH",
                            help="file holding the edge's admin token (its admin_token_file)")
    get.set_defaults(run=_run_policy)
    add_config_flags(put, EdgeConfig, ("thresholds", "score", "offload_enabled", "split_block", "route"),
                     with_defaults=False)
    put.set_defaults(run=_run_policy)


def _run_policy(args: argparse.Namespace) -> int:
    import grpc

    from offramp.core.errors import OfframpError
    from offramp.serving.security import bearer_metadata, read_token
    from offramp.core.wire import pb, pb_grpc

    metadata = bearer_metadata(read_token(args.admin_token_file) if args.admin_token_file else None)
    with grpc.insecure_channel(args.edge) as channel:
        stub = pb_grpc.EdgeStub(channel)
        try:
            policy = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10, metadata=metadata)
            if args.action == "unpin":
                policy = stub.SetPolicy(pb.Policy(adaptive=True), timeout=10, metadata=metadata)
            if args.action == "set":
                if (args.thresholds is None and args.score is None and args.offload_enabled is None
                        and args.split_block is None and args.route is None):
                    raise OfframpError("nothing to set: give --thresholds, --score, --offload, --split-block or "
                                       "--route")
                policy.ClearField("state")
                policy.adaptive = False  # the given parts over the policy in force, pinned
                if args.split_block is not None:
                    policy.split_block = args.split_block
                elif args.thresholds is not None:  # new thresholds are for the edge's split unless told otherwise
                    policy.ClearField("split_block")
                if args.thresholds is not None:
                    policy.ClearField("thresholds")
                    policy.thresholds.extend(args.thresholds)
                if args.score is not None:
                    policy.score = args.score
                if args.offload_enabled is not None:
                    policy.offload_enabled = args.offload_enabled
                    policy.route = "split" if args.offload_enabled else "local"
                if args.route is not None:
                    policy.route = args.route
                    policy.offload_enabled = args.route != "local"
                policy = stub.SetPolicy(policy, timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            raise _rpc_error(args.edge, e) from None
    print("\n".join(describe_policy(policy)))
    return 0


ROUTE_MEANING = {"split": "exits on the edge, tokens to the cloud for the rest",
                 "input": "inputs to the cloud as they came; the exits answer only when it cannot",
                 "local": "the edge's exits answer everything"}


def describe_policy(policy: pb.Policy) -> list[str]:
    """The policy in force, then the controller's choice and the measurements behind it, a line each."""
    def ms(value: float) -> str:
        return f"{value:.1f} ms"

    thresholds = ", ".join(f"{t:g}" for t in policy.thresholds) or "(no exits)"
    if policy.HasField("split_block"):
        thresholds += f" (split block {policy.split_block})"
    route = policy.route or ("split" if policy.offload_enabled else "local")
    lines = [f"route:      {route} ({ROUTE_MEANING[route]})", f"thresholds: {thresholds}",
             f"score:      {policy.score}", f"offload:    {'on' if policy.offload_enabled else 'off'}"]
    s = policy.state
    if s.latency_slo_ms:
        judged = f" per {s.slo_window_s:g} s window" if s.slo_window_s else " over all requests"
        mode = (f"adaptive, p95 target {s.latency_slo_ms:g} ms{judged}" if policy.adaptive
                else f"pinned by 'offramp policy set' ('offramp policy unpin' resumes the p95 target "
                     f"{s.latency_slo_ms:g} ms)")
        lines.append(f"mode:       {mode}")
        if s.chosen_thresholds:
            met = "target met" if s.target_met else "NO OPTION MEETS THE TARGET: answering locally"
            lines.append(f"controller: thresholds {', '.join(f'{t:g}' for t in s.chosen_thresholds)} at split "
                         f"{s.split_block}, expected accuracy {s.expected_accuracy:.4f}, offload "
                         f"{s.expected_offload:.1%}, predicted p95 {ms(s.predicted_p95_ms)} (planned as the "
                         f"{100 * (1 - s.planned_tail):.3g}th percentile of answers), {met} ({s.reason}; "
                         f"{s.changes} changes)")
        else:
            lines.append("controller: waiting for the first measurement of the link")
    else:
        lines.append("mode:       fixed (no latency target)")
    link = [f"rtt {ms(s.rtt_ms)}" if s.HasField("rtt_ms") else "rtt not measured yet"]
    if s.HasField("transfer_ms"):
        link.append(f"transfer {ms(s.transfer_ms)} (p90)")
    if s.HasField("uplink_bytes_per_s"):
        link.append(f"uplink {s.uplink_bytes_per_s * 8 / 1e6:.3g} Mbit/s")
    if s.HasField("offload_bytes"):
        link.append(f"{s.offload_bytes / 1000:.3g} kB per offload")
    lines.append(f"link:       {', '.join(link)}")
    if s.HasField("cloud_ms"):
        lines.append(f"cloud:      {ms(s.cloud_ms)} (p90), queue {ms(s.cloud_queue_ms)}, "
                     f"compute {ms(s.cloud_compute_ms)}")
    stages = ", ".join(f"{name} {ms(value)}" for name, value in sorted(s.compute_ms.items(), key=lambda kv: kv[1]))
    lines.append(f"edge:       {s.request_rate:.3g} requests/s, queue {ms(s.edge_queue_ms)} (p90)"
                 + (f", compute by deepest stage: {stages}" if stages else ""))
    return lines


def _rpc_error(address: str, error: grpc.RpcError) -> Exception:
    """A one-line user error from a failed call."""
    import grpc

    from offramp.core.errors import OfframpError

    if error.code() is grpc.StatusCode.UNAVAILABLE:
        return OfframpError(f"cannot reach the edge at {address}: {error.details()}")
    return OfframpError(f"edge at {address}: {error.code().name}: {error.details()}")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="pick exit thresholds on validation data and write them into an edge config",
        description="Evaluates the exits and the full model on the checkpoint's validation split (offline), "
                    "then picks thresholds: a shared value searched exhaustively, refined per exit. "
                    "Writes them (and the score) into --out, creating a complete, commented edge config "
                    "if it does not exist and keeping every other setting if it does.",
    )
    p.add_argument("checkpoint", help="checkpoint directory written by 'offramp train'")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-accuracy-drop", type=float, metavar="POINTS",
                        help="fewest offloads with accuracy at most POINTS percentage points below the full model")
    target.add_argument("--target-offload", type=float, metavar="FRACTION",
                        help="best accuracy with at most FRACTION (0..1) of the samples sent to the cloud")
    target.add_argument("--target-speedup", type=float, metavar="FACTOR",
                        help="best accuracy with mean MACs per input at least FACTOR times below the full model's "
                             "(every exit tried on the way counted, as 'offramp eval' reports)")
    p.add_argument("--margin-se", type=float, default=0.0, metavar="K",
                   help="with --target-accuracy-drop: keep K standard errors of the loss (paired, against the full "
                        "model) inside the drop, so that thresholds chosen on a small split hold on new data "
                        "(default 0)")
    p.add_argument("--shared-threshold", action="store_true",
                   help="one threshold for every exit (in the chosen setting and in the controller's tables): "
                        "per-exit thresholds tuned on a few thousand samples fit their noise, and lose more on new "
                        "data than they did there")
    p.add_argument("--consistent", action="store_true",
                   help="judge the exits by consistency with the full model: an exit's answer counts as right only "
                        "where the full model is right too, so what the exits break is counted and their lucky "
                        "answers earn nothing. Reported accuracies are then a lower bound (the full model's less "
                        "what the exits break); on a split of a few thousand samples, the choice holds on new data "
                        "where plain accuracy flatters the exits (classification only)")
    p.add_argument("--score", choices=choices(EdgeConfig, "score"),
                   help="confidence score (default: the one --out names, else max_prob; std for regression)")
    p.add_argument("--data", help="calibrate on all of this data spec instead of the card's validation split")
    p.add_argument("--on", choices=["validation", "selection"], default="validation",
                   help="which of the checkpoint's splits to choose on: 'selection' is held out of training and "
                        "validation ('offramp train --selection-fraction'), so validation then reports honestly")
    p.add_argument("--input-route", action="store_true",
                   help="also measure the input route (the whole model on the inputs as the cloud receives them, "
                        "and the bytes each sends) and write it as [input_route], so the latency controller can "
                        "choose to send inputs as they are")
    p.add_argument("--input-quality", type=int, metavar="Q",
                   help="JPEG quality images are sent at on the input route (default: the config's input_quality, "
                        "else 90)")
    p.add_argument("--out", required=True, metavar="TOML", help="edge config to create or update")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from offramp.core.errors import OfframpError

    from offramp.training.calibrate import Target
    from offramp.serving.edge_toml import calibrate_into

    try:
        target = Target(accuracy_drop=args.target_accuracy_drop, max_offload=args.target_offload,
                        min_speedup=args.target_speedup, margin_se=args.margin_se,
                        shared=args.shared_threshold, consistent=args.consistent)
    except ValueError as e:
        raise OfframpError(str(e)) from None
    quality = None
    if args.input_route or args.input_quality is not None:
        from offramp.serving.config import read_toml

        configured = read_toml(Path(args.out)) if Path(args.out).is_file() else {}
        quality = args.input_quality if args.input_quality is not None else configured.get("input_quality", 90)
        if not 1 <= quality <= 95:
            raise OfframpError(f"--input-quality must be a JPEG quality in 1..95, not {quality}")
    result, route, created = calibrate_into(args.out, args.checkpoint, target, score=args.score, data=args.data,
                                            on=args.on, input_quality=quality)
    print(result.summary())
    if route is not None:
        print(f"  input route   accuracy {route.accuracy:.4f} on inputs as sent (JPEG quality {route.quality} for "
              f"images), {route.bytes_per_request:.0f} bytes per request")
    print(f"{'created' if created else 'updated'} {args.out}")
    return 0
