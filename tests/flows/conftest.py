"""Fixtures for the flow tests: a session-wide Prefect test harness (real Prefect API on a temporary
SQLite database), a temporary SQLite MLflow store, and the micro experiment's overrides.
Fixtures only: nothing here is autouse, so plain MLflow tests (test_tracking.py) are unaffected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.tracking import configure as configure_tracking

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CORPORA = Path(__file__).resolve().parents[1] / "fixtures" / "corpora"


def build_line(tmp_path_factory, name: str, *extra: str):
    """A micro pipeline in a project home of its own, with the default SQLite MLflow store:
    (out_dir, uri, overrides, summary); its Nexus MoE is version 1 (@champion) of `nexus-micro-moe`."""
    import mlflow

    from flows.pipeline import upcycle_pipeline

    home = tmp_path_factory.mktemp(name)
    previous = mlflow.get_tracking_uri()
    overrides = micro_overrides(home, *extra, tracking=True)
    try:
        summary = upcycle_pipeline("micro", overrides)
    finally:
        configure_tracking(previous)
    return micro_out(home), micro_uri(home), overrides, summary


@pytest.fixture(scope="session")
def micro_moe(prefect_harness, tmp_path_factory):
    """The micro pipeline run once per session (see `build_line`). Only test_pipeline extends it (with
    `moe=` pinned to version 1, adding records every reader tolerates); every other user only reads it
    or writes into folders of its own (test_recipes). Tests that build model lines of their own call
    `build_line`. The flow tests pass in any order (`-p random_order --random-order`)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    try:
        yield build_line(tmp_path_factory, "micro-moe")
    finally:
        configure_tracking(previous)


def domain_folder(dest: Path, corpus: str) -> Path:
    """A new domain as a user brings one: a folder with a JSONL file, one document per paragraph of
    the fixture corpus `corpus` (e.g. `kernel-docs`, `python-docs`, `code`)."""
    import json

    dest.mkdir(parents=True)
    docs = [
        block.strip()
        for path in sorted((CORPORA / corpus).rglob("*"))
        if path.is_file()
        for block in path.read_text().split("\n\n")
        if len(block.strip()) > 40
    ]
    (dest / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return dest


def registry_versions(uri: str, name: str = "nexus-micro-moe") -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient(uri).search_model_versions(f"name = '{name}'"))


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store; the previous tracking URI is restored afterwards."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    configure_tracking(uri)
    yield uri
    configure_tracking(previous)


def micro_overrides(home: Path, *extra: str, tracking: bool = False) -> list[str]:
    """The micro experiment as a user runs it from project home `home` (outputs in
    `<home>/outputs/micro`, the MLflow store `<home>/outputs/mlflow.db` when `tracking`)."""
    return [f"home={home}", "torch_threads=1", *([] if tracking else ["tracking.enabled=false"]), *extra]


def micro_out(home: Path) -> Path:
    return home / "outputs" / "micro"


def micro_uri(home: Path) -> str:
    return f"sqlite:///{home}/outputs/mlflow.db"
