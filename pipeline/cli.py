"""The `upcycle` console script: one subcommand per stage of the workflow.

Each stage module owns its arguments through an `add_parser(subparsers)` function and sets
`func` on its parser; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import UserError

# subcommand -> the module whose `add_parser` defines it. Only the one being run is imported, so that
# `upcycle prep` does not pay for torch (~2 s), which the model stages import.
STAGES = {
    "init": "pipeline.init_model",
    "convert": "pipeline.convert",
    "prep": "data_prep.cli",
    "train": "pipeline.launcher",
    "export": "pipeline.export",
    "eval": "pipeline.evaluate",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `upcycle` parser; with `command`, only that subcommand's module is imported and registered."""
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Upcycle dense Llama/Mistral/Qwen2 checkpoints into Mixture-of-Experts and train them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in STAGES.items():
        if command is None or name == command:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in STAGES else None)
    # `upcycle train` passes `--section.key value` overrides through to the run config.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"upcycle {getattr(args, 'command_label', args.command)}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
