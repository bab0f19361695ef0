"""Real servers on 127.0.0.1 for the integration tests: started as background processes in their
own process groups, health-checked over HTTP, and always stopped by PID (even on failure)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Background:
    """A process started with `Processes.start` (its own process group)."""

    name: str
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the process and every descendant, as a machine failure would: no clean-up handlers
        run. Descendants are collected by parent pid because Prefect starts each flow-run process in a
        session of its own, which a process-group kill would not reach."""
        import psutil

        family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=10)
        self.proc.wait(timeout=10)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Processes:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env, self.started = log_dir, env, []

    def start(
        self, name: str, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Background:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or self.env,
                cwd=cwd or self.log_dir,
                start_new_session=True,
            )
        bg = Background(name, proc, log)
        self.started.append(bg)
        return bg

    def wait_http(self, bg: Background, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if bg.proc.poll() is not None:
                raise RuntimeError(f"{bg.name} exited with {bg.proc.returncode}:\n{bg.tail()}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{bg.name} did not answer {url} within {timeout} s:\n{bg.tail()}")

    def stop_all(self) -> None:
        stop_together(self.started)


def stop_together(processes: list[Background]) -> None:
    """SIGTERM each group (servers and workers shut down cleanly), all at once, then SIGKILL whatever is
    left after 20 s, descendants in other sessions (flow-run processes) included."""
    import psutil

    family = []
    for bg in [bg for bg in processes if bg.proc.poll() is None]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            family += [psutil.Process(bg.proc.pid), *psutil.Process(bg.proc.pid).children(recursive=True)]
            os.killpg(bg.proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for bg in processes:
        bg.proc.wait(timeout=10)


@dataclass
class Stack:
    prefect_url: str
    mlflow_url: str
    env: dict[str, str]
    procs: Processes
    root: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """A Prefect server and an MLflow server (SQLite stores, served artifacts) on free loopback ports."""
    root = tmp_path_factory.mktemp("stack")
    p_port, m_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{m_port}"
    from flows.home import PREFECT_RESULT_SETTINGS

    # The tests assert the defaults, so no result location of the developer's (or an earlier test's)
    clean = {k: v for k, v in os.environ.items() if k not in (*PREFECT_RESULT_SETTINGS, "NEXUS_HOME")}
    env = {
        **clean,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": f"{prefect_url}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{prefect_url}/api",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    procs = Processes(root, env)
    atexit.register(procs.stop_all)  # also when pytest itself is terminated
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        prefect = procs.start(
            "prefect-server",
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(p_port),
        )
        mlflow = procs.start(
            "mlflow-server",
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(m_port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "mlartifacts"),
            "--workers",
            "1",
        )
        procs.wait_http(prefect, f"{prefect_url}/api/health")
        procs.wait_http(mlflow, f"{mlflow_url}/health")
        yield Stack(prefect_url, mlflow_url, env, procs, root)
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
