"""Fixtures for the fault-injection suite: the micro pipeline as a real subprocess (killable with
SIGKILL), digests of its final checkpoints, temp-file detection, and a Prefect test harness for the
in-process bad-input tests.

The subprocess is `python -c DRIVER <flows.cli args>`: `flows.cli.main` plus an optional fault hook
(`NEXUS_FAULT_KILL_WRITE=<path fragment>`) that SIGKILLs the whole process group right after a
checkpoint's temporary directory has been filled and fsynced, before it is renamed into place, i.e.
"during checkpoint write", deterministically. Every other kill point is hit by polling the output
directory from the test and `os.killpg(pid, SIGKILL)`.

"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPORA = ROOT / "tests" / "fixtures" / "corpora"
PYTHON = sys.executable

# The kill suite's variant of the micro experiment: one MoE (nexus), no baselines, and expert/MoE
# stages long enough (24/12 steps, a Lightning checkpoint every 4) for a poll to catch them mid-run.
KILL_OVERRIDES = (
    "router.routers=[nexus]",
    "router.dense_merge=false",
    "train.expert.max_steps=24",
    "train.expert.val_every_n_steps=24",
    "train.expert.checkpoint_every_n_steps=4",
    "train.moe.max_steps=12",
    "train.moe.val_every_n_steps=12",
    "train.moe.checkpoint_every_n_steps=4",
)

DRIVER = """
import os, signal, sys
target = os.environ.get("NEXUS_FAULT_KILL_WRITE")
if target:
    import nexus.io as io
    fsync = io._fsync_tree
    def fsync_then_die(root):
        fsync(root)
        if target in str(root):
            print("FAULT: SIGKILL during checkpoint write of", root, flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)
    io._fsync_tree = fsync_then_die
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def overrides(out_dir: Path, *extra: str, uri: str | None = None, cache_dir: Path | None = None) -> list[str]:
    """The micro experiment, deterministic on CPU (1 thread), writing to `out_dir`: given as a project
    home (its parent) and a relative `out_dir`, as a user would."""
    tracking = [f"tracking.uri={uri}"] if uri else ["tracking.enabled=false"]
    return [
        f"home={out_dir.parent}",
        f"out_dir={out_dir.name}",
        *([f"data.cache_dir={cache_dir}"] if cache_dir else []),
        "torch_threads=1",
        *tracking,
        *extra,
    ]


def env_for(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start(
    out_dir: Path,
    *extra: str,
    prefect_home: Path,
    uri: str | None = None,
    cache_dir: Path | None = None,
    log: Path | None = None,
    api_url: str | None = None,
    **env: str,
) -> subprocess.Popen:
    """Start `nexus run --experiment micro pipeline <overrides>` in its own session (process group).
    (`--experiment` goes before the flow name: see test_bad_inputs.test_cli_experiment_after_flow.)"""
    args = [
        "run",
        "--experiment",
        "micro",
        "pipeline",
        *overrides(out_dir, *extra, uri=uri, cache_dir=cache_dir),
    ]
    return start_cli(
        args,
        prefect_home=prefect_home,
        log=log or out_dir.parent / f"{out_dir.name}.log",
        api_url=api_url,
        **env,
    )


def start_cli(
    args: list[str], *, prefect_home: Path, log: Path, api_url: str | None = None, **env: str
) -> subprocess.Popen:
    """Start `nexus <args>` (with the fault hook) in its own session (process group), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if api_url:  # the session's Prefect server instead of a ~15 s ephemeral one per process
        env = {"PREFECT_API_URL": api_url, **env}
    with open(log, "ab") as handle:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [PYTHON, "-c", DRIVER, *args],
            cwd=ROOT,
            env=env_for(prefect_home, **env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `proc`; its log text. Kills the group on timeout."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    finally:
        reap_group(proc)
    return Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]


def run(out_dir: Path, *extra: str, prefect_home: Path, timeout: float = 300, **kw) -> tuple[int, str]:
    proc = start(out_dir, *extra, prefect_home=prefect_home, **kw)
    text = finish(proc, timeout)
    return proc.returncode, text


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def reap_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the pipeline's process group (e.g. Prefect's ephemeral server)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_when(
    proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240, poll: float = 0.01
) -> bool:
    """SIGKILL the process group as soon as `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            kill_group(proc)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    kill_group(proc)
    raise TimeoutError("kill condition never held")


def final_digest(out_dir: Path, router: str = "nexus") -> str:
    """SHA-256 of the final MoE's weights, as recorded by nexus.checkpoint and re-hashed from the file."""
    from nexus.checkpoint import sha256_file

    model = out_dir / "moe" / router / "model"
    recorded = json.loads((model / "config.json").read_text())["sha256"]["model.safetensors"]
    assert sha256_file(model / "model.safetensors") == recorded, f"{model}: weights do not match config.json"
    return recorded


def stage_digests(out_dir: Path) -> dict[str, str]:
    """{relative checkpoint dir: recorded SHA-256} of every checkpoint under `out_dir`."""
    found = {}
    for cfg in sorted(out_dir.rglob("config.json")):
        if ".tmp-" in str(cfg) or ".old-" in str(cfg):
            continue
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and data.get("format") == "nexus-checkpoint":
            found[str(cfg.parent.relative_to(out_dir))] = data["sha256"]["model.safetensors"]
    return found


def temp_leftovers(root: Path) -> list[str]:
    """Temporary files/directories (`.tmp-`, `.old-`, `*.tmp`) anywhere under `root`."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")
    )


def stage_dirs(root: Path) -> list[str]:
    """Training/upcycling outputs under `root` (what a fail-fast error must not have created)."""
    names = ("seed", "experts", "upcycled", "merged", "moe", "summary.json")
    return sorted(
        [str(p.relative_to(root)) for n in names for p in [root / n] if p.exists()]
        + [str(p.relative_to(root)) for p in root.rglob("*.safetensors")]
        + [str(p.relative_to(root)) for p in root.rglob("*.ckpt")]
    )


@pytest.fixture(scope="session")
def api_url(prefect_harness) -> str:
    """The test harness's Prefect API, shared by the pipeline subprocesses (each keeps its own PREFECT_HOME,
    i.e. its own result/cache storage)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, api_url):
    """One uninterrupted kill-suite pipeline: (out_dir, final digest, all stage digests)."""
    base = tmp_path_factory.mktemp("reference")
    code, log = run(base / "out", *KILL_OVERRIDES, prefect_home=base / "prefect", api_url=api_url)
    assert code == 0, log[-3000:]
    return base / "out", final_digest(base / "out"), stage_digests(base / "out")
