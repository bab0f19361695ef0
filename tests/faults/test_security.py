"""Security: no pickle on any load path, servers bind to 127.0.0.1 by default, no credential in MLflow
params."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.tracking import configure as configure_tracking

from .conftest import ROOT

CODE_DIRS = ("nexus", "flows", "benchmarks")


def _sources() -> list[Path]:
    return [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")]


def _calls(pattern: str) -> list[tuple[Path, int, str]]:
    """Occurrences of `pattern` in code (comments and docstring lines excluded), with the call's text
    up to its closing parenthesis (calls may span lines)."""
    found = []
    for path in _sources():
        text = path.read_text()
        for m in re.finditer(pattern, text):
            line = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
            if "#" in line or line.strip().startswith(('"', "`")):
                continue
            depth, end = 0, m.end()
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            found.append((path, text.count("\n", 0, m.start()) + 1, text[m.start() : end + 1]))
    return found


def test_torch_load_only_with_weights_only():
    unsafe = [
        f"{p.relative_to(ROOT)}:{n}"
        for p, n, call in _calls(r"\btorch\.load\(")
        if "weights_only=True" not in call
    ]
    assert unsafe == []


def test_no_pickle_loading():
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for pat in (
            r"\bpickle\.loads?\(",
            r"\bdill\.loads?\(",
            r"\bjoblib\.load\(",
            r"\bcloudpickle\.loads?\(",
        )
        for p, n, _ in _calls(pat)
    ]
    assert hits == []


def test_lightning_resume_uses_weights_only():
    """Lightning's own torch.load of last.ckpt is told weights_only=True (nexus.training.stages)."""
    calls = [c for p, _, c in _calls(r"\.fit\(") if p.name == "stages.py"]
    assert calls and all("weights_only=True" in c for c in calls)


def test_ui_binds_to_localhost(monkeypatch):
    import argparse

    import flows.cli

    started = []

    class FakePopen:
        def __init__(self, cmd, *a, **k):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(flows.cli.subprocess, "Popen", FakePopen)
    flows.cli._ui(argparse.Namespace(prefect_port=1, mlflow_port=2, mlflow_db="x.db"))
    assert len(started) == 2
    for cmd in started:
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd


def test_compose_ports_bind_to_localhost():
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    ports = re.findall(r"ports:\s*\[([^\]]*)\]", compose) + re.findall(
        r"^\s*-\s*\"?([\w${}:.\-]+:\d+:\d+)", compose, re.MULTILINE
    )
    assert ports
    for spec in ports:
        assert spec.strip(" \"'").startswith(("127.0.0.1:", "${NEXUS_BIND:-127.0.0.1}:")), spec


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "db_password",
        "api_key",
        "apiKey",
        "aws_secret_access_key",
        "access_key_id",
        "private_key",
        "hf_token",
        "auth",
        "credentials",
    ],
)
def test_credential_like_keys_are_redacted(key):
    from flows.tracking import flatten, resolved

    flat = flatten(
        resolved({"tracking": {key: "hunter2"}, "tokenizer_path": "/tok", "author": "me", "max_tokens": 5})
    )
    assert flat[f"tracking.{key}"] == "***"
    assert flat["tokenizer_path"] == "/tok" and flat["author"] == "me" and flat["max_tokens"] == 5


def test_secret_never_reaches_mlflow_params(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flows.tracking import configure, pipeline_run

    previous = mlflow.get_tracking_uri()
    try:
        configure(f"sqlite:///{tmp_path}/mlflow.db")
        with pipeline_run(
            "sec", config={"tracking": {"api_key": "hunter2", "password": "hunter2"}, "lr": 1}
        ) as rid:
            pass
        params = MlflowClient().get_run(rid).data.params
    finally:
        configure_tracking(previous)
    assert params["lr"] == "1" and "hunter2" not in " ".join(params.values())


def test_password_in_uri_value_is_redacted():
    from flows.tracking import flatten, resolved

    flat = flatten(resolved({"tracking": {"uri": "postgresql://nexus:hunter2@db:5432/mlflow"}}))
    assert "hunter2" not in flat["tracking.uri"]
