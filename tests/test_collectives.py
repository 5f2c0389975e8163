"""Collectives on real ranks without a launcher (tests/helpers/distributed.py: processes, a gloo group).

The harness itself: each rank's result comes back; a rank that raises, dies or hangs fails the test with
the rank named and no process left behind. Then the collectives of the checkpoint record (each rank hashes
the files it wrote, rank 0's run_state.json covers every rank's; at resume the ranks split the hashing and
agree on what any of them found) and of the logged expert loads (summed over the ranks).
"""

from __future__ import annotations

import hashlib
import os
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import RankError, run_on_ranks
from trainer_stand_in import train_steps, whole_batch_steps

from pipeline import checkpointing

# ---- the harness ---------------------------------------------------------------------------------------


def rank_facts(base: int) -> dict:
    t = torch.tensor([base + dist.get_rank()])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": int(t), "env": os.environ["RANK"]}


def rank_pid() -> int:
    return os.getpid()


def test_each_rank_returns_its_result():
    assert run_on_ranks(rank_facts, 10, world_size=3) == [
        {"rank": r, "world": 3, "sum": 33, "env": str(r)} for r in range(3)
    ]
    assert run_on_ranks(rank_facts, 10, world_size=1) == [{"rank": 0, "world": 1, "sum": 10, "env": "0"}]
    pids = run_on_ranks(rank_pid)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # gone when run_on_ranks returns


def note_pid(pid_dir: str) -> None:
    """Leave this rank's pid in `pid_dir`, once every rank is past the group's start-up."""
    Path(pid_dir, str(os.getpid())).touch()
    dist.barrier()


def fail_on_rank_1(pid_dir: str) -> None:
    note_pid(pid_dir)
    if dist.get_rank() == 1:
        raise ValueError("rank 1 refuses")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 here, in vain


def die_on_rank_1(pid_dir: str) -> None:
    note_pid(pid_dir)
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()


def hang_on_rank_0(pid_dir: str) -> None:
    note_pid(pid_dir)
    if dist.get_rank() == 0:
        time.sleep(3600)


def assert_all_exited(pid_dir: Path, ranks: int) -> None:
    pids = [int(p.name) for p in pid_dir.iterdir()]
    assert len(pids) == ranks
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_failing_rank_is_named_with_its_traceback(tmp_path):
    started = time.monotonic()
    with pytest.raises(RankError) as caught:
        run_on_ranks(fail_on_rank_1, str(tmp_path))
    assert time.monotonic() - started < 15  # not the 60 s timeout: the others are stopped soon after
    message = str(caught.value)
    assert caught.value.rank == 1 and message.startswith("rank 1 of 2 raised:\nTraceback")
    assert "in fail_on_rank_1" in message and "ValueError: rank 1 refuses" in message
    assert_all_exited(tmp_path, 2)


def test_a_rank_that_dies_is_named(tmp_path):
    with pytest.raises(RankError, match=r"^rank 1 of 2 died without reporting \(exit code 7"):
        run_on_ranks(die_on_rank_1, str(tmp_path))
    assert_all_exited(tmp_path, 2)


def test_a_hung_rank_times_out_with_its_stack(tmp_path):
    started = time.monotonic()
    with pytest.raises(RankError) as caught:
        run_on_ranks(hang_on_rank_0, str(tmp_path), timeout=3)
    assert time.monotonic() - started < 10
    assert caught.value.failures.keys() == {0, 1}  # rank 1 waits for rank 0 in the final barrier
    assert caught.value.failures[0] == "still running after 3 s (its stack is in its output)"
    assert "in hang_on_rank_0" in caught.value.outputs[0]  # faulthandler's dump
    assert_all_exited(tmp_path, 2)


# ---- the checkpoint record (pipeline.checkpointing, docs/design.md §6) ---------------------------------

MODEL = "mp_rank_00_model_states.pt"


