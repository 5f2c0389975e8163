"""Resume paths under another topology that tests/test_elastic.py does not take (docs/design.md §6):
ZeRO-3 -> ZeRO-3 under another EP size and world size, bf16, the expert bias of moe.balance bias, and
rank 0 dying while it converts the checkpoint to DeepSpeed's universal format.

Each base run trains STEPS steps on 2 CPU ranks and saves at SAVED_AT; a resumed run is a copy of it as it
was at SAVED_AT, run again under the new topology: its steps after SAVED_AT must be the base run's.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from launching import REPO, TINY_CONFIG, TRAIN, free_port, launch, losses, run_paths

from data_prep.faults import FAULT_ENV, fault_spec
from pipeline import checkpointing, universal_checkpoint
from pipeline.ds_adapter import remove_leftover_shm

pytestmark = pytest.mark.slow

STEPS, SAVED_AT = 6, 3
TAG = f"step_{SAVED_AT:08d}"
# tiny_cpu's schedule (2 warmup steps, then cosine): the learning rate differs at every resumed step.
COMMON = ("--train.steps", str(STEPS), "--output.checkpoint_interval", str(SAVED_AT),
          "--output.eval_interval", "0", "--output.keep_checkpoints", "0")  # fmt: skip
EP1, EP2 = ("--parallel.ep_size", "1"), ("--parallel.ep_size", "2")
ZERO3 = ("--parallel.zero_stage", "3")
BF16 = ("--train.precision", "bf16")
# 10x the default rate: at step 3 the bias is nonzero (it is all zero again after step 2 on a fresh router).
BIAS = ("--moe.balance", "bias", "--moe.bias_update_rate", "1e-2")
FP32_TOLERANCE = 1e-5  # test_elastic's: another reduction order (measured 0 to 2e-8)
# bf16: measured 4.6e-6 (one rank, EP 1) against a 2-rank EP 2 run; not restoring Adam's state moves the
# losses by 2.7e-3, resuming one step off by 7.3e-3.
BF16_TOLERANCE = 1e-4
KILL_TIMEOUT_S = 30  # parallel.timeout_s of the run whose rank 0 dies converting
STOP_SLACK_S = 30  # beyond it: the error path and the interpreter's exit on a loaded machine
REPORT: dict = {}  # measurements, printed at the end of the module (pytest -s)


def relative_mismatch(resumed: dict, full: dict) -> float:
    return max(abs(resumed[s] - full[s]) / abs(full[s]) for s in range(SAVED_AT + 1, STEPS + 1))


def log_rows(workspace, out: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workspace / out / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def train(workspace, out: str, *overrides: str, launcher: str = "deepspeed") -> dict[int, float]:
    started = time.monotonic()
    launch(workspace, out, *COMMON, *overrides, launcher=launcher)
    REPORT[f"{out}_s"] = round(time.monotonic() - started, 1)
    return losses(workspace, out)


def copy_at_saved(workspace, base: str, out: str):
    """Run `base` copied to `out` as it was right after step SAVED_AT was saved; its checkpoint folder."""
    shutil.copytree(workspace / base, workspace / out)
    root = workspace / out / "checkpoints"
    shutil.rmtree(root / f"step_{STEPS:08d}")
    (root / checkpointing.LATEST).write_text(TAG)
    rows = (workspace / out / "train_log.jsonl").read_text().splitlines()[:SAVED_AT]
    (workspace / out / "train_log.jsonl").write_text("".join(r + "\n" for r in rows))
    return root


def resume(workspace, base: str, out: str, *overrides: str, launcher: str = "deepspeed") -> dict:
    copy_at_saved(workspace, base, out)
    return train(workspace, out, *overrides, launcher=launcher)


def assert_resumed_through_universal(workspace, out: str, log: str | None = None) -> None:
    log = log if log is not None else (workspace / f"{out}.log").read_text()
    assert f"converting {TAG} to DeepSpeed's universal checkpoint" in log, log[-3000:]
    assert f"resumed from {TAG} through its universal checkpoint: step {SAVED_AT}, 24 samples" in log
    assert sorted(losses(workspace, out)) == list(range(1, STEPS + 1))


def saved_topology(workspace, out: str) -> dict:
    """The topology of the run's next save: an ordinary checkpoint under the new topology."""
    return checkpointing.read_run_state(workspace / out / "checkpoints" / f"step_{STEPS:08d}")["topology"]


