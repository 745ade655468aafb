"""The cloud tier at scale: per-request server CPU against an echo server, worker processes, a replica pool.

(a) Server CPU time per request beyond the tail's compute, against a gRPC
    echo server's CPU time per message: the same clients, the same token
    messages, the same run; servers pinned to core 0, the load generator to
    the others. The tail is the demo model's (two blocks of a micro ViT), so
    small that the per-request work shows, as it does on a GPU. The tail's
    compute is timed alone at each batch size the cloud formed; each server's
    CPU is also split into its event loop's thread and its other threads.
(b) Requests/s of one cloud with 1 worker and with N (default 2) workers,
    the workers on every core, beside the load generator's own CPU time (on
    two cores they share the machine with it); the load may come from
    several processes. The other way to one port beside it: a front end
    relaying each request to one of N single-process clouds. With ``--device cuda``, again with the workers on the
    GPU, as a share of the tail's own throughput at batch 256 there.
(c) A pool of 3 replicas behind 12 edges (each a ``ReplicaPool``, least
    outstanding first, in this process): each replica's share of the
    offloads; one replica killed (SIGKILL) a third of the way in and
    restarted on its port at two thirds; requests lost (no answer from any
    replica within the deadline); seconds from its return until it carries a
    fair share again.

    python -m bench.scale                      # about 2 minutes, once `make demo` has trained its model
    python -m bench.scale --quick              # a short run, for the tests
    python -m bench.scale --workers 8 --load-processes 6 --device cuda --out bench/results/scale-gpu.json
                                               # on a GPU machine with 16 cores
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.offload import OffloadError, OffloadSettings
from edge_node.pool import ReplicaPool
from offramp.core.tables import format_table
from offramp.core.wire import pb
from offramp.serving.daemon_proc import DaemonProcess
from offramp.serving.config import CloudConnection
from orchestrator.floors import child_server, serve_echo, serve_relay
from orchestrator.loadgen import (SERVER_CORES, cpu_seconds, drive_streams, drive_streams_from_processes,
                                  loop_and_others, machine, offload_tokens, thread_cpu_seconds, write_result)

RESULTS = Path(__file__).parent / "results"
FAIR_SHARE = 0.25  # of three replicas, the least share that counts as carrying its part


def compute_per_request(cost_per_sample: dict[int, float], batches: dict[int, int]) -> float:
    """The tail's compute per request over the batches a run actually formed: ``batches`` counts batches by
    size, ``cost_per_sample`` is the tail's cost per sample at each of those sizes."""
    samples = sum(size * n for size, n in batches.items())
    return sum(cost_per_sample[size] * size * n for size, n in batches.items()) / samples


async def drive(address: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor], edges: int,
                window: int, seconds: float, server_pid: int, processes: int = 1,
                behind: Sequence[int] = ()) -> dict[str, Any]:
    """``edges`` clients (a connection each) x ``window`` requests in flight for ``seconds``, from this process
    or from ``processes`` load processes; the server's and the load's CPU time over the run (and that of the
    processes ``behind`` the server, a front end's clouds), and the batches the replies report."""
    def server_cpu() -> tuple[float, dict[int, float], float]:
        return cpu_seconds(server_pid), thread_cpu_seconds(server_pid), sum(cpu_seconds(p) for p in behind)

    marks = []
    if processes == 1:
        loads = [await drive_streams(address, fingerprint, split, tokens, edges, window, seconds,
                                     on_start=lambda: marks.append(server_cpu()))]
    else:
        loads = await asyncio.to_thread(drive_streams_from_processes, address, fingerprint, split, tokens, edges,
                                        window, seconds, processes, lambda: marks.append(server_cpu()))
    marks.append(server_cpu())
    (server0, threads0, behind0), (server1, threads1, behind1) = marks
    loop_cpu, other_cpu = loop_and_others(server_pid, threads0, threads1)
    replies = Counter()
    for load in loads:
        replies.update(load["replies_by_batch"])
    n = sum(replies.values())
    wall, client_cpu = max(load["wall_s"] for load in loads), sum(load["client_cpu_s"] for load in loads)
    # A reply carries the size of its batch, so a batch of b one-sample requests is seen b times (batches at
    # the run's two ends are partly outside it: fractions).
    batches = {size: count / size for size, count in sorted(replies.items())}
    return {"edges": edges, "window": window, "requests": n, "wall_s": wall, "throughput_rps": n / wall,
            "mean_batch": sum(size * count for size, count in replies.items()) / n, "batches_by_size": batches,
            "load_processes": processes, "server_cpu_ms_per_request": (server1 - server0) * 1e3 / n,
            "server_loop_cpu_ms_per_request": loop_cpu * 1e3 / n,
            "server_other_threads_cpu_ms_per_request": other_cpu * 1e3 / n,
            "client_cpu_ms_per_request": client_cpu * 1e3 / n,
            **({"behind_cpu_ms_per_request": (behind1 - behind0) * 1e3 / n} if behind else {})}


