"""TLS, mutual TLS and bearer tokens between real edge and cloud daemons (in-process, real sockets)."""
from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import CloudFactory, LoopThread, edge_servers, wait_for

from edge_node.server import EdgeServer
from offramp.core.checkpoint import read_card
from offramp.serving.config import CloudConfig, EdgeConfig, replace_settings
from offramp.core.errors import OfframpError
from offramp.core.data.card_data import load_validation
from offramp.core.wire import pb, pb_grpc

NEVER = [2.0, 2.0]  # max_prob thresholds no exit reaches: everything goes to the cloud


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ca: bool = False,
           server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a cloud certificate for 127.0.0.1/localhost, an edge certificate, and a stranger's certificate."""
    folder = tmp_path_factory.mktemp("pki")
    paths: dict[str, str] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name] = str(folder / f"{name}.pem")
        if key is not None:
            (folder / f"{name}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            paths[f"{name}_key"] = str(folder / f"{name}.key")

    ca, ca_key = _issue("offramp test CA", None, ca=True)
    write("ca", ca)
    write("cloud", *_issue("cloud", (ca.subject, ca_key), server=True))
    write("edge", *_issue("edge", (ca.subject, ca_key)))
    other_ca, other_key = _issue("someone else's CA", None, ca=True)
    write("other_ca", other_ca)
    write("stranger", *_issue("stranger", (other_ca.subject, other_key)))
    (folder / "token").write_text("s3cret-token\n")
    (folder / "wrong-token").write_text("guess\n")
    paths["token"], paths["wrong_token"] = str(folder / "token"), str(folder / "wrong-token")
    return paths


@pytest.fixture
def start_cloud(tiny_checkpoint: Path) -> Iterator[CloudFactory]:
    with CloudFactory(tiny_checkpoint, {"grace_s": 1.0}) as factory:
        yield factory


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    defaults = {"thresholds": tuple(NEVER), "grace_s": 1.0, "deadline_ms": 3000, "reconnect_initial_s": 0.05,
                "reconnect_max_s": 0.2}
    with edge_servers(loop, tiny_checkpoint, defaults) as start:
        yield start


@pytest.fixture(scope="module")
def sample(tiny_checkpoint: Path) -> pb.InferRequest:
    x = load_validation(read_card(tiny_checkpoint))[0].tensors[0][0]
    return pb.InferRequest(request_id=1, tensor=pb.RawTensor(shape=list(x.shape), data=x.numpy().tobytes()))


def answer(edge: EdgeServer, request: pb.InferRequest) -> pb.InferReply:
    with grpc.insecure_channel(edge.address) as channel:
        return pb_grpc.EdgeStub(channel).Infer(request, timeout=30)


def offloads_to(edge: EdgeServer, address: str) -> None:
    wait_for(lambda: edge.engine.offload.connected_to == address, 15, what=f"the edge to pair with {address}")


def refused(edge: EdgeServer, address: str, why: str) -> None:
    """The edge never pairs with the cloud, says why, and still answers (degraded) from its exits."""
    wait_for(lambda: why in edge.engine.offload.unavailable_reason(), 15,
             what=f"the edge to report {why!r}, not {edge.engine.offload.unavailable_reason()!r}")
    assert edge.engine.offload.connected_to is None


def test_tls_cloud_serves_edges_that_trust_its_ca(pki: dict[str, str], start_cloud: CloudFactory,
                                                  start_edge: Callable[..., EdgeServer],
                                                  sample: pb.InferRequest) -> None:
    address, _ = start_cloud(tls_cert=pki["cloud"], tls_key=pki["cloud_key"])
    edge = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"])
    offloads_to(edge, address)
    reply = answer(edge, sample)
    assert reply.decided_by == "cloud" and not reply.degraded

    plain = start_edge(cloud=(address,))  # speaks plaintext to a TLS port
    refused(plain, address, "UNAVAILABLE")
    distrustful = start_edge(cloud=(address,), cloud_tls_ca=pki["other_ca"])  # a CA that did not sign the cloud
    refused(distrustful, address, "UNAVAILABLE")
    fallback = answer(distrustful, sample)
    assert fallback.degraded and fallback.decided_by.startswith("exit:")


def test_mutual_tls_admits_only_edges_with_a_certificate_from_the_clients_ca(
        pki: dict[str, str], start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer]) -> None:
    address, _ = start_cloud(tls_cert=pki["cloud"], tls_key=pki["cloud_key"], tls_client_ca=pki["ca"])
    member = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"], cloud_tls_cert=pki["edge"],
                        cloud_tls_key=pki["edge_key"])
    offloads_to(member, address)
    anonymous = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"])
    refused(anonymous, address, "UNAVAILABLE")
    stranger = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"], cloud_tls_cert=pki["stranger"],
                          cloud_tls_key=pki["stranger_key"])
    refused(stranger, address, "UNAVAILABLE")


