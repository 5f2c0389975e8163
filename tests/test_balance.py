"""`moe.balance: bias`: aux-loss-free load balancing with a per-expert selection bias (docs/design.md §3).

Unit level: our `route` with a bias is DeepSpeed AutoEP's router, and the update moves a skewed router
toward balance. In process (2 gloo ranks, `Trainer.train_step` with a stand-in engine: tests/helpers/
trainer_stand_in.py): each step's expert counts are the whole global batch's, counted with the bias, so every
rank ends with the same bias. One real launch (2 CPU ranks, EP 2, tests/balance_worker.py: a 5-step run,
then in the same processes a resume of a copy of its step-3 checkpoint), shared by the tests: the bias is
the same on every rank, nonzero, logged, used by the fast and the stock forward, and by our own model on
the checkpoint; the resume restores it exactly; export refuses it unless --drop-expert-bias.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess

import pytest
import torch
from distributed import run_on_ranks
from launching import REPO, TINY_CONFIG, free_port, losses, run_paths
from trainer_stand_in import train_steps, whole_batch_steps

from pipeline.ds_adapter import shm_buffer_name, update_expert_bias
from pipeline.errors import UserError
from pipeline.moe import MoEBlock, route
from pipeline.run_config import load_run_config, validate

RATE = "1e-2"  # 10x the default, so that 4 steps move the bias enough to change selections
BIAS_RUN = ("--moe.balance", "bias", "--moe.bias_update_rate", RATE, "--parallel.ep_size", "2",
            "--train.steps", "5", "--output.checkpoint_interval", "3",
            "--output.eval_interval", "0")  # fmt: skip
RESUMING = "---- resuming a copy ----"  # balance_worker.py prints it between its two runs


# ---- unit level ------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["softmax-topk", "topk-softmax"])
def test_route_with_bias_is_deepspeeds_router(routing):
    """Same experts, same order, same weights as AutoEP's router given the same bias, bit for bit; and the
    bias changes the choice, not the weights' source (the unbiased probabilities)."""
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    torch.manual_seed(0)
    x_TH, n, k = torch.randn(64, 16), 8, 2
    router = TokenChoiceTopKRouter(16, n, None, None, k, "softmax", routing == "topk-softmax", 1.0, False)
    bias_N = torch.randn(n) * 0.1
    ds_weights_TK, ds_experts_TK, _ = router(x_TH, bias_N)
    weights_TK, experts_TK = route(router.gate(x_TH), k, routing, bias_N)
    assert torch.equal(experts_TK, ds_experts_TK) and torch.equal(weights_TK, ds_weights_TK)
    probs_TN = torch.softmax(router.gate(x_TH), dim=-1)
    unbiased = route(router.gate(x_TH), k, routing)[1].sort(dim=-1).values
    assert not torch.equal(unbiased, experts_TK.sort(dim=-1).values)  # the bias did change selections
    if routing == "softmax-topk":
        assert torch.allclose(weights_TK, probs_TN.gather(1, experts_TK))


def test_moe_block_routes_with_its_bias():
    """A bias that favours expert 5 sends every token there; the weight is still its unbiased probability."""
    torch.manual_seed(0)
    block = MoEBlock(16, 8, 1, 8)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert "expert_bias" not in block.state_dict()  # no bias: names as `upcycle convert` writes them
    x_BTH = torch.randn(2, 10, 16)
    block(x_BTH)
    assert block.last_tokens_per_expert_N[5] < 20
    bias_N = torch.zeros(8)
    bias_N[5] = 1.0
    block.set_expert_bias(bias_N)
    assert block.state_dict()["expert_bias"].dtype == torch.float32
    y_BTH = block(x_BTH)
    assert block.last_tokens_per_expert_N.tolist() == [0, 0, 0, 0, 0, 20, 0, 0]
    probs_T = torch.softmax(block.last_router_logits_TN, dim=-1)[:, 5]
    x_TH = x_BTH.reshape(-1, 16)
    gate_up = x_TH @ block.experts.gate_up_proj[5].T
    expert_TH = (torch.nn.functional.silu(gate_up[:, :8]) * gate_up[:, 8:]) @ block.experts.down_proj[5].T
    assert torch.allclose(y_BTH.reshape(-1, 16), probs_T[:, None] * expert_TH, atol=1e-6)


def test_bias_moves_a_skewed_router_toward_balance():
    """Logits that favour expert 0: a few sign updates lower its bias, raise the others', and the load
    spread shrinks."""
    torch.manual_seed(0)
    n, k = 8, 2
    logits_TN = torch.randn(512, n) * 0.3
    logits_TN[:, 0] += 1.0
    bias_N = torch.zeros(n)

    def counts(bias):
        experts_TK = route(logits_TN, k, "softmax-topk", bias)[1]
        return torch.bincount(experts_TK.flatten(), minlength=n).float()

    before = counts(bias_N)
    for _ in range(30):
        update_expert_bias(bias_N, counts(bias_N), 5e-3)
    after = counts(bias_N)
    assert before[0] == before.max() and int(before[0]) > 400  # expert 0 takes most tokens
    assert bias_N[0] == bias_N.min() < 0 and (bias_N[1:] > 0).any()
    assert after.max() - after.min() < 0.5 * (before.max() - before.min())


