"""Model references, domain records and the model-line lock (flows/models.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flows.models import domain_records, model_line_lock, parse_registry_ref, resolve_model
from nexus.checkpoint import read_checkpoint_config
from nexus.errors import ConfigError


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("models:/line/3", ("line", "3", None)),
        ("models:/line@candidate", ("line", None, "candidate")),
        ("line@champion", ("line", None, "champion")),
        ("line", ("line", None, "champion")),
    ],
)
def test_registry_references(ref, parsed):
    assert parse_registry_ref(ref) == parsed


@pytest.mark.parametrize(
    "ref", ["models:/", "models:/line/", "models:/line/x", "models:/line@", "models:/l/1@a"]
)
def test_malformed_references_are_named(ref):
    with pytest.raises(ConfigError, match="model reference"):
        parse_registry_ref(ref)


def test_a_missing_store_is_reported_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    with pytest.raises(ConfigError, match="no MLflow store"):
        resolve_model(None, "nexus-demo-moe", uri, "moe")
    assert list(tmp_path.iterdir()) == []


def test_a_path_reference_must_be_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="moe .*does not exist"):
        resolve_model(str(tmp_path / "nope"), "line", "sqlite:///unused.db", "moe")


def test_records_of_older_checkpoints_match_the_recorded_ones(micro_moe):
    """A checkpoint from before `domain_data` (only `data_dir` + `domains`) gets the same records."""
    _, _, _, summary = micro_moe
    config = read_checkpoint_config(summary["checkpoints"]["moe:nexus"])
    recorded = domain_records(config, "moe")
    assert list(recorded) == ["dictionary", "lore"]
    legacy = {**config, "metadata": {k: v for k, v in config["metadata"].items() if k != "domain_data"}}
    assert domain_records(legacy, "moe") == recorded
    legacy["metadata"]["domains"] = ["dictionary", "code"]
    with pytest.raises(ConfigError, match="'code'"):
        domain_records(legacy, "moe")


HOLD = """
import sys, time
from pathlib import Path
from flows.models import model_line_lock
folder, me = Path(sys.argv[1]), sys.argv[2]
(folder / f"{me}.ready").touch()
while not (folder / f"{me}.go").exists():
    time.sleep(0.02)
with model_line_lock(folder, "line") as waited:
    start = time.time()
    while not (folder / f"{me}.release").exists():
        time.sleep(0.02)
    print(f"{waited:.3f} {start:.3f} {time.time():.3f}", flush=True)
"""


def test_the_lock_serialises_processes(tmp_path):
    """Two processes take one model line's lock: the second waits until the first lets go."""

    def wait_for(path):
        deadline = time.time() + 120
        while not path.exists():
            assert time.time() < deadline, path
            time.sleep(0.02)

    procs = {
        me: subprocess.Popen(
            [sys.executable, "-c", HOLD, str(tmp_path), me], stdout=subprocess.PIPE, text=True
        )
        for me in ("a", "b")
    }
    for me in procs:
        wait_for(tmp_path / f"{me}.ready")
    (tmp_path / "a.go").touch()
    deadline = time.time() + 60
    while "pid" not in ((tmp_path / "line.lock").read_text() if (tmp_path / "line.lock").exists() else ""):
        assert time.time() < deadline
        time.sleep(0.02)
    (tmp_path / "b.go").touch()
    time.sleep(1.0)  # b is blocked on the lock now
    assert procs["b"].poll() is None
    (tmp_path / "a.release").touch()
    (tmp_path / "b.release").touch()
    a, b = ([float(x) for x in procs[me].communicate(timeout=60)[0].split()] for me in ("a", "b"))
    assert b[1] >= a[2] and b[0] > 0.5  # b held it only after a let go, having waited
    with model_line_lock(tmp_path, "line") as waited:  # free again
        assert waited < 1
