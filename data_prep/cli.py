"""`upcycle prep ...`: corpus, tokenizer, tokenize and stats stages.

`add_parser(subparsers)` is wired into the top-level `upcycle` CLI (pipeline.cli), which imports only
this module when the command is `prep`. `main(argv)` and `python -m data_prep.cli [prep] STAGE ...` run
the same stages without the training package: data_prep never imports `pipeline` (docs/design.md §7).
"""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import UserError

DESCRIPTION = "Data preparation stages (each separable and resumable)."


def add_parser(subparsers) -> None:
    """Add the `prep` command with its sub-commands to an argparse subparsers object."""
    prep = subparsers.add_parser(
        "prep", help="prepare training data: corpus, tokenizer, token shards", description=DESCRIPTION
    )
    add_stages(prep)


def add_stages(prep: argparse.ArgumentParser) -> None:
    """Add the stages (corpus, tokenizer, tokenize, stats) to the `prep` parser."""
    sub = prep.add_subparsers(dest="prep_command", required=True, metavar="STAGE")

    p = sub.add_parser("corpus", help="write the embedded default corpus (the Python stdlib) as JSONL")
    p.add_argument("--out", required=True, help="a .jsonl/.jsonl.gz file, or a directory (gets stdlib.jsonl)")
    p.add_argument("--max-mb", type=float, default=None, help="stop after about this many MB of text")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with an <|endoftext|> token")
    p.add_argument(
        "--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="JSONL/Parquet/text files"
    )
    p.add_argument("--text-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--max-doc-chars", type=int, default=10_000_000)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize corpora into Megatron .bin/.idx shards (resumable)")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH_OR_GLOB",
        help="JSONL (.gz), Parquet or text files, directories or globs",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding it")
    p.add_argument("--out", required=True, help="output directory (rerun with the same arguments to resume)")
    p.add_argument("--text-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents for valid")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard step")
    p.add_argument(
        "--max-doc-chars",
        type=int,
        default=10_000_000,
        help="documents longer than this are skipped and counted (default: 10M)",
    )
    p.add_argument("--eod-token", default=None, help="end-of-document token, if the tokenizer has no eos")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--encoder",
        default="auto",
        choices=("auto", "hf", "fastokens"),
        help="auto (default): fastokens when it is exact for this tokenizer and a sample of the "
        "documents, else tokenizers; hf: always tokenizers; fastokens: require it (shards are identical)",
    )
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("stats", help="summary and document-length histogram of a prepared directory")
    p.add_argument("dir")
    p.set_defaults(func=cmd_stats)
    for name, stage in sub.choices.items():
        stage.set_defaults(command_label=f"prep {name}")  # error messages name the stage


def cmd_corpus(args) -> int:
    from data_prep.corpus import write_corpus

    path, docs, size = write_corpus(args.out, args.max_mb)
    print(f"wrote {path}: {docs:,} documents, {size / 1e6:,.1f} MB of text")
    return 0


def cmd_tokenizer(args) -> int:
    from data_prep.sources import RecordReader, expand_inputs, fingerprint
    from data_prep.tokenizer import train_bpe

    files = expand_inputs(args.input)
    fingerprint(files)
    skipped: dict[str, int] = {}

    def warn(reason: str, message: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= 5:
            print(f"warning: {message}", file=sys.stderr)

    reader = RecordReader(files, args.text_key, args.max_doc_chars, warn)
    texts = (text for _, _, text, _ in reader.records() if text is not None)
    path = train_bpe(texts, args.vocab_size, args.out, show_progress=sys.stderr.isatty())
    note = f" (skipped: {', '.join(f'{k}={v}' for k, v in skipped.items())})" if skipped else ""
    print(f"wrote {path}{note}")
    return 0


def cmd_tokenize(args) -> int:
    from data_prep.tokenize_stage import TokenizeConfig, run_tokenize

    cfg = TokenizeConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        out=args.out,
        text_key=args.text_key,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        max_doc_chars=args.max_doc_chars,
        eod_token=args.eod_token,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        encoder=args.encoder,
    )
    try:
        run_tokenize(cfg)
    except UserError as exc:
        if getattr(exc, "quiet", False):
            return 2  # under MPI every rank has it; rank 0 prints it (data_prep.mpi_prep)
        raise
    return 0


def cmd_stats(args) -> int:
    from data_prep.stats import format_report

    print(format_report(args.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`upcycle prep STAGE ...` (argv may start with "prep"); UserError -> message on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prep"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="upcycle prep", description=DESCRIPTION)
    add_stages(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"upcycle {args.command_label}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
