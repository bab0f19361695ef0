"""The one-command demo: `upcycle_pipeline` then `extend_with_expert` (the held-out `code` domain) on
the `demo` experiment, offline (ephemeral Prefect, SQLite MLflow, packaged embedder), then a table of
per-domain held-out perplexities and routing shares.

    python -m flows.demo [overrides...]        (or: nexus run demo [overrides...])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows import names


def results_table(summary: dict, extension: dict) -> str:
    domains = [*summary["domains"], extension["domain"]]
    rows = {
        **summary["perplexity"],
        **{f"extended ({k})": v for k, v in extension["perplexity"].items() if k != names.BEFORE},
    }
    lines = [f"{'model':<24}" + "".join(f"{d[:12]:>13}" for d in domains)]
    lines += [
        f"{name:<24}" + "".join(f"{ppl[d]:>13.2f}" if d in ppl else f"{'-':>13}" for d in domains)
        for name, ppl in rows.items()
    ]
    for name, r in {**summary["routing"], "extended": extension["routing"].get(names.AFTER)}.items():
        if r:
            lines.append(f"\nrouting top-1 share, {name} (rows: domains, cols: {', '.join(r['experts'])})")
            lines += [
                f"  {d:<22}" + "".join(f"{v:>8.2f}" for v in row)
                for d, row in zip(r["domains"], r["top1_share"])
            ]
    return "\n".join(lines)


def main(overrides: list[str] | None = None) -> int:
    from flows.home import offline_env

    offline_env()
    from flows.extend import extend_with_expert
    from flows.pipeline import upcycle_pipeline
    from flows.report import write_pipeline_report
    from flows.rounds import round_report
    from nexus.io import atomic_write_text

    overrides = list(overrides or [])
    summary = upcycle_pipeline("demo", overrides)
    extension = extend_with_expert("demo", overrides, domain="code")
    out = Path(summary["out_dir"])
    combined = {"pipeline": summary, "extension": extension}
    atomic_write_text(out / "summary.json", json.dumps(combined, indent=1, default=str))
    if summary["mlflow"]["parent_run_id"]:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(summary["mlflow"]["parent_run_id"], str(out / "summary.json"))
    report = write_pipeline_report(summary, extension)
    print("\nheld-out perplexity per domain\n" + results_table(summary, extension))
    print(
        f"\npromotion gate of the {extension['domain']!r} extension\n"
        + round_report(extension).split("\n\n", 1)[1]
    )
    print(
        f"\nsummary: {out / 'summary.json'} ({summary['seconds']:.0f} s pipeline); report: {report['html']}"
    )
    print(
        f"UIs: `nexus ui --mlflow-db {summary['mlflow']['tracking_uri'].removeprefix('sqlite:///')}` "
        "then Prefect http://127.0.0.1:4200 and MLflow http://127.0.0.1:5000"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
