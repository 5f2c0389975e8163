"""`prep corpus`: a default corpus that needs no download, from the running interpreter's standard library.

Each `.py` file of the standard library (source and docstrings; site-packages excluded) becomes one
JSONL document `{"text": ..., "source": "relative/path.py"}`, in sorted path order, so the output is
the same on every run with the same Python. It is tens of MB: enough for demos, tests and benchmarks.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from collections.abc import Iterator

from data_prep.errors import UserError


def stdlib_documents(max_bytes: int | None = None) -> Iterator[dict]:
    """Documents from the stdlib's .py files, in a stable order, up to about max_bytes of text."""
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise UserError(f"the standard library directory {root} does not exist; pass --input files instead")
    total = 0
    for path in _stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # a few test files are deliberately in other encodings
        if not text.strip():
            continue
        yield {"text": text, "source": os.path.relpath(path, root)}
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return


def _stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = ("site-packages", "dist-packages", "__pycache__")
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(".py"))
    return sorted(out)


def write_corpus(out: str, max_mb: float | None = None) -> tuple[str, int, int]:
    """Write the stdlib corpus to `out` (a .jsonl/.jsonl.gz file, or a directory that gets stdlib.jsonl).

    Returns (path, documents, bytes of text).
    """
    if out.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        path = out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    else:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "stdlib.jsonl")
    max_bytes = int(max_mb * 1e6) if max_mb is not None else None
    docs = size = 0
    tmp = path + ".tmp"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for doc in stdlib_documents(max_bytes):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            docs += 1
            size += len(doc["text"].encode("utf-8"))
    os.replace(tmp, path)
    return path, docs, size
