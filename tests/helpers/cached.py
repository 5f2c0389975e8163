"""Entries of the test cache (`smollm2.cache_root()`) that tests build once per machine: a directory built in
a temporary sibling and renamed into place under a file lock, with a marker file written last, so that
concurrent test sessions build it once and an interrupted build never leaves a half entry."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smollm2 import cache_root

MARKER = "entry.json"  # written last: its presence marks a whole entry


def cached_entry(name: str, build: Callable[[Path], dict], root: Path | None = None) -> Path:
    """cache_root()/name, made by `build(empty directory)` (which returns what MARKER records, the build's
    seconds added) unless it is there already."""
    root = root or cache_root()
    entry = root / name
    if (entry / MARKER).is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it: wait, then use its entry
        if not (entry / MARKER).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
            try:
                started = time.monotonic()
                record = build(tmp)
                record["build_s"] = round(time.monotonic() - started)
                (tmp / MARKER).write_text(json.dumps(record))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(tmp, entry)
    return entry
