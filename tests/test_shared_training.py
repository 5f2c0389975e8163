"""Training a model with a shared expert (`upcycle convert --shared-shards`) on 2 CPU ranks, DeepSpeed AutoEP
with `has_shared_experts`: the fast path covers its layers, step 1 is the dense model's loss, the shared
expert and its sigmoid gate (started at exactly 0) train, the run exports to Qwen2MoE and evaluates, and it
resumes exactly, at the same topology and through DeepSpeed's universal checkpoint at EP 1.

One run (`shared_run`: E8 top-2, G=4 of which S=2 shared, so routed groups of 2 and R=4 copies; EP 2,
ZeRO-2, 6 steps, a checkpoint every 3) is trained once for the module; the resumes start from copies of
its step 3 (workspace.copy_run).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from launching import launch, losses
from safetensors import safe_open
from workspace import copy_run, run_args

from pipeline.cli import main

STEPS, SAVED_AT = 6, 3
TAG = f"step_{SAVED_AT:08d}"
SETTINGS = {
    "train.steps": STEPS,
    "output.checkpoint_interval": SAVED_AT,
    "output.eval_interval": SAVED_AT,
    "output.keep_checkpoints": 0,  # step 3 stays: the resumes start from it
    "train.lr": 3e-3,  # as the reference run: the weights move clearly within 6 steps
}
CONVERT = ("--experts", "8", "--top-k", "2", "--granularity", "4", "--shared-shards", "2")
SHARED = ("gate_proj", "up_proj", "down_proj")
REPORT: dict = {}


def model_args(workspace: Path, model: str = "moe_shared") -> tuple[str, ...]:
    """The run's settings pointed at workspace/model (after launching.run_paths' --model.path: the later
    override wins)."""
    return (*run_args(SETTINGS), "--model.path", str(workspace / model))


def timed_launch(workspace: Path, out: str, *overrides: str) -> dict[int, float]:
    started = time.monotonic()
    launch(workspace, out, *overrides)
    REPORT[f"{out}_run_s"] = round(time.monotonic() - started, 1)
    return losses(workspace, out)


def train_log(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def learning_rates(run_dir: Path) -> dict[int, float]:
    return {step: row["lr"] for step, row in train_log(run_dir).items()}


def read_tensors(model_dir: Path, names) -> dict:
    """The named tensors of a safetensors model directory, whichever shard holds them."""
    found = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found |= {name: f.get_tensor(name) for name in names if name in f.keys()}
    assert sorted(found) == sorted(names), f"{model_dir}: missing {sorted(set(names) - set(found))}"
    return found


def shared_names(layer: int) -> list[str]:
    prefix = f"model.layers.{layer}.mlp.shared_expert"
    return [f"{prefix}.{proj}.weight" for proj in SHARED] + [f"{prefix}_gate.weight"]


@pytest.fixture(scope="module")
def shared_run(train_workspace) -> Path:
    """workspace/moe_shared (the workspace's dense model, upcycled with a shared expert), trained for STEPS
    steps at EP 2 into workspace/shared; read-only: resume from a copy (copy_run)."""
    ws = train_workspace
    argv = ["convert", "--dense", str(ws / "dense"), "--out", str(ws / "moe_shared"), *CONVERT]
    assert main(argv) == 0
    config = json.loads((ws / "moe_shared" / "config.json").read_text())
    assert config["moe"]["shared_shards"] == 2 and config["moe"]["num_experts"] == 8
    timed_launch(ws, "shared", *model_args(ws))
    yield ws / "shared"
    print("\nshared-expert training:", json.dumps(REPORT, indent=1))


def test_the_shared_expert_trains_and_exports_as_qwen2moe(train_workspace, shared_run, capsys):
    """The fast path takes both AutoEP layers with their shared expert, every loss is finite, and the
    trained checkpoint exports to Qwen2MoeForCausalLM (--verify: stock transformers reproduces our logits)
    with the shared expert's width, and with its sigmoid gate, which started at exactly 0, and its
    projections moved by training."""
    ws = train_workspace
    full = losses(ws, "shared")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert all(math.isfinite(row[k]) for row in train_log(shared_run).values() for k in ("loss", "lm_loss"))
    assert "MoE fast path on 2 of 2 AutoEP layers" in (ws / "shared.log").read_text()
    # The engine held the shared expert under AutoEP's names, which the export maps back to ours.
    states = torch.load(shared_run / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)  # fmt: skip
    assert "model.layers.0.mlp.shared_experts.down_proj.weight" in states["module"]
    assert "model.layers.0.mlp.shared_experts_gate.weight" in states["module"]

    out = ws / "shared_hf"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(shared_run), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "as Qwen2MoeForCausalLM" in printed
    REPORT["export_verify"] = next(line for line in printed.splitlines() if line.startswith("verify:"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["shared_expert_intermediate_size"] == 64  # S * I = 2 * 128 / 4
    assert config["moe_intermediate_size"] == 32
    assert config["num_experts"] == 8 and config["num_experts_per_tok"] == 2

    for layer in (0, 1):
        names = shared_names(layer)
        trained, converted = read_tensors(out, names), read_tensors(ws / "moe_shared", names)
        gate = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
        assert not converted[gate].any()  # upcycled: sigmoid(0) = 0.5 for every token
        REPORT[f"layer{layer}_gate_max_abs"] = float(trained[gate].abs().max())
        assert REPORT[f"layer{layer}_gate_max_abs"] > 1e-4
        for name in names[:3]:
            assert trained[name].shape == converted[name].shape
            assert float((trained[name].float() - converted[name].float()).abs().max()) > 1e-4, name


def test_step_one_is_the_dense_models_loss(train_workspace, shared_run):
    """Upcycled exactly: the first step's language-model loss (train_log's `lm_loss`; `loss` adds the
    weighted aux loss) of the shared-expert model is the dense model's on the same global batch (same
    train.seed and global_batch: the data order does not depend on EP size or the split)."""
    ws = train_workspace
    dense = timed_launch(ws, "dense_step1", *model_args(ws, "dense"), "--train.steps", "1",
                         "--parallel.ep_size", "1")  # fmt: skip
    assert sorted(dense) == [1]
    dense_lm, shared_lm = train_log(ws / "dense_step1")[1]["lm_loss"], train_log(shared_run)[1]["lm_loss"]
    assert dense[1] == dense_lm  # no aux loss for a dense model
    REPORT["step1_lm_loss"] = {"dense": dense_lm, "shared": shared_lm}
    REPORT["step1_rel_diff"] = abs(shared_lm - dense_lm) / dense_lm
    assert shared_lm == pytest.approx(dense_lm, rel=1e-4)


def test_resume_at_the_same_topology_is_exact(train_workspace, shared_run):
    """From a copy of the run as it was at step 3, the same command continues as if never stopped: steps
    4..6 have the uninterrupted run's losses (the shared expert's weights and Adam state restored)."""
    ws, full = train_workspace, losses(train_workspace, "shared")
    copy_run(shared_run, ws / "resumed", at_step=SAVED_AT)
    resumed = timed_launch(ws, "resumed", *model_args(ws))
    log = (ws / "resumed.log").read_text()
    assert f"resumed from {TAG}: step {SAVED_AT}" in log and "through its universal" not in log
    assert sorted(resumed) == list(range(1, STEPS + 1))
    REPORT["same_topology_abs_mismatch"] = max(
        abs(resumed[s] - full[s]) for s in range(SAVED_AT + 1, STEPS + 1)
    )
    for step in range(SAVED_AT + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    assert learning_rates(ws / "resumed") == learning_rates(shared_run)  # the schedule's step


def test_elastic_resume_at_ep1_continues_exactly(train_workspace, shared_run):
    """From a copy of step 3 (saved at EP 2), a resume at EP 1 goes through DeepSpeed's universal
    checkpoint (the shared expert is a non-expert parameter there, the routed experts are resharded) and
    steps 4..6 have the uninterrupted run's losses."""
    ws, full = train_workspace, losses(train_workspace, "shared")
    copy_run(shared_run, ws / "elastic", at_step=SAVED_AT)
    resumed = timed_launch(ws, "elastic", *model_args(ws), "--parallel.ep_size", "1")
    log = (ws / "elastic.log").read_text()
    assert f"converting {TAG} to DeepSpeed's universal checkpoint" in log
    assert (
        f"resumed from {TAG} through its universal checkpoint: step {SAVED_AT}, {SAVED_AT * 8} samples" in log
    )
    REPORT["elastic_rel_mismatch"] = max(
        abs(resumed[s] - full[s]) / abs(full[s]) for s in range(SAVED_AT + 1, STEPS + 1)
    )
    assert REPORT["elastic_rel_mismatch"] <= 1e-5, REPORT
    assert learning_rates(ws / "elastic") == learning_rates(shared_run)
    assert "MoE fast path on 2 of 2 AutoEP layers" in log
    # The next save is an ordinary checkpoint under the new topology.
    state = json.loads((ws / "elastic" / "checkpoints" / f"step_{STEPS:08d}" / "run_state.json").read_text())
    assert state["topology"]["parallel.ep_size"] == 1 and state["topology"]["world_size"] == 2


def test_eval_of_the_trained_checkpoint(train_workspace, shared_run, capsys):
    """`upcycle eval` reads the training checkpoint itself (our model, AutoEP's names mapped back): a finite
    perplexity, and on the trainer's validation windows (2 batches of 8, data.eval_seed 0) the run's own
    final validation loss."""
    ws = train_workspace
    report = ws / "shared_eval.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(shared_run), "--data", str(ws / "data"), "--batches", "2",
                 "--json", str(report)]) == 0  # fmt: skip
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(report.read_text())
    REPORT["eval_perplexity"] = result["perplexity"]
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    val = json.loads((shared_run / "val_loss.jsonl").read_text().splitlines()[-1])
    assert val["step"] == STEPS
    assert result["loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    assert sorted(result["layers"]) == ["0", "1"]
