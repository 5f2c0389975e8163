"""Resume with another topology (docs/design.md §6): EP size, world size or ZeRO stage changed between
runs; the resume goes through DeepSpeed's universal checkpoint, converted once and cached beside the
checkpoint, and continues exactly: the remaining steps' losses equal the uninterrupted run's.

The fast tests check the data order (a step's global batch does not depend on how it is split over ranks
and micro-batches) and the refusals; the slow one resumes copies of the session's reference run (2 ranks,
EP 2, ZeRO-2; tests/helpers/workspace.py) from its step 8 with EP 1 and with ZeRO-3, and on 1 rank from a
copy of the EP 1 run, reusing the conversion cached there.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from launching import launch, losses
from workspace import REFERENCE, copy_run, run_args

from data_prep.reader import DistributedBatches
from pipeline import checkpointing, universal_checkpoint
from pipeline.errors import UserError

# The reference run's schedule (2 warmup steps, then cosine): the learning rate differs at every resumed
# step. It checkpoints every 4 steps and keeps them all.
STEPS, SAVED_AT = REFERENCE["train.steps"], 8
TAG = f"step_{SAVED_AT:08d}"
REFERENCE_ARGS = run_args(REFERENCE)
REPORT: dict = {}


class Indices:
    """A stand-in dataset whose sample i is [i]."""

    def sample(self, i: int) -> np.ndarray:
        return np.array([i], dtype=np.int64)


def global_batches(world: int, micro_batch: int, steps: int, consumed: int = 0) -> list[list[list[int]]]:
    """Per step: the micro-batches of all ranks, in rank order, as DistributedBatches and the trainer
    split them."""
    readers = [DistributedBatches(Indices(), 8, r, world, consumed) for r in range(world)]
    out = []
    for _ in range(steps):
        micro = []
        for reader in readers:
            micro += [m[:, 0].tolist() for m in next(reader).split(micro_batch)]
        out.append(micro)
    return out


def test_global_batch_does_not_depend_on_the_split():
    """Every step sees the same samples, in the same micro-batches, for 1, 2, 4 or 8 ranks; resuming at a
    consumed count under another world size yields the batches that would have followed."""
    reference = global_batches(1, 2, 6)
    assert reference[1] == [[8, 9], [10, 11], [12, 13], [14, 15]]
    for world in (2, 4):
        assert global_batches(world, 2, 6) == reference
    assert global_batches(8, 1, 6) == [[[i] for i in sum(step, [])] for step in reference]
    assert global_batches(4, 2, 3, consumed=3 * 8) == reference[3:]


def write_state(out, step: int, topology: dict, config: dict) -> None:
    step_dir = checkpointing.checkpoint_root(out) / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    state = {"step": step, "consumed_samples": 8 * step, "config": config, "topology": topology}
    (step_dir / checkpointing.RUN_STATE).write_text(json.dumps(state))
    (step_dir.parent / checkpointing.LATEST).write_text(step_dir.name)


def test_topology_changes_are_allowed_and_data_order_changes_refused(tmp_path):
    config = {
        "train": {"global_batch": 8, "seq_len": 64, "seed": 1, "micro_batch": 2},
        "data": {"weights": None},
    }
    saved = {"parallel.ep_size": 2, "parallel.zero_stage": 2, "world_size": 2}
    write_state(tmp_path, 4, saved, config)
    now = {"parallel.ep_size": 1, "parallel.zero_stage": 3, "world_size": 1}
    tag, changed = checkpointing.resume_plan(tmp_path, config, now)
    assert tag == "step_00000004"
    assert changed == {"parallel.ep_size": (2, 1), "parallel.zero_stage": (2, 3), "world_size": (2, 1)}
    assert checkpointing.resume_plan(tmp_path, config, saved) == ("step_00000004", {})
    micro = {**config, "train": {**config["train"], "micro_batch": 1}}  # the split may change
    assert checkpointing.resume_plan(tmp_path, micro, saved)[0] == "step_00000004"
    for key, value in (("global_batch", 16), ("seq_len", 32), ("seed", 2)):
        other = {**config, "train": {**config["train"], key: value}}
        with pytest.raises(UserError, match=f"train.{key} was {config['train'][key]} and is now {value}"):
            checkpointing.resume_plan(tmp_path, other, now)
    with pytest.raises(UserError, match=r"data.weights was None and is now \[1.0\]"):
        checkpointing.resume_plan(tmp_path, {**config, "data": {"weights": [1.0]}}, now)


def test_zero3_to_zero12_is_refused(tmp_path):
    """DeepSpeed's ZeRO-1/2 loader cannot read a universal checkpoint converted from ZeRO-3 (tried: no
    ds_version in its optimizer_state.pt, then flat tensors where it indexes shaped ones)."""
    config = {"train": {"global_batch": 8, "seq_len": 64, "seed": 1}, "data": {"weights": None}}
    write_state(tmp_path, 4, {"parallel.ep_size": 2, "parallel.zero_stage": 3, "world_size": 2}, config)
    ok = {"parallel.ep_size": 1, "parallel.zero_stage": 3, "world_size": 1}
    assert checkpointing.resume_plan(tmp_path, config, ok)[1] == {
        "parallel.ep_size": (2, 1),
        "world_size": (2, 1),
    }
    with pytest.raises(UserError, match="with parallel.zero_stage 2: it was saved with ZeRO-3"):
        checkpointing.resume_plan(tmp_path, config, {**ok, "parallel.zero_stage": 2})


# ---- the real thing: 2 CPU ranks, DeepSpeed, AutoEP -----------------------------------------------------


def learning_rates(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows}


def relative_mismatch(resumed: dict, full: dict) -> float:
    return max(abs(resumed[s] - full[s]) / abs(full[s]) for s in range(SAVED_AT + 1, STEPS + 1))


def resume_copy(workspace, source, name: str, *overrides: str, launcher: str = "deepspeed"):
    """Copy run `source` (the reference run, or a resumed copy of it) to `name` as it was when step SAVED_AT
    was saved, then run the reference run's command on it with `overrides`; its losses."""
    copy_run(source, workspace / name, at_step=SAVED_AT)
    started = time.monotonic()
    launch(workspace, name, *REFERENCE_ARGS, *overrides, launcher=launcher)
    REPORT[f"{name}_run_s"] = round(time.monotonic() - started, 1)
    return losses(workspace, name)