# ---- rank 0 dies converting: ranks started one by one, as on nodes that each run their own ---------------


def start_ranks(workspace, out: str, *overrides: str, fault: str | None = None):
    """The run's 2 ranks as 2 separate processes with torch's environment variables (srun-style: no
    launcher above both that would kill the survivor when a rank dies). ([procs], the rendezvous port)."""
    port = free_port()
    cmd = [sys.executable, TRAIN, "--config", TINY_CONFIG, *run_paths(workspace, out), *COMMON, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}  # fmt: skip
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    procs = []
    for rank in (0, 1):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = open(workspace / f"{out}.rank{rank}.log", "a")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env))
    return procs, port


def stop_all(procs, port: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    remove_leftover_shm(port)  # a killed rank cannot unlink its DeepSpeed shm segment


def converters_after(step_dir, deadline: float) -> list[int]:
    """Pids of DeepSpeed converters still reading `step_dir` at `deadline` (none as soon as none is)."""
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(step_dir) in (p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def rank_log(workspace, out: str, rank: int) -> str:
    return (workspace / f"{out}.rank{rank}.log").read_text()


@pytest.fixture(scope="module")
def zero3(train_workspace):
    """The ZeRO-3 EP 2 base run: (workspace, its losses)."""
    return train_workspace, train(train_workspace, "paths_zero3", *ZERO3, *EP2)


@pytest.fixture(scope="module")
def killed_conversion(zero3):
    """A copy of the ZeRO-3 run resumed as EP 1 on 2 ranks whose rank 0 is killed (fault seam) while
    DeepSpeed's converter runs; then the same command again. What was observed, for the tests."""
    workspace, _ = zero3
    out, overrides = "paths_zero3_ep1", (*ZERO3, *EP1, "--parallel.timeout_s", str(KILL_TIMEOUT_S))
    copy_at_saved(workspace, "paths_zero3", out)
    fault = fault_spec(universal_checkpoint.CONVERT_FAULT, SAVED_AT, "kill")
    procs, port = start_ranks(workspace, out, *overrides, fault=fault)
    seen = {"rank0_pid": procs[0].pid}
    step_dir = workspace / out / "checkpoints" / TAG
    try:
        seen["rank0_code"] = procs[0].wait(timeout=240)
        died = time.monotonic()
        seen["converters_left"] = converters_after(step_dir, deadline=died + 5)
        seen["rank1_code"] = procs[1].wait(timeout=KILL_TIMEOUT_S + STOP_SLACK_S)
        seen["rank1_stop_s"] = REPORT["rank1_stop_after_rank0_died_s"] = round(time.monotonic() - died, 1)
    finally:
        stop_all(procs, port)
    seen["step_dir_after_kill"] = sorted(p.name for p in step_dir.iterdir())
    REPORT["universal_files_after_kill"] = [n for n in seen["step_dir_after_kill"] if "universal" in n]
    seen["damage_after_kill"] = checkpointing.damage(step_dir)
    started = time.monotonic()
    procs, port = start_ranks(workspace, out, *overrides)
    try:
        seen["rerun_codes"] = [proc.wait(timeout=300) for proc in procs]
    finally:
        stop_all(procs, port)
    REPORT[f"{out}_rerun_s"] = round(time.monotonic() - started, 1)
    return workspace, out, seen


# ---- 1. ZeRO-3 -> ZeRO-3 under another EP size and world size ---------------------------------------------


def test_zero3_resumes_under_another_ep_size_and_world_size(zero3, killed_conversion):
    """ZeRO-3 EP 2 on 2 ranks, resumed as ZeRO-3 EP 1 on 2 ranks (the rerun after the killed conversion)
    and on 1 rank: the base run's learning rates and losses."""
    workspace, full = zero3
    _, ep1, seen = killed_conversion
    assert seen["rerun_codes"] == [0, 0], rank_log(workspace, ep1, 0)[-3000:]
    one = resume(workspace, "paths_zero3", "paths_zero3_one", *ZERO3, *EP1, launcher="upcycle_1gpu")
    resumed = {ep1: losses(workspace, ep1), "paths_zero3_one": one}
    logs = {ep1: rank_log(workspace, ep1, 0), "paths_zero3_one": None}  # None: the launcher's log
    for out, world in ((ep1, 2), ("paths_zero3_one", 1)):
        assert_resumed_through_universal(workspace, out, logs[out])
        lrs = {s: row["lr"] for s, row in log_rows(workspace, out).items()}
        assert lrs == {s: row["lr"] for s, row in log_rows(workspace, "paths_zero3").items()}, out
        REPORT[f"{out}_rel_mismatch"] = relative_mismatch(resumed[out], full)
        assert REPORT[f"{out}_rel_mismatch"] <= FP32_TOLERANCE, (out, REPORT)
        topology = {"parallel.ep_size": 1, "parallel.zero_stage": 3, "world_size": world}
        assert saved_topology(workspace, out) == topology


# ---- 2. bf16 ------------------------------------------------------------------------------------------


def zero_adam_state(universal) -> None:
    """What a resume that lost Adam's state would train with: the moments and step of every parameter in
    a universal checkpoint set to a fresh optimizer's (zero)."""
    for path in glob.glob(str(universal / "zero" / "*" / "exp_avg*.pt")):
        state = torch.load(path, weights_only=False)  # {"param": tensor, "cat_dim": int}, ours
        state["param"].zero_()
        torch.save(state, path)
    for path in glob.glob(str(universal / "zero" / "*" / "step.pt")):
        torch.save(torch.zeros_like(torch.load(path, weights_only=True)), path)


def test_bf16_resume_under_another_topology_continues_within_rounding(train_workspace):
    """bf16 ZeRO-2 EP 2 on 2 ranks, resumed as EP 1 on 1 rank: within BF16_TOLERANCE of the base run, and
    a resume that lost Adam's state (the same conversion, moments zeroed) or is one step off is not."""
    workspace = train_workspace
    full = train(workspace, "paths_bf16", *BF16, *EP2)
    resumed = resume(workspace, "paths_bf16", "paths_bf16_one", *BF16, *EP1, launcher="upcycle_1gpu")
    assert_resumed_through_universal(workspace, "paths_bf16_one")
    REPORT["bf16_rel_mismatch"] = relative_mismatch(resumed, full)
    assert REPORT["bf16_rel_mismatch"] <= BF16_TOLERANCE, REPORT
    # The first resumed step's loss comes from the restored weights alone (measured: equal).
    assert abs(resumed[SAVED_AT + 1] / full[SAVED_AT + 1] - 1) <= 1e-7, REPORT

    root = copy_at_saved(workspace, "paths_bf16", "paths_bf16_no_adam")
    universal = universal_checkpoint.universal_dir(root / TAG)
    shutil.copytree(universal_checkpoint.universal_dir(workspace / "paths_bf16_one" / "checkpoints" / TAG),
                    universal)  # fmt: skip
    zero_adam_state(universal)
    broken = train(workspace, "paths_bf16_no_adam", *BF16, *EP1, launcher="upcycle_1gpu")
    assert "(converted earlier)" in (workspace / "paths_bf16_no_adam.log").read_text()
    REPORT["bf16_without_adam_state_rel_mismatch"] = relative_mismatch(broken, full)
    shifted = {s: resumed[s - 1] for s in range(SAVED_AT + 1, STEPS + 1)}  # one step off
    REPORT["bf16_one_step_off_rel_mismatch"] = relative_mismatch(shifted, full)
    for name in ("bf16_without_adam_state_rel_mismatch", "bf16_one_step_off_rel_mismatch"):
        assert REPORT[name] > 10 * BF16_TOLERANCE, REPORT


# ---- 3. the expert bias across a topology change -------------------------------------------------------


def checkpoint_bias(workspace, out: str, tag: str) -> torch.Tensor:
    """[layer, expert] expert bias from a ZeRO-1/2 checkpoint's model-state file (whole, on rank 0's)."""
    path = workspace / out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return torch.stack([module[f"model.layers.{i}.mlp.expert_bias"] for i in (0, 1)])


def test_expert_bias_is_restored_across_a_topology_change(train_workspace):
    """moe.balance bias, EP 2 -> EP 1 on 2 ranks: DeepSpeed's universal load skips module buffers
    (checkpointing._restore_buffers copies them back). The bias logged after every resumed step and saved
    at the end equals the base run's, bit for bit; and the losses continue."""
    workspace = train_workspace
    full = train(workspace, "paths_bias", *BIAS, *EP2)
    saved = checkpoint_bias(workspace, "paths_bias", TAG)
    assert saved.abs().min() > 0, saved  # every entry: a bias lost on resume cannot pass
    resumed = resume(workspace, "paths_bias", "paths_bias_ep1", *BIAS, *EP1)
    assert_resumed_through_universal(workspace, "paths_bias_ep1")
    final = f"step_{STEPS:08d}"
    assert torch.equal(checkpoint_bias(workspace, "paths_bias_ep1", final),
                       checkpoint_bias(workspace, "paths_bias", final))  # fmt: skip
    base_rows, rows = log_rows(workspace, "paths_bias"), log_rows(workspace, "paths_bias_ep1")
    for step in range(SAVED_AT + 1, STEPS + 1):
        for key in ("expert_bias_min", "expert_bias_max"):
            assert rows[step][key] == base_rows[step][key], (step, key)
    REPORT["bias_rel_mismatch"] = relative_mismatch(resumed, full)
    assert REPORT["bias_rel_mismatch"] <= FP32_TOLERANCE, REPORT
    assert saved_topology(workspace, "paths_bias_ep1")["parallel.ep_size"] == 1


# ---- 4. rank 0 dies during the conversion ------------------------------------------------------------


def test_waiting_ranks_stop_when_rank0_dies_converting(killed_conversion):
    """The other rank stops by itself, exit code 2, within parallel.timeout_s of rank 0's death (its
    heartbeat stops), naming rank 0, the checkpoint and what to do; DeepSpeed's converter dies with rank 0,
    the checkpoint is untouched, and the same command then converts afresh (test_zero3_resumes_... checks
    what it trains)."""
    workspace, out, seen = killed_conversion
    assert seen["rank0_code"] == -signal.SIGKILL, rank_log(workspace, out, 0)[-3000:]
    log1 = rank_log(workspace, out, 1)
    assert seen["rank1_code"] == 2, log1[-3000:]
    assert KILL_TIMEOUT_S - 2 < seen["rank1_stop_s"] < KILL_TIMEOUT_S + STOP_SLACK_S, seen
    step_dir = workspace / out / "checkpoints" / TAG
    expected = (
        f"train (rank 1): error: gave up waiting for rank 0 (pid {seen['rank0_pid']} on "
        f"{socket.gethostname()}) to convert checkpoint {step_dir} to DeepSpeed's universal checkpoint: "
        f"its heartbeat {step_dir / universal_checkpoint.HEARTBEAT} has not changed for {KILL_TIMEOUT_S} s "
        "(parallel.timeout_s)"
    )
    assert expected in log1, log1[-3000:]
    assert f"run the same command again to resume from {TAG}" in log1
    assert "Traceback" not in log1
    # Killed while DeepSpeed's converter ran: the converter died with it, no universal copy was made
    # (at most universal.tmp), the checkpoint is intact.
    assert seen["converters_left"] == [], seen
    assert universal_checkpoint.UNIVERSAL not in seen["step_dir_after_kill"], seen
    assert seen["damage_after_kill"] == []
    log0 = rank_log(workspace, out, 0)
    assert log0.count(f"converting {TAG} to DeepSpeed's universal checkpoint") == 2, log0[-3000:]
    assert not (step_dir / universal_checkpoint.HEARTBEAT).exists()  # removed after the conversion
    assert (step_dir / universal_checkpoint.UNIVERSAL / universal_checkpoint.UNIVERSAL_DONE).is_file()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nresume paths:", json.dumps(REPORT, indent=1))