def tail_cpu_ms(checkpoint: str, batches: Iterable[int], repeats: int = 100) -> dict[int, float]:
    """CPU milliseconds per sample of the tail alone at each batch size (decoded tokens in, outputs out), one
    torch thread, on a server core: what the cloud spends on compute, measured as its CPU time rather than
    from the replies' wall-clock timings, which waiting for a core inflates."""
    import torch

    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.halves import CloudHalf

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, SERVER_CORES)
    torch.set_num_threads(1)
    try:
        model, card = load_checkpoint(checkpoint)
        tail = CloudHalf(model, card.split_block)
        out = {}
        for batch in batches:
            x = torch.randn(batch, *tail.spec.shape)
            for _ in range(10):
                tail.run(x)
            t0 = time.process_time()
            for _ in range(repeats):
                tail.run(x)
            out[batch] = (time.process_time() - t0) * 1e3 / (repeats * batch)
        return out
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)


async def handler_path_us(checkpoint: str, tokens: list[pb.EncodedTensor], concurrent: int = 12,
                          rounds: int = 300) -> dict[str, float]:
    """Microseconds of CPU per request of the cloud's own Python, in-process and hot, on a server core: the
    whole ``OffloadHandler`` path (checks, decoding, batcher, reply, metrics; ``concurrent`` requests at a
    time) with a model that computes nothing, and the decoding alone. No gRPC, no compute: what is ours."""
    import torch

    from cloud_node.handler import OffloadHandler
    from cloud_node.metrics import CloudMetrics
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.codec import DecodeLimits, decode
    from offramp.core.halves import CloudHalf
    from offramp.serving.batcher import Batcher

    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, SERVER_CORES)
    try:
        model, card = load_checkpoint(checkpoint)
        half = CloudHalf(model, card.split_block)
        metrics = CloudMetrics()
        batcher = Batcher(lambda x, audio=None: torch.zeros(x.shape[0], 10), 64, lone_on_loop=True,
                          on_batch=metrics.batch_size.observe)
        batcher.start()
        handler = OffloadHandler(half, card, batcher, metrics, 64, 64 << 20)
        requests = [pb.OffloadRequest(request_id=i, model_fingerprint=card.fingerprint, split_block=card.split_block,
                                      tokens=tokens[i % len(tokens)]) for i in range(concurrent)]
        for _ in range(20):
            await asyncio.gather(*(handler.answer(r) for r in requests))
        t0 = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(handler.answer(r) for r in requests))
        path = (time.process_time() - t0) * 1e6 / (rounds * concurrent)
        await batcher.close()
        limits = DecodeLimits(max_payload_bytes=64 << 20, max_raw_bytes=1 << 30,
                              expected_shape=(None, *half.spec.shape))
        t0 = time.process_time()
        for _ in range(rounds):
            for r in requests:
                torch.from_numpy(decode(r.tokens, limits))
        decoding = (time.process_time() - t0) * 1e6 / (rounds * concurrent)
        return {"handler_path_us": path, "decode_us": decoding}
    finally:
        os.sched_setaffinity(0, affinity)


