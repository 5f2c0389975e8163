"""A damaged checkpoint is detected before DeepSpeed unpickles it (docs/design.md §6).

Each checkpoint's run_state.json records every file's size and sha256 at save. A truncated, corrupted or
missing file is named; the run falls back to the previous intact checkpoint (the damaged one is kept as
damaged_step_*) or, with `--output.on_damaged_checkpoint refuse`, stops. The fast tests drive
`pipeline.checkpointing` on one gloo rank with a stand-in engine; the slow one damages a real 2-rank
checkpoint and checks that the rerun reproduces the uninterrupted losses.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launching import launch, losses
from workspace import copy_run

from pipeline import checkpointing
from pipeline.cli import main as upcycle
from pipeline.errors import UserError

TOPOLOGY = {"parallel.ep_size": 1, "parallel.zero_stage": 2, "world_size": 1}
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


class StandInEngine:
    """Writes like DeepSpeed: state files through its checkpoint engine's `save`, one file around it."""

    def __init__(self):
        self.checkpoint_engine = types.SimpleNamespace(save=lambda state, path: torch.save(state, path))

    def save_checkpoint(self, save_dir, tag, save_latest):
        step_dir = Path(save_dir) / tag
        step_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": torch.arange(1000.0)}, str(step_dir / MODEL))
        self.checkpoint_engine.save({"m": torch.ones(5000)}, str(step_dir / OPTIM))
        (step_dir / "notes.txt").write_text("written around the checkpoint engine")


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield tmp_path / "out"
    dist.destroy_process_group()


def save(out, *steps, keep=2):
    for step in steps:
        checkpointing.save(StandInEngine(), out, step, {"step": step, "topology": TOPOLOGY}, keep)
    return checkpointing.checkpoint_root(out)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_records_size_and_sha256_of_every_file(one_rank):
    step_dir = save(one_rank, 2) / "step_00000002"
    files = checkpointing.read_run_state(step_dir)["files"]
    assert sorted(files) == sorted([MODEL, OPTIM, "notes.txt", "rng_rank0.pt"])
    for name, record in files.items():
        data = (step_dir / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert checkpointing.damage(step_dir) == []


@pytest.mark.parametrize("how", ["truncated", "corrupted", "missing"])
def test_damage_names_the_file(one_rank, how):
    step_dir = save(one_rank, 2) / "step_00000002"
    {"truncated": truncate, "corrupted": flip_a_byte, "missing": lambda p: p.unlink()}[how](step_dir / OPTIM)
    (problem,) = checkpointing.damage(step_dir)
    assert problem.startswith(f"{OPTIM}: ") and how in problem
    # Sizes alone (the check before any process group) catch all but a same-size corruption.
    assert bool(checkpointing.damage(step_dir, hashes=False)) == (how != "corrupted")
    with pytest.raises(UserError, match=f"checkpoint {step_dir} is damaged, not reading it: {OPTIM}"):
        checkpointing.verify(step_dir)  # what `upcycle export` calls


def test_resume_falls_back_to_the_previous_intact_checkpoint(one_rank):
    out = one_rank
    root = save(out, 2, 4, 6)  # keep 2: step 4 and step 6 remain
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    truncate(root / "step_00000006" / OPTIM)
    # Before any process group (preflight): refused with the flag named, or the fallback's topology checked.
    with pytest.raises(
        UserError, match=f"step_00000006 is damaged: {OPTIM}: .*--output.on_damaged_checkpoint"
    ):
        checkpointing.check_topology(out, TOPOLOGY, "refuse")
    assert checkpointing.check_topology(out, TOPOLOGY, "fallback") == "step_00000004"
    # At resume: every rank agrees, rank 0 points latest at step 4 and keeps the damaged one aside.
    tag, warnings = checkpointing.resume_tag(out, "fallback")
    assert tag == "step_00000004" and checkpointing.latest_tag(out) == tag
    (warning,) = warnings
    assert f"checkpoint step_00000006 is damaged, not loading it: {OPTIM}" in warning
    assert f"kept as {root / 'damaged_step_00000006'}" in warning
    assert not (root / "step_00000006").exists() and (root / "damaged_step_00000006" / OPTIM).is_file()
    # Training on saves step 6 afresh; pruning never counts or deletes the damaged copy.
    save(out, 6, 8)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "damaged_step_00000006",
        "step_00000006",
        "step_00000008",
    ]
    assert checkpointing.damage(root / "step_00000008") == []


