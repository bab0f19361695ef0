"""The `nexus` console script: Nexus's flows, data and model commands.

Each subcommand lives in its own module, imported only when used (the ML stack takes seconds to
import), and exposes `add_parser(subparsers)` which registers its command(s), each with `func(args)`
(via `set_defaults`) that runs it. This module registers `nexus run <flow> [overrides...]` (with
`-m`: one run per combination of Hydra sweep overrides), `nexus serve` and `nexus ui`; the library
commands (`export`, `import`) come from nexus.interop.cli."""

from __future__ import annotations

import argparse
import importlib
import itertools
import subprocess
import sys

from flows.home import offline_env
from nexus.errors import ConfigError

FLOWS = ("pipeline", "extend", "remove", "inbox", "demo")
COMMANDS: dict[str, str] = {
    "data": "flows.data",
    "eval": "flows.lm_evaluation",
    "export": "nexus.interop.cli",
    "import": "nexus.interop.cli",
    "run": "flows.cli",
    "serve": "flows.cli",
    "ui": "flows.cli",
    "deploy": "flows.deploy",
}
"""command -> module whose add_parser(subparsers) registers it (one module may register several)."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = {COMMANDS[only]} if only else set(COMMANDS.values())
    for module in dict.fromkeys(COMMANDS.values()):
        if module in wanted:
            importlib.import_module(module).add_parser(sub)
    for name in COMMANDS:
        if name not in sub.choices:  # not imported: listed in --help, parsed only when used
            sub.add_parser(name, help=f"(see `nexus {name} --help`)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args, rest = parser.parse_known_args(argv)
    # Hydra overrides may follow options (`nexus run pipeline --experiment demo key=value`)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from nexus.errors import NexusError

    try:
        return int(args.func(args) or 0)
    except NexusError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"nexus {args.command}: error: {message}", file=sys.stderr)
        return 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a flow locally: " + " | ".join(FLOWS))
    run.add_argument("flow", choices=FLOWS)
    run.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    run.add_argument("--experiment", default="demo")
    run.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="Hydra sweep: one run per combination of `key=a,b` / range(...) / choice(...) overrides, "
        "each in <out_dir>/multirun/<n> (every combination is composed and checked first)",
    )
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


def sweep(overrides: list[str]) -> list[list[str]]:
    """The override lists of a Hydra sweep, one per combination (cartesian product, in order): `key=a,b`,
    `key=range(1,4)` and `key=choice(a,b)` each give a list of values; other overrides are kept as given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's OverrideParseException
        raise ConfigError(f"invalid sweep override: {err}") from err
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(combination) for combination in itertools.product(*axes)]


def multirun(args: argparse.Namespace) -> int:
    """`nexus run <flow> -m ...`: every combination composed and checked, then run one after another,
    each in `<out_dir>/multirun/<n>` unless the sweep sets `out_dir`."""
    from flows.config import compose

    jobs = sweep(args.overrides)
    for n, overrides in enumerate(jobs):
        try:
            if not any(o.lstrip("+").startswith("out_dir=") for o in overrides):
                base = compose(args.experiment, overrides, check=False).out_dir
                overrides.append(f"out_dir={base}/multirun/{n}")
            compose(args.experiment, overrides)
        except ConfigError as err:
            raise ConfigError(f"multirun job {n} ({' '.join(overrides)}): {err}") from err
    for n, overrides in enumerate(jobs):
        print(f"[multirun] job {n}/{len(jobs)}: {' '.join(overrides)}", flush=True)
        _run(argparse.Namespace(**{**vars(args), "overrides": overrides, "multirun": False}))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.multirun:
        return multirun(args)
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


if __name__ == "__main__":
    sys.exit(main())