async def cpu_against_echo(checkpoint: str, card: Any, tokens: list[pb.EncodedTensor], seconds: float
                           ) -> dict[str, Any]:
    """(a): the cloud and the echo server, one after the other, under the same load."""
    edges, window = 8, 4
    with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--threads", "1"], cores=SERVER_CORES) as cloud:
        assert cloud.proc is not None
        run = await drive(cloud.address, card.fingerprint, card.split_block, tokens, edges, window, seconds,
                          cloud.proc.pid)
    with child_server(serve_echo, card.fingerprint, card.split_block, None) as (port, pid):
        echo = await drive(f"127.0.0.1:{port}", card.fingerprint, card.split_block, tokens, edges, window,
                           seconds, pid)
    # The tail's own compute per request, over the batch sizes the cloud actually formed.
    cost = tail_cpu_ms(checkpoint, run["batches_by_size"])
    compute = compute_per_request(cost, run["batches_by_size"])
    beyond = run["server_cpu_ms_per_request"] - compute
    ours = await handler_path_us(checkpoint, tokens)
    return {"cloud": run, "echo": echo, "in_process_hot": ours,
            "tail_cpu_ms_per_sample_by_batch": cost, "tail_cpu_ms_per_request": compute,
            "cloud_beyond_compute_ms_per_request": beyond, "ratio": beyond / echo["server_cpu_ms_per_request"]}


async def workers_throughput(checkpoint: str, card: Any, tokens: list[pb.EncodedTensor], counts: list[int],
                             seconds: float, device: str = "cpu", processes: int = 1) -> list[dict[str, Any]]:
    """(b): one cloud daemon with each number of workers on ``device``, every core its own, under 16 edges x 4
    in flight from ``processes`` load processes."""
    rows = []
    for n in counts:
        with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--workers", str(n), "--threads", "1",
                                     "--device", device], startup_timeout=180) as cloud:
            assert cloud.proc is not None
            run = await drive(cloud.address, card.fingerprint, card.split_block, tokens, 16, 4, seconds,
                              cloud.proc.pid, processes)
        rows.append({"workers": n, "device": device, **run})
        print(f"  {n} worker(s) on {device}: {run['throughput_rps']:.0f} requests/s", flush=True)
    return rows


async def front_end_throughput(checkpoint: str, card: Any, tokens: list[pb.EncodedTensor], clouds: int,
                               seconds: float, processes: int = 1) -> dict[str, Any]:
    """(b), the other way to one port: a front end (``orchestrator.floors.RelayOffload``) relaying each request
    to one of ``clouds`` single-process clouds, under the load of (b); the front end's CPU per request and the
    clouds' beside it."""
    daemons = [DaemonProcess("cloud", ["--checkpoint", checkpoint, "--threads", "1"]) for _ in range(clouds)]
    try:
        for d in daemons:
            d.start()
        with child_server(serve_relay, card.fingerprint, card.split_block, [d.address for d in daemons]) as (port,
                                                                                                             pid):
            run = await drive(f"127.0.0.1:{port}", card.fingerprint, card.split_block, tokens, 16, 4, seconds, pid,
                              processes, behind=[d.proc.pid for d in daemons if d.proc is not None])
    finally:
        for d in daemons:
            d.stop()
    print(f"  a front end before {clouds} clouds: {run['throughput_rps']:.0f} requests/s", flush=True)
    return {"clouds": clouds, **run}


