"""The shared-server topology without Docker, used as a user uses it: a real `prefect server`, `mlflow
server`, work pool and process worker on 127.0.0.1. `nexus deploy` runs in the project home; the worker
runs in another directory (and runs every flow in a temporary one). Runs are triggered through the REST
API with the deployments' **default parameters** (what the UI's Run button does), and everything they
produce must land in the project home (checkpoints, the default SQLite MLflow store, the registry) or,
with `MLFLOW_TRACKING_URI` set for the worker, on the MLflow server. Both UIs are rendered in headless
Chromium; a worker killed mid-run is replaced and the run retried to completion."""

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

from flows.tracking import configure as configure_tracking

pytestmark = pytest.mark.servers

BIN = Path(sys.executable).parent
POOL = "nexus-test"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ARTIFACTS = Path(
    os.environ.get("NEXUS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts")
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run_cli(
    stack, *cmd: str, timeout: int = 300, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    done = subprocess.run(
        list(cmd),
        env=env or stack.env,
        cwd=cwd or stack.root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def sqlite_env(stack) -> dict[str, str]:
    """The stack's environment without MLFLOW_TRACKING_URI: runs use the project home's SQLite store."""
    return {k: v for k, v in stack.env.items() if k != "MLFLOW_TRACKING_URI"}


def api(stack, method: str, path: str, **kwargs) -> dict | list:
    response = httpx.request(method, f"{stack.prefect_url}/api{path}", timeout=30, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else {}


def trigger(stack, deployment: str, parameters: dict) -> str:
    """What the UI's Run button does: create a flow run from the deployment with custom parameters."""
    dep = api(stack, "GET", f"/deployments/name/{deployment}")
    return api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})[
        "id"
    ]


def wait_state(stack, run_id: str, states: set[str], timeout: float, worker=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(stack, "GET", f"/flow_runs/{run_id}")
        if run["state_type"] in states:
            return run
        time.sleep(2)
    raise TimeoutError(
        f"flow run {run_id} still {run['state_type']}; worker log:\n{worker.tail() if worker else ''}"
    )


def task_states(stack, run_id: str) -> dict[str, str]:
    runs = api(
        stack, "POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}
    )
    return {r["name"]: r["state_name"] for r in runs}


def render(url: str, name: str, tmp: Path, height: int = 900) -> str:
    """Screenshot `url` (a 1400 x `height` window) into ARTIFACTS/<name>.png and return its rendered DOM."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--window-size=1400,{height}",
        "--virtual-time-budget=20000",
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = str(tmp / f"chromium-{name}")
    subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={profile}-s", f"--screenshot={ARTIFACTS / name}.png", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    dom = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={profile}-d", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return dom


def deploy_from(stack, home: Path, pool: str, env: dict[str, str], worker_name: str):
    """`nexus deploy --experiment micro` run in `home` (no overrides), then a process worker for `pool`
    started in another directory."""
    home.mkdir(parents=True, exist_ok=True)
    run_cli(stack, str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", env=env, cwd=home)
    out = run_cli(
        stack, str(BIN / "nexus"), "deploy", "--pool", pool, "--experiment", "micro", env=env, cwd=home
    )
    assert "5 deployments" in out
    elsewhere = stack.root / f"{worker_name}-cwd"
    elsewhere.mkdir(exist_ok=True)
    return stack.procs.start(
        worker_name,
        str(BIN / "prefect"),
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        env=env,
        cwd=elsewhere,
    )


def run_to_completion(stack, deployment: str, worker, parameters: dict | None = None) -> dict:
    run = wait_state(
        stack, trigger(stack, deployment, parameters or {}), TERMINAL, timeout=600, worker=worker
    )
    assert run["state_type"] == "COMPLETED", worker.tail()
    return run


def test_ui_runs_with_default_parameters_keep_everything_in_the_project_home(stack, tmp_path):
    """Pipeline, extension (the preset's held-out `code`) and inbox deployments, each with its default
    parameters only, on a worker in another directory and with the default (SQLite) MLflow store."""
    from mlflow import MlflowClient

    from tests.flows.conftest import domain_folder

    home = stack.root / "home"
    worker = deploy_from(stack, home, POOL, sqlite_env(stack), "worker")
    out = home / "outputs" / "micro"
    pipeline = run_to_completion(stack, "upcycle_pipeline/micro-pipeline", worker)
    assert pipeline["parameters"]["overrides"] == [f"home={home}"]  # recorded by `nexus deploy`
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "moe" / "nexus" / "model" / "model.safetensors").is_file()
    assert all(Path(p).is_relative_to(home) for p in summary["checkpoints"].values())
    extension = run_to_completion(stack, "extend_with_expert/micro-extend", worker)
    assert (out / "extensions" / "code" / "summary.json").is_file()
    domain_folder(out / "inbox" / "kernel", "kernel-docs")  # a user drops a new domain into the inbox
    run_to_completion(stack, "extend_from_inbox/micro-inbox", worker)
    assert (out / "extensions" / "kernel" / "finetuned" / "model" / "model.safetensors").is_file()

    client = MlflowClient(f"sqlite:///{home}/outputs/mlflow.db")  # where the worker's runs went
    versions = {int(v.version): v for v in client.search_model_versions("name = 'nexus-micro-moe'")}
    assert sorted(versions) == [1, 2, 3]
    from flows.mlflow_models import checkpoint_uri

    assert all(
        Path(checkpoint_uri(v.source, client).removeprefix("file://")).is_relative_to(home)
        for v in versions.values()
    )  # the registered checkpoints live in the home's artifact store
    assert client.get_registered_model("nexus-micro-moe").aliases["candidate"] == 3
    runs = client.search_runs([client.get_experiment_by_name("nexus-micro").experiment_id], max_results=200)
    assert {"pipeline", "seed", "expert", "moe", "extension"} <= {
        r.data.tags.get("nexus.stage") for r in runs
    }
    assert not any((stack.root / "worker-cwd").iterdir())  # nothing in the worker's own directory
    job_env = api(stack, "GET", f"/deployments/{pipeline['deployment_id']}")["job_variables"].get("env")
    assert (home / ".prefect" / "results").is_dir(), job_env  # cached task results live in the home too
    log = worker.tail(200_000)
    assert "moe/nexus: step 4/4 (100%)" in log and "tok/s" in log  # training progress in the worker's log
    assert "GPU available:" not in log

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: UI check skipped (apt-get install chromium)")
    artifacts = api(
        stack, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [extension["id"]]}}}
    )
    assert {a["type"] for a in artifacts} >= {"markdown", "table"}
    markdown = next(a for a in artifacts if a["type"] == "markdown")
    page = render(
        f"{stack.prefect_url}/artifacts/artifact/{markdown['id']}", "prefect-extension-summary", tmp_path
    )
    assert "Promotion gate" in page and "Held-out perplexity" in page
    page = render(
        f"{stack.prefect_url}/v2/runs/flow-run/{extension['id']}?tab=Artifacts",
        "prefect-extension-artifacts",
        tmp_path,
    )  # the run page's Artifacts tab (the V2 UI takes ?tab=)
    assert "extension-micro-summary" in page and "extension-micro-perplexity" in page
    dep = api(stack, "GET", "/deployments/name/upcycle_pipeline/micro-pipeline")
    form = render(
        f"{stack.prefect_url}/v2/deployments/deployment/{dep['id']}/run", "prefect-run-form", tmp_path
    )
    assert "Training steps of each MoE" in form and "micro" in form  # descriptions and the experiment choice


def mlflow_runs(stack) -> dict[str, tuple[str | None, str, str | None]]:
    """{run_id: (nexus.stage, status, nexus.resumed_from_step)} of the micro experiment, over HTTP."""
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name("nexus-micro")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    return {
        r.info.run_id: (
            r.data.tags.get("nexus.stage"),
            r.info.status,
            r.data.tags.get("nexus.resumed_from_step"),
        )
        for r in runs
    }


def test_killed_worker_on_an_mlflow_server_leaves_a_retryable_run_that_completes(stack, tmp_path):
    """With MLFLOW_TRACKING_URI set for the worker, the runs land on the MLflow server (checkpoints in the
    project home); a worker killed mid-run is replaced and the run, retried, completes."""
    home = stack.root / "home-server"
    worker = deploy_from(stack, home, f"{POOL}-server", stack.env, "worker-server")
    out = home / "outputs" / "micro"
    params = {"overrides": [f"home={home}", "train.expert.checkpoint_every_n_steps=50"], "expert_steps": 1500}
    run_id = trigger(stack, "upcycle_pipeline/micro-pipeline", params)
    deadline = time.monotonic() + 600
    while not list(out.glob("experts/*/lightning/last.ckpt")):  # an expert is mid-training
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.tail()
        time.sleep(0.5)
    worker.kill()  # the worker and the flow-run process it started, without clean-up
    before = task_states(stack, run_id)
    assert api(stack, "GET", f"/flow_runs/{run_id}")["state_type"] != "COMPLETED"
    killed_attempt = mlflow_runs(stack)

    # What the UI's "Retry" does for a crashed run: schedule it again; a fresh worker picks it up.
    api(
        stack,
        "POST",
        f"/flow_runs/{run_id}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
    )
    again = stack.procs.start(
        "worker-server-2",
        str(BIN / "prefect"),
        "worker",
        "start",
        "--pool",
        f"{POOL}-server",
        "--type",
        "process",
        cwd=stack.root / "worker-server-cwd",
    )
    run = wait_state(stack, run_id, TERMINAL, timeout=600, worker=again)
    assert run["state_type"] == "COMPLETED", again.tail()
    after = task_states(stack, run_id)
    finished_before = [n for n, s in before.items() if s in ("Completed", "Cached")]
    assert finished_before, before
    assert all(after.get(n) in ("Completed", "Cached") for n in finished_before), after

    steps = [
        json.loads((d / "model" / "config.json").read_text())["metadata"]["global_step"]
        for d in out.glob("experts/*")
    ]
    assert steps and all(s == 1500 for s in steps), steps
    assert not (home / "outputs" / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won over the default
    final = mlflow_runs(stack)
    finished_in_killed_attempt = [k for k, (_, status, _) in killed_attempt.items() if status == "FINISHED"]
    assert all(final[k][1] == "FINISHED" for k in finished_in_killed_attempt)  # nothing lost
    new_runs = {k: v for k, v in final.items() if k not in killed_attempt}
    assert any(stage == "moe" and status == "FINISHED" for stage, status, _ in new_runs.values()), new_runs
    resumed = [
        int(step)
        for stage, status, step in new_runs.values()
        if stage == "expert" and status == "FINISHED" and step not in (None, "None")
    ]
    assert resumed and max(resumed) >= 50, new_runs  # continued from the Lightning checkpoint, not step 0

    # the registry on the server: an extension fetches the champion's checkpoint through the served
    # artifacts, and the registered MoE loads as a pyfunc model from the server
    run_to_completion(stack, "extend_with_expert/micro-extend", again)
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'nexus-micro-moe'")) == [1, 2]
    assert (
        out / "models" / "nexus-micro-moe" / "v1" / "model.safetensors"
    ).is_file()  # fetched from the server
    previous = mlflow.get_tracking_uri()
    try:
        configure_tracking(stack.mlflow_url)
        scores = mlflow.pyfunc.load_model("models:/nexus-micro-moe/2").predict(
            pd.DataFrame({"text": ["a word"]})
        )
    finally:
        configure_tracking(previous)
    assert scores["perplexity"][0] > 1

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: UI check skipped (apt-get install chromium)")
    experiment = client.get_experiment_by_name("nexus-micro")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    prefect_dom = render(f"{stack.prefect_url}/runs/flow-run/{run_id}", "prefect-flow-run", tmp_path)
    assert run["name"] in prefect_dom and "upcycle_pipeline" in prefect_dom
    mlflow_dom = render(
        f"{stack.mlflow_url}/#/experiments/{experiment.experiment_id}/runs", "mlflow-experiment", tmp_path
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert "nexus-micro" in mlflow_dom and parents and all(r.info.run_name in mlflow_dom for r in parents)
    moes = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("nexus.stage") == "moe"}
    compare = render(
        f"{stack.mlflow_url}/#/compare-runs?runs={json.dumps([moes['nexus'], moes['linear']])}"
        f"&experiments={json.dumps([experiment.experiment_id])}",
        "mlflow-nexus-vs-linear",
        tmp_path,
        height=2200,
    )  # tall enough for the metrics rows below the chart
    assert "ppl/dictionary" in compare and "ppl/lore" in compare  # the two MoEs, side by side per domain
    version = render(
        f"{stack.mlflow_url}/#/models/nexus-micro-moe/versions/1", "mlflow-model-version", tmp_path
    )
    assert "held-out perplexity" in version and moes["nexus"] in version  # description, lineage to its run
    assert {"champion", "candidate"} <= set(client.get_registered_model("nexus-micro-moe").aliases)
    for name in ("prefect-flow-run", "mlflow-experiment", "mlflow-nexus-vs-linear", "mlflow-model-version"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 20_000  # a rendered page, not a blank one