def optim(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


class RankEngineStandIn:
    """Writes as DeepSpeed does on each rank: its optimizer shard through its checkpoint engine's `save`;
    rank 0 also the model states, and one file around the checkpoint engine."""

    def __init__(self):
        self.checkpoint_engine = types.SimpleNamespace(save=lambda state, path: torch.save(state, path))

    def save_checkpoint(self, save_dir, tag, save_latest):
        rank = dist.get_rank()
        step_dir = Path(save_dir) / tag
        step_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"m": torch.full((5000,), float(rank))}, str(step_dir / optim(rank)))
        if rank == 0:
            self.checkpoint_engine.save({"w": torch.arange(1000.0)}, str(step_dir / MODEL))
            (step_dir / "notes.txt").write_text("written around the checkpoint engine")


def save_steps(out: str, steps: list[int]) -> str:
    """checkpointing.save of each step on every rank into `out` (a format field: {rank})."""
    for step in steps:
        tag = checkpointing.save(
            RankEngineStandIn(), out.format(rank=dist.get_rank()), step, {"step": step}, 2
        )
    return tag


def test_the_record_covers_every_ranks_files(tmp_path):
    """Two nodes that do not share a disk (node0/, node1/): each rank hashes the files it wrote, and rank
    0's run_state.json records them all, though it cannot read node 1's."""
    tags = run_on_ranks(save_steps, str(tmp_path / "node{rank}"), [2])
    assert tags == ["step_00000002"] * 2
    step_dirs = [checkpointing.checkpoint_root(tmp_path / f"node{r}") / tags[0] for r in range(2)]
    files = checkpointing.read_run_state(step_dirs[0])["files"]
    where = {MODEL: 0, "notes.txt": 0, optim(0): 0, "rng_rank0.pt": 0, optim(1): 1, "rng_rank1.pt": 1}
    assert sorted(files) == sorted(where)
    for name, node in where.items():
        data = (step_dirs[node] / name).read_bytes()
        assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert checkpointing.latest_tag(tmp_path / "node0") == tags[0]
    assert not (step_dirs[1] / checkpointing.RUN_STATE).exists()  # rank 0 alone writes the record


def resume_after_damage(out: str, name: str) -> tuple[str, list[str]]:
    """Save steps 2 and 4 on every rank, corrupt `name` of step 4 (same size), then resume_tag."""
    save_steps(out, [2, 4])
    if dist.get_rank() == 0:
        path = checkpointing.checkpoint_root(out) / "step_00000004" / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    return checkpointing.resume_tag(out, "fallback")


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_falls_back_whichever_rank_hashed_the_damage(tmp_path, rank):
    """The ranks split the hashing at resume (the two largest files, the optimizer shards, go to different
    ranks) and agree on what any of them found."""
    (tag0, warnings0), (tag1, warnings1) = run_on_ranks(resume_after_damage, str(tmp_path), optim(rank))
    assert tag0 == tag1 == "step_00000002"
    (warning,) = warnings0
    assert f"checkpoint step_00000004 is damaged, not loading it: {optim(rank)}: contents differ" in warning
    assert warnings1 == []  # rank 0 logs
    root = checkpointing.checkpoint_root(tmp_path)
    assert checkpointing.latest_tag(tmp_path) == tag0 and (root / "damaged_step_00000004").is_dir()


# ---- the logged expert loads ----------------------------------------------------------------------------


def test_logged_expert_loads_are_the_whole_batchs():
    """Trainer.train_step on 2 ranks x 2 micro-batches (stand-in engine): the expert counts and router
    entropy it logs are those of the whole global batch, on every rank."""
    overrides = ["--train.micro_batch", "2"]
    ranks = run_on_ranks(train_steps, overrides, 2)
    for rank in ranks:
        for row, expected in zip(rank["stats"], whole_batch_steps(overrides, 2), strict=True):
            assert torch.equal(row["expert_counts"], expected["expert_counts"])
            assert row["router_entropy"] == pytest.approx(expected["router_entropy"], rel=1e-6)
