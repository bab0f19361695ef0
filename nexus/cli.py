"""The `nexus` console script. Each subcommand lives in its own module, imported only when used
(the ML stack takes seconds to import), and exposes `add_parser(subparsers)` which registers its
command(s), each with `func(args)` (via `set_defaults`) that runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module whose add_parser(subparsers) registers it (one module may register several)
COMMANDS: dict[str, str] = {
    "data": "nexus.data.cli",
    "eval": "flows.lm_evaluation",
    "export": "nexus.interop.cli",
    "import": "nexus.interop.cli",
    "run": "flows.cli",
    "serve": "flows.cli",
    "ui": "flows.cli",
    "deploy": "flows.deploy",
}


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


if __name__ == "__main__":
    sys.exit(main())
