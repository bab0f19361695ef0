"""Run a training stage as its own processes and read its result back.

    launch_stage(spec, nproc=2)      # -> result dict, as `python -m nexus.training.run_stage` wrote it

`nproc > 1` starts `python -m nexus.training.launch` (torchrun's agent, `--standalone`: a free
rendezvous port per stage) with one `nexus.training.run_stage` worker per device; `nproc == 1`
starts the worker alone. The calling process never joins the process group, so DDP/FSDP cannot
re-execute the caller (a CLI, a flow, a Dask worker) and no distributed environment variable
(`MASTER_PORT`, `RANK`, `LOCAL_RANK`, ...) is set in it; the child's environment is the caller's
with those removed, plus `env` (e.g. `CUDA_VISIBLE_DEVICES` from the GPU placement).

No process outlives its stage: the child runs in its own session and is terminated (then killed)
with everything it started when the caller is interrupted, and each process asks the kernel to
SIGTERM it if its parent dies (`run_stage.die_with_parent`). Output goes to `<out_dir>/stage.log`;
a failure raises the worker's `NexusError` class (exit code 2) or `StageProcessError` with the
log's tail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nexus import errors
from nexus.training.run_stage import PARENT_PID_ENV, StageSpec, die_with_parent

DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "NODE_RANK",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)
LIGHTNING_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "PL_TRAINER_GPUS", "LT_CLI_USED")
"""Set by an in-process Lightning run (`seed_everything`); a stage process sets its own."""
LOG_FILE = "stage.log"


class StageProcessError(RuntimeError):
    """A stage process failed for a reason other than bad input (its log's tail is in the message)."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without distributed-training variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV + LIGHTNING_ENV}
    env.update(extra or {})
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def stage_command(spec_path: Path, nproc: int) -> list[str]:
    worker = ["-m", "nexus.training.run_stage", str(spec_path)]
    if nproc == 1:
        return [sys.executable, *worker]
    return [
        sys.executable,
        "-m",
        "nexus.training.launch",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        *worker,
    ]


def launch_stage(
    spec: StageSpec, nproc: int, env: Mapping[str, str] | None = None, terminate_grace_s: float = 10.0
) -> dict[str, Any]:
    """Run `spec` in `nproc` new processes (see module doc); returns the result rank 0 wrote."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.result_file.unlink(missing_ok=True)
    spec_path = spec.save(out / "stage-spec.json")
    extra = {"OMP_NUM_THREADS": str(spec.torch_threads or 1), **(env or {})}
    with open(out / LOG_FILE, "ab") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {nproc} process(es)\n".encode())
        log.flush()
        proc = subprocess.Popen(
            stage_command(spec_path, nproc),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(extra),
            start_new_session=True,
        )
        try:
            code = proc.wait()
        except BaseException:
            _terminate(proc, terminate_grace_s)
            raise
    return _result(spec, code, out / LOG_FILE)


def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group (torchrun forwards it to its workers), SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def _result(spec: StageSpec, code: int, log: Path) -> dict[str, Any]:
    payload = json.loads(spec.result_file.read_text()) if spec.result_file.is_file() else None
    if code == 0 and payload is not None and "error" not in payload:
        return payload
    error = (payload or {}).get("error")
    if code == 2 and error is not None:
        cls = getattr(errors, error["type"], errors.NexusError)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.NexusError) else errors.NexusError)(
            error["message"]
        )
    what = f"{error['type']}: {error['message']}" if error else f"exit code {code}, no result"
    raise StageProcessError(f"stage {spec.out_dir} failed ({what}); last lines of {log}:\n{_tail(log)}")


def main(argv: list[str] | None = None) -> None:
    """torchrun's agent, dying with the process that launched it; its workers die with it."""
    from torch.distributed.run import main as torchrun

    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's own handler stops its workers
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # the workers' parent is this agent
    torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
