"""Training checkpoints: DeepSpeed's own files plus the run state needed to resume exactly.

Layout under `output.dir/checkpoints/`:
    step_000100/            DeepSpeed's files (per-expert files with ZeRO-1/2), rng_rank{r}.pt, run_state.json
    step_000100/universal/  DeepSpeed's universal checkpoint of it, made once on a resume under another
                            topology (EP size, ZeRO stage, world size: `ensure_universal`)
    latest                  the tag of the newest *complete* checkpoint
    damaged_step_000100/    a checkpoint found damaged on resume, kept for inspection (never loaded)

`latest` is replaced atomically by rank 0 only after every rank finished writing (a barrier), so a crash
during a save leaves the previous checkpoint as latest. `run_state.json` records every file's size and
sha256 (docs/design.md §6): a checkpoint damaged afterwards (full disk, bad copy, dying node) is found
before DeepSpeed unpickles it, and the run falls back to the previous intact one or refuses, as
`output.on_damaged_checkpoint` says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.faults import fault_point
from data_prep.fileio import write_atomically
from pipeline import universal_checkpoint
from pipeline.errors import UserError
from pipeline.run_config import RunConfig

LATEST = "latest"
RUN_STATE = "run_state.json"
FILES = "files"  # the run_state.json key of the integrity record: relative path -> {size, sha256}
DAMAGED_PREFIX = "damaged_"  # outside the step_* glob: pruning and resume never touch a damaged one


# ---- a finished run: which ranks got there, and which then also exited cleanly -----------------------
# output.dir/finished/rank_{r}.json: {"tag": the final checkpoint, "exited": false, then true}. Written by
# each rank after its final save (and the expert-load picture, the last output), and again at the very
# end of its shutdown. A launcher reads them when a rank's exit code says failure: a rank that finished
# but did not exit cleanly failed in teardown, after everything of the run was on disk.
FINISHED_DIR = "finished"


def record_finished(output_dir: str | Path, rank: int, tag: str) -> None:
    _write_finished(output_dir, rank, tag, exited=False)


def record_exit(output_dir: str | Path, rank: int, tag: str) -> None:
    _write_finished(output_dir, rank, tag, exited=True)


def _write_finished(output_dir: str | Path, rank: int, tag: str, exited: bool) -> None:
    folder = Path(output_dir) / FINISHED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(str(folder / f"rank_{rank}.json"), json.dumps({"tag": tag, "exited": exited}) + "\n")


def clear_finished(output_dir: str | Path) -> None:
    """Rank 0 at the start of a run: the records of an earlier run in this output.dir are void."""
    shutil.rmtree(Path(output_dir) / FINISHED_DIR, ignore_errors=True)


@dataclass(frozen=True)
class Completion:
    """What the finished records of a run say, against the checkpoint `latest` names."""

    final_tag: str  # the checkpoint a completed run ends with
    latest: str | None
    finished: list[int]  # ranks that recorded final_tag as saved
    exited: list[int]  # ... and then their clean exit
    world: int

    @property
    def complete(self) -> bool:
        """Every rank saved the final checkpoint, and `latest` names it."""
        return self.latest == self.final_tag and self.finished == list(range(self.world))

    @property
    def failed_in_teardown(self) -> list[int]:
        return [r for r in self.finished if r not in self.exited]


def completion(output_dir: str | Path, steps: int, world: int) -> Completion:
    final_tag = step_tag(steps)
    finished, exited = [], []
    for rank in range(world):
        path = Path(output_dir) / FINISHED_DIR / f"rank_{rank}.json"
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if record.get("tag") == final_tag:
                finished.append(rank)
                if record.get("exited"):
                    exited.append(rank)
    try:
        latest = latest_tag(output_dir)
    except UserError:  # a pointer to a damaged checkpoint: not the complete run this asks about
        latest = None
    return Completion(final_tag, latest, finished, exited, world)


def topology(cfg: RunConfig, world_size: int) -> dict:
    """The settings DeepSpeed shards checkpoints by: a resume must keep them."""
    return {
        "parallel.ep_size": cfg.parallel.ep_size,
        "parallel.zero_stage": cfg.parallel.zero_stage,
        "world_size": world_size,
    }


def step_tag(step: int) -> str:
    """The tag (directory name, `latest`'s content) of the checkpoint saved after `step` steps."""
    return f"step_{step:08d}"


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
    Each rank hashes the files it wrote itself (split work, and no reliance on another node's view of a
    shared file system); rank 0 records them all in run_state.json.
    """
    root = checkpoint_root(output_dir)
    tag = step_tag(step)
    previous = latest_tag(output_dir)
    _check_free_space(root, tag, previous)
    rank = dist.get_rank()
    written: list[Path] = []
    try:
        with _recording_writes(engine, written):
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        rng_file = root / tag / f"rng_rank{rank}.pt"
        torch.save(_rng_state(), rng_file)
        written.append(rng_file)
        mine = {_relative(root / tag, path): _file_record(path) for path in written}
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"saving checkpoint {root / tag} failed on rank {rank}: {exc}. latest still names "
            f"{previous or 'no checkpoint'}; free space in {root} (or set output.dir elsewhere) and run the "
            "same command again to resume"
        ) from exc
    if rank == 0:
        fault_point("checkpoint.before_latest", step)
    records: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(records, mine)  # also the barrier: every rank has written its files
    if rank == 0:
        files = _merge_records(root / tag, records)
        write_atomically(root / tag / RUN_STATE, json.dumps({**run_state, FILES: files}, indent=2))
        write_atomically(root / LATEST, tag)
        _prune(root, keep)
    dist.barrier()
    return tag


@contextlib.contextmanager
def _recording_writes(engine, written: list[Path]):
    """Collect the paths DeepSpeed writes on this rank: every state file goes through its checkpoint
    engine's `save` (deepspeed/runtime/engine.py); DeepSpeed's file names per rank are not documented."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:  # a stand-in engine: rank 0 records what it finds (_merge_records)
        yield
        return
    original = checkpoint_engine.save

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        written.append(Path(path))
        return result

    checkpoint_engine.save = save
    try:
        yield
    finally:
        checkpoint_engine.save = original


def _relative(step_dir: Path, path: Path) -> str:
    return Path(path).resolve().relative_to(step_dir.resolve()).as_posix()


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _merge_records(step_dir: Path, records: list[dict]) -> dict:
    """Every rank's records, plus any file in the step directory that no rank recorded (written by
    DeepSpeed outside its checkpoint engine), hashed here by rank 0."""
    files = {name: record for per_rank in records for name, record in per_rank.items()}
    for path in sorted(step_dir.rglob("*")):
        name = _relative(step_dir, path)
        if path.is_file() and name not in files and name != RUN_STATE and not name.endswith(".tmp"):
            files[name] = _file_record(path)
    return dict(sorted(files.items()))


def _check_free_space(root: Path, tag: str, previous: str | None) -> None:
    """Refuse (on every rank at once) a save that would not fit next to the previous checkpoint."""
    need = 0
    if previous is not None:
        step_dir = root / previous
        files = [f for f in step_dir.rglob("*") if f.is_file()]
        need = sum(
            f.stat().st_size
            for f in files
            if f.relative_to(step_dir).parts[0] != universal_checkpoint.UNIVERSAL
        )
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


# What a resume may not change: the data order and the meaning of `consumed_samples` (global_batch,
# seq_len, seed, blend weights) and the model's parameters (its shapes are DeepSpeed's to check, but a
# different model.path would silently continue someone else's weights).
FIXED_ON_RESUME = ("train.global_batch", "train.seq_len", "train.seed", "data.weights")


def resume_plan(output_dir: str | Path, cfg_dict: dict, expected: dict, on_damaged: str = "fallback"):
    """(tag to resume from or None, {topology key: (old, new)} that changed), checked before any process
    group starts.

    The tag is the newest checkpoint whose files have their recorded sizes (a truncated or missing file is
    caught here; the checksums are compared at resume, by all ranks together: `resume_tag`). With
    on_damaged="refuse" a damaged latest checkpoint is refused here. A changed topology (EP size, ZeRO
    stage, world size) is allowed: the resume goes through DeepSpeed's universal checkpoint
    (`ensure_universal`). A changed FIXED_ON_RESUME key is refused, naming it.
    """
    tag, _ = choose_intact(output_dir, on_damaged, lambda step_dir: damage(step_dir, hashes=False))
    if tag is None:
        return None, {}
    path = checkpoint_root(output_dir) / tag
    state = read_run_state(path)
    saved_cfg = state.get("config", {})
    fixed = {}
    for key in FIXED_ON_RESUME:
        section, _, name = key.partition(".")
        old, new = saved_cfg.get(section, {}).get(name), cfg_dict.get(section, {}).get(name)
        if section in saved_cfg and old != new:
            fixed[key] = (old, new)
    if fixed:
        details = ", ".join(f"{k} was {old} and is now {new}" for k, (old, new) in fixed.items())
        raise UserError(
            f"cannot resume {path}: {details}. These fix the data order (which samples each step sees) and "
            "cannot change within a run; resume with the original values, or use a new output.dir"
        )
    _check_expert_bias_kept(path, saved_cfg, cfg_dict)
    changed = topology_changes(state, expected)
    old_stage, new_stage = (
        state.get("topology", {}).get("parallel.zero_stage"),
        expected.get("parallel.zero_stage"),
    )
    if old_stage == 3 and new_stage is not None and new_stage < 3:
        raise UserError(
            f"cannot resume {path} with parallel.zero_stage {new_stage}: it was saved with ZeRO-3, and "
            "DeepSpeed 0.19.8's ZeRO-1/2 loader cannot read a universal checkpoint converted from ZeRO-3 "
            "(flat tensors, no ds_version). Resume with parallel.zero_stage 3 (EP size and world size may "
            "change), or use a new output.dir"
        )
    return tag, changed


def _check_expert_bias_kept(path: Path, saved_cfg: dict, cfg_dict: dict) -> None:
    """A run's MoE layers either carry an expert bias (moe.balance bias, aux+bias) or not (aux), and DeepSpeed
    loads the module state strictly: switching between the two is refused here, before any rank starts."""
    old, new = (c.get("moe", {}).get("balance", "aux") for c in (saved_cfg, cfg_dict))
    if "moe" in saved_cfg and "moe" in cfg_dict and (old == "aux") != (new == "aux"):
        raise UserError(
            f"cannot resume {path}: moe.balance was {old} and is now {new}, but the checkpoint's MoE layers "
            f"{'have no' if old == 'aux' else 'carry an'} expert bias. Resume with moe.balance {old} (bias "
            "and aux+bias may replace each other), or start a new output.dir"
        )


def topology_changes(run_state: dict, expected: dict) -> dict:
    """{topology key: (saved, now)} for each setting that differs from the checkpoint's."""
    saved = run_state.get("topology", {})
    return {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}


def check_topology(output_dir: str | Path, expected: dict, on_damaged: str = "fallback") -> str | None:
    """The tag `resume_plan` would resume from (topology changes are allowed; kept for callers that
    check a checkpoint without a run config)."""
    tag, _ = resume_plan(output_dir, {}, expected, on_damaged)
    return tag


# ---- integrity: verify before loading (docs/design.md §6) ---------------------------------------------
def damage(step_dir: str | Path, hashes: bool = True, only: list[str] | None = None) -> list[str]:
    """What is wrong with a committed checkpoint, one line per file; empty when it is intact.

    Compares each file's size (and, with `hashes`, its sha256) with the record written when it was saved;
    `only` limits the check to some of the recorded files. A checkpoint saved before records existed has
    none to compare with and passes.
    """
    step_dir = Path(step_dir)
    try:
        files = read_run_state(step_dir).get(FILES, {})
    except (OSError, ValueError) as exc:
        return [f"{RUN_STATE}: unreadable ({exc})"]
    names = sorted(files) if only is None else only
    return [problem for name in names if (problem := _file_damage(step_dir, name, files[name], hashes))]


def _file_damage(step_dir: Path, name: str, record: dict, hashes: bool) -> str | None:
    path = step_dir / name
    try:
        size = path.stat().st_size
        if size != record["size"]:
            return f"{name}: {size} bytes, {record['size']} when saved (truncated or overwritten)"
        if hashes and _sha256(path) != record["sha256"]:
            return f"{name}: contents differ from the sha256 recorded when saved (corrupted)"
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: unreadable ({exc})"
    return None


def verify(step_dir: str | Path) -> None:
    """Refuse a damaged checkpoint before anything reads it (for `upcycle export` and other readers that
    run without a process group): raises UserError naming each damaged file."""
    problems = damage(step_dir)
    if problems:
        raise UserError(
            f"checkpoint {step_dir} is damaged, not reading it: " + "; ".join(problems) + ". Use an earlier "
            "checkpoint (a step_* directory next to it), or restore the file(s) from a copy"
        )


def choose_intact(
    output_dir: str | Path, on_damaged: str, check: Callable[[Path], list[str]]
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """(the newest committed checkpoint `check` finds intact, [(damaged tag, its problems) newer than it]).

    Starts at `latest`; on damage, refuses (on_damaged="refuse", naming the flag) or goes back to the
    previous complete checkpoint ("fallback"). Refuses when no complete checkpoint is intact.
    """
    root = checkpoint_root(output_dir)
    latest = read_latest(root)
    if latest is None:
        return None, []
    damaged: list[tuple[str, list[str]]] = []
    for tag in _committed_tags(root, latest):
        problems = check(root / tag)
        if not problems:
            return tag, damaged
        damaged.append((tag, problems))
        if on_damaged == "refuse":
            raise UserError(
                f"checkpoint {root / tag} is damaged: {'; '.join(problems)}. Not loading it "
                "(output.on_damaged_checkpoint=refuse). Restore the file(s) from a copy, or run again with "
                "--output.on_damaged_checkpoint fallback to resume from the previous intact checkpoint"
            )
    details = " | ".join(f"{tag}: {'; '.join(problems)}" for tag, problems in damaged)
    raise UserError(
        f"no intact checkpoint to resume from in {root}: {details}. Restore the file(s) from a copy, or "
        "start afresh with a new output.dir (output.keep_checkpoints >= 2 keeps a previous checkpoint "
        "to fall back to)"
    )


def _committed_tags(root: Path, latest: str) -> list[str]:
    """Complete checkpoints up to `latest`, newest first (a step directory after `latest` was never
    committed)."""
    tags = [p.name for p in root.glob("step_*") if p.name <= latest and (p / RUN_STATE).is_file()]
    return sorted(tags, reverse=True)


def resume_tag(output_dir: str | Path, on_damaged: str) -> tuple[str | None, list[str]]:
    """Every rank calls this before loading: (the tag to resume from, warnings for rank 0 to log).

    The ranks verify sizes and sha256 of the candidate together, each hashing a share of the files, and
    agree on the outcome (all_gather). On a fallback rank 0 moves each damaged checkpoint aside as
    damaged_step_* (kept, not deleted) and points `latest` at the intact one.
    """
    tag, damaged = choose_intact(output_dir, on_damaged, _damage_checked_together)
    if not damaged:
        return tag, []
    root, warnings = checkpoint_root(output_dir), []
    if dist.get_rank() == 0:
        write_atomically(root / LATEST, tag)  # first: a crash after it leaves a consistent pointer
        for bad, problems in damaged:
            warnings.append(
                f"warning: checkpoint {bad} is damaged, not loading it: {'; '.join(problems)}. Resuming from "
                f"{tag} instead (output.on_damaged_checkpoint=fallback); {_set_aside(root / bad)}"
            )
    dist.barrier()
    return tag, warnings


def _damage_checked_together(step_dir: Path) -> list[str]:
    """`damage` with the hashing split over the ranks (largest files first, to the least loaded rank)."""
    try:
        files = read_run_state(step_dir).get(FILES, {})
    except (OSError, ValueError):
        files = {}
    rank, world = dist.get_rank(), dist.get_world_size()
    load, mine = [0] * world, []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        least = load.index(min(load))
        load[least] += files[name]["size"] + 1
        if least == rank:
            mine.append(name)
    found = damage(step_dir, only=mine) if files else (damage(step_dir) if rank == 0 else [])
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, found)
    return sorted(problem for per_rank in gathered for problem in per_rank)


def _set_aside(step_dir: Path) -> str:
    """Rename a damaged checkpoint out of the step_* namespace (a later save of that step must not mix
    with it; pruning must not count it); never delete it. Returns what was done, for the warning."""
    target = step_dir.with_name(DAMAGED_PREFIX + step_dir.name)
    n = 1
    while target.exists():
        target = step_dir.with_name(f"{DAMAGED_PREFIX}{step_dir.name}.{n}")
        n += 1
    try:
        step_dir.rename(target)
    except OSError as exc:  # not fatal: `latest` no longer names it, the next save of that step replaces it
        return f"it could not be moved aside ({exc}) and stays as {step_dir}"
    return f"the damaged one is kept as {target}"


def load(engine, output_dir: str | Path, tag: str, universal: bool = False) -> dict:
    """Load DeepSpeed state and RNG (after `resume_plan` accepted the checkpoint).

    With `universal`, DeepSpeed reads the step's universal checkpoint
    (`universal_checkpoint.ensure_universal`), which it
    reshards to this run's EP size, ZeRO stage and world size; the engine must have been built with
    `"checkpoint": {"load_universal": true}`. RNG: a rank restores its own file, or rank 0's where the
    saving run had fewer ranks (nothing in training draws random numbers: no dropout, deterministic routing,
    the data order comes from index-seeded permutations; docs/design.md §6).
    """
    root = checkpoint_root(output_dir)
    run_state = read_run_state(root / tag)
    load_dir, load_tag = (root / tag, universal_checkpoint.UNIVERSAL) if universal else (root, tag)
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise UserError(f"DeepSpeed could not load {load_dir / load_tag}")
    if universal:
        universal_checkpoint.unshare_adam_steps(engine)
        _restore_buffers(engine, root / tag)
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        rng_file = root / tag / "rng_rank0.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return run_state


def _restore_buffers(engine, step_dir: Path) -> None:
    """DeepSpeed's universal load restores parameters and optimizer state but skips the module state, so
    persistent buffers (the expert bias of moe.balance bias, docs/design.md §3) would silently restart
    from their initial values. Copy them from the step's own model-state file (rank 0's: whole, not
    sharded); non-persistent buffers are not saved and stay as they are."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    path = next((step_dir / n for n in names if (step_dir / n).is_file()), None)
    buffers = {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, module in engine.module.named_modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    }
    if path is None or not buffers:
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)["module"]
    with torch.no_grad():
        for name, buffer in buffers.items():
            if name in saved:
                buffer.copy_(saved[name])


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
