"""Static checks of docker/: the Dockerfile, compose.yaml, the health probe and .dockerignore.

No Docker engine is needed: the Dockerfile is parsed into instructions, the compose
file is loaded with PyYAML, and every service's command goes through the real
``offramp`` argument parser, so a renamed flag or subcommand breaks this test
instead of a container at start-up.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import tomllib
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offramp.cli import build_parser
from offramp.netem.profiles import parse_profile

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_TLS = DOCKER / "compose.tls.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


# ---------------------------------------------------------------------------------------------
# A small Dockerfile parser: comments, line continuations, instructions, stages
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    line: int       # where it starts, 1-based
    keyword: str    # upper case
    args: str       # the rest, continuations joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions as the builder sees them: comment lines are dropped (also inside a
    continuation), a trailing backslash joins the next line, keywords are case-insensitive."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].rstrip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, f"Dockerfile ends inside a continuation (started on line {start})"
    return out


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """``--from=build --chown=a src dst`` -> ({"from": "build", "chown": "a"}, "src dst")."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, or None for the shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` from the build args' defaults."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name in variables:
            return variables[name]
        assert m.group(2) is not None, f"${name} has no default and no ARG default"
        return m.group(2)
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, text)


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction]


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), ins
            result.append(Stage(words[2] if len(words) == 3 else None, substitute(words[0], global_args), []))
        elif not result:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default
        else:
            result[-1].instructions.append(ins)
    return global_args, result


# ---------------------------------------------------------------------------------------------
# .dockerignore, as the builder applies it to the build context
# ---------------------------------------------------------------------------------------------

