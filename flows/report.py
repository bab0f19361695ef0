"""The comparison report of a pipeline run (and its extension): Markdown, HTML and PNG figures under
`<out_dir>/report/`, logged to the run's parent MLflow run as artifacts."""

from __future__ import annotations

from pathlib import Path

from flows import names


def write_pipeline_report(summary: dict, extension: dict | None = None) -> dict[str, Path]:
    """Render `summary` (from upcycle_pipeline) and optionally `extension` (from extend_with_expert)."""
    from nexus.evaluation import write_report

    results = {
        "title": f"Nexus: {summary['experiment']}",
        "metadata": {
            "output directory": summary["out_dir"],
            "domains": ", ".join(summary["domains"]),
            "pipeline seconds": summary["seconds"],
            "MLflow parent run": summary["mlflow"]["parent_run_id"],
        },
        "perplexity": summary["metrics"],
        "baselines": {"linear": names.moe("linear"), "seed": names.SEED},
        "routing": summary["routing_analysis"],
        "embeddings": summary["embeddings"],
    }
    if extension is not None:
        results["extension"] = {
            "perplexity": extension["metrics"],
            "baselines": {names.BEFORE: names.BEFORE},
            "note": f"`{names.BEFORE}`: the MoE; `{names.expert(extension['domain'])}`: the new dense expert; "
            f"`{names.APPENDED}`: the MoE with the new expert appended, before finetuning; `{names.AFTER}`: "
            f"the extended MoE after its finetune (registered version {extension['registered_version']}).",
        }
        results["routing"] = {
            **results["routing"],
            f"{names.moe('nexus')}+{extension['domain']}": extension["routing_analysis"][names.AFTER],
        }
    paths = write_report(results, Path(summary["out_dir"]) / "report")
    parent = summary["mlflow"]["parent_run_id"]
    if parent:
        from mlflow import MlflowClient

        MlflowClient().log_artifacts(parent, str(Path(summary["out_dir"]) / "report"), "report")
    return paths
