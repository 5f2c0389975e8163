"""`prep stats DIR`: the manifest's summary and a histogram of document lengths read from the shards."""

from __future__ import annotations

import numpy as np

from data_prep.indexed import read_index
from data_prep.manifest import Manifest, read_manifest


def document_lengths(manifest: Manifest, split: str) -> np.ndarray:
    """Token lengths (EOD included) of every document of a split, from the `.idx` files."""
    parts = [read_index(prefix + ".idx").lengths for prefix in manifest.shard_prefixes(split)]
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
    manifest = read_manifest(path)
    t = manifest.tokenizer
    lines = [
        f"{path}: {manifest['format']} shards, dtype {manifest['dtype']}, vocab {t['vocab_size']:,}, "
        f"EOD {t['eod_token']!r} = {t['eod_id']}",
        f"inputs: {len(manifest['inputs'])} files, {manifest['totals']['input_bytes'] / 1e6:,.1f} MB",
        format_stats(manifest),
    ]
    for split in manifest["splits"]:
        lengths = document_lengths(manifest, split)
        if not lengths.size:
            continue
        lines.append(
            f"\n{split}: document length in tokens (EOD included): mean {lengths.mean():,.1f}, "
            f"median {int(np.median(lengths)):,}, max {int(lengths.max()):,}"
        )
        hist = length_histogram(lengths)
        peak = max(c for _, _, c in hist)
        for lo, hi, c in hist:
            bar = "#" * max(1, round(width * c / peak))
            lines.append(f"  [{lo:>8,}, {hi:>8,})  {c:>9,}  {bar}")
    return "\n".join(lines)


def format_stats(manifest: dict) -> str:
    """A small fixed-width table: documents, tokens, skipped, MB/s, tokens/s."""
    t = manifest["totals"]
    rows = [("split", "documents", "tokens", "shards")]
    for split, s in manifest["splits"].items():
        rows.append((split, f"{s['documents']:,}", f"{s['tokens']:,}", str(len(s["shards"]))))
    rows.append(
        (
            "total",
            f"{t['documents']:,}",
            f"{t['tokens']:,}",
            str(sum(len(s["shards"]) for s in manifest["splits"].values())),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def fmt(r):
        cells = zip(r, widths, strict=True)
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells))

    lines = [fmt(r) for r in rows]
    skipped = {k: v for k, v in t["skipped"].items() if v}
    lines.append(
        "skipped: "
        + (", ".join(f"{k}={v:,}" for k, v in skipped.items()) if skipped else "none")
        + (f"; unreadable files={t['unreadable_files']}" if t.get("unreadable_files") else "")
    )
    tm = manifest["timing"]
    if tm["seconds"]:
        lines.append(
            f"input {t['input_bytes'] / 1e6:,.1f} MB in {tm['seconds']:.1f} s: "
            f"{tm['mb_per_s']:.2f} MB/s, {tm['tokens_per_s']:,.0f} tokens/s "
            f"({tm['workers']} workers; dtype {manifest['dtype']})"
        )
    return "\n".join(lines)