def test_corruption_of_the_same_size_is_found_at_resume(one_rank):
    out = one_rank
    root = save(out, 2, 4)
    flip_a_byte(root / "step_00000004" / MODEL)
    assert checkpointing.check_topology(out, TOPOLOGY, "refuse") == "step_00000004"  # sizes agree
    with pytest.raises(UserError, match=f"{MODEL}: contents differ .*output.on_damaged_checkpoint=refuse"):
        checkpointing.resume_tag(out, "refuse")
    assert checkpointing.latest_tag(out) == "step_00000004"  # refusing changes nothing


def test_nothing_intact_is_refused(one_rank):
    out = one_rank
    root = save(out, 2, keep=1)
    flip_a_byte(root / "step_00000002" / OPTIM)
    with pytest.raises(UserError, match="no intact checkpoint to resume from .*new output.dir"):
        checkpointing.resume_tag(out, "fallback")


def test_checkpoint_saved_before_records_existed_is_accepted(one_rank):
    out = one_rank
    step_dir = save(out, 2) / "step_00000002"
    state = checkpointing.read_run_state(step_dir)
    del state["files"]
    (step_dir / "run_state.json").write_text(json.dumps(state))
    assert checkpointing.damage(step_dir) == []
    assert checkpointing.resume_tag(out, "refuse") == ("step_00000002", [])


# ---- a real run: 2 CPU ranks -----------------------------------------------------------------------------


@pytest.mark.slow
def test_damaged_shard_falls_back_and_reproduces_the_losses(train_workspace, reference_run, capsys):
    """Truncate one optimizer shard of the latest checkpoint (a full disk, a bad copy) of a copy of the
    reference run as it was at step 8: the same command resumes from the previous checkpoint and
    reproduces the uninterrupted run's losses. Then a same-size corruption with `refuse`: every rank stops
    naming the file and the flag, nothing is loaded."""
    workspace = train_workspace
    copy_run(reference_run.dir, workspace / "damaged", at_step=8)
    root = workspace / "damaged" / "checkpoints"
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncate(root / "step_00000008" / shard)

    launch(workspace, "damaged", *reference_run.args)
    log = (workspace / "damaged.log").read_text()
    assert f"checkpoint step_00000008 is damaged, not loading it: {shard}: " in log
    assert "resumed from step_00000004" in log and "Traceback" not in log
    rows = [json.loads(line) for line in (workspace / "damaged" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows[8:]] == list(range(5, 13))  # what the resumed run logged
    resumed = losses(workspace, "damaged")
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(reference_run.losses[step], abs=1e-6), step
    assert (root / "damaged_step_00000008" / shard).is_file()
    assert checkpointing.latest_tag(workspace / "damaged") == "step_00000012"

    flip_a_byte(root / "step_00000012" / MODEL)
    refuse = ("--output.on_damaged_checkpoint", "refuse")
    proc = launch(workspace, "damaged", *reference_run.args, "--train.steps", "16", *refuse, wait=False)
    try:
        assert proc.wait(timeout=300) != 0
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = (workspace / "damaged.log").read_text().split("resumed from step_00000004")[-1]
    assert f"{MODEL}: contents differ from the sha256 recorded" in log
    assert "--output.on_damaged_checkpoint fallback" in log and "Traceback" not in log
    assert checkpointing.latest_tag(workspace / "damaged") == "step_00000012"
    # `upcycle export` of the damaged checkpoint names the file too, before reading anything.
    out = workspace / "damaged_export"
    code = upcycle(["export", "--checkpoint", str(workspace / "damaged"), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert f"{MODEL}: contents differ from the sha256 recorded" in capsys.readouterr().err
