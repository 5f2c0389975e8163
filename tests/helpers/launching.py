"""Launching training runs from tests: real launchers (deepspeed, torchrun, mpirun, `upcycle train`) and
real processes on 2 CPU ranks; shared by the training, fault, export, multi-node and GPU tests."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import free_port

from pipeline.ds_adapter import shm_buffer_name

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "pipeline" / "train.py")
TINY_CONFIG = str(REPO / "launch" / "configs" / "tiny_cpu.yaml")


LAUNCHERS = {
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), TRAIN],
    "upcycle": lambda port: ["upcycle", "train", "--nproc", "2", "--master-port", str(port)],
    "upcycle_1gpu": lambda port: ["upcycle", "train", "--nproc", "1", "--master-port", str(port)],
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), TRAIN],
    # Rank discovery through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)).
    "mpirun": lambda port: [
        "mpirun",
        "-n",
        "2",
        "--allow-run-as-root",
        "--oversubscribe",
        "-x",
        "PYTHONPATH",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        f"MASTER_PORT={port}",
        sys.executable,
        TRAIN,
    ],
}


def run_paths(workspace: Path, out: str) -> list[str]:
    """Overrides pointing a run at the workspace's upcycled model and data, writing to workspace/out."""
    return [
        "--model.path",
        str(workspace / "moe"),
        "--data.path",
        str(workspace / "data"),
        "--output.dir",
        str(workspace / out),
    ]


def launch(
    workspace: Path,
    out: str,
    *overrides: str,
    wait: bool = True,
    timeout: int = 300,
    launcher: str = "deepspeed",
):
    port = free_port()
    cmd = [
        *LAUNCHERS[launcher](port),
        "--config",
        TINY_CONFIG,
        *run_paths(workspace, out),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(workspace / f"{out}.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if not wait:
        return proc
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (workspace / f"{out}.log").read_text()[-3000:]
    # DeepSpeed's CPU all-reduce segments (~67 MB of RAM each) are removed when the ranks exit.
    assert not glob.glob("/dev/shm/" + shm_buffer_name("*", port, "*"))
    return proc


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def losses(workspace: Path, out: str) -> dict[int, float]:
    """step -> loss from train_log.jsonl; a step logged twice (killed, then resumed) keeps the last."""
    rows = [json.loads(line) for line in (workspace / out / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def wait_for_steps(workspace: Path, out: str, steps: int, proc=None, timeout: float = 240) -> None:
    """Wait until train_log.jsonl has `steps` rows (the ranks are past start-up and their SIGTERM handler
    is installed); fail early if `proc` exits first."""
    log = workspace / out / "train_log.jsonl"
    deadline = time.time() + timeout
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            raise AssertionError(
                f"{out}: {steps} steps not logged\n{(workspace / f'{out}.log').read_text()[-3000:]}"
            )
        time.sleep(0.2)
