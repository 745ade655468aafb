"""The edge's decision path: exits first, the cloud for the rest, the best exit when the cloud fails.

Every request gets exactly one ``InferReply``:

* an exit was confident -> that exit answers (``decided_by="exit:NAME"``);
* no exit was confident -> the tokens go to the cloud, and its answer is final
  (``decided_by="cloud"``);
* the cloud was wanted but is unreachable, refused, late or answered an error ->
  the sample's most confident exit answers with ``degraded=True`` and the reason;
* offload switched off by policy (the local route) -> the last exit takes
  whatever the earlier ones did not. That is the operator's choice, not a
  failure: not degraded;
* the input route -> the input goes to the cloud as it came (an image tensor
  as a JPEG) and the whole model answers (``decided_by="cloud"``); only when
  the cloud cannot does the edge compute its exits on it, degraded.

Stage timings (milliseconds) go into every reply: ``preprocess`` (by the
caller), ``queue``, ``edge_compute`` (the whole local batch the sample ran in),
``encode``, ``offload_rtt``, ``cloud`` (the cloud's own total) and ``total``.
The same timings feed the edge's measurements (``measure``), from which a
latency controller (``adaptive``), where a target is set, picks each batch's
thresholds.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import grpc
import torch

from offramp.core.checkpoint import Card
from offramp.core.codec import CodecConfig, encode, encode_code, zstd_dictionary
from offramp.core.data.preprocess import encode_images
from offramp.core.operating_points import CalibrationTable, InputRouteCalibration
from offramp.serving.config import ControllerSettings
from offramp.core.exit_rule import always_leave, never_leave
from offramp.netem.device_costs import DeviceCosts
from offramp.netem.profiles import slowed
from offramp.serving.batcher import Batcher, lone_on_loop
from offramp.serving.replies import answer_reply
from offramp.core.halves import EdgeWalk
from offramp.core.wire import make_status, pb

from .adaptive import Adaptive, options_for
from .controller import INPUT
from .measure import Measurements
from .metrics import EdgeMetrics
from .offload import CloudError, CloudUnavailable, DeadlineExceeded, OffloadClient, OffloadError
from .pool import ReplicaPool
from .policy import ExitPolicy, PolicySettings


@dataclass(frozen=True)
class _Outcome:
    """What the edge half decided for one sample of a local batch."""

    exit_index: int  # edge exit that answered; -1: the sample wants the cloud
    best_exit: int  # most confident edge exit (the degraded fallback); -1 when the edge has none
    output: torch.Tensor  # (num_outputs,) of that exit
    score: str
    tokens: pb.EncodedTensor | None  # survivors only, B = 1
    audio_tokens: pb.EncodedTensor | None  # survivors of audiovisual models, B = 1
    encode_error: str  # why the tokens could not be encoded, if they could not
    raw_bytes: int  # the survivor's tokens as plain float32
    encode_ms: float | None  # survivors only
    split_block: int  # the split its batch ran to (exit indices count that split's exits)
    route: str  # the route in force for its batch


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class EdgeEngine:
    """Runs requests through the edge half, the codec and the offload client, and answers each once."""

    def __init__(self, half: EdgeWalk, card: Card, policy: ExitPolicy, codec: CodecConfig, deadline_ms: int,
                 offload: OffloadClient | ReplicaPool | None, max_batch: int = 16, slowdown: float = 1.0,
                 other_halves: Sequence[EdgeWalk] = (), input_quality: int = 90,
                 device_costs: DeviceCosts | None = None) -> None:
        """``half`` runs to the edge's split block; ``other_halves`` (sharing its model) to further split blocks
        a latency controller may choose; ``input_quality``: JPEG quality of image tensors the input route sends;
        ``device_costs``: with ``slowdown``, what each local batch is charged (else its CPU time here)."""
        for h in (half, *other_halves):
            if codec.dtype == "bottleneck" and not h.bottleneck_id:
                raise ValueError(f"codec 'bottleneck' needs a checkpoint with a bottleneck at split block "
                                 f"{h.split_block} (add one with `offramp bottleneck`), run by the torch runtime")
            if codec.top_k is not None and (h.spec.kind != "tokens" or h.split_block == 0):
                raise ValueError("codec top_k selects tokens of a ViT split after block 1 or later; "
                                 f"this split gives a {h.spec.kind} representation after block {h.split_block}")
        if deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be positive, not {deadline_ms}")
        self.half = half
        self.card = card
        self.task = card.config.task
        self.policy = policy
        self.codec = codec
        self.deadline_ms = deadline_ms
        self.offload = offload
        self.input_quality = input_quality
        self.halves = {h.split_block: h for h in (half, *other_halves)}
        # The bottleneck's zstd dictionary (shipped in the checkpoint), loaded once per split.
        self._code_dictionaries = {h.split_block: zstd_dictionary(h.code_dictionary)
                                   for h in self.halves.values()}
        # Emulated weaker device: edge compute and encoding take `slowdown` times as long.
        # One compute thread (the edge's default): the device's time is this thread's CPU time, times slowdown;
        # with a cost table, the table's time for the work the batch did, times slowdown (the same in any process).
        one_thread = torch.get_num_threads() == 1
        self._run_halves = {split: slowed(h.run, slowdown, one_thread, None if device_costs is None else
                                          partial(device_costs.batch_s, split))
                            for split, h in self.halves.items()}
        self._encode = slowed(encode, slowdown, one_thread)
        self._encode_visual = slowed(self._encode_tokens, slowdown, one_thread)
        self.split_exit_names = {split: h.exit_names for split, h in self.halves.items()}
        self.exit_names = self.split_exit_names[half.split_block]
        self.metrics = EdgeMetrics(connected=lambda: float(offload is not None and offload.connected_to is not None),
                                   model=card.config.backbone, fingerprint=card.fingerprint)
        self._batcher: Batcher[list[_Outcome]] = Batcher(
            self._run_batch, max_batch, lone_on_loop=lone_on_loop(half.device, sleeps=slowdown > 1.0),
            on_batch=self.metrics.batch_size.observe, name="edge-compute")
        self.metrics.watch_queue(self._batcher.depth)
        if isinstance(offload, ReplicaPool):
            self.metrics.watch_pool(offload)
        self.measurements = Measurements({split: (math.nan,) * (h.num_exits + 1) for split, h in self.halves.items()},
                                         tail_blocks={INPUT: half.num_blocks,
                                                      **{split: h.num_blocks - split
                                                         for split, h in self.halves.items()}})
        self.adaptive: Adaptive | None = None
        if offload is not None:
            offload.on_rtt = self.measurements.probe
        self.metrics.watch_measurements(self.measurements.snapshot, self.stage_names(), lambda: self.adaptive,
                                        lambda: self.policy)

    def stage_names(self) -> dict[int, list[str]]:
        """Per split block, its compute stages: its exits, then the split itself."""
        return {split: [*names, "split"] for split, names in self.split_exit_names.items()}

    def adapt(self, controller: ControllerSettings, tables: Sequence[CalibrationTable],
              input_route: InputRouteCalibration | None = None, route: str | None = None) -> None:
        """Let a controller choose the route and thresholds to meet the ``controller``'s p95 target from the
        calibration ``tables`` and ``input_route``; only among ``route``'s options where one is fixed.

        ``ValueError`` when the tables are not this edge's, or when the target is below the time the edge's
        fastest exit takes here (profiled now): no choice could meet it.
        """
        score = self.policy.get().score
        options = options_for(tables, self.card.fingerprint, self.split_exit_names, score, input_route, route,
                              primary=self.half.split_block)
        exit_times = {}  # (time, exit name) of every exit, on every split
        for split, names in self.split_exit_names.items():
            exit_times.update({name: ms for name, ms in zip(names, self.profile(split))})
        slo_ms = controller.latency_slo_ms
        if slo_ms is None:
            raise ValueError("the latency controller needs latency_slo_ms, the p95 target it keeps")
        if exit_times and slo_ms < min(exit_times.values()):
            fastest = min(exit_times, key=exit_times.__getitem__)
            raise ValueError(f"latency_slo_ms {slo_ms:g} is below what this edge needs to answer at all: its "
                             f"fastest exit, {fastest}, takes {exit_times[fastest]:.1f} ms here")
        self.adaptive = Adaptive(options, controller, self.measurements, score)
        self.policy.follow(self.adaptive.settings)

    def profile(self, split: int, repeats: int = 5) -> list[float]:
        """Milliseconds one sample takes to be answered by each exit of ``split``, then to reach that split
        encoded (medians of ``repeats``); the runs are measurements too, so the controller knows every stage
        from the start."""
        x = torch.zeros(1, *self.card.input_shape)
        audio_config = self.card.config.audio
        audio = None if not self.half.audiovisual else torch.zeros(1, *audio_config.input_shape)
        score, exits = self.policy.get().score, self.halves[split].num_exits
        times = []
        for stage in range(exits + 1):
            thresholds = tuple(always_leave(score) if k == stage else never_leave(score) for k in range(exits))
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._run_batch(x, audio, PolicySettings(thresholds, score, split_block=split))
                runs.append(_ms(time.perf_counter() - t0))
            times.append(statistics.median(runs))
        return times

    def start(self) -> None:
        """Start computing and connecting (needs the running event loop)."""
        self._batcher.start()
        if self.offload is not None:
            self.offload.start()

    async def close(self) -> None:
        await self._batcher.close()
        if self.offload is not None:
            await self.offload.close()

    async def infer(self, x: torch.Tensor, request_id: int = 0, since: float | None = None,
                    stage_ms: dict[str, float] | None = None, audio: torch.Tensor | None = None,
                    source: pb.InferRequest | None = None) -> pb.InferReply:
        """The one answer for input ``x`` (C, H, W) (and ``audio``, audiovisual models); ``since`` is when the
        request arrived (perf_counter); ``source``: the request as the application sent it, which the input
        route forwards as it is (without it, the route sends ``x``)."""
        since = time.perf_counter() if since is None else since
        if (audio is None) == self.half.audiovisual:
            raise ValueError("audiovisual models need the audio input, others must not get one")
        self.measurements.arrival()
        stages = dict(stage_ms or {})
        input_failed: OffloadError | None = None
        if self.adaptive is not None:
            self.adaptive.tick()
        if self.policy.get().route == "input":
            try:
                reply = await self._send_input(x, audio, source, stages)
            except OffloadError as e:  # the edge's own exits answer instead, degraded
                input_failed = e
            else:
                return self._sent(reply, request_id, since, stages, None)
        batched = await self._batcher.submit(x[None], None if audio is None else audio[None])
        self.measurements.queued(_ms(batched.queue_s))
        outcome = batched.rows[0]
        stages.update({"queue": _ms(batched.queue_s), "edge_compute": _ms(batched.compute_s)})
        if outcome.encode_ms is not None:
            stages["encode"] = outcome.encode_ms
        if input_failed is not None:
            k = outcome.exit_index if outcome.exit_index >= 0 else outcome.best_exit
            if k < 0:
                reply = pb.InferReply(status=make_status(grpc.StatusCode.UNAVAILABLE, str(input_failed)))
                return self._sent(reply, request_id, since, stages, None)
            reply = self._exit_reply(outcome, k, degraded_reason=str(input_failed))
            reply.route = "input"
            return self._sent(reply, request_id, since, stages, input_failed.kind)
        reply, degraded_kind = await self._decide(outcome, stages)
        return self._sent(reply, request_id, since, stages, degraded_kind)

    def _sent(self, reply: pb.InferReply, request_id: int, since: float, stages: dict[str, float],
              degraded_kind: str | None) -> pb.InferReply:
        """``reply`` finished (id, timings) and counted: what goes back to the caller."""
        reply.request_id = request_id
        stages["total"] = _ms(time.perf_counter() - since)
        reply.stage_ms.update(stages)
        if reply.status.code == grpc.StatusCode.OK.value[0]:
            self.metrics.record(reply, degraded_kind)
            if not (self.adaptive is None or self.adaptive.target_met or self.policy.pinned):
                self.metrics.slo_unmet_answers.inc()
        return reply

    async def _decide(self, outcome: _Outcome, stages: dict[str, float]) -> tuple[pb.InferReply, str | None]:
        """The reply for one sample, and the kind of degradation if it is degraded."""
        if outcome.exit_index >= 0:
            return self._exit_reply(outcome, outcome.exit_index), None
        try:
            reply = await self._offload(outcome, stages)
            return reply, None
        except OffloadError as e:
            if outcome.best_exit < 0:  # nothing on the edge to fall back on
                return pb.InferReply(status=make_status(grpc.StatusCode.UNAVAILABLE, str(e))), None
            return self._exit_reply(outcome, outcome.best_exit, degraded_reason=str(e)), e.kind

    async def _offload(self, outcome: _Outcome, stages: dict[str, float]) -> pb.InferReply:
        if self.offload is None:
            raise CloudUnavailable("cloud unavailable: no cloud address configured")
        if outcome.tokens is None:
            raise OffloadError(f"cannot encode the tokens: {outcome.encode_error}")
        # No fingerprint (the stream carries it) and no stage timings (the caller's reply has them): the
        # envelope stays small beside a code of a few hundred bytes.
        request = pb.OffloadRequest(split_block=outcome.split_block, tokens=outcome.tokens,
                                    deadline_ms=self.deadline_ms)
        if outcome.audio_tokens is not None:
            request.audio_tokens.CopyFrom(outcome.audio_tokens)
            request.modalities.extend(("visual", "audio"))
        sent = time.perf_counter()
        try:
            cloud = await self.offload.infer(request, self.deadline_ms / 1000)
        except DeadlineExceeded:
            self.measurements.timed_out(outcome.split_block, request.ByteSize(), _ms(time.perf_counter() - sent))
            raise
        finally:  # also when it fails: a degraded answer shows how long the cloud was waited for
            stages["offload_rtt"] = _ms(time.perf_counter() - sent)
        return self._cloud_reply(cloud, request, outcome.split_block, stages, outcome.score, outcome.raw_bytes)

    def _cloud_reply(self, cloud: pb.OffloadReply, request: pb.OffloadRequest, key: int, stages: dict[str, float],
                     score: str, raw_bytes: int) -> pb.InferReply:
        """The caller's reply from the cloud's, measured and counted; ``key``: the split block, or ``INPUT``."""
        size = request.ByteSize()
        self.measurements.offloaded(key, size, stages["offload_rtt"], cloud.timings.queue_ms,
                                    cloud.timings.compute_ms, cloud.timings.total_ms)
        stages["cloud"] = cloud.timings.total_ms
        stages["cloud_decode"], stages["cloud_queue"], stages["cloud_compute"] = (
            cloud.timings.decode_ms, cloud.timings.queue_ms, cloud.timings.compute_ms)
        output = torch.tensor(list(cloud.output), dtype=torch.float32)
        if list(cloud.output_shape) != [1, self.half.num_outputs] or output.numel() != self.half.num_outputs:
            raise CloudError(f"cloud error: output of shape {list(cloud.output_shape)} for one sample with "
                             f"{self.half.num_outputs} outputs")
        reply = answer_reply(output, score, self.task, self.card.label_names, "cloud", -1)
        reply.route = "input" if key == INPUT else "split"
        reply.bytes_sent = size
        self.metrics.offloads.inc()
        self.metrics.bytes_sent.inc(size)
        self.metrics.bytes_saved.inc(max(0, raw_bytes - size))
        return reply

    async def _send_input(self, x: torch.Tensor, audio: torch.Tensor | None, source: pb.InferRequest | None,
                          stages: dict[str, float]) -> pb.InferReply:
        """The input route: the cloud's answer from the whole model on the input itself, or an ``OffloadError``."""
        if self.offload is None:
            raise CloudUnavailable("cloud unavailable: no cloud address configured")
        t0 = time.perf_counter()
        request = pb.OffloadRequest(deadline_ms=self.deadline_ms, input=self._input_message(x, source))
        stages["input_encode"] = _ms(time.perf_counter() - t0)
        sent = time.perf_counter()
        try:
            cloud = await self.offload.infer(request, self.deadline_ms / 1000)
        except DeadlineExceeded:
            self.measurements.timed_out(INPUT, request.ByteSize(), _ms(time.perf_counter() - sent))
            raise
        finally:
            stages["offload_rtt"] = _ms(time.perf_counter() - sent)
        return self._cloud_reply(cloud, request, INPUT, stages, self.policy.get().score, raw_bytes=0)

    def _input_message(self, x: torch.Tensor, source: pb.InferRequest | None) -> pb.InferRequest:
        """The input as the input route sends it: the application's file as it came; an image tensor as a
        JPEG at ``input_quality``; any other tensor as it is."""
        message = pb.InferRequest()
        if source is not None and source.WhichOneof("input") == "encoded_file":
            message.encoded_file = source.encoded_file
        elif self.card.modality in ("image", "audiovisual"):
            message.encoded_file = encode_images(x[None].numpy(), "jpeg", self.input_quality)[0]
        else:
            message.tensor.shape.extend(x.shape)
            message.tensor.data = x.numpy().astype("<f4").tobytes()
        if source is not None and source.HasField("audio"):
            message.audio = source.audio
        elif self.half.audiovisual:
            raise OffloadError("the input route needs the audio clip as the application sent it (a WAV)")
        return message

    def _exit_reply(self, outcome: _Outcome, exit_index: int, degraded_reason: str = "") -> pb.InferReply:
        reply = answer_reply(outcome.output, outcome.score, self.task, self.card.label_names,
                             f"exit:{self.split_exit_names[outcome.split_block][exit_index]}", exit_index)
        reply.degraded = bool(degraded_reason)
        reply.degraded_reason = degraded_reason
        reply.route = outcome.route
        return reply

    def _run_batch(self, x: torch.Tensor, audio: torch.Tensor | None,
                   policy: PolicySettings | None = None) -> list[_Outcome]:
        """Exits for the whole batch (B, C, H, W) under one policy snapshot (the one in force unless given),
        then encode the survivors."""
        if policy is None:
            if self.adaptive is not None:
                self.adaptive.tick()
            policy = self.policy.get()
        half = self.halves[self.half.split_block if policy.split_block is None else policy.split_block]
        run_half, started = self._run_halves[half.split_block], time.perf_counter()
        result = run_half(x, policy.run_thresholds(), policy.score, with_scores=self.codec.top_k is not None,
                          audio=audio)
        survivor_row = {sample: row for row, sample in enumerate(result.offload.tolist())}
        outcomes = []
        for i in range(len(x)):
            tokens, audio_tokens, error, raw, encode_ms = None, None, "", 0, None
            row = survivor_row.get(i)
            if row is not None:
                t0 = time.perf_counter()
                sample_tokens = result.tokens[row:row + 1]  # (1, N, D) or (1, C, H, W)
                scores = None if result.scores is None else result.scores[row:row + 1]
                raw = sample_tokens.numel() * 4
                try:
                    tokens = self._encode_visual(half, sample_tokens, self.codec, scores)
                    if result.audio_tokens is not None:  # all of them: top-k selects visual tokens only
                        sample_audio = result.audio_tokens[row:row + 1]
                        raw += sample_audio.numel() * 4
                        audio_tokens = self._encode(sample_audio, dataclasses.replace(self.codec, top_k=None))
                except ValueError as e:  # e.g. values beyond float16's range
                    tokens, error = None, str(e)
                encode_ms = _ms(time.perf_counter() - t0)
            outcomes.append(_Outcome(
                exit_index=int(result.exit_index[i]), best_exit=int(result.best_exit[i]), output=result.output[i],
                score=policy.score, tokens=tokens, audio_tokens=audio_tokens, encode_error=error, raw_bytes=raw,
                encode_ms=encode_ms, split_block=half.split_block, route=policy.route,
            ))
        deepest = half.num_exits if len(result.offload) else int(result.exit_index.max())
        self.measurements.batch(half.split_block, deepest, _ms(time.perf_counter() - started))
        return outcomes

    def _encode_tokens(self, half: EdgeWalk, tokens: torch.Tensor, codec: CodecConfig, scores: torch.Tensor | None
                       ) -> pb.EncodedTensor:
        """One sample's tokens at ``half``'s split as the wire carries them: quantized, or the bottleneck's code."""
        if codec.dtype == "bottleneck":
            return encode_code(half.to_code(tokens), half.bottleneck_id, codec.zstd_level,
                               self._code_dictionaries[half.split_block])
        return encode(tokens, codec, scores, half.spec.num_prefix)
