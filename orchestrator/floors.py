"""Floors for the serving benchmarks: a gRPC Offload server that does no work (echo), and a front end that
relays to several clouds, each run in a child process.

What any Python gRPC server costs here, measured beside the real cloud with the same clients, is the floor
every overhead figure is read against.
"""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from edge_node.offload import OffloadError, OffloadSettings
from edge_node.pool import ReplicaPool
from offramp.core.checkpoint import load_checkpoint
from offramp.core.halves import CloudHalf
from offramp.core.wire import make_status, pb, pb_grpc
from offramp.serving.daemon import grpc_server
from offramp.serving.streams import unordered_map

from .loadgen import SERVER_CORES


class EchoOffload(pb_grpc.OffloadServicer):
    """The gRPC floor: answers every request at once, with no decoding, batching or model.

    Given the model's ``tail``, it also runs it on one fixed sample per request, inline as the cloud runs a
    lone request: the floor of a leg with compute in it, which the model's compute slows down for everything
    after it (caches) without any work of ours.
    """

    def __init__(self, fingerprint: str, split: int, tail: CloudHalf | None = None) -> None:
        self._description = pb.DescribeReply(fingerprint=fingerprint, split_block=split, max_batch_size=1,
                                             max_message_bytes=64 << 20)
        self._tail = tail
        self._sample = None if tail is None else torch.zeros(1, *tail.spec.shape)

    async def Infer(self, requests, context):
        async def answer(request: pb.OffloadRequest) -> pb.OffloadReply:
            if self._tail is not None:
                self._tail.run(self._sample)
            return pb.OffloadReply(request_id=request.request_id, status=make_status(), batch_size=1)

        async for reply in unordered_map(requests, answer):
            yield reply

    async def Describe(self, request, context):
        return self._description


class RelayOffload(pb_grpc.OffloadServicer):
    """A front end: hands each request to one of several clouds (``ReplicaPool``, least outstanding first)
    and relays its reply. The other way to serve one port from several processes than workers sharing it
    (SO_REUSEPORT), measured against it: a second hop for every request, in a process of its own."""

    def __init__(self, fingerprint: str, split: int, backends: list[str]) -> None:
        self._description = pb.DescribeReply(fingerprint=fingerprint, split_block=split, max_batch_size=1,
                                             max_message_bytes=64 << 20)
        self.pool = ReplicaPool(backends, fingerprint, split, OffloadSettings())
        self.pool.start()

    async def Infer(self, requests, context):
        async def relay(request: pb.OffloadRequest) -> pb.OffloadReply:
            forwarded = pb.OffloadRequest()
            forwarded.CopyFrom(request)  # the pool numbers it for its own stream
            try:
                reply = await self.pool.infer(forwarded, timeout_s=30)
            except OffloadError as e:
                reply = pb.OffloadReply(status=make_status(grpc.StatusCode.UNAVAILABLE, str(e)))
            reply.request_id = request.request_id
            return reply

        async for reply in unordered_map(requests, relay):
            yield reply

    async def Describe(self, request, context):
        return self._description


def serve_relay(fingerprint: str, split: int, backends: list[str], port: Any) -> None:
    """Child process: the front end ``RelayOffload`` before ``backends``, on every core."""
    async def serve() -> None:
        relay = RelayOffload(fingerprint, split, backends)  # its pool needs the running loop
        by = time.monotonic() + 60
        while len(relay.pool.streaming) < len(backends):  # listen once every cloud is reached
            if time.monotonic() > by:
                raise RuntimeError(f"the front end reached {len(relay.pool.streaming)} of {len(backends)} clouds")
            await asyncio.sleep(0.05)
        await serve_until_killed(lambda server: pb_grpc.add_OffloadServicer_to_server(relay, server), port)

    asyncio.run(serve())


async def serve_until_killed(add_servicer: Callable[[grpc.aio.Server], None], port: Any) -> None:
    """A server on a free loopback port, written to ``port`` (a shared value) once it listens."""
    server = grpc_server(64 << 20)
    add_servicer(server)
    port.value = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.wait_for_termination()


def serve_echo(fingerprint: str, split: int, checkpoint: str | None, port: Any) -> None:
    """Child process: the echo server pinned to the servers' core; with ``checkpoint``, running its tail
    with one torch thread, as the cloud daemon does in (c)."""
    os.sched_setaffinity(0, SERVER_CORES)
    tail = None
    if checkpoint is not None:
        torch.set_num_threads(1)
        model, card = load_checkpoint(checkpoint)
        tail = CloudHalf(model, card.split_block)
    echo = EchoOffload(fingerprint, split, tail)
    asyncio.run(serve_until_killed(lambda server: pb_grpc.add_OffloadServicer_to_server(echo, server), port))


@contextlib.contextmanager
def child_server(target, *args: Any) -> Iterator[tuple[int, int]]:
    """A server in a spawned child process (``target(*args, port)``); yields its (port, pid) once it listens."""
    ctx = multiprocessing.get_context("spawn")
    port = ctx.Value("i", 0)
    child = ctx.Process(target=target, args=(*args, port), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not port.value:
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} did not start")
            time.sleep(0.05)
        yield port.value, child.pid
    finally:
        child.kill()
        child.join()
