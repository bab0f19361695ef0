"""`nexus serve`'s deployments against a real Prefect API (test harness): they are registered with the
configured schedule, and a run of the scheduled inbox deployment can be triggered with parameter
overrides, then executed (an empty inbox: a quick no-op)."""

from __future__ import annotations

from prefect import get_client
from prefect.deployments import run_deployment
from prefect.flow_engine import run_flow

from flows.extend import extend_from_inbox
from flows.serve import build_deployments

from .conftest import micro_overrides

NAMES = {"micro-pipeline", "micro-extend", "micro-inbox", "micro-remove", "micro-evaluate"}


def test_deployments_have_the_configured_schedule(tmp_path):
    overrides = micro_overrides(tmp_path, "extension.cron='*/5 * * * *'")
    deployments = {d.name: d for d in build_deployments("micro", overrides)}
    assert set(deployments) == NAMES
    inbox = deployments["micro-inbox"]
    assert inbox.schedules and inbox.schedules[0].schedule.cron == "*/5 * * * *"
    assert deployments["micro-pipeline"].parameters == {"experiment": "micro", "overrides": overrides}
    assert not deployments["micro-pipeline"].schedules
    hourly = {
        d.name: d
        for d in build_deployments("micro", micro_overrides(tmp_path, "extension.interval_seconds=3600"))
    }["micro-inbox"]
    assert hourly.schedules[0].schedule.interval.total_seconds() == 3600


def test_served_deployments_exist_and_run_with_overrides(prefect_harness, tmp_path):
    overrides = micro_overrides(tmp_path, "extension.cron='*/5 * * * *'")
    deployments = build_deployments("micro", overrides)
    ids = {d.name: d.apply() for d in deployments}

    with get_client(sync_client=True) as client:
        stored = {name: client.read_deployment(i) for name, i in ids.items()}
        assert {d.name for d in stored.values()} == NAMES
        inbox = client.read_deployment_by_name("extend_from_inbox/micro-inbox")
        assert inbox.id == ids["micro-inbox"]
        assert [s.schedule.cron for s in inbox.schedules] == ["*/5 * * * *"]
        assert all(s.active for s in inbox.schedules)
        assert inbox.parameters == {"experiment": "micro", "overrides": overrides}
        assert not stored["micro-pipeline"].schedules

        # trigger a run with overridden parameters (timeout=0: create it and return)
        empty = tmp_path / "empty-inbox"
        empty.mkdir()
        new_overrides = [*overrides, "train.extension.max_steps=2"]
        run = run_deployment(
            "extend_from_inbox/micro-inbox",
            timeout=0,
            parameters={"overrides": new_overrides, "inbox": str(empty)},
        )
        created = client.read_flow_run(run.id)
        assert created.deployment_id == ids["micro-inbox"]
        assert created.parameters == {"experiment": "micro", "overrides": new_overrides, "inbox": str(empty)}
        assert created.state.is_scheduled()

        # execute that flow run in this process, as a served deployment would
        result = run_flow(extend_from_inbox, flow_run=created, parameters=created.parameters)
        assert result == {"inbox": str(empty), "extended": [], "versions": [], "skipped": {}}
        finished = client.read_flow_run(run.id)
        assert finished.state.is_completed(), finished.state


def test_nexus_serve_serves_these_deployments(monkeypatch, tmp_path):
    """`nexus serve --experiment micro <overrides>` hands exactly these deployments to `prefect.serve`."""
    import prefect

    from flows.cli import main

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kw: served.extend(deployments))
    overrides = micro_overrides(tmp_path, "extension.interval_seconds=600")
    assert main(["serve", "--experiment", "micro", *overrides]) == 0
    by_name = {d.name: d for d in served}
    assert set(by_name) == NAMES
    assert by_name["micro-inbox"].schedules[0].schedule.interval.total_seconds() == 600
    assert by_name["micro-extend"].parameters == {"experiment": "micro", "overrides": overrides}


def test_deployments_record_the_project_home_for_workers(tmp_path, monkeypatch):
    """`nexus deploy` run in a project home records it in the deployments' parameters and the worker
    environment; shared result storage (a Prefect block) replaces the home's local results."""
    from flows.serve import recorded_overrides, worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEXUS_HOME", raising=False)
    for key in (
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
        "PREFECT_LOCAL_STORAGE_PATH",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    ):
        monkeypatch.delenv(key, raising=False)
    overrides, home = recorded_overrides("micro", ["train.moe.max_steps=2"])
    assert home == str(tmp_path) and overrides == ["train.moe.max_steps=2", f"home={tmp_path}"]
    deployments = {d.name: d for d in build_deployments("micro", overrides)}
    assert all(d.parameters["overrides"] == overrides for d in deployments.values())
    assert {n for n, d in deployments.items() if d.concurrency_limit == 1} == {
        "micro-extend",
        "micro-inbox",
        "micro-remove",
    }
    env = worker_env(home)
    assert (
        env["NEXUS_HOME"] == home and env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{home}/.prefect/results"
    )
    shared = worker_env(home, "remote-file-system/nexus-results")
    assert shared["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "remote-file-system/nexus-results"
    assert "PREFECT_RESULTS_LOCAL_STORAGE_PATH" not in shared
