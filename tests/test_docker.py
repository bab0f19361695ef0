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
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_compose_topology_binds_loopback_and_checks_health():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgres", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("${NEXUS_BIND:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
        if name != "worker":
            assert "healthcheck" in service, f"{name} has no health check"
    assert "postgresql://" in services["mlflow"]["command"]
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
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
    known = {"FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "USER", "VOLUME", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL"}
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
