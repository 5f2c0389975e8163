"""DeepSpeed training on 2 CPU ranks (gloo), real launcher and real processes.

Each launch costs ~20 s of start-up on 2 cores, so the runs are shared between assertions where the
assertions are independent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from launching import REPO, TINY_CONFIG, TRAIN, launch, losses, process_group_alive, run_paths
from workspace import CLIPPED, run_args

pytestmark = pytest.mark.slow


def test_expert_parallel_is_the_same_math(train_workspace, clipped_runs):
    """EP=2 (experts split across the ranks, all-to-all) and EP=1 give the same losses; so does ZeRO-3,
    and so does DeepSpeed's stock AutoEP forward in place of the fast path (`--moe.fast_path false`).

    The runs are the fp32 clipped runs of tests/test_grad_clip.py (workspace.CLIPPED: every step clips, so
    a wrong norm would show here too), and go through the three launchers: deepspeed (EP 2), torchrun
    (EP 1) and mpirun (ZeRO-3).
    """
    ep2, ep1, zero3 = (clipped_runs("fp32", stage, ep) for stage, ep in ((2, 2), (2, 1), (3, 2)))
    launch(
        train_workspace,
        "ep2_stock",
        *run_args(CLIPPED),
        "--parallel.ep_size",
        "2",
        "--moe.fast_path",
        "false",
    )
    stock = train_workspace / "ep2_stock"
    ep2_losses, ep1_losses, zero3_losses, stock_losses = (
        losses(run.parent, run.name) for run in (ep2, ep1, zero3, stock)
    )
    assert sorted(ep2_losses) == list(range(1, CLIPPED["train.steps"] + 1))
    for step in ep2_losses:
        assert ep1_losses[step] == pytest.approx(ep2_losses[step], abs=2e-5)
        assert zero3_losses[step] == pytest.approx(ep2_losses[step], abs=2e-5)
        assert stock_losses[step] == pytest.approx(ep2_losses[step], abs=2e-5)
    launched_by = {run: run.with_name(f"{run.name}.log").read_text() for run in (ep2, ep1, zero3)}
    assert "deepspeed.launcher.launch" in launched_by[ep2]
    assert "MoE fast path on 2 of 2 AutoEP layers" in launched_by[ep2]
    assert "MoE fast path" not in (train_workspace / "ep2_stock.log").read_text()


def test_training_learns_logs_and_resumes_exactly(train_workspace, reference_run):
    """The session's uninterrupted reference run (`upcycle train`, the convenience command) against one
    killed with SIGKILL mid-run, moved to another directory and run again there with the same command
    (nothing in a run directory records an absolute path)."""
    full = reference_run.losses
    assert sorted(full) == list(range(1, 13))
    assert sum(full[s] for s in (10, 11, 12)) / 3 < sum(full[s] for s in (1, 2, 3)) / 3 - 0.1

    proc = launch(train_workspace, "killed", *reference_run.args, wait=False)
    log = train_workspace / "killed" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 6):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (train_workspace / "killed" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    moved = "elsewhere/killed"
    (train_workspace / "elsewhere").mkdir()
    shutil.move(train_workspace / "killed", train_workspace / moved)
    launch(train_workspace, moved, *reference_run.args)
    resumed = losses(train_workspace, moved)
    log = (train_workspace / f"{moved}.log").read_text()
    assert "resumed from step_00000004: step 4" in log and "through its universal" not in log
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step

    # TensorBoard holds the scalars, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run.dir / "tensorboard"))
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
    assert (reference_run.dir / "expert_load.png").stat().st_size > 1000


def test_sigterm_saves_and_exits_cleanly(train_workspace):
    proc = launch(
        train_workspace,
        "preempted",
        "--train.steps",
        "200",
        "--output.checkpoint_interval",
        "0",
        "--output.eval_interval",
        "0",
        wait=False,
    )
    log = train_workspace / "preempted" / "train_log.jsonl"
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
    tag = (train_workspace / "preempted" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((train_workspace / "preempted" / "checkpoints" / tag / "run_state.json").read_text())
    assert 2 <= state["step"] < 200
    assert state["consumed_samples"] == state["step"] * 8
    assert "SIGTERM received" in (train_workspace / "preempted.log").read_text()

    # A different global batch on resume (it fixes the data order) is refused before any process group
    # starts, naming the key; a different topology is allowed (tests/test_elastic.py).
    result = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--config",
            TINY_CONFIG,
            *run_paths(train_workspace, "preempted"),
            "--train.global_batch",
            "16",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.global_batch was 8 and is now 16" in result.stderr
