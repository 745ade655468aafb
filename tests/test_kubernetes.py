"""The Kubernetes manifests (deploy/kubernetes): every object valid against Kubernetes' own schemas (offline,
kubernetes-validate), the overlays' patches applied and valid too, the daemons' arguments accepted by the
daemons' own parsers, and the names that tie objects together (selectors, probes, HPA target, metric,
KServe runtime) consistent. No cluster runs them here."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from offramp.cli.main import build_parser
from offramp.serving.config import CloudConfig, EdgeConfig
from offramp.serving.flags import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}  # custom resources: kubernetes-validate has no schema


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> dict[str, Any]:
    return documents(directory / "kustomization.yaml")[0]


def objects(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists, its bases' first, with its JSON patches applied."""
    k = kustomization(directory)
    found: list[dict[str, Any]] = []
    for resource in k.get("resources", []):
        path = directory / resource
        found += objects(path) if path.is_dir() else documents(path)
    for patch in k.get("patches", []):
        target = [o for o in found if o["kind"] == patch["target"]["kind"]
                  and o["metadata"]["name"] == patch["target"]["name"]]
        assert len(target) == 1, f"{directory.name}: patch {patch['path']} matches {len(target)} objects"
        for op in documents(directory / patch["path"])[0]:
            add(target[0], op)
    return found


def add(obj: dict[str, Any], op: dict[str, Any]) -> None:
    """JSON patch's ``add`` (the only op the overlays use); ``-`` appends, and the parent must exist."""
    assert op["op"] == "add", op
    *parents, last = op["path"].strip("/").split("/")
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
    else:
        node[last] = op["value"]


OVERLAYS = ["base", "tls", "kserve"]


def test_every_kustomization_is_listed_and_every_file_it_names_exists() -> None:
    assert sorted(p.parent.name for p in DEPLOY.glob("*/kustomization.yaml")) == sorted(OVERLAYS)
    for name in OVERLAYS:
        k = kustomization(DEPLOY / name)
        named = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        assert all((DEPLOY / name / n).exists() for n in named), named
        script = (ROOT / "docker" / "make-certs.sh").read_text()
        for generator in k.get("secretGenerator", []):  # certificates the script writes, never committed
            assert all(Path(f).parts[0] == "certs" and Path(f).name in script for f in generator["files"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_pass_kubernetes_schemas(overlay: str) -> None:
    version = kubernetes_validate.latest_version()
    for obj in objects(DEPLOY / overlay):
        if obj["kind"] in KSERVE_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises, naming the field, on any error


def test_a_schema_error_is_caught() -> None:  # the check above can fail
    [deployment] = [o for o in objects(DEPLOY / "base") if o["metadata"]["name"] == "offramp-cloud"
                    and o["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]


def daemon_config(args: list[str]) -> CloudConfig | EdgeConfig:
    """The config the daemon would start with, from its container's arguments (no TOML, no environment)."""
    parsed = build_parser().parse_args(args)
    return config_from_args(CloudConfig if args[0] == "cloud" else EdgeConfig, parsed, environ={})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemons_accept_their_arguments_and_probe_their_own_port(overlay: str) -> None:
    for obj in objects(DEPLOY / overlay):
        if obj["kind"] not in ("Deployment", "ServingRuntime"):
            continue
        for container in pod_spec(obj)["containers"]:
            args = [re.sub(r"\{\{\.Name\}\}", "model", a) for a in container["args"]]
            config = daemon_config(args)
            port = int(config.listen.rpartition(":")[2])
            assert config.listen.startswith("0.0.0.0:"), "in a pod the daemon must listen beyond loopback"
            assert port in {p["containerPort"] for p in container["ports"]}
            assert container["readinessProbe"]["grpc"]["port"] == port
            if config.metrics_port is not None:
                assert config.metrics_port in {p["containerPort"] for p in container["ports"]}
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert obj["kind"] == "ServingRuntime" or any(config.checkpoint.startswith(m) for m in mounts)
            if isinstance(config, EdgeConfig):
                assert config.cloud_balance != "failover" and config.cloud[0].startswith("dns:offramp-cloud:")
            if overlay == "tls":
                assert (config.tls_cert if isinstance(config, CloudConfig) else config.cloud_tls.ca) is not None


def test_names_tie_the_objects_together() -> None:
    from cloud_node.metrics import CloudMetrics

    base = {(o["kind"], o["metadata"]["name"]): o for o in objects(DEPLOY / "base")}
    cloud = base["Deployment", "offramp-cloud"]
    service = base["Service", "offramp-cloud"]
    assert service["spec"]["clusterIP"] == "None"  # headless: the name resolves to every replica
    assert service["spec"]["selector"].items() <= cloud["spec"]["template"]["metadata"]["labels"].items()
    edge_args = base["Deployment", "offramp-edge"]["spec"]["template"]["spec"]["containers"][0]["args"]
    pool = edge_args[edge_args.index("--cloud") + 1]
    assert pool == f"dns:{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    hpa = base["HorizontalPodAutoscaler", "offramp-cloud"]
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == ("Deployment",
                                                                                              "offramp-cloud")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert CloudMetrics().registry.get_sample_value(metric) is not None, f"the cloud exports no {metric}"
    claim = base["PersistentVolumeClaim", "offramp-models"]["metadata"]["name"]
    for deployment in (cloud, base["Deployment", "offramp-edge"]):
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in volumes)


def test_kserve_objects_fit_each_other_and_kubernetes() -> None:
    kserve = {o["kind"]: o for o in objects(DEPLOY / "kserve")}
    runtime, service = kserve["ServingRuntime"], kserve["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert model["storageUri"].startswith("pvc://offramp-models/")
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["ports"][0]["name"] == "h2c"
    assert daemon_config(container["args"]).checkpoint == "/mnt/models"  # where KServe mounts storageUri
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
