"""Training checkpoints: DeepSpeed's own files plus the run state needed to resume exactly.

Layout under `output.dir/checkpoints/`:
    step_000100/            DeepSpeed's files (per-expert files with ZeRO-1/2), rng_rank{r}.pt, run_state.json
    latest                  the tag of the newest *complete* checkpoint

`latest` is replaced atomically by rank 0 only after every rank finished writing (a barrier), so a crash
during a save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.faults import fault_point
from data_prep.fileio import write_atomically
from pipeline.errors import UserError
from pipeline.run_config import RunConfig

LATEST = "latest"
RUN_STATE = "run_state.json"


def topology(cfg: RunConfig, world_size: int) -> dict:
    """The settings DeepSpeed shards checkpoints by: a resume must keep them."""
    return {
        "parallel.ep_size": cfg.parallel.ep_size,
        "parallel.zero_stage": cfg.parallel.zero_stage,
        "world_size": world_size,
    }


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def read_latest(root: str | Path) -> str | None:
    """The tag the `latest` pointer in a checkpoints folder names; None when there is no pointer.

    The one reader of the pointer (trainer, export, reproduce): it must name a complete checkpoint.
    """
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(root) / tag / RUN_STATE).is_file():
        raise UserError(
            f"{path} names {tag!r}, which has no {RUN_STATE}: the checkpoint directory was "
            "modified by hand; point latest at a complete step_* directory"
        )
    return tag


def latest_tag(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint of a training run's output.dir."""
    return read_latest(checkpoint_root(output_dir))


def read_run_state(step_dir: str | Path) -> dict:
    return json.loads((Path(step_dir) / RUN_STATE).read_text())


def save(engine, output_dir: str | Path, step: int, run_state: dict, keep: int) -> str:
    """Every rank calls this. Returns the tag; `latest` names it only once all ranks are done.

    A failed write (full disk, quota, I/O error) raises UserError naming the directory; `latest` then
    still names the previous checkpoint. The free-space check before writing is collective, so all ranks
    refuse together when the file system cannot hold another checkpoint of the previous one's size.
    """
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    previous = latest_tag(output_dir)
    _check_free_space(root, tag, previous)
    rank = dist.get_rank()
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"saving checkpoint {root / tag} failed on rank {rank}: {exc}. latest still names "
            f"{previous or 'no checkpoint'}; free space in {root} (or set output.dir elsewhere) and run the "
            "same command again to resume"
        ) from exc
    if rank == 0:
        fault_point("checkpoint.before_latest", step)
    dist.barrier()
    if rank == 0:
        write_atomically(root / tag / RUN_STATE, json.dumps(run_state, indent=2))
        write_atomically(root / LATEST, tag)
        _prune(root, keep)
    dist.barrier()
    return tag


def _check_free_space(root: Path, tag: str, previous: str | None) -> None:
    """Refuse (on every rank at once) a save that would not fit next to the previous checkpoint."""
    need = 0
    if previous is not None:
        need = sum(f.stat().st_size for f in (root / previous).rglob("*") if f.is_file())
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    short = torch.tensor([1.0 if need > free else 0.0])
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        raise UserError(
            f"not enough free space to save checkpoint {root / tag}: the previous one ({previous}) takes "
            f"{need / 2**20:.1f} MiB and the file system of {root} has {free / 2**20:.1f} MiB free "
            f"(on at least one rank). latest still names {previous}; free space or lower "
            "output.keep_checkpoints, then run the same command again to resume"
        )


def remove_incomplete(output_dir: str | Path, latest: str | None) -> list[str]:
    """Delete step directories left by a save that never completed (no run_state.json); return their tags."""
    removed = []
    for path in sorted(checkpoint_root(output_dir).glob("step_*")):
        if path.is_dir() and path.name != latest and not (path / RUN_STATE).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def check_topology(output_dir: str | Path, expected: dict) -> str | None:
    """Refuse, before any process group starts, to resume under a different topology; return the tag."""
    tag = latest_tag(output_dir)
    if tag is None:
        return None
    path = checkpoint_root(output_dir) / tag
    saved = read_run_state(path).get("topology", {})
    changed = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
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
    run_state = read_run_state(root / tag)
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


def _prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the one `latest` names)."""
    if keep <= 0:
        return
    tags = sorted(p for p in root.glob("step_*") if (p / RUN_STATE).is_file())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
