"""deploy/docker/Dockerfile: linted by hadolint and checked by reading (no Docker engine here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge import settings
from tests.test_deploy_contract import DEPLOY, REPO, design_env_vars, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    pairs = []
    for line in joined:
        word, _, rest = line.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    pairs = instructions()
    last_from = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    return pairs[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args):
                env[key] = value
    return env


def args_defaults() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+([A-Za-z_]+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_every_stage_is_python_311_slim() -> None:
    defaults = args_defaults()
    images = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert len(images) >= 2, "a build stage and a runtime stage"
    for image in images:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        assert resolved.startswith("python:3.11-slim"), resolved


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    # numeric, so Kubernetes can verify runAsNonRoot without a passwd lookup
    assert uid.isdigit(), uid
    assert int(uid) != 0


def test_jemalloc_is_installed_and_preloaded() -> None:
    stage = final_stage()
    runs = " ".join(args for word, args in stage if word == "RUN")
    env = env_of(stage)
    assert "libjemalloc2" in runs
    assert env["LD_PRELOAD"].endswith("libjemalloc.so.2")
    # the preloaded path is the one the RUN step links (architecture-independent)
    assert re.search(rf"ln -s (\"[^\"]+\"|\S+) {re.escape(env['LD_PRELOAD'])}", runs), runs
    assert env["MALLOC_ARENA_MAX"] == "2"


def test_exposes_the_port_it_listens_on_and_stops_on_sigterm() -> None:
    stage = final_stage()
    env = env_of(stage)
    exposed = [args for word, args in stage if word == "EXPOSE"]
    assert exposed == ["8080"]
    assert env["EDGE_PORT"] == "8080"
    assert env["EDGE_HOST"] == "0.0.0.0"
    assert [args for word, args in stage if word == "STOPSIGNAL"] == ["SIGTERM"]
    entry = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    assert entry == [["python", "-m", "edge"]]


def test_edge_defaults_are_contract_variables_with_valid_values() -> None:
    env = {k: v for k, v in env_of(final_stage()).items() if k.startswith("EDGE_")}
    assert env
    assert set(env) <= design_env_vars(), set(env) - design_env_vars()
    declared = {var.name: var for var in settings.VARS}
    for name, value in env.items():
        if name in declared:
            declared[name].parse(value)  # raises on an invalid default
    assert float(env["EDGE_SHUTDOWN_GRACE"]) > 0


def test_copied_sources_exist_and_survive_the_dockerignore() -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    assert "**" in ignore, "the context is an allow-list"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources: list[str] = []
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            sources.extend(args.split()[:-1])
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the build context"
        assert source.rstrip("/") in kept, f"COPY {source}: excluded by the dockerignore"
    # `pip install .` needs the files pyproject.toml names
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["readme"] in sources


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _healthcheck(port: int) -> int:
    args = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    assert len(args) == 1
    command = json.loads(args[0].split(" CMD ", 1)[1])
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env={"EDGE_PORT": str(port), "PATH": ""},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return result.returncode


def test_healthcheck_passes_on_200_and_fails_otherwise(health_server: ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 200
    assert _healthcheck(port) == 0
    _Health.status = 503
    try:
        assert _healthcheck(port) != 0
    finally:
        _Health.status = 200


def test_healthcheck_fails_when_nothing_listens() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    server.server_close()
    assert _healthcheck(port) != 0


def test_dockerignore_sits_where_buildkit_reads_it() -> None:
    assert DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore") == DOCKERIGNORE
    assert DOCKERIGNORE.is_file()
