"""The `nexus` console script lives in the app layer (flows/), the library never imports it, the flows
import each other without cycles; `nexus run -m` sweeps Hydra overrides."""

from __future__ import annotations

import ast
from pathlib import Path

from flows.cli import main, parse_args, sweep

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """module -> every module it imports (lazy imports inside functions too), from the source."""
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph restricted to its own nodes (depth-first), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for dep in sorted(graph[node] & set(graph)):
            found = visit(dep, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in graph) if c), None)


def test_the_console_script_is_the_app_layers_and_the_library_imports_no_app_or_orchestration():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n\n")[0]
    assert scripts.splitlines() == ['nexus = "flows.cli:main"']
    forbidden = ("flows", "prefect", "mlflow")
    offenders = {
        module: sorted(d for d in deps if d.split(".")[0] in forbidden)
        for module, deps in _imports("nexus").items()
        if any(d.split(".")[0] in forbidden for d in deps)
    }
    assert offenders == {}


def test_flows_import_each_other_without_cycles_and_nothing_imports_the_cli():
    graph = _imports("flows")
    assert {"flows.cli", "flows.demo", "flows.data"} <= set(graph)
    assert _cycle(graph) is None, _cycle(graph)
    assert sorted(m for m, deps in graph.items() if "flows.cli" in deps) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works


def test_sweep_is_the_cartesian_product_of_hydra_sweep_overrides_in_order():
    jobs = sweep(
        ["train.moe.max_steps=2,3", "router.top_k=1", "+data.sources.x={kind:stdlib}", "seed=range(0,2)"]
    )
    assert jobs == [
        ["train.moe.max_steps=2", "router.top_k=1", "+data.sources.x={kind:stdlib}", "seed=0"],
        ["train.moe.max_steps=2", "router.top_k=1", "+data.sources.x={kind:stdlib}", "seed=1"],
        ["train.moe.max_steps=3", "router.top_k=1", "+data.sources.x={kind:stdlib}", "seed=0"],
        ["train.moe.max_steps=3", "router.top_k=1", "+data.sources.x={kind:stdlib}", "seed=1"],
    ]
    assert sweep(["a=choice(x,y)", "b=[1,2]"]) == [
        ["a=x", "b=[1,2]"],
        ["a=y", "b=[1,2]"],
    ]  # a list is a value


def test_multirun_parses_like_hydra_and_checks_every_combination_before_running_any(tmp_path, capsys):
    args = parse_args(["run", "pipeline", "--experiment", "micro", "-m", "train.moe.max_steps=2,3"])
    assert args.multirun and args.overrides == ["train.moe.max_steps=2,3"]
    code = main(
        [
            "run",
            "pipeline",
            "--experiment",
            "micro",
            "-m",
            f"home={tmp_path}",
            "tracking.enabled=false",
            "train.moe.max_steps=2,many",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "multirun job 1" in err and "train.moe.max_steps=many" in err
    assert not (tmp_path / "outputs").exists()


def test_multirun_runs_one_pipeline_per_combination_in_its_own_directory(tmp_path):
    """As a user, from a fresh directory: `nexus run pipeline --experiment micro -m train.moe.max_steps=2,3`
    (one MoE, few steps) trains two pipelines, each MoE for its own number of steps."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NEXUS_HOME", "MLFLOW_TRACKING_URI")}
    small = [
        "router.routers=[nexus]",
        "router.dense_merge=false",
        "tracking.enabled=false",
        "torch_threads=1",
    ]
    steps = [f"train.{s}.{k}=2" for s in ("seed", "expert") for k in ("max_steps", "val_every_n_steps")]
    run = subprocess.run(
        [str(Path(sys.executable).parent / "nexus"), "run", "pipeline", "--experiment", "micro", "-m"]
        + ["train.moe.max_steps=2,3", *small, *steps],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = tmp_path / "outputs" / "micro" / "multirun"
    assert sorted(p.name for p in jobs.iterdir()) == ["0", "1"]
    trained = [json.loads((jobs / n / "moe/nexus/model/config.json").read_text()) for n in ("0", "1")]
    assert [t["metadata"]["train_config"]["max_steps"] for t in trained] == [2, 3]
    assert [t["metadata"]["global_step"] for t in trained] == [2, 3]
    assert all((jobs / n / "summary.json").is_file() for n in ("0", "1"))
