"""Resuming under another topology through DeepSpeed's universal checkpoint (docs/design.md §6).

A checkpoint saved under one EP size, ZeRO stage or world size is converted once by DeepSpeed's
`ds_to_universal` into `step_*/universal`, which DeepSpeed's `load_universal` reshards to the new run; the
helpers here mend what DeepSpeed 0.19.8 leaves out for a ZeRO-1/2 -> ZeRO-3 resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from data_prep.fileio import write_atomically
from pipeline.errors import UserError

UNIVERSAL = "universal"  # step_*/universal: the converted copy, made once, reused by later resumes
UNIVERSAL_DONE = "conversion_complete"  # written last into it
UNIVERSAL_FAILED = "universal.failed"  # step_*/universal.failed: the conversion's error, for waiting ranks


def universal_dir(step_dir: str | Path) -> Path:
    return Path(step_dir) / UNIVERSAL


def ensure_universal(step_dir: str | Path, rank: int, log: Callable[[str], None], poll_s: float = 0.5):
    """Every rank calls this; returns the universal checkpoint directory of `step_dir`.

    Rank 0 converts once (DeepSpeed's `ds_to_universal`, in a subprocess, into a temporary folder renamed
    into place when complete); the other ranks wait for it by polling the file system, not in a
    collective, so a long conversion cannot trip parallel.timeout_s. A cached complete conversion is
    reused. A failed conversion stops every rank with DeepSpeed's error.
    """
    step_dir = Path(step_dir)
    target, failed = universal_dir(step_dir), step_dir / UNIVERSAL_FAILED
    if (target / UNIVERSAL_DONE).is_file():
        if rank == 0:
            log(f"resuming through the universal checkpoint {target} (converted earlier)")
        return target
    if rank == 0:
        failed.unlink(missing_ok=True)
        tmp = step_dir / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log(
            f"converting {step_dir.name} to DeepSpeed's universal checkpoint for the new topology (once; "
            f"cached as {target}) ..."
        )
        started = time.monotonic()
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(step_dir), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        (step_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; unused
        if result.returncode != 0:
            message = (
                f"DeepSpeed's universal-checkpoint conversion of {step_dir} failed:\n{result.stderr[-2000:]}"
            )
            write_atomically(failed, message)
            raise UserError(message)
        _name_model_states_for_every_stage(tmp)
        _add_zero3_optimizer_record(tmp)
        write_atomically(tmp / UNIVERSAL_DONE, "")
        tmp.rename(target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        log(f"converted {step_dir.name} in {time.monotonic() - started:.1f} s ({size / 2**20:.1f} MiB)")
        return target
    while not (target / UNIVERSAL_DONE).is_file():
        if failed.is_file():
            raise UserError(failed.read_text())
        time.sleep(poll_s)
    return target


def _name_model_states_for_every_stage(folder: Path) -> None:
    """DeepSpeed's universal loader looks for the engine-state file under its own stage's name
    (`mp_rank_00_model_states.pt` for ZeRO-1/2, `zero_pp_rank_0_mp_rank_00_model_states.pt` for ZeRO-3)
    but the converter keeps the saving stage's: link the other name, so that either stage resumes.
    Universal loading takes only scheduler and step counters from it (the weights come from zero/)."""
    for plain in sorted(folder.glob("mp_rank_*_model_states.pt")):
        _link(plain, folder / f"zero_pp_rank_0_{plain.name}")
    for zero3 in sorted(folder.glob("zero_pp_rank_0_mp_rank_*_model_states.pt")):
        _link(zero3, folder / zero3.name.removeprefix("zero_pp_rank_0_"))


def _add_zero3_optimizer_record(folder: Path) -> None:
    """A ZeRO-1/2 checkpoint converted for a ZeRO-3 engine: DeepSpeed's ZeRO-3 universal loader reads the
    Adam step and the hyperparameters from `zero/optimizer_state.pt["optimizer_state_dict"]`, which only
    its ZeRO-3 converter writes; add it from what the ZeRO-1/2 converter wrote. `params`, `name` and `moe`
    are left out: the loader copies every key of the first group onto all groups (the expert group would
    lose its name; `params` would be emptied)."""
    path = folder / "zero" / "optimizer_state.pt"
    with torch.serialization.safe_globals(_deepspeed_state_classes()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer_state_dict" in state:
        return
    step_file = next(iter(sorted((folder / "zero").glob("*/step.pt"))), None)
    if step_file is None:
        return
    step = torch.load(step_file, map_location="cpu", weights_only=True)
    hyper = {k: v for k, v in state["param_groups"][0].items() if k not in ("params", "name", "moe")}
    state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": [hyper]}
    torch.save(state, path)


def _deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into optimizer_state.pt (its loss scaler, the ZeRO stage enum): allowed
    by name, so that the file is read with weights_only=True rather than by running arbitrary pickle."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, ZeroStageEnum]


def _link(existing: Path, name: Path) -> None:
    if name.exists():
        return
    try:
        os.link(existing, name)  # a hard link: no extra space, and it moves with the directory
    except OSError:
        shutil.copy2(existing, name)


def unshare_adam_steps(engine) -> None:
    """DeepSpeed's ZeRO-3 universal loader gives every parameter group one and the same `step` tensor;
    torch's Adam increments each group's in place, so with two groups (dense and expert parameters) the
    shared counter advanced twice per step and the expert group's bias correction went wrong (a 4e-4
    relative loss drift within 4 steps). One tensor per state, as a fresh optimizer has."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
