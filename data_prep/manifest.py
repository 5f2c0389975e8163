"""`manifest.json`: the one description of a prepared data directory (docs/design.md §5).

`prep tokenize` builds and writes it (last, once every shard is in place); the training reader,
`prep stats` and the trainer's preflight read it through `read_manifest`. Nothing else knows the
file's name or its layout.

    format, format_version, created_by
    inputs        per input file: path, format, size, sha256, documents, skipped counts
    tokenizer     path, sha256, vocab_size, eod_id, eod_token (the tokenizer record)
    vocab_size, eod_id, dtype, text_key, seed, valid_fraction, shard_tokens, max_doc_chars
    splits        {train, valid}: documents, tokens, shards (prefix, bin, idx, documents, tokens,
                  bin_bytes, sha256, idx_sha256), in stream order
    totals        documents, skipped by reason, tokens, input_bytes, unreadable_files
    timing        seconds (summed over resumed runs), workers, mb_per_s, tokens_per_s
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from data_prep.errors import UserError
from data_prep.fileio import write_atomically

if TYPE_CHECKING:
    from data_prep.tokenizer import TokenizerInfo

MANIFEST_FILE = "manifest.json"
FORMAT = "megatron-mmap-indexed"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
SHARD_NAMING = "{split}_{step:05d}.bin/.idx; a split with no document in a step has no file"


class Manifest(dict):
    """A prepared directory's manifest: the JSON object as written, plus named accessors.

    It is a dict so that the JSON stays the one source of truth (and `run_tokenize` can return it).
    """

    def __init__(self, data: dict | None = None, directory: str = ""):
        super().__init__(data or {})
        self.directory = directory  # the prepared directory the manifest was read from

    @property
    def tokenizer(self) -> dict:
        """The tokenizer record: path, sha256, vocab_size, eod_id, eod_token."""
        return self["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return int(self["vocab_size"])

    @property
    def eod_id(self) -> int:
        return int(self["eod_id"])

    @property
    def dtype(self) -> str:
        return self["dtype"]

    def shards(self, split: str) -> list[dict]:
        """The shard records of `split`, in stream order; UserError for a split the directory lacks."""
        if split not in self["splits"]:
            raise UserError(f"{self.directory}: unknown split {split!r}; it has {', '.join(self['splits'])}")
        return self["splits"][split]["shards"]

    def shard_prefixes(self, split: str) -> list[str]:
        """Path prefixes (`DIR/train_00000`, without .bin/.idx) of the shards of `split`."""
        return [os.path.join(self.directory, s["prefix"]) for s in self.shards(split)]


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_FILE)


def read_manifest(directory: str) -> Manifest:
    """The manifest of a prepared directory; UserError when it has none (never prepared, or unfinished)."""
    path = manifest_path(directory)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory}: not a prepared data directory (no {MANIFEST_FILE}); run `upcycle prep tokenize "
            "--out DIR` first, or rerun an unfinished one with the same arguments to complete it"
        )
    with open(path, encoding="utf-8") as f:
        return Manifest(json.load(f), directory)


def write_manifest(directory: str, manifest: dict) -> None:
    """Write DIR/manifest.json atomically (a reader sees the old file or the new one, never a part)."""
    write_atomically(manifest_path(directory), json.dumps(manifest, indent=1))


def tokenizer_record(tok: TokenizerInfo) -> dict:
    """The manifest's record of the tokenizer the shards were made with."""
    return {
        "path": tok.path,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "eod_token": tok.eod_token,
    }


def splits_from_steps(steps: list[dict]) -> dict:
    """Per split: documents, tokens and the shard records, from the prep state's steps in order."""
    splits = {}
    for split in SPLITS:
        shards = [s["shards"][split] for s in steps if split in s["shards"]]
        splits[split] = {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    return splits


def build_manifest(
    directory: str,
    settings: dict,
    steps: list[dict],
    inputs: list[dict],
    counts: dict,
    input_bytes: int,
    unreadable_files: int,
    seconds: float,
    workers: int,
) -> Manifest:
    """The manifest of a finished `prep tokenize` run into `directory`.

    `settings` are the run's settings (inputs, tokenizer record, dtype, text_key, valid_fraction, seed,
    shard_tokens, max_doc_chars), `steps` the prep state's steps, `inputs` one record per input file,
    `counts` the totals {"documents": n, "skipped": {reason: n}}.
    """
    splits = splits_from_steps(steps)
    tokens = sum(s["tokens"] for s in splits.values())
    totals = {
        "documents": counts["documents"],
        "skipped": counts["skipped"],
        "tokens": tokens,
        "input_bytes": input_bytes,
        "unreadable_files": unreadable_files,
    }
    tok = settings["tokenizer"]
    return Manifest(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": "upcycle prep tokenize",
            "inputs": inputs,
            "tokenizer": tok,
            "vocab_size": tok["vocab_size"],
            "eod_id": tok["eod_id"],
            "dtype": settings["dtype"],
            "text_key": settings["text_key"],
            "seed": settings["seed"],
            "valid_fraction": settings["valid_fraction"],
            "shard_tokens": settings["shard_tokens"],
            "max_doc_chars": settings["max_doc_chars"],
            "shard_naming": SHARD_NAMING,
            "splits": splits,
            "totals": totals,
            "timing": {
                "seconds": round(seconds, 3),
                "workers": workers,
                "mb_per_s": round(input_bytes / 1e6 / seconds, 3) if seconds else None,
                "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            },
        },
        directory,
    )
