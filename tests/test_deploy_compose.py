"""deploy/compose.yaml: valid against the compose spec, and wired the way edge expects."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge import settings
from tests.test_deploy_contract import DEPLOY, GRAFANA, design_env_vars, tool

COMPOSE = DEPLOY / "compose.yaml"


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def mounts(name: str) -> dict[str, tuple[Path, str]]:
    """Container path -> (host path, options) of a service's bind mounts."""
    found = {}
    for volume in service(name).get("volumes", []):
        source, target, *options = volume.split(":")
        if source.startswith("."):
            found[target] = ((DEPLOY / source).resolve(), ",".join(options))
    return found


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def test_valid_against_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_has_every_part() -> None:
    assert set(compose()["services"]) == {
        "edge",
        "redis",
        "minio",
        "minio-seed",
        "prometheus",
        "grafana",
    }
    for name, spec in compose()["services"].items():
        if "image" in spec and name != "edge":
            repo, _, tag = spec["image"].rpartition(":")
            assert repo, f"{name}: image without a tag"
            assert tag not in ("", "latest"), f"{name}: pin the image"


def test_edge_builds_from_the_dockerfile_and_runs_two_replicas() -> None:
    edge = service("edge")
    context = (DEPLOY / edge["build"]["context"]).resolve()
    assert (context / edge["build"]["dockerfile"]).is_file()
    assert (context / "pyproject.toml").is_file()
    assert edge["deploy"]["replicas"] == 2
    assert edge["deploy"]["resources"]["limits"]["memory"]
    assert edge["cap_drop"] == ["ALL"]


def test_edge_environment_uses_contract_variables() -> None:
    env = service("edge")["environment"]
    names = {k for k in env if k.startswith("EDGE_")}
    assert names <= design_env_vars(), names - design_env_vars()
    declared = {var.name: var for var in settings.VARS}
    for name in names & set(declared):
        declared[name].parse(str(env[name]))
    assert env["EDGE_CACHE"] == "memory,redis://redis:6379/0"
    assert env["EDGE_ORIGIN"] == "s3://images/"
    assert env["EDGE_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_edge_drains_within_the_stop_grace_period() -> None:
    edge = service("edge")
    assert duration_seconds(edge["stop_grace_period"]) > float(
        edge["environment"]["EDGE_SHUTDOWN_GRACE"]
    )


def test_edge_waits_for_redis_and_the_seeded_bucket() -> None:
    depends = service("edge")["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["minio-seed"]["condition"] == "service_completed_successfully"
    assert service("redis")["healthcheck"]["test"]
    assert service("minio")["healthcheck"]["test"]


def test_s3_credentials_match_minio() -> None:
    edge, minio = service("edge")["environment"], service("minio")["environment"]
    assert edge["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert edge["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    seed = service("minio-seed")["environment"]
    assert seed == {k: minio[k] for k in seed}


def test_minio_seed_creates_the_origin_bucket_from_the_sample_images() -> None:
    seed = service("minio-seed")
    assert seed["image"].startswith("minio/mc:")
    assert seed["depends_on"]["minio"]["condition"] == "service_healthy"
    ((target, (source, options)),) = mounts("minio-seed").items()
    assert options == "ro"
    assert source.is_dir()
    assert any(p.suffix in (".jpg", ".png", ".webp", ".gif") for p in source.iterdir())
    script = " ".join(seed["command"])
    bucket = service("edge")["environment"]["EDGE_ORIGIN"].removeprefix("s3://").strip("/")
    assert f"mc mb --ignore-existing local/{bucket}" in script
    assert re.search(rf"mc (mirror|cp)[^;]* {re.escape(target)}/? local/{bucket}", script)
    assert "http://minio:9000" in script


def test_prometheus_mounts_the_rules_and_scrapes_every_replica() -> None:
    prometheus = service("prometheus")
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = PurePosixPath(config_flag.split("=", 1)[1])
    source, _ = mounts("prometheus")[str(config_path.parent)]
    assert source == DEPLOY / "prometheus"
    config = yaml.safe_load((source / config_path.name).read_text())
    for rule_file in config["rule_files"]:
        assert (source / rule_file).is_file()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "edge"]
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["edge"]
    assert dns["port"] == 8080


def test_grafana_is_provisioned_from_the_repository() -> None:
    found = mounts("grafana")
    provisioning, _ = found["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "edge.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    source, _ = found[dashboards_path]
    assert (source / "edge.json").is_file()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]
