"""Pre-emption: the launching process outlives its ranks' last save.

SLURM ends a job step when the step's main process exits and kills what is left, so after SIGTERM the
launching process (`upcycle train`, `launch/node.sh`, `launch/slurm.sbatch`) must stay until every rank
has saved and exited. The DeepSpeed runner alone dies 0.05 s after SIGTERM, and its per-node launcher
SIGKILLs the ranks 30 s after it: `pipeline.launcher.supervise` takes both out of the way.

Each test checks the moment the launching process exits: `latest` already names the checkpoint of the
stop, and no process of the group is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import (
    REPO,
    TINY_CONFIG,
    free_port,
    launch,
    losses,
    process_group_alive,
    run_paths,
    wait_for_steps,
)

RUN = ("--train.steps", "200", "--train.schedule", "constant", "--output.checkpoint_interval", "0",
       "--output.eval_interval", "0")  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def stop_and_time(proc: subprocess.Popen, timeout: float = 120) -> float:
    """SIGTERM to the whole process group (what SLURM does); seconds until the launching process exits."""
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - started


def saved_at_stop(workspace: Path, out: str) -> int:
    """The step `latest` names; it must be the step the run stopped at (the last one logged)."""
    tag = (workspace / out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((workspace / out / "checkpoints" / tag / "run_state.json").read_text())
    assert tag == f"step_{state['step']:08d}" and 2 <= state["step"] < 200
    assert max(losses(workspace, out)) == state["step"], "a step after the saved one was logged"
    return state["step"]


# ---- the supervisor against a stand-in launcher (seconds, no DeepSpeed) -----------------------------------
FAKE_LAUNCHER = """
import signal, subprocess, sys
# Like DeepSpeed's per-node launcher: starts the rank; on SIGTERM it terminates the rank and SIGKILLs it
# after a grace period (30 s there, 1 s here).
rank = subprocess.Popen([sys.executable, *sys.argv[1:]])
def on_term(signum, frame):
    rank.terminate()
    try:
        rank.wait(timeout=1)
    except subprocess.TimeoutExpired:
        rank.kill()
    sys.exit(1)
signal.signal(signal.SIGTERM, on_term)
sys.exit(rank.wait())
"""
FAKE_RANK = """
import signal, sys, time
from pathlib import Path
out, save_s = Path(sys.argv[1]), float(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, (lambda s, f: stop.append(s)) if save_s >= 0 else signal.SIG_IGN)
(out / "ready").write_text("")
while not stop:
    time.sleep(0.05)
time.sleep(save_s)  # a save that outlasts the launcher's grace period
(out / "saved").write_text("")
"""


def supervised_fake(tmp_path: Path, save_s: float, stop_timeout: float) -> subprocess.Popen:
    """The supervisor running `python -m deepspeed.launcher.launch` (a stand-in package) and one rank."""
    package = tmp_path / "fake" / "deepspeed" / "launcher"
    package.mkdir(parents=True)
    for init in (package / "__init__.py", package.parent / "__init__.py"):
        init.write_text("")
    (package / "launch.py").write_text(FAKE_LAUNCHER)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    rank = [str(tmp_path / "rank.py"), str(tmp_path), str(save_s)]
    fake = [sys.executable, "-m", "deepspeed.launcher.launch", *rank]
    cmd = [sys.executable, "-m", "pipeline.launcher", "--stop-timeout", str(stop_timeout), "--", *fake]
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'fake'}:{REPO}"}
    log = open(tmp_path / "supervisor.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "supervisor.log").read_text()
        time.sleep(0.05)
    return proc


def test_supervisor_keeps_a_long_save_from_the_launchers_kill(tmp_path):
    """The rank saves for 3 s after SIGTERM, its launcher would SIGKILL it after 1 s: the save completes
    and the supervisor exits only after it, with the rank's exit code 0."""
    proc = supervised_fake(tmp_path, save_s=3, stop_timeout=60)
    waited = stop_and_time(proc)
    assert proc.returncode == 0, (tmp_path / "supervisor.log").read_text()
    assert (tmp_path / "saved").exists() and waited >= 3
    assert not process_group_alive(proc.pid)
    assert "every rank has exited" in (tmp_path / "supervisor.log").read_text()


def test_supervisor_stop_timeout_kills_what_is_left(tmp_path):
    proc = supervised_fake(tmp_path, save_s=-1, stop_timeout=2)  # the rank ignores SIGTERM
    waited = stop_and_time(proc)
    assert proc.returncode == 1 and 2 <= waited < 30
    assert not process_group_alive(proc.pid)
    assert "killed them (--stop-timeout)" in (tmp_path / "supervisor.log").read_text()


def test_supervisor_passes_the_exit_code_through():
    cmd = [sys.executable, "-m", "pipeline.launcher", "--", sys.executable, "-c", "raise SystemExit(3)"]
    assert subprocess.run(cmd, env=ENV, timeout=60).returncode == 3


# ---- real runs: 2 CPU ranks ------------------------------------------------------------------------------
@pytest.mark.slow
def test_upcycle_train_outlives_the_ranks_save_and_the_rerun_resumes_there(train_workspace):
    workspace = train_workspace
    proc = launch(workspace, "preempted", *RUN, launcher="upcycle", wait=False)
    wait_for_steps(workspace, "preempted", 2, proc)
    waited = stop_and_time(proc)
    # The moment `upcycle train` has exited:
    assert not process_group_alive(proc.pid), "a rank outlived the launching process"
    step = saved_at_stop(workspace, "preempted")
    assert proc.returncode == 0
    log = (workspace / "preempted.log").read_text()
    assert f"SIGTERM received: saving at step {step}" in log and "every rank has exited" in log
    print(f"\nupcycle train exited {waited:.1f} s after SIGTERM, with the checkpoint of step {step}")

    more = ("--train.steps", str(step + 2))
    launch(workspace, "preempted", *RUN, *more, launcher="upcycle")  # the same command again
    assert f"resumed from step_{step:08d}" in (workspace / "preempted.log").read_text()
    assert max(losses(workspace, "preempted")) == step + 2


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node: drop srun's options, run the task as node 0 (it replaces this process, as the task's
# main process would be under slurmstepd)
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo localhost  # scontrol show hostnames NODELIST
"""


@pytest.mark.slow
def test_slurm_sbatch_and_node_sh_outlive_the_ranks_save(train_workspace, tmp_path):
    """launch/slurm.sbatch as sbatch runs it, with srun and scontrol stood in for on one node: the whole
    chain (batch script, srun task = launch/node.sh, DeepSpeed launcher, ranks) gets SIGTERM."""
    workspace = train_workspace
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    bin_dir.mkdir()
    submit.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (submit / "launch").symlink_to(REPO / "launch")  # sbatch runs in the submit directory
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node0")
    env.update(SLURM_GPUS_PER_NODE="2", SLURM_SUBMIT_DIR=str(submit), MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), TINY_CONFIG, *run_paths(workspace, "slurm"), *RUN]
    with open(workspace / "slurm.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=submit, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    wait_for_steps(workspace, "slurm", 2, proc)
    waited = stop_and_time(proc)
    assert not process_group_alive(proc.pid), "a rank outlived the batch script"
    step = saved_at_stop(workspace, "slurm")
    log = (workspace / "slurm.log").read_text()
    assert proc.returncode == 0, (proc.returncode, log[-3000:])
    assert "slurm.sbatch" in log and "node.sh (node 0): every rank has exited" in log
    print(f"\nslurm.sbatch exited {waited:.1f} s after SIGTERM, with the checkpoint of step {step}")
