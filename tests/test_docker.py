"""The Docker files, validated offline: compose by `docker-compose config` when the client is
installed (Debian's docker-compose needs no engine for it) plus structural checks, Dockerfiles
parsed with dockerfile-parse. The worker images must install the project as the README does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose client not installed")
def test_compose_file_passes_docker_compose_config():
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_compose_topology_binds_loopback_and_checks_health():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgres", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("${NEXUS_BIND:-127.0.0.1}:"), (
                f"{name} publishes {port} beyond loopback"
            )
        if name != "worker":
            assert "healthcheck" in service, f"{name} has no health check"
    assert "postgresql://" in services["mlflow"]["command"]
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    worker = services["worker"]["command"]
    assert "prefect worker start --pool nexus" in worker and "nexus deploy --pool nexus" in worker


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_parse_and_install_like_the_readme(dockerfile):
    with open(dockerfile, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure = [i for i in parser.structure if i["instruction"] != "COMMENT"]
        baseimage = parser.baseimage
    instructions = [i["instruction"] for i in structure]
    assert instructions[0] == "FROM" and ":" in baseimage and not baseimage.endswith(":latest")
    known = {
        "FROM",
        "RUN",
        "COPY",
        "ENV",
        "ARG",
        "WORKDIR",
        "USER",
        "VOLUME",
        "CMD",
        "ENTRYPOINT",
        "EXPOSE",
        "LABEL",
    }
    assert set(instructions) <= known, set(instructions) - known
    runs = [i["value"] for i in structure if i["instruction"] == "RUN"]
    assert any(re.match(r"make install\b", r) for r in runs), "the image must install with `make install`"
    for copy in (i["value"] for i in structure if i["instruction"] == "COPY"):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} missing"
    users = [i["value"] for i in structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"


def test_readme_and_makefile_share_the_install_path():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install: \$\(VENV\)/\.installed", makefile, re.MULTILINE)
    assert "make test" in (ROOT / "README.md").read_text() and "make demo" in (ROOT / "README.md").read_text()


def test_runs_of_the_compose_worker_keep_their_outputs_on_named_volumes():
    """The worker's project home, MLflow's artifacts and the databases are named volumes; the worker
    tracks to the MLflow server, and runs as a non-root user that owns the home and can fetch the demo's
    Debian corpora (apt's package lists stay in the image)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    named = set(compose["volumes"])
    services = compose["services"]
    worker = services["worker"]
    home = worker["environment"]["NEXUS_HOME"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in worker["volumes"]}
    assert mounts.get(home) in named, f"the worker's project home {home} is not a named volume"
    artifacts = re.search(r"--artifacts-destination (\S+)", services["mlflow"]["command"]).group(1)
    assert {m.split(":")[1]: m.split(":")[0] for m in services["mlflow"]["volumes"]}.get(artifacts) in named
    assert "--serve-artifacts" in services["mlflow"]["command"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"NEXUS_HOME={home}" in text and f"chown nexus {home}" in text, dockerfile.name
        assert "apt-get update" in text and "rm -rf /var/lib/apt/lists" not in text, dockerfile.name