@pytest.mark.parametrize(
    "override, message",
    [
        (["--moe.balance", "bias-only"], "moe.balance='bias-only': must be one of aux, bias, aux+bias"),
        (["--moe.bias_update_rate", "0"], "moe.bias_update_rate=0.0: must be a number in (0, 1)"),
        (["--moe.bias_update_rate", "nan"], "moe.bias_update_rate=nan"),
    ],
)
def test_bad_balance_settings_are_refused(override, message):
    cfg = load_run_config(TINY_CONFIG, override)
    with pytest.raises(UserError, match=re.escape(message)):
        validate(cfg, world_size=2, cuda=False)


def test_aux_weight_follows_balance():
    """balance bias: the aux loss is logged but weighs 0; aux+bias keeps the coefficient."""
    weights = {
        b: load_run_config(TINY_CONFIG, ["--moe.balance", b]).moe.aux_weight
        for b in ("aux", "bias", "aux+bias")
    }
    assert weights == {"aux": 1e-2, "bias": 0.0, "aux+bias": 1e-2}


# ---- in process: Trainer.train_step on 2 gloo ranks ---------------------------------------------------

STAND_IN_BIAS = ["--moe.balance", "bias", "--moe.bias_update_rate", RATE, "--train.micro_batch", "2"]


def test_every_rank_ends_with_the_bias_of_the_whole_batchs_loads():
    """4 steps of balance bias on 2 ranks x 2 micro-batches: each step's expert counts are the whole global
    batch's, counted with the bias the forward chose with; every rank applies the same update to the same
    counts, so every rank holds the bias the whole batch's loads give (computed here, one process)."""
    ranks = run_on_ranks(train_steps, STAND_IN_BIAS, 4)
    whole = whole_batch_steps(STAND_IN_BIAS, 4)
    for rank in ranks:
        assert rank["lines"] == [
            "moe.balance bias: expert bias on 2 MoE layers, rate 0.01",
            "moe.balance bias: the load-balancing loss is logged but not added (aux_loss_coef treated as 0)",
        ]
        bias_LN = rank["bias_LN"]
        assert bias_LN.dtype == torch.float32 and bias_LN.shape == (2, 8) and bias_LN.abs().max() > 0
        assert torch.equal(bias_LN, ranks[0]["bias_LN"]) and torch.equal(bias_LN, whole[-1]["expert_bias"])
        for step, (row, expected) in enumerate(zip(rank["stats"], whole, strict=True)):
            assert torch.equal(row["expert_counts"], expected["expert_counts"]), step
            assert torch.equal(row["expert_bias"], expected["expert_bias"]), step  # what the run log gets
            assert row["loss"] == row["lm_loss"] and row["aux_loss"] > 0  # aux logged, not added
    # The bias changed selections: counts without it differ, so the counts above were made with it.
    unbiased = whole_batch_steps(["--train.micro_batch", "2"], 4)
    assert not torch.equal(whole[-1]["expert_counts"], unbiased[-1]["expert_counts"])


