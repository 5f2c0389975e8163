"""DeepSpeed training on 2 CPU ranks (gloo), real launcher and real processes.

Each launch costs ~20 s of start-up on 2 cores, so the runs are shared between assertions where the
assertions are independent.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import prepare_train_workspace

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "pipeline" / "train.py")
TINY_CONFIG = str(REPO / "launch" / "configs" / "tiny_cpu.yaml")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared tiny corpus, a tiny dense model and its E8 top-2 upcycled version."""
    return prepare_train_workspace(tmp_path_factory.mktemp("train"))


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


def launch(
    workspace: Path,
    out: str,
    *overrides: str,
    wait: bool = True,
    timeout: int = 300,
    launcher: str = "deepspeed",
):
    data_args = ["--model.path", str(workspace / "moe"), "--data.path", str(workspace / "data")]
    port = free_port()
    cmd = [
        *LAUNCHERS[launcher](port),
        "--config",
        TINY_CONFIG,
        *data_args,
        "--output.dir",
        str(workspace / out),
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
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
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


def test_expert_parallel_is_the_same_math(workspace):
    """EP=2 (experts split across the ranks, all-to-all) and EP=1 give the same losses; so does ZeRO-3,
    and so does DeepSpeed's stock AutoEP forward in place of the fast path (`--moe.fast_path false`).

    The runs also go through the three launchers: deepspeed, torchrun and mpirun.
    """
    common = ("--train.steps", "3", "--output.checkpoint_interval", "0", "--output.eval_interval", "0")
    launch(workspace, "ep2", "--parallel.ep_size", "2", *common)
    launch(workspace, "ep1", "--parallel.ep_size", "1", *common, launcher="torchrun")
    zero3 = ("--parallel.ep_size", "2", "--parallel.zero_stage", "3")
    launch(
        workspace, "ep2_zero3", *zero3, *common, launcher="mpirun"
    )
    launch(workspace, "ep2_stock", "--parallel.ep_size", "2", "--moe.fast_path", "false", *common)
    ep2, ep1, zero3, stock = (losses(workspace, name) for name in ("ep2", "ep1", "ep2_zero3", "ep2_stock"))
    assert sorted(ep2) == [1, 2, 3]
    for step in ep2:
        assert ep1[step] == pytest.approx(ep2[step], abs=2e-5)
        assert zero3[step] == pytest.approx(ep2[step], abs=2e-5)
        assert stock[step] == pytest.approx(ep2[step], abs=2e-5)
    assert "MoE fast path on 2 of 2 AutoEP layers" in (workspace / "ep2.log").read_text()
    assert "MoE fast path" not in (workspace / "ep2_stock.log").read_text()


def test_training_learns_logs_and_resumes_exactly(workspace):
    """An uninterrupted run against one killed with SIGKILL mid-run and run again with the same command."""
    steps = (
        "--train.steps",
        "12",
        "--output.checkpoint_interval",
        "4",
        "--output.eval_interval",
        "6",
        "--train.lr",
        "3e-3",
    )
    launch(workspace, "full", *steps, launcher="upcycle")  # the convenience command
    full = losses(workspace, "full")
    assert sorted(full) == list(range(1, 13))
    assert sum(full[s] for s in (10, 11, 12)) / 3 < sum(full[s] for s in (1, 2, 3)) / 3 - 0.1

    proc = launch(workspace, "killed", *steps, wait=False)
    log = workspace / "killed" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 6):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (workspace / "killed" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    launch(workspace, "killed", *steps)
    resumed = losses(workspace, "killed")
    assert "resumed from step_00000004" in (workspace / "killed.log").read_text()
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step

    # TensorBoard holds the scalars, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "full" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lm_loss",
        "train/aux_loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "val/loss",
        "val/perplexity",
        "moe/layer00/max_over_mean",
        "moe/layer01/dead_experts",
        "moe/layer00/router_entropy",
    ):
        assert tag in scalars, tag
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == list(range(1, 13))
    assert loss_events[0].value == pytest.approx(full[1], rel=1e-5)
    assert (workspace / "full" / "expert_load.png").stat().st_size > 1000


def test_sigterm_saves_and_exits_cleanly(workspace):
    proc = launch(
        workspace,
        "preempted",
        "--train.steps",
        "200",
        "--output.checkpoint_interval",
        "0",
        "--output.eval_interval",
        "0",
        wait=False,
    )
    log = workspace / "preempted" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    # SLURM signals every process of the job step; so does this, to the launcher's whole process group.
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 90
    while time.time() < deadline and process_group_alive(proc.pid):
        time.sleep(0.2)
    assert not process_group_alive(proc.pid), "ranks did not exit after SIGTERM"
    tag = (workspace / "preempted" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((workspace / "preempted" / "checkpoints" / tag / "run_state.json").read_text())
    assert 2 <= state["step"] < 200
    assert state["consumed_samples"] == state["step"] * 8
    assert "SIGTERM received" in (workspace / "preempted.log").read_text()

    # A different expert-parallel size on resume is refused before any process group starts.
    result = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--config",
            TINY_CONFIG,
            "--model.path",
            str(workspace / "moe"),
            "--data.path",
            str(workspace / "data"),
            "--output.dir",
            str(workspace / "preempted"),
            "--parallel.ep_size",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 2
    assert "parallel.ep_size was 2 and is now 1" in result.stderr
