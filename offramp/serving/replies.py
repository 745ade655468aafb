"""The answer a caller gets for one sample, whoever computed it: an exit, the cloud, a baseline."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from offramp.core.scores import confidence, prediction
from offramp.core.wire import make_status, pb


def answer_reply(output: torch.Tensor, score: str, task: str, label_names: Sequence[str], decided_by: str,
                 exit_index: int) -> pb.InferReply:
    """An OK ``InferReply`` from one head output (num_outputs,): the class and its label, or the value."""
    out = output[None]  # (1, num_outputs)
    reply = pb.InferReply(
        confidence=float(confidence(out, score)[0]), decided_by=decided_by, exit_index=exit_index,
        output=output.tolist(), status=make_status(),
    )
    if task == "classification":
        reply.prediction = int(prediction(out, task)[0])
        reply.label = label_names[reply.prediction]
    else:
        reply.prediction = -1
        reply.value = float(prediction(out, task)[0])
    return reply