def tail_samples_per_s(checkpoint: str, device: str, batch: int = 256, seconds: float = 2.0) -> float:
    """Samples/s of the tail alone at ``batch`` on ``device`` (tokens already there, synchronised): what a
    cloud on that device could answer if nothing but the model cost anything."""
    import torch

    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.halves import CloudHalf

    model, card = load_checkpoint(checkpoint)
    tail = CloudHalf(model, card.split_block, device=device)
    x = torch.randn(batch, *tail.spec.shape).to(tail.device)

    def sync() -> None:
        if tail.device.type == "cuda":
            torch.cuda.synchronize(tail.device)

    for _ in range(5):
        tail.run(x)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tail.run(x)
        n += 1
    sync()
    return batch * n / (time.perf_counter() - start)


async def pool_under_failure(checkpoint: str, card: Any, tokens: list[pb.EncodedTensor], seconds: float,
                             edges: int = 12) -> dict[str, Any]:
    """(c): 3 replicas, ``edges`` pools of them; replica 2 killed at a third, restarted at two thirds."""
    settings = OffloadSettings(CloudConnection(reconnect_initial_s=0.05, reconnect_max_s=1.0, connect_timeout_s=1.0))
    clouds = [DaemonProcess("cloud", ["--checkpoint", checkpoint, "--threads", "1"]) for _ in range(3)]
    for c in clouds:
        c.start()
    pools = [ReplicaPool([c.address for c in clouds], card.fingerprint, card.split_block, settings)
             for _ in range(edges)]
    lost: list[str] = []
    answered = 0
    timeline: list[tuple[float, list[int]]] = []  # (seconds since start, answers per replica so far)
    try:
        for p in pools:
            p.start()
        while not all(len(p.streaming) == 3 for p in pools):
            await asyncio.sleep(0.05)
        start = time.monotonic()
        events: dict[str, float] = {}

        async def request(worker: int, i: int) -> None:
            nonlocal answered
            req = pb.OffloadRequest(model_fingerprint=card.fingerprint, split_block=card.split_block,
                                    tokens=tokens[(worker + i) % len(tokens)])
            try:
                await pools[worker // 2].infer(req, timeout_s=5.0)
                answered += 1
            except OffloadError as e:
                lost.append(str(e))

        async def chaos() -> None:
            await asyncio.sleep(seconds / 3)
            clouds[2].kill()
            events["killed_s"] = time.monotonic() - start
            await asyncio.sleep(seconds / 3)
            await asyncio.to_thread(clouds[2].restart)  # returns once it serves again
            events["returned_s"] = time.monotonic() - start

        async def sample() -> None:
            while True:
                timeline.append((time.monotonic() - start,
                                 [sum(p.sent[c.address] for p in pools) for c in clouds]))
                await asyncio.sleep(0.25)

        async def worker(k: int) -> None:
            i = 0
            while not chaos_task.done() or time.monotonic() - start < events["returned_s"] + seconds / 3:
                await request(k, i)
                i += 1

        sampler, chaos_task = asyncio.create_task(sample()), asyncio.create_task(chaos())
        await asyncio.gather(*(worker(k) for k in range(edges * 2)))
        sampler.cancel()
    finally:
        await asyncio.gather(*(p.close() for p in pools))
        for c in clouds:
            c.stop()
    t = np.array([s for s, _ in timeline])
    counts = np.array([c for _, c in timeline], dtype=float)
    before = counts[t <= events["killed_s"]][-1]
    shares_before = (before / before.sum()).tolist()
    balanced_after = _rebalance_s(t, counts, events["returned_s"])
    return {"replicas": 3, "edges": edges, "window_per_edge": 2, "seconds": seconds, **events,
            "answered": answered, "lost": len(lost), "lost_reasons": sorted(set(lost))[:5],
            "retried": sum(p.retried for p in pools), "shares_before_kill": shares_before,
            "back_in_balance_s": balanced_after, "fair_share": FAIR_SHARE,
            "timeline": {"t_s": t.round(3).tolist(), "answers_per_replica": counts.astype(int).tolist()}}


def _rebalance_s(t: np.ndarray, counts: np.ndarray, returned_s: float, window_s: float = 1.0) -> float | None:
    """Seconds from ``returned_s`` until the returned replica (the last) carries a fair share of the answers
    of a ``window_s`` window; None if it never does."""
    for k in np.flatnonzero(t >= returned_s + window_s):
        j = np.searchsorted(t, t[k] - window_s)
        delta = counts[k] - counts[j]
        if delta.sum() > 0 and delta[-1] / delta.sum() >= FAIR_SHARE:
            return float(t[k] - returned_s)
    return None


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = result["pool"]
    t = np.array(pool["timeline"]["t_s"])
    counts = np.array(pool["timeline"]["answers_per_replica"], dtype=float)
    rate = np.diff(counts, axis=0) / np.diff(t)[:, None]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.stackplot(t[1:], rate.T, labels=[f"replica {i}" for i in range(rate.shape[1])], alpha=0.8)
    for key, text in (("killed_s", "replica 2 killed"), ("returned_s", "replica 2 back")):
        ax.axvline(pool[key], color="k", ls="--", lw=1)
        ax.text(pool[key], ax.get_ylim()[1] * 0.95, f" {text}", va="top", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("offloads answered per second")
    ax.set_title(f"3 replicas behind {pool['edges']} edges: {pool['lost']} requests lost")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/model",
                    help="model whose tail the clouds serve (default: the demo model, which `make demo` trains)")
    ap.add_argument("--workers", type=int, default=2, help="workers to compare with one (default 2)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load run (the pool run: a third "
                                                                 "with 3 replicas, a third with 2, a third after "
                                                                 "the third returns)")
    ap.add_argument("--device", default="cpu",
                    help="also run (b) with the workers on this device (e.g. cuda), beside the CPU run, and give its "
                         "requests/s as a share of the tail's own throughput at batch 256 there (default cpu: "
                         "the CPU run only)")
    ap.add_argument("--load-processes", type=int, default=1,
                    help="processes the load of (b) comes from (default 1; on a machine with many cores, enough "
                         "that the load generator is not what limits the workers)")
    ap.add_argument("--quick", action="store_true", help="2-second runs, for the tests")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = ap.parse_args(argv)
    if args.workers < 2:
        ap.error("--workers must be at least 2 (it is compared with one worker)")
    if args.load_processes < 1:
        ap.error("--load-processes must be at least 1")
    seconds = 2.0 if args.quick else args.seconds
    if not (Path(args.checkpoint) / "card.json").exists():
        ap.error(f"no checkpoint at {args.checkpoint}: run `make demo` (it trains the demo model there) or give "
                 "--checkpoint")
    started = time.monotonic()
    card, _, tokens = offload_tokens(args.checkpoint, 64)
    print("(a) server CPU per request against an echo server", flush=True)
    cpu = asyncio.run(cpu_against_echo(args.checkpoint, card, tokens, seconds))
    print(f"(b) 1 vs {args.workers} workers", flush=True)
    workers = asyncio.run(workers_throughput(args.checkpoint, card, tokens, [1, args.workers], seconds,
                                             processes=args.load_processes))
    front_end = asyncio.run(front_end_throughput(args.checkpoint, card, tokens, args.workers, seconds,
                                                 args.load_processes))
    on_device = None
    if args.device != "cpu":
        print(f"(b) on {args.device}: 1 vs {args.workers} workers, and the tail alone at batch 256", flush=True)
        rows = asyncio.run(workers_throughput(args.checkpoint, card, tokens, [1, args.workers], seconds,
                                              args.device, args.load_processes))
        tail = tail_samples_per_s(args.checkpoint, args.device)
        on_device = {"device": args.device, "workers": rows, "tail_samples_per_s_batch256": tail,
                     "share_of_tail_batch256": max(r["throughput_rps"] for r in rows) / tail}
    print("(c) a pool of 3 replicas, one killed and brought back", flush=True)
    pool = asyncio.run(pool_under_failure(args.checkpoint, card, tokens, 3 * seconds))
    result = {
        "command": shlex.join(["python", "-m", "bench.scale", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "checkpoint": args.checkpoint, "cores": os.cpu_count(),
        "cpu_against_echo": cpu, "workers": workers, "front_end": front_end, "workers_on_device": on_device,
        "pool": pool,
        "targets": {
            "cpu_per_request_vs_echo": cpu["ratio"],
            "workers_speedup": {"workers": args.workers, "cores": os.cpu_count(),
                                "speedup": workers[1]["throughput_rps"] / workers[0]["throughput_rps"]},
            **({} if on_device is None else {"device_share_of_tail_batch256": {
                "device": args.device, "workers": args.workers, "share": on_device["share_of_tail_batch256"]}}),
            "pool_replica_shares": pool["shares_before_kill"],
            "pool_requests_lost": pool["lost"],
            "pool_back_in_balance_s": pool["back_in_balance_s"],
        },
        "wall_s": time.monotonic() - started,
    }
    report(result)
    out = write_result(result, args.out)
    plot(result, out.with_suffix(".png"))
    return 0


def report(result: dict[str, Any]) -> None:
    cpu = result["cpu_against_echo"]
    print(format_table(["server", "requests/s", "mean batch", "server CPU ms/request", "client CPU ms/request"],
                       [[name, f"{r['throughput_rps']:.0f}", f"{r['mean_batch']:.1f}",
                         f"{r['server_cpu_ms_per_request']:.3f}", f"{r['client_cpu_ms_per_request']:.3f}"]
                        for name, r in (("cloud", cpu["cloud"]), ("echo", cpu["echo"]))]))
    print(format_table(["server", "event loop thread CPU ms/request", "other threads CPU ms/request"],
                       [[name, f"{r['server_loop_cpu_ms_per_request']:.3f}",
                         f"{r['server_other_threads_cpu_ms_per_request']:.3f}"]
                        for name, r in (("cloud", cpu["cloud"]), ("echo", cpu["echo"]))]))
    print(f"the tail's own compute: {cpu['tail_cpu_ms_per_request']:.3f} CPU ms/request over the batches the cloud "
          "formed")
    hot = cpu["in_process_hot"]
    print(f"the cloud's own Python, in-process and hot, with a model that computes nothing: "
          f"{hot['handler_path_us']:.0f} us/request, of which decoding {hot['decode_us']:.0f} us")
    print(f"cloud CPU beyond compute: {cpu['cloud_beyond_compute_ms_per_request']:.3f} ms/request = "
          f"{cpu['ratio']:.2f}x the echo server's")
    on_device = result["workers_on_device"]
    rows = result["workers"] + ([] if on_device is None else on_device["workers"])
    print(format_table(["workers", "device", "requests/s", "server CPU ms/request", "load generator CPU ms/request"],
                       [[r["workers"], r["device"], f"{r['throughput_rps']:.0f}", f"{r['server_cpu_ms_per_request']:.3f}",
                         f"{r['client_cpu_ms_per_request']:.3f}"] for r in rows]))
    f = result["front_end"]
    print(f"a front end before {f['clouds']} single-process clouds instead: {f['throughput_rps']:.0f} requests/s, "
          f"the front end {f['server_cpu_ms_per_request']:.3f} CPU ms/request and the clouds "
          f"{f['behind_cpu_ms_per_request']:.3f} beside it")
    if on_device is not None:
        print(f"on {on_device['device']}: the tail alone at batch 256 computes "
              f"{on_device['tail_samples_per_s_batch256']:.0f} samples/s; the workers reached "
              f"{on_device['share_of_tail_batch256']:.1%} of it")
    t = result["targets"]
    pool = result["pool"]
    print(f"pool: shares {', '.join(f'{s:.0%}' for s in t['pool_replica_shares'])}; {pool['answered']} answered, "
          f"{pool['lost']} lost, {pool['retried']} retried on another replica; the killed replica back in "
          f"balance {t['pool_back_in_balance_s']} s after its return")


if __name__ == "__main__":
    sys.exit(main())
