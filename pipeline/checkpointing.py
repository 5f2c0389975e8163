"""Training checkpoints: DeepSpeed's own files plus the run state needed to resume exactly.

Layout under `output.dir/checkpoints/`:
    step_000100/            DeepSpeed's files (per-expert files with ZeRO-1/2), rng_rank{r}.pt, run_state.json
    latest                  the tag of the newest *complete* checkpoint

`latest` is replaced atomically by rank 0 only after every rank finished writing (a barrier), so a crash
during a save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError

# Settings a checkpoint cannot be resumed under a different value of (DeepSpeed shards by them).
TOPOLOGY_KEYS = ("parallel.ep_size", "parallel.zero_stage", "world_size")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(output_dir: str | Path) -> str | None:
    path = checkpoint_root(output_dir) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (checkpoint_root(output_dir) / tag / "run_state.json").is_file():
        raise UserError(
            f"{path} names {tag!r}, which has no run_state.json: the checkpoint directory was "
            "modified by hand; point latest at a complete step_* directory"
        )
    return tag


def save(engine, output_dir: str | Path, step: int, run_state: dict, keep: int) -> str:
    """Every rank calls this. Returns the tag; `latest` names it only once all ranks are done."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomically(root / tag / "run_state.json", json.dumps(run_state, indent=2))
        _write_atomically(root / "latest", tag)
        _prune(root, keep)
    dist.barrier()
    return tag


def check_topology(output_dir: str | Path, expected: dict) -> str | None:
    """Refuse, before any process group starts, to resume under a different topology; return the tag."""
    tag = latest_tag(output_dir)
    if tag is None:
        return None
    path = checkpoint_root(output_dir) / tag
    saved = json.loads((path / "run_state.json").read_text()).get("topology", {})
    changed = {k: (saved.get(k), expected[k]) for k in TOPOLOGY_KEYS if saved.get(k) != expected[k]}
    if changed:
        details = ", ".join(f"{k} was {old} and is now {new}" for k, (old, new) in changed.items())
        raise UserError(
            f"cannot resume {path}: {details}. DeepSpeed would restore optimizer state for the wrong shards "
            "(silently, with ZeRO-1/2). Resume with the original settings, or use a new output.dir."
        )
    return tag


def load(engine, output_dir: str | Path, tag: str) -> dict:
    """Load DeepSpeed state and this rank's RNG (after `check_topology` accepted the checkpoint)."""
    root = checkpoint_root(output_dir)
    run_state = json.loads((root / tag / "run_state.json").read_text())
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise UserError(f"DeepSpeed could not load {root / tag}")
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return run_state


def _rng_state() -> dict:
    # Plain lists and tensors only, so that loading needs no pickle (torch.load(weights_only=True)).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the one `latest` names)."""
    if keep <= 0:
        return
    tags = sorted(p for p in root.glob("step_*") if (p / "run_state.json").is_file())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
