"""The Open Inference Protocol over HTTP/REST (KServe v2), checked with Triton's own HTTP client: health,
metadata, infer at batch 1 and 3 (binary and JSON tensors), a wrong model (404), bad bodies, the token."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CloudFactory

from offramp.core.checkpoint import load_checkpoint
from offramp.core.halves import CloudHalf, EdgeHalf

tc_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def rest(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(REST address, token file) of one cloud serving REST with a bearer token."""
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret-token-0123456789\n")
    with CloudFactory(tiny_checkpoint, {"model_name": MODEL, "rest_port": 0, "grace_s": 1.0,
                                        "token_file": str(token)}) as start:
        _, server = start()
        yield f"127.0.0.1:{server.rest_port}", "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def tail(tiny_checkpoint: Path) -> tuple[torch.Tensor, CloudHalf]:
    model, card = load_checkpoint(tiny_checkpoint)
    x = torch.randn(3, *card.input_shape, generator=torch.Generator().manual_seed(1))
    tokens = EdgeHalf(model, card.split_block).run(x, [2.0, 2.0], "max_prob").tokens
    return tokens, CloudHalf(model, card.split_block)


def client(address: str) -> tc_http.InferenceServerClient:
    return tc_http.InferenceServerClient(address)


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_and_metadata(rest: tuple[str, str], tail: tuple[torch.Tensor, CloudHalf]) -> None:
    address, token = rest
    c = client(address)
    assert c.is_server_live() and c.is_server_ready()  # health is open, as over gRPC
    assert c.is_model_ready(MODEL, headers=headers(token)) and not c.is_model_ready("other", headers=headers(token))
    meta = c.get_model_metadata(MODEL, headers=headers(token))
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["TOKENS", "SCALE"]
    assert meta["inputs"][0]["shape"] == [-1, *tail[0].shape[1:]]
    assert c.get_server_metadata(headers=headers(token))["name"] == "offramp"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_the_tail(rest: tuple[str, str], tail: tuple[torch.Tensor, CloudHalf], batch: int,
                                binary: bool) -> None:
    address, token = rest
    tokens, half = tail
    x = tc_http.InferInput("TOKENS", [batch, *tokens.shape[1:]], "FP32")
    x.set_data_from_numpy(tokens[:batch].numpy(), binary_data=binary)
    out = tc_http.InferRequestedOutput("OUTPUT", binary_data=binary)
    result = client(address).infer(MODEL, [x], outputs=[out], headers=headers(token))
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), half.run(tokens[:batch]).numpy(), atol=1e-4, rtol=1e-4)


def test_a_wrong_model_is_404_and_bad_bodies_are_400(rest: tuple[str, str]) -> None:
    address, token = rest
    x = tc_http.InferInput("TOKENS", [1, 2], "FP32")
    x.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException, match="no model named 'other'"):
        client(address).infer("other", [x], headers=headers(token))

    def post(path: str, body: bytes, auth: bool = True) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{address}{path}", data=body, method="POST",
                                         headers=headers(token) if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post("/v2/models/other/infer", b'{"inputs": []}')[0] == 404
    status, reply = post(f"/v2/models/{MODEL}/infer", b"not json")
    assert status == 400 and "not JSON" in reply["error"]
    status, reply = post(f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [
        {"name": "TOKENS", "datatype": "FP32", "shape": [1, 2], "data": [1.0]}]}).encode())
    assert status == 400 and "1 values for shape [1, 2]" in reply["error"]
    status, reply = post(f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [
        {"name": "TOKENS", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}).encode())
    assert status == 400 and "TOKENS" in reply["error"]  # the wrong token shape for this model
    status, reply = post(f"/v2/models/{MODEL}/infer", b'{"inputs": []}', auth=False)
    assert status == 401 and "bearer token" in reply["error"]
    assert client(address).is_server_live()  # still serving
