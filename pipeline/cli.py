"""The `upcycle` console script: one subcommand per stage of the workflow.

Each stage module owns its arguments through an `add_parser(subparsers)` function and sets
`func` on its parser; this file only wires them together.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from data_prep import cli as prep_cli
    from pipeline import convert, evaluate, export, init_model, launcher

    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Upcycle dense Llama/Mistral/Qwen2 checkpoints into Mixture-of-Experts and train them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init_model.add_parser(sub)
    convert.add_parser(sub)
    prep_cli.add_parser(sub)
    launcher.add_parser(sub)
    export.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `upcycle train` passes `--section.key value` overrides through to the run config.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"upcycle {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
