"""Entries of the test cache that tests build once per machine (the SmolLM2 model, transformers 4.57.1,
llama.cpp): `$UPCYCLE_TEST_CACHE` or `~/.cache/moe-upcycle-tests`.

An entry is built in a temporary sibling directory and renamed into place under a file lock, with a marker
file written last, so that concurrent test sessions build it once and an interrupted build never leaves a
half entry.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "UPCYCLE_TEST_CACHE"
MARKER = "entry.json"  # written last: its presence marks a whole entry


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moe-upcycle-tests")


def cached_entry(name: str, build: Callable[[Path], dict], marker: str = MARKER) -> Path:
    """cache_root()/name, made by `build(empty directory)` unless it is there already; what `build` returns,
    with the build's seconds added, is written to `marker` last."""
    root = cache_root()
    entry = root / name
    if (entry / marker).is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it: wait, then use its entry
        if (entry / marker).is_file():
            return entry
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build (builders hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            started = time.monotonic()
            record = build(tmp)
            record["build_s"] = round(time.monotonic() - started, 1)
            (tmp / marker).write_text(json.dumps(record, indent=2) + "\n")
            if entry.exists():  # without its marker an entry is not complete: replaced
                shutil.rmtree(entry)
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