def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip("/")))
        rules.append((negate, _glob_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """A path is left out when the last rule matching it or one of its parent folders excludes it."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with the defaults, as on a machine with none of them set.
    A variable without a default fails: compose would substitute an empty string."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            assert m.group(2) is not None, f"${{{m.group(1)}}} has no default in {value!r}"
            return m.group(2)
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", one, value.replace("$$", "\0")).replace("\0", "$")
    return value


def copies(instructions: list[Instruction]) -> list[tuple[dict[str, str], list[str], str]]:
    """(flags, sources, destination) of every COPY/ADD."""
    out = []
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            flags, rest = split_flags(ins.args)
            words = exec_form(rest) or shlex.split(rest)
            assert len(words) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a destination"
            out.append((flags, words[:-1], words[-1]))
    return out


def parse_command(command: list[str]) -> Any:
    """The real ``offramp`` parser on a service's command; argparse's complaint becomes the failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(command)
    except SystemExit as e:
        pytest.fail(f"'offramp {shlex.join(command)}' does not parse (exit {e.code}): {err.getvalue().strip()}")


def flag(command: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a command list."""
    for i, word in enumerate(command):
        if word == name and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------

def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN x \\\n # note\n    && y\n\nrun z\n"
    assert parse_dockerfile(text) == [Instruction(2, "FROM", "a AS b"), Instruction(3, "RUN", "x && y"),
                                      Instruction(7, "RUN", "z")]


def test_dockerfile_instructions_are_valid(dockerfile: list[Instruction]) -> None:
    assert dockerfile, "no instructions"
    for ins in dockerfile:
        assert ins.keyword in INSTRUCTIONS, f"line {ins.line}: unknown instruction {ins.keyword}"
        assert ins.args, f"line {ins.line}: {ins.keyword} without arguments"
        if ins.keyword in ("CMD", "ENTRYPOINT", "SHELL"):
            exec_form(ins.args)  # valid JSON when it is the exec form


def test_dockerfile_stages_and_base(dockerfile: list[Instruction]) -> None:
    _, built = stages(dockerfile)
    assert len(built) >= 2, "expected a multi-stage build"
    assert all(s.base == "python:3.11-slim" for s in built), [s.base for s in built]
    names = [s.name for s in built]
    for i, stage in enumerate(built):
        for flags, _, _ in copies(stage.instructions):
            if "from" in flags:
                assert flags["from"] in names[:i], f"COPY --from={flags['from']} names no earlier stage"


def test_dockerfile_copy_sources_exist_and_are_in_the_context(dockerfile: list[Instruction]) -> None:
    rules = dockerignore_rules()
    _, built = stages(dockerfile)
    copied: set[str] = set()
    for stage in built:
        for flags, sources, _ in copies(stage.instructions):
            if "from" in flags:
                continue
            for source in sources:
                assert not source.startswith(("http://", "https://")), f"{source}: remote sources are not pinned"
                path = ROOT / source
                assert path.exists(), f"COPY source {source} is not in the repository"
                assert not is_ignored(source, rules), f"COPY source {source} is excluded by .dockerignore"
                copied.add(PurePosixPath(source).parts[0])
    # `pip install .` must see the readme and every package pyproject.toml packages.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "pyproject.toml" in copied and project["project"]["readme"] in copied
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*")
        if (ROOT / top / "__init__.py").exists():
            assert top in copied, f"package {top} is in pyproject.toml but not copied into the build stage"


def test_entrypoint_is_the_console_script(dockerfile: list[Instruction]) -> None:
    _, built = stages(dockerfile)
    final = built[-1].instructions
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [exec_form(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "the final stage has no ENTRYPOINT"
    entrypoint = entrypoints[-1]
    assert entrypoint is not None and len(entrypoint) == 1, "ENTRYPOINT should be the exec form of one command"
    assert entrypoint[0] in scripts, f"ENTRYPOINT {entrypoint[0]} is not a console script of pyproject.toml"
    cmds = [exec_form(i.args) for i in final if i.keyword == "CMD"]
    assert cmds and cmds[-1] is not None, "the final stage needs an exec-form CMD"
    if cmds[-1] != ["--help"]:
        parse_command(cmds[-1])


def test_runs_as_non_root_with_models_volume(dockerfile: list[Instruction]) -> None:
    _, built = stages(dockerfile)
    final = built[-1].instructions
    users = [i.args.split(":")[0] for i in final if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must switch to an unprivileged user"
    volumes = [v for i in final if i.keyword == "VOLUME" for v in (exec_form(i.args) or i.args.split())]
    assert "/models" in volumes


def test_healthcheck_script_is_copied(dockerfile: list[Instruction]) -> None:
    _, built = stages(dockerfile)
    final = built[-1].instructions
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    flags, rest = split_flags(checks[0].args)
    assert rest.startswith("CMD "), checks[0]
    command = exec_form(rest[4:]) or shlex.split(rest[4:])
    destinations = {dest: srcs for f, srcs, dest in copies(final) if "from" not in f}
    script = next(w for w in command if w.endswith(".py"))
    assert script in destinations, f"HEALTHCHECK runs {script}, which no COPY puts there"
    assert all((ROOT / s).is_file() for s in destinations[script])


# ---------------------------------------------------------------------------------------------
# compose.yaml
# ---------------------------------------------------------------------------------------------

def test_compose_services_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"cloud", "edge1", "edge2"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(w, str) for w in command), name
        args = parse_command(command)
        assert args.command == command[0], f"{name}: parsed as {args.command}"


def test_compose_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    listen = {name: port_of(flag(s["command"], "--listen")) for name, s in services.items()
              if flag(s["command"], "--listen")}
    kinds = {name: s["command"][0] for name, s in services.items()}
    for name, service in services.items():
        command = service["command"]
        targets = []
        if kinds[name] == "edge":
            after = command[command.index("--cloud") + 1:]
            ends = [i for i, w in enumerate(after) if w.startswith("-")]
            targets = [(w, "link") for w in after[:ends[0] if ends else None]]  # nargs="+": up to the next flag
            assert targets, f"{name}: no --cloud"
        elif kinds[name] == "link":
            targets = [(flag(command, "--upstream"), "cloud")]
            parse_profile(flag(command, "--profile") or "lan")
        for address, kind in targets:
            host = address.rpartition(":")[0]
            assert host in services, f"{name}: {address} names no service"
            assert kinds[host] in (kind, "cloud"), f"{name}: {address} is a {kinds[host]}"
            assert port_of(address) == listen[host], f"{name}: {address}, but {host} listens on {listen[host]}"
            deps = service.get("depends_on", {})
            assert host in deps, f"{name} talks to {host} without depending on it"


def test_compose_depends_on_and_healthchecks(compose: dict[str, Any], dockerfile: list[Instruction]) -> None:
    services = compose["services"]
    _, built = stages(dockerfile)
    destinations = {dest: srcs for f, srcs, dest in copies(built[-1].instructions) if "from" not in f}
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on should carry conditions"
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {target}"
            assert "healthcheck" in services[target], f"{name} waits for {target}'s health, which it lacks"
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD", f"{name}: healthcheck should be the exec form"
        script = next(w for w in check if w.endswith(".py"))
        assert script in destinations and all((ROOT / s).is_file() for s in destinations[script]), script
        # It probes the port the daemon listens on.
        address = check[check.index(script) + 1]
        assert port_of(address) == port_of(flag(service["command"], "--listen")), name


def test_compose_models_volume_and_checkpoints(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        mounts = [v for v in service.get("volumes", []) if isinstance(v, dict)]
        models = [v for v in mounts if v["target"] == "/models"]
        assert models and models[0].get("read_only") is True, f"{name}: /models should be mounted read-only"
        checkpoint = flag(service["command"], "--checkpoint")
        if checkpoint is not None:
            assert PurePosixPath(checkpoint).is_relative_to("/models") and checkpoint != "/models", \
                f"{name}: checkpoint {checkpoint} is outside the /models volume"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() \
            == DOCKERFILE.resolve()


def test_compose_metrics_ports_published(compose: dict[str, Any]) -> None:
    published: list[int] = []
    for name, service in compose["services"].items():
        ports = [str(p) for p in service.get("ports", [])]
        published += [int(p.split(":")[0]) for p in ports]
        metrics = flag(service["command"], "--metrics-port")
        if service["command"][0] in ("cloud", "edge"):
            assert metrics is not None, f"{name}: no --metrics-port"
            assert any(p.endswith(f":{metrics}") for p in ports), f"{name}: metrics port {metrics} not published"
    assert len(published) == len(set(published)), f"a host port is published twice: {sorted(published)}"


def merged_tls(compose: dict[str, Any]) -> dict[str, Any]:
    """compose.yaml with compose.tls.yaml laid over it, as ``-f compose.yaml -f compose.tls.yaml`` does
    (a service's command, secrets and environment are replaced whole by the override's)."""
    override = interpolate(yaml.safe_load(COMPOSE_TLS.read_text()))
    services = {name: {**service, **override["services"].get(name, {})}
                for name, service in compose["services"].items()}
    assert set(override["services"]) <= set(services), "the TLS variant names a service compose.yaml lacks"
    return {"services": services, "secrets": {**compose.get("secrets", {}), **override["secrets"]}}


def test_compose_tls_variant_parses_and_has_every_secret_it_names(compose: dict[str, Any]) -> None:
    merged = merged_tls(compose)
    script = (DOCKER / "make-certs.sh").read_text()
    for name, service in merged["services"].items():
        args = parse_command(service["command"])
        if args.command == "cloud":
            assert flag(service["command"], "--tls-client-ca"), "the cloud should ask edges for certificates"
        if args.command == "edge":
            assert flag(service["command"], "--cloud-tls-server-name") == "cloud"
        named = {w.removeprefix("/run/secrets/") for w in [*service["command"], *service.get("environment", {}).values()]
                 if str(w).startswith("/run/secrets/")}
        assert named <= set(service.get("secrets", [])), f"{name} reads secrets it does not mount"
        for secret in service.get("secrets", []):
            source = merged["secrets"][secret]["file"]
            if "certs" in source:  # made by the script, which must write that file name
                assert Path(source).name in script, f"make-certs.sh does not write {Path(source).name}"


def test_throwaway_certificates_give_mutual_tls(tmp_path: Path, tiny_checkpoint: Path, probe: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from offramp.serving.daemon_proc import DaemonProcess

    certs = tmp_path / "certs"
    subprocess.run(["sh", str(DOCKER / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    tls = ["--tls-cert", str(certs / "cloud.pem"), "--tls-key", str(certs / "cloud.key"),
           "--tls-client-ca", str(certs / "ca.pem")]
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint), *tls], tls_ca=str(certs / "ca.pem"),
                       tls_client=(str(certs / "edge.pem"), str(certs / "edge.key"))) as cloud:
        monkeypatch.setenv("OFFRAMP_HEALTH_TLS_CA", str(certs / "ca.pem"))
        monkeypatch.setenv("OFFRAMP_HEALTH_TLS_SERVER_NAME", "cloud")
        assert probe.main([cloud.address]) == 1  # no client certificate: the cloud refuses the handshake
        monkeypatch.setenv("OFFRAMP_HEALTH_TLS_CERT", str(certs / "edge.pem"))
        monkeypatch.setenv("OFFRAMP_HEALTH_TLS_KEY", str(certs / "edge.key"))
        assert probe.main([cloud.address]) == 0


# ---------------------------------------------------------------------------------------------
# The health probe and .dockerignore
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe() -> Any:
    spec = importlib.util.spec_from_file_location("offramp_healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_probe_against_a_health_server(probe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe.main([f"127.0.0.1:{port}"]) == 0
        assert probe.main([str(port)]) == 0
        monkeypatch.setenv("OFFRAMP_HEALTH_ADDR", f"127.0.0.1:{port}")
        assert probe.main([]) == 0
        assert probe.main([str(port), "no.such.Service"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe.main([str(port)]) == 1
    finally:
        server.stop(None)
    assert probe.main([str(port)]) == 1  # nobody listening


def test_dockerignore_keeps_local_state_out() -> None:
    rules = dockerignore_rules()
    for path in (".venv/bin/python", "runs/demo/model", ".git/HEAD", "bench/results/link.json",
                 "offramp/__pycache__/cli.cpython-311.pyc"):
        assert is_ignored(path, rules), path
    for path in ("pyproject.toml", "offramp/cli/main.py", "docker/healthcheck.py", "bench/exits.py"):
        assert not is_ignored(path, rules), path
