"""`nexus run <flow> [overrides...]`, `nexus serve`, `nexus ui` (registered in nexus.cli COMMANDS)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from nexus.errors import ConfigError

FLOWS = ("pipeline", "extend", "remove", "inbox", "demo")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a flow locally: " + " | ".join(FLOWS))
    run.add_argument("flow", choices=FLOWS)
    run.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    run.add_argument("--experiment", default="demo")
    run.add_argument(
        "--domain",
        default=None,
        help="extend: the new domain's name (default: code); remove: the expert to remove",
    )
    run.add_argument("--folder", default=None, help="extend: the new domain's folder of text/JSONL files")
    run.add_argument(
        "--moe",
        default=None,
        help="extend/remove: a checkpoint dir, models:/NAME/VERSION, "
        "models:/NAME@ALIAS or NAME (default: the model line's @champion)",
    )
    run.set_defaults(func=_run)
    serve = subparsers.add_parser("serve", help="create the flows' Prefect deployments and serve them")
    serve.add_argument("overrides", nargs="*")
    serve.add_argument("--experiment", default="demo")
    serve.set_defaults(func=_serve)
    ui = subparsers.add_parser("ui", help="start the Prefect and MLflow UIs on 127.0.0.1")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--mlflow-db", default=None, help="default: <project home>/outputs/mlflow.db")
    ui.set_defaults(func=_ui)


def offline_env(home: str | None = None) -> None:
    """Environment defaults of every `nexus` command (set only where the user has not): offline hubs,
    no telemetry, training progress in Prefect's logs, Prefect's task results in the project home."""
    from flows.home import prefect_env, project_home

    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "nexus",
        **prefect_env(project_home(home)),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _run(args: argparse.Namespace) -> int:
    if args.flow == "demo":
        from flows.demo import main

        return main(args.overrides)
    from flows.config import compose

    cfg = compose(args.experiment, args.overrides)  # a bad experiment or override fails here, before any flow
    offline_env(cfg.home)
    if args.flow == "pipeline":
        from flows.pipeline import upcycle_pipeline

        upcycle_pipeline(args.experiment, args.overrides)
    elif args.flow == "extend":
        from flows.rounds import plan_extension, round_report

        domain = args.domain or "code"
        plan_extension(cfg, args.moe, domain, args.folder)  # every input checked before Prefect starts
        from flows.extend import extend_with_expert

        summary = extend_with_expert(
            args.experiment, args.overrides, moe=args.moe, domain=domain, domain_folder=args.folder
        )
        print(f"\nextension of {summary['base']['ref']} with {domain!r}\n" + round_report(summary))
    elif args.flow == "remove":
        from flows.rounds import plan_removal, round_report

        if not args.domain:
            raise ConfigError("remove: --domain NAME (the expert to remove) is required")
        plan_removal(cfg, args.moe, args.domain)
        from flows.remove import remove_expert

        summary = remove_expert(args.experiment, args.overrides, moe=args.moe, domain=args.domain)
        print(f"\nremoval of {args.domain!r} from {summary['base']['ref']}\n" + round_report(summary))
    else:
        from flows.extend import extend_from_inbox

        result = extend_from_inbox(args.experiment, args.overrides)
        print(
            f"inbox {result['inbox']}: extended {result['extended'] or 'nothing'}; versions {result['versions']}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    offline_env()
    from flows.serve import serve

    serve(args.experiment, args.overrides)
    return 0


def _ui(args: argparse.Namespace) -> int:
    offline_env()
    from flows.home import project_home

    db = args.mlflow_db or str(project_home() / "outputs" / "mlflow.db")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.prefect_port),
            ]
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{db}",
            ]
        ),
    ]
    print(
        f"Prefect UI: http://127.0.0.1:{args.prefect_port}  MLflow UI: http://127.0.0.1:{args.mlflow_port}"
        "  (Ctrl-C stops both)"
    )
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
    return 0