# ---- a real run: 2 ranks, EP 2 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bias_run(train_workspace):
    """5 steps of balance bias at EP 2 (checkpoints at steps 3 and 5), then a resume of a copy of step 3 to
    step 5 in `bias_resumed`: one torchrun of tests/balance_worker.py."""
    out = train_workspace / "bias_worker_out"
    out.mkdir()
    port = free_port()
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "balance_worker.py"), str(out), "step_00000003", "--config", TINY_CONFIG,
           *run_paths(train_workspace, "bias"), *BIAS_RUN]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    (train_workspace / "bias.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce segments (~67 MB of RAM each) are removed when the ranks exit.
    assert not glob.glob("/dev/shm/" + shm_buffer_name("*", port, "*"))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return train_workspace, ranks


def run_logs(workspace) -> list[str]:
    """The worker's output: [the first run's, the resumed run's] (rank 0 logs; both ranks' errors)."""
    first, resumed = (workspace / "bias.log").read_text().split(RESUMING)
    return [first, resumed]


def checkpoint_bias(run_dir, tag) -> torch.Tensor:
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return torch.stack([states["module"][f"model.layers.{i}.mlp.expert_bias"] for i in (0, 1)])


@pytest.mark.slow
def test_bias_is_synced_logged_and_routes_every_forward(bias_run):
    workspace, (rank0, rank1) = bias_run
    bias_LN = rank0["bias_LN"]
    # The same on every rank (each applied the update from the all-reduced counts), and it moved.
    assert torch.equal(bias_LN, rank1["bias_LN"]) and bias_LN.dtype == torch.float32
    assert bias_LN.abs().max() > 0 and bias_LN.shape == (2, 8)
    print(f"expert bias after 5 steps at rate {RATE}: {bias_LN.tolist()}")
    # Saved whole (all N experts, not one rank's half) with the non-expert weights.
    assert torch.equal(checkpoint_bias(workspace / "bias", "step_00000005"), bias_LN)
    # The fast forward and DeepSpeed's stock one both select with it; zeroing it changes the logits.
    for r in (rank0, rank1):
        assert torch.allclose(r["fast"], r["stock"], atol=1e-5, rtol=0)
        assert (r["fast"] - r["unbiased"]).abs().max() > 1e-3
    # Our own model on the checkpoint (eval, export's reference) routes as training did.
    from pipeline.export import open_source, our_model

    source = open_source(workspace / "bias")
    assert torch.equal(torch.stack(list(source.expert_bias.values())), bias_LN)
    with torch.no_grad():
        ours = our_model(source)(rank0["ids"])
    assert torch.allclose(ours, rank0["fast"], atol=1e-4, rtol=0)

    # Logged: the console, train_log.jsonl (per layer min/max) and TensorBoard.
    log = run_logs(workspace)[0]
    assert "moe.balance bias: expert bias on 2 MoE layers, rate 0.01" in log
    assert "aux_loss_coef treated as 0" in log
    rows = [json.loads(line) for line in (workspace / "bias" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["expert_bias_min"] == bias_LN.min(dim=1).values.tolist()
    assert rows[-1]["expert_bias_max"] == bias_LN.max(dim=1).values.tolist()
    assert all(row["loss"] == row["lm_loss"] and row["aux_loss"] > 0 for row in rows)  # aux logged, not added
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "bias" / "tensorboard"))
    events.Reload()
    spread = events.Scalars("moe/layer01/expert_bias_spread")
    assert [e.step for e in spread] == [1, 2, 3, 4, 5]
    assert spread[-1].value == pytest.approx(float(bias_LN[1].max() - bias_LN[1].min()))


@pytest.mark.slow
def test_resume_restores_the_bias_exactly(bias_run):
    """The shared run's step-3 checkpoint, copied and resumed to step 5 (a new Trainer and engine): bias and
    losses equal the uninterrupted run's. (At rate 1e-2 the bias flips back and forth on a fresh upcycled
    router: after step 2 it is all zero again, hence step 3, whose bias is not, so that a bias lost on resume
    cannot pass.)"""
    workspace, (rank0, _) = bias_run
    resumed = workspace / "bias_resumed"
    assert checkpoint_bias(resumed, "step_00000003").abs().max() > 0
    assert "resumed from step_00000003" in run_logs(workspace)[1]
    assert torch.equal(checkpoint_bias(resumed, "step_00000005"), rank0["bias_LN"])
    full, again = losses(workspace, "bias"), losses(workspace, "bias_resumed")
    assert sorted(again) == [4, 5] and all(again[s] == full[s] for s in (4, 5)), (full, again)

    # Switching a run with a bias to one without (or back) is refused before any rank starts.
    from pipeline.checkpointing import resume_plan

    cfg = load_run_config(TINY_CONFIG, ["--moe.balance", "aux"]).to_dict()
    with pytest.raises(UserError, match="moe.balance was bias and is now aux"):
        resume_plan(workspace / "bias", cfg, {})
    cfg["moe"]["balance"] = "aux+bias"
    assert resume_plan(workspace / "bias", cfg, {})[0] == "step_00000005"


@pytest.mark.slow
def test_export_refuses_the_bias_unless_dropped(bias_run, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.export import check_expert_bias, compare_logits, export, open_source

    workspace, _ = bias_run
    run = str(workspace / "bias")
    assert main(["export", "--checkpoint", run, "--out", str(tmp_path / "refused")]) == 2
    assert "--drop-expert-bias" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    dropped = tmp_path / "dropped"
    assert main(["export", "--checkpoint", run, "--out", str(dropped), "--drop-expert-bias", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert (
        "without the expert bias, max |logit diff|" in printed and "token-expert selections change" in printed
    )
    changed = int(printed.split(" of ")[0].rsplit(" ", 1)[-1])
    print(printed)
    assert changed > 0

    # An all-zero bias exports as a run without one: no flag needed, the same files.
    source = open_source(run)
    source.expert_bias = {name: torch.zeros_like(b) for name, b in source.expert_bias.items()}
    assert check_expert_bias(source, drop=False) == []
    zero = tmp_path / "zero"
    export(source, zero, torch.float32, 2**30)
    assert compare_logits(source, zero) < 1e-4
    for f in dropped.glob("*.safetensors"):
        assert (zero / f.name).read_bytes() == f.read_bytes()
