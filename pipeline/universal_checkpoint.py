"""Resuming under another topology through DeepSpeed's universal checkpoint (docs/design.md §6).

A checkpoint saved under one EP size, ZeRO stage or world size is converted once by DeepSpeed's
`ds_to_universal` into `step_*/universal`, which DeepSpeed's `load_universal` reshards to the new run; the
helpers here mend what DeepSpeed 0.19.8 leaves out for a ZeRO-1/2 -> ZeRO-3 resume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.faults import fault_point
from data_prep.fileio import write_atomically
from pipeline.errors import UserError

UNIVERSAL = "universal"  # step_*/universal: the converted copy, made once, reused by later resumes
UNIVERSAL_DONE = "conversion_complete"  # written last into it
UNIVERSAL_FAILED = "universal.failed"  # step_*/universal.failed: the conversion's error, for waiting ranks
HEARTBEAT = "universal.converting"  # step_*/universal.converting: rewritten by rank 0 while it converts
HEARTBEAT_S = 1.0  # how often; the waiting ranks give up after parallel.timeout_s without a change
CONVERT_FAULT = "universal.convert"  # the fault point (data_prep/faults.py): rank 0, converter running


def universal_dir(step_dir: str | Path) -> Path:
    return Path(step_dir) / UNIVERSAL


def ensure_universal(
    step_dir: str | Path, rank: int, log: Callable[[str], None], step: int, timeout_s: float, poll_s=0.5
) -> Path:
    """Every rank calls this (collective); returns the universal checkpoint directory of `step_dir`.

    Rank 0 converts once (DeepSpeed's `ds_to_universal`, in a subprocess, into a temporary folder renamed
    into place when complete); the other ranks wait for it by polling the file system, not in a
    collective, so a long conversion cannot trip parallel.timeout_s. Rank 0 rewrites a heartbeat file
    while it works; a waiting rank that sees no change for `timeout_s` (rank 0 died) stops with a
    UserError. A cached complete conversion is reused. A failed conversion stops every rank with
    DeepSpeed's error. `step` is the checkpoint's, for the fault point.
    """
    step_dir = Path(step_dir)
    target = universal_dir(step_dir)
    if rank == 0:  # what an earlier attempt left must not reach this one's waiting ranks
        (step_dir / UNIVERSAL_FAILED).unlink(missing_ok=True)
        (step_dir / HEARTBEAT).unlink(missing_ok=True)
    dist.barrier()
    if (target / UNIVERSAL_DONE).is_file():
        if rank == 0:
            log(f"resuming through the universal checkpoint {target} (converted earlier)")
        return target
    if rank == 0:
        return _convert(step_dir, step, log)
    return _wait_for_conversion(step_dir, timeout_s, poll_s)


def _convert(step_dir: Path, step: int, log: Callable[[str], None]) -> Path:
    """Rank 0: the conversion, with the heartbeat running from the first file operation to the rename."""
    target, tmp = universal_dir(step_dir), step_dir / (UNIVERSAL + ".tmp")
    with _beating(step_dir / HEARTBEAT):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        log(
            f"converting {step_dir.name} to DeepSpeed's universal checkpoint for the new topology (once; "
            f"cached as {target}) ..."
        )
        started = time.monotonic()
        _run_converter(step_dir, tmp, step)
        _name_model_states_for_every_stage(tmp)
        _add_zero3_optimizer_record(tmp)
        write_atomically(tmp / UNIVERSAL_DONE, "")
        tmp.rename(target)  # before the heartbeat stops: a waiting rank sees one or the other
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"converted {step_dir.name} in {time.monotonic() - started:.1f} s ({size / 2**20:.1f} MiB)")
    return target


# The converter's interpreter: dies with rank 0 (Linux), so that a killed rank 0 leaves no converter
# writing into universal.tmp while the rerun's writes there; then DeepSpeed's converter, as `python -m`.
_CONVERTER = """
import ctypes, os, runpy, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != {parent}:
        sys.exit("rank 0 died before the converter started")
sys.argv[0] = "ds_to_universal"
runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
"""


def _run_converter(step_dir: Path, out: Path, step: int) -> None:
    cmd = [sys.executable, "-c", _CONVERTER.format(parent=os.getpid()), "--input_folder", str(step_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fault_point(CONVERT_FAULT, step)  # while DeepSpeed's converter runs
    _, stderr = proc.communicate()
    (step_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; unused
    if proc.returncode != 0:
        message = f"DeepSpeed's universal-checkpoint conversion of {step_dir} failed:\n{stderr[-2000:]}"
        write_atomically(step_dir / UNIVERSAL_FAILED, message)
        raise UserError(message)


@contextlib.contextmanager
def _beating(path: Path):
    """Rewrite `path` every HEARTBEAT_S from a thread while the block runs (through DeepSpeed's converter
    and our own long torch.load/save), so that waiting ranks can tell a slow conversion from a dead rank 0;
    removed afterwards. Dies with the process: a killed rank 0 leaves it unchanged."""
    stop = threading.Event()
    who = {"host": socket.gethostname(), "pid": os.getpid()}

    def write(n: int) -> None:
        with contextlib.suppress(OSError):  # a missed beat is not fatal; timeout_s spans many
            path.write_text(json.dumps({**who, "beat": n}))

    def beat() -> None:
        for n in itertools.count(1):
            if stop.wait(HEARTBEAT_S):
                return
            write(n)

    write(0)  # before the block: the waiting ranks learn who converts even if it dies at once
    thread = threading.Thread(target=beat, name="universal-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def _wait_for_conversion(step_dir: Path, timeout_s: float, poll_s: float) -> Path:
    """A rank other than 0: poll until rank 0's conversion is complete or failed, or its heartbeat has not
    changed for `timeout_s` (also when it never appeared)."""
    target, failed, heartbeat = universal_dir(step_dir), step_dir / UNIVERSAL_FAILED, step_dir / HEARTBEAT
    last, changed_at = None, time.monotonic()
    while not (target / UNIVERSAL_DONE).is_file():
        if failed.is_file():
            raise UserError(failed.read_text())
        with contextlib.suppress(OSError):
            beat = heartbeat.read_text()
            if beat != last:
                last, changed_at = beat, time.monotonic()
        if time.monotonic() - changed_at > timeout_s:
            raise UserError(_converter_silent_message(step_dir, last, timeout_s))
        time.sleep(poll_s)
    return target


def _converter_silent_message(step_dir: Path, last_beat: str | None, timeout_s: float) -> str:
    try:
        who = json.loads(last_beat)
        rank0 = f"rank 0 (pid {who['pid']} on {who['host']})"
    except (TypeError, ValueError, KeyError):
        rank0 = "rank 0"
    return (
        f"gave up waiting for {rank0} to convert checkpoint {step_dir} to DeepSpeed's universal checkpoint: "
        f"its heartbeat {step_dir / HEARTBEAT} has not changed for {timeout_s:g} s (parallel.timeout_s), "
        "so it most likely died (killed, out of memory, node failure: see rank 0's log). Nothing was "
        f"loaded and the checkpoint is unchanged; run the same command again to resume from {step_dir.name} "
        "(the conversion starts afresh), or raise parallel.timeout_s if rank 0's file system is that slow"
    )


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
