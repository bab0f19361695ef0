"""The shared-server topology without Docker: a real `prefect server`, `mlflow server`, work pool and
process worker on 127.0.0.1. Deployments are registered with `nexus deploy`, a run is triggered
through the REST API (as the UI's "Run" button does), both UIs are rendered in headless Chromium,
and a worker killed mid-run is replaced and the run retried to completion."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.servers

BIN = Path(sys.executable).parent
CORPORA = Path(__file__).resolve().parents[1] / "fixtures" / "corpora"
POOL = "nexus-test"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ARTIFACTS = Path(os.environ.get("NEXUS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def overrides(stack, out: str) -> list[str]:
    return [f"out_dir={stack.root / out}", f"data.corpora_dir={CORPORA}", f"data.cache_dir={stack.root}/cache",
            "torch_threads=1", f"tracking.uri={stack.mlflow_url}"]


def run_cli(stack, *cmd: str, timeout: int = 300) -> str:
    done = subprocess.run(list(cmd), env=stack.env, cwd=stack.root, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def api(stack, method: str, path: str, **kwargs) -> dict | list:
    response = httpx.request(method, f"{stack.prefect_url}/api{path}", timeout=30, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else {}


def trigger(stack, deployment: str, parameters: dict) -> str:
    """What the UI's Run button does: create a flow run from the deployment with custom parameters."""
    dep = api(stack, "GET", f"/deployments/name/{deployment}")
    return api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})["id"]


def wait_state(stack, run_id: str, states: set[str], timeout: float, worker=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(stack, "GET", f"/flow_runs/{run_id}")
        if run["state_type"] in states:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} still {run['state_type']}; worker log:\n{worker.tail() if worker else ''}")


def task_states(stack, run_id: str) -> dict[str, str]:
    runs = api(stack, "POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
    return {r["name"]: r["state_name"] for r in runs}


def render(url: str, name: str, tmp: Path) -> str:
    """Screenshot `url` into ARTIFACTS/<name>.png and return its rendered DOM."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=20000"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = str(tmp / f"chromium-{name}")
    subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}-s", f"--screenshot={ARTIFACTS / name}.png", url],
                   capture_output=True, timeout=120, check=True)
    dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}-d", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return dom


@pytest.fixture(scope="module")
def deployed(stack):
    run_cli(stack, str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process")
    out = run_cli(stack, str(BIN / "nexus"), "deploy", "--pool", POOL, "--experiment", "micro",
                  *overrides(stack, "default-out"))
    assert "4 deployments" in out
    worker = stack.procs.start("worker", str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process")
    yield worker


def test_triggered_deployment_runs_on_the_worker_and_lands_in_mlflow(stack, deployed, tmp_path):
    run_id = trigger(stack, "upcycle_pipeline/micro-pipeline",
                     {"overrides": overrides(stack, "run-1"), "expert_steps": 3})
    run = wait_state(stack, run_id, TERMINAL, timeout=600, worker=deployed)
    assert run["state_type"] == "COMPLETED", deployed.tail()
    assert run["parameters"]["expert_steps"] == 3
    assert (stack.root / "run-1" / "summary.json").is_file()

    from mlflow import MlflowClient  # over HTTP, against the server

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name("nexus-micro")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    stages = {r.data.tags.get("nexus.stage") for r in runs}
    assert {"seed", "expert", "moe"} <= stages, stages
    expert = next(r for r in runs if r.data.tags.get("nexus.stage") == "expert")
    assert client.list_artifacts(expert.info.run_id), "expert run has no artifacts on the server"
    assert any(r.info.status == "FINISHED" for r in runs)

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: UI check skipped (apt-get install chromium)")
    prefect_dom = render(f"{stack.prefect_url}/runs/flow-run/{run_id}", "prefect-flow-run", tmp_path)
    assert run["name"] in prefect_dom and "upcycle_pipeline" in prefect_dom
    mlflow_dom = render(f"{stack.mlflow_url}/#/experiments/{experiment.experiment_id}/runs", "mlflow-experiment",
                        tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the table lists these first
    assert "nexus-micro" in mlflow_dom and parents and all(r.info.run_name in mlflow_dom for r in parents)
    assert f"<strong>{len(runs)}</strong> matching runs" in mlflow_dom  # every stage run, nested in its pipeline run
    for name in ("prefect-flow-run", "mlflow-experiment"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 20_000  # a rendered page, not a blank one


def mlflow_runs(stack) -> dict[str, tuple[str | None, str, str | None]]:
    """{run_id: (nexus.stage, status, nexus.resumed_from_step)} of the micro experiment, over HTTP."""
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name("nexus-micro")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    return {r.info.run_id: (r.data.tags.get("nexus.stage"), r.info.status, r.data.tags.get("nexus.resumed_from_step"))
            for r in runs}


def test_killed_worker_leaves_a_retryable_run_that_completes(stack, deployed):
    earlier = mlflow_runs(stack)
    out = stack.root / "run-2"
    params = {"overrides": [*overrides(stack, "run-2"), "train.expert.checkpoint_every_n_steps=50"],
              "expert_steps": 1500}
    run_id = trigger(stack, "upcycle_pipeline/micro-pipeline", params)
    deadline = time.monotonic() + 600
    while not list(out.glob("experts/*/lightning/last.ckpt")):  # an expert is mid-training
        assert time.monotonic() < deadline and deployed.proc.poll() is None, deployed.tail()
        time.sleep(0.5)
    deployed.kill()  # the worker and the flow-run process it started, without clean-up
    before = task_states(stack, run_id)
    assert api(stack, "GET", f"/flow_runs/{run_id}")["state_type"] != "COMPLETED"
    killed_attempt = {k: v for k, v in mlflow_runs(stack).items() if k not in earlier}

    # What the UI's "Retry" does for a crashed run: schedule it again; a fresh worker picks it up.
    api(stack, "POST", f"/flow_runs/{run_id}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    worker = stack.procs.start("worker-2", str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process")
    run = wait_state(stack, run_id, TERMINAL, timeout=600, worker=worker)
    assert run["state_type"] == "COMPLETED", worker.tail()
    after = task_states(stack, run_id)
    finished_before = [n for n, s in before.items() if s in ("Completed", "Cached")]
    assert finished_before, before
    assert all(after.get(n) in ("Completed", "Cached") for n in finished_before), after

    steps = [json.loads((d / "model" / "config.json").read_text())["metadata"]["global_step"]
             for d in out.glob("experts/*")]
    assert steps and all(s == 1500 for s in steps), steps
    final = mlflow_runs(stack)
    finished_in_killed_attempt = [k for k, (_, status, _) in killed_attempt.items() if status == "FINISHED"]
    assert all(final[k][1] == "FINISHED" for k in finished_in_killed_attempt)  # nothing lost
    new_runs = {k: v for k, v in final.items() if k not in earlier}
    assert any(stage == "moe" and status == "FINISHED" for stage, status, _ in new_runs.values()), new_runs
    resumed = [int(step) for stage, status, step in new_runs.values()
               if stage == "expert" and status == "FINISHED" and step not in (None, "None")]
    assert resumed and max(resumed) >= 50, new_runs  # continued from the Lightning checkpoint, not step 0
