"""`prep stats DIR`: the manifest's summary and a histogram of document lengths read from the shards."""
from __future__ import annotations

import json
import os

import numpy as np

from data_prep.indexed import read_index
from data_prep.tokenize_stage import MANIFEST_FILE, format_stats
from pipeline.errors import UserError


def load_manifest(path: str) -> dict:
    """OUT/manifest.json of a prepared directory; UserError when there is none."""
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(file):
        raise UserError(f"{path}: no {MANIFEST_FILE} (not a prepared directory, or the run is unfinished: "
                        "run `upcycle prep tokenize` again with the same arguments to complete it)")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def document_lengths(path: str, manifest: dict, split: str) -> np.ndarray:
    """Token lengths (EOD included) of every document of a split, from the `.idx` files."""
    parts = [read_index(os.path.join(path, s["idx"])).lengths for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Power-of-two buckets: (low, high, count) for lengths in [low, high)."""
    if not lengths.size:
        return []
    top = int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1)))
    edges = [0] + [1 << k for k in range(1, top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return [(edges[i], edges[i + 1], int(c)) for i, c in enumerate(counts) if c]


def format_report(path: str, width: int = 40) -> str:
    """The text printed by `prep stats`."""
    manifest = load_manifest(path)
    t = manifest["tokenizer"]
    lines = [f"{path}: {manifest['format']} shards, dtype {manifest['dtype']}, vocab {t['vocab_size']:,}, "
             f"EOD {t['eod_token']!r} = {t['eod_id']}",
             f"inputs: {len(manifest['inputs'])} files, {manifest['totals']['input_bytes'] / 1e6:,.1f} MB",
             format_stats(manifest)]
    for split in manifest["splits"]:
        lengths = document_lengths(path, manifest, split)
        if not lengths.size:
            continue
        lines.append(f"\n{split}: document length in tokens (EOD included): mean {lengths.mean():,.1f}, "
                     f"median {int(np.median(lengths)):,}, max {int(lengths.max()):,}")
        hist = length_histogram(lengths)
        peak = max(c for _, _, c in hist)
        for lo, hi, c in hist:
            bar = "#" * max(1, round(width * c / peak))
            lines.append(f"  [{lo:>8,}, {hi:>8,})  {c:>9,}  {bar}")
    return "\n".join(lines)
