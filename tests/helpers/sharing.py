"""Expensive session fixtures built once per test run, also when pytest-xdist spreads the run over worker
processes (each worker has its own session fixtures).

The first worker that needs an entry builds it under a file lock in the directory every worker of the run
shares; the others wait on the lock and then read what it built. An entry whose build failed is built
again by the next one that asks (and fails there with its own error).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def shared_root(tmp_path_factory) -> Path:
    """The run's base temporary directory: under xdist, the parent of the workers' own ones."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(path: Path, build: Callable[[], object]) -> Path:
    """`path`, made by `build()` unless it was made already (by this process or another one)."""
    done = path.with_name(f"{path.name}.built")
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if path.exists():  # what a failed build left
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            build()
            done.touch()
    return path