@pytest.mark.slow
def test_resume_under_another_topology_continues_exactly(train_workspace, reference_run):
    """From the reference run's step 8: EP 1 (converting it to DeepSpeed's universal checkpoint), ZeRO-3
    (converting its own copy), and one rank from a copy of the EP 1 run, whose universal checkpoint is
    cached beside step 8 and read again instead of converted twice. (A moved run directory resuming at
    the same topology: tests/test_train.py.)"""
    ws, full = train_workspace, reference_run.losses
    assert reference_run.args == REFERENCE_ARGS
    assert sorted(full) == list(range(1, STEPS + 1))
    step_dir = reference_run.dir / "checkpoints" / f"step_{SAVED_AT:08d}"
    REPORT["checkpoint_mib"] = round(sum(f.stat().st_size for f in step_dir.rglob("*")) / 2**20, 2)

    cases = {
        "ep1": (reference_run.dir, ("--parallel.ep_size", "1", "--parallel.zero_stage", "2"), "deepspeed"),
        "zero3": (reference_run.dir, ("--parallel.ep_size", "2", "--parallel.zero_stage", "3"), "deepspeed"),
        "one_rank": (ws / "ep1", ("--parallel.ep_size", "1", "--parallel.zero_stage", "2"), "upcycle_1gpu"),
    }
    for name, (source, overrides, launcher) in cases.items():
        resumed = resume_copy(ws, source, name, *overrides, launcher=launcher)
        log = (ws / f"{name}.log").read_text()
        if source == reference_run.dir:
            assert f"converting {TAG} to DeepSpeed's universal checkpoint" in log, name
        else:  # converted once: the copy of the EP 1 run reuses the conversion cached beside its step 8
            assert f"converting {TAG}" not in log and "(converted earlier)" in log, name
        resumed_from = f"resumed from {TAG} through its universal checkpoint: step {SAVED_AT}, {SAVED_AT * 8}"
        assert f"{resumed_from} samples" in log  # 8 samples a step (train.global_batch)
        REPORT[f"{name}_rel_mismatch"] = relative_mismatch(resumed, full)
        assert learning_rates(ws / name) == learning_rates(reference_run.dir), name  # the schedule's step
        universal = ws / name / "checkpoints" / f"step_{SAVED_AT:08d}" / universal_checkpoint.UNIVERSAL
        REPORT[f"{name}_universal_mib"] = round(
            sum(f.stat().st_size for f in universal.rglob("*")) / 2**20, 2
        )
        assert REPORT[f"{name}_rel_mismatch"] <= 1e-5, (name, REPORT)
        # The next save is an ordinary checkpoint under the new topology.
        state = checkpointing.read_run_state(ws / name / "checkpoints" / f"step_{STEPS:08d}")
        assert state["topology"]["parallel.ep_size"] == int(overrides[1])
        assert state["topology"]["world_size"] == (1 if launcher == "upcycle_1gpu" else 2)
    print("\nelastic resume:", json.dumps(REPORT, indent=1))
