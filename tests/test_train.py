"""DeepSpeed training on 2 CPU ranks (gloo), real launcher and real processes.

Each launch costs ~20 s of start-up on 2 cores, so the runs are shared between assertions where the
assertions are independent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from launching import REPO, TINY_CONFIG, TRAIN, launch, losses, process_group_alive, run_paths

pytestmark = pytest.mark.slow


def test_expert_parallel_is_the_same_math(train_workspace):
    """EP=2 (experts split across the ranks, all-to-all) and EP=1 give the same losses; so does ZeRO-3,
    and so does DeepSpeed's stock AutoEP forward in place of the fast path (`--moe.fast_path false`).

    The runs also go through the three launchers: deepspeed, torchrun and mpirun.
    """
    common = ("--train.steps", "3", "--output.checkpoint_interval", "0", "--output.eval_interval", "0")
    launch(train_workspace, "ep2", "--parallel.ep_size", "2", *common)
    launch(train_workspace, "ep1", "--parallel.ep_size", "1", *common, launcher="torchrun")
    zero3 = ("--parallel.ep_size", "2", "--parallel.zero_stage", "3")
    launch(train_workspace, "ep2_zero3", *zero3, *common, launcher="mpirun")
    launch(train_workspace, "ep2_stock", "--parallel.ep_size", "2", "--moe.fast_path", "false", *common)
    runs = ("ep2", "ep1", "ep2_zero3", "ep2_stock")
    ep2, ep1, zero3, stock = (losses(train_workspace, name) for name in runs)
    assert sorted(ep2) == [1, 2, 3]
    for step in ep2:
        assert ep1[step] == pytest.approx(ep2[step], abs=2e-5)
        assert zero3[step] == pytest.approx(ep2[step], abs=2e-5)
        assert stock[step] == pytest.approx(ep2[step], abs=2e-5)
    assert "MoE fast path on 2 of 2 AutoEP layers" in (train_workspace / "ep2.log").read_text()
    assert "MoE fast path" not in (train_workspace / "ep2_stock.log").read_text()


def test_training_learns_logs_and_resumes_exactly(train_workspace, reference_run):
    """The session's uninterrupted reference run (`upcycle train`, the convenience command) against one
    killed with SIGKILL mid-run and run again with the same command."""
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
    launch(train_workspace, "killed", *reference_run.args)
    resumed = losses(train_workspace, "killed")
    assert "resumed from step_00000004" in (train_workspace / "killed.log").read_text()
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