def test_bearer_token_is_required_on_the_offload_service_only(
        pki: dict[str, str], start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer],
        sample: pb.InferRequest) -> None:
    address, _ = start_cloud(token_file=pki["token"])
    good = start_edge(cloud=(address,), cloud_token_file=pki["token"])
    offloads_to(good, address)
    assert answer(good, sample).decided_by == "cloud"
    refused(start_edge(cloud=(address,), cloud_token_file=pki["wrong_token"]), address,
            "UNAUTHENTICATED (wrong bearer token)")
    refused(start_edge(cloud=(address,)), address, "UNAUTHENTICATED (missing bearer token)")
    with grpc.insecure_channel(address) as channel:  # health checks stay open for orchestrators
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.OffloadStub(channel).Infer(iter([pb.OffloadRequest(request_id=1)]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_and_token_together_with_a_server_name_override(
        pki: dict[str, str], start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer]) -> None:
    address, _ = start_cloud(tls_cert=pki["cloud"], tls_key=pki["cloud_key"], token_file=pki["token"])
    edge = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"], cloud_token_file=pki["token"],
                      cloud_tls_server_name="localhost")
    offloads_to(edge, address)
    wrong_name = start_edge(cloud=(address,), cloud_tls_ca=pki["ca"], cloud_token_file=pki["token"],
                            cloud_tls_server_name="cloud.example.com")  # not in the certificate
    refused(wrong_name, address, "UNAVAILABLE")


@pytest.mark.parametrize(("cls", "settings", "message"), [
    (CloudConfig, {"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
    (CloudConfig, {"tls_client_ca": "ca.pem"}, "needs tls_cert and tls_key"),
    (EdgeConfig, {"cloud_tls_cert": "c.pem", "cloud_tls_key": "k.pem"}, "need cloud_tls_ca"),
    (EdgeConfig, {"cloud_tls_ca": "ca.pem", "cloud_tls_key": "k.pem"}, "cloud_tls_cert and cloud_tls_key go together"),
])
def test_incomplete_security_settings_are_refused(cls: type, settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace_settings(cls(checkpoint="x"), **settings)


def test_unreadable_or_empty_secrets_are_named(pki: dict[str, str], tmp_path: Path,
                                               start_cloud: CloudFactory) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(OfframpError, match="token file '.*empty' is empty"):
        start_cloud(token_file=str(empty))
    with pytest.raises(OfframpError, match="cannot read TLS key '.*missing.key'"):
        start_cloud(tls_cert=pki["cloud"], tls_key=str(tmp_path / "missing.key"))
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    with pytest.raises(OfframpError, match="must hold one token"):
        start_cloud(token_file=str(spaced))


# --------------------------------------------------------------------------- the edge's admin surface


def test_the_edge_policy_needs_the_admin_token_beyond_loopback(tiny_checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from offramp.cli import main

    token = tmp_path / "admin-token"
    token.write_text("s3cret\n")
    with LoopThread() as loop, edge_servers(loop, tiny_checkpoint, {"grace_s": 1.0}) as start:
        open_edge = start(listen="0.0.0.0:0")  # beyond loopback, no admin token: the policy is closed
        local = f"127.0.0.1:{open_edge.port}"
        with grpc.insecure_channel(local) as channel:
            stub = pb_grpc.EdgeStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.SetPolicy(pb.Policy(thresholds=[0.0, 0.0], score="max_prob"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin_token_file" in e.value.details()
            x = bytes(4 * 32 * 32)  # one 1x32x32 float32 image of zeros
            reply = stub.Infer(pb.InferRequest(tensor=pb.RawTensor(shape=[1, 32, 32], data=x)), timeout=10)
            assert reply.status.code == 0  # inference stays open to the applications
        guarded = start(admin_token_file=str(token))
        assert main(["policy", "get", "--edge", guarded.address]) == 2
        assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err
        assert main(["policy", "set", "--edge", guarded.address, "--admin-token-file", str(token),
                     "--thresholds", "0.5,0.6"]) == 0
        assert "thresholds: 0.5, 0.6" in capsys.readouterr().out


def test_daemon_process_starts_and_health_checks_tls_daemons(tiny_checkpoint: Path, pki: dict[str, str]) -> None:
    from offramp.serving.daemon_proc import DaemonProcess

    tls = ["--checkpoint", str(tiny_checkpoint), "--tls-cert", pki["cloud"], "--tls-key", pki["cloud_key"]]
    with DaemonProcess("cloud", [*tls, "--tls-client-ca", pki["ca"]], tls_ca=pki["ca"],
                       tls_client=(pki["edge"], pki["edge_key"])) as cloud:
        with cloud.channel() as channel:
            reply = pb_grpc.OffloadStub(channel).Describe(pb.DescribeRequest(), timeout=10)
        assert reply.split_block == read_card(tiny_checkpoint).split_block
        with grpc.insecure_channel(cloud.address) as channel:  # plaintext gets nowhere
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
