"""Prefect artifacts on a flow run's page: a Markdown summary, the held-out perplexity table and links to
the MLflow runs and registered model versions (when the store is an MLflow server the browser can
open; a SQLite store is named, to open with `nexus ui`)."""

from __future__ import annotations

import re
from typing import Any


def _key(*parts: str) -> str:
    """An artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _web(tracking_uri: str | None) -> str | None:
    return (
        tracking_uri.rstrip("/")
        if tracking_uri and tracking_uri.startswith(("http://", "https://"))
        else None
    )


def mlflow_links(
    tracking_uri: str | None, run_id: str | None = None, versions: list[dict[str, str]] = ()
) -> dict[str, str]:
    """{link text: URL} of an MLflow run and registered versions ({name, version}) on an MLflow server."""
    base = _web(tracking_uri)
    if base is None:
        return {}
    links = {}
    if run_id:
        from mlflow import MlflowClient

        experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        links[f"MLflow run {run_id[:8]}"] = f"{base}/#/experiments/{experiment}/runs/{run_id}"
    for v in versions:
        links[f"{v['name']} version {v['version']}"] = f"{base}/#/models/{v['name']}/versions/{v['version']}"
    return links


def perplexity_rows(perplexity: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [{"model": model, **{d: round(p, 2) for d, p in row.items()}} for model, row in perplexity.items()]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def publish(
    kind: str,
    experiment: str,
    title: str,
    facts: dict[str, Any],
    perplexity: dict[str, dict[str, float]],
    tracking_uri: str | None = None,
    run_id: str | None = None,
    versions: list[dict[str, str]] = (),
    sections: dict[str, str] | None = None,
) -> None:
    """Create the artifacts of one flow run: `<kind>-<experiment>-summary` (Markdown: `facts`, the
    perplexity table, `sections`), `...-perplexity` (a table) and one link per MLflow run/version."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    rows = perplexity_rows(perplexity)
    links = mlflow_links(tracking_uri, run_id, list(versions))
    facts = {
        **facts,
        **(
            {"MLflow store": f"`{tracking_uri}` (browse with `nexus ui`)"}
            if tracking_uri and not links
            else {}
        ),
    }
    markdown = [
        f"# {title}",
        "",
        *(f"- **{k}**: {v}" for k, v in facts.items()),
        "",
        "## Held-out perplexity",
        "",
        markdown_table(rows),
    ]
    for heading, body in (sections or {}).items():
        markdown += ["", f"## {heading}", "", body]
    if links:
        markdown += ["", "## MLflow", "", *(f"- [{text}]({url})" for text, url in links.items())]
    create_markdown_artifact("\n".join(markdown), key=_key(kind, experiment, "summary"), description=title)
    create_table_artifact(
        rows, key=_key(kind, experiment, "perplexity"), description=f"{title}: held-out perplexity"
    )
    for text, url in links.items():
        create_link_artifact(url, text, key=_key(kind, experiment, text))


def gate_markdown(gate: dict) -> str:
    """A promotion gate's verdict (GateVerdict.to_dict()) as a Markdown table and a decision line."""
    rows = [
        {
            "domain": d,
            "role": c["role"],
            "before": round(c["before"], 2),
            "after": round(c["after"], 2),
            "change": f"{c['change']:+.1%}",
            "verdict": "pass" if c["passed"] else "FAIL",
        }
        for d, c in gate["domains"].items()
    ]
    return (
        markdown_table(rows) + f"\n\n**gate {'passed' if gate['passed'] else 'failed'}** "
        f"(tolerance {gate['tolerance']:.0%})"
    )
