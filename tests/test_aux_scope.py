"""The global-batch load-balancing loss (`moe.aux_loss_scope: global`, docs/design.md §3).

The logged aux loss of a step counts expert frequencies f and mean probabilities P over every token of the
step's global batch, so it cannot depend on how the batch is split into ranks and micro-batches; the micro
scope's (the mean of per-micro-batch losses) does.

In process (tests/helpers/distributed.py, gloo ranks): RouterCapture's sums over the ranks, and the real
`Trainer.train_step` with a stand-in engine (tests/helpers/trainer_stand_in.py) training one step of the same
global batch of 8 sequences split 1 rank x 4 micro-batches and 2 ranks x 2, against that batch at once.

One real run (2 ranks, EP=2, 2 micro-batches of 2, DeepSpeed's engine and AutoEP's routers) logs the
global-scope loss of its whole batch; the reference is that batch through our model in this process, all 8
sequences at once. At step 1 the upcycled router is nearly uniform, so the aux loss is 1 + ~3e-5: the
excess over 1 is what routing moves. Measured (excess over 1): the whole batch 2.5749e-5 (fp32; a DeepSpeed
run with one micro-batch of 8 gives the same bits), the global scope 2.5829e-5 at both 1 x 4 and 2 x 2 (the
same float64 bits). The micro scope gives 5.07e-5 at 1 x 4 and at 2 x 2 (the same micro-batches), 2.5e-5
away from the whole batch's, so a trainer that ignored the scope fails here (tolerance 3e-7). No
micro-scope run is launched to show it (a launch costs ~20 s on 2 cores); the in-process tests show it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from distributed import run_on_ranks
from launching import TINY_CONFIG, launch
from trainer_stand_in import train_steps, whole_batch_steps

from pipeline.ds_adapter import RouterCapture
from pipeline.errors import UserError
from pipeline.moe import load_balancing_loss, route
from pipeline.run_config import DEFAULT_AUX_LOSS_SCOPE, load_run_config, validate

N, K, LAYERS = 8, 2, 3


def step_losses(
    scope: str, micro_logits: list[list[torch.Tensor]]
) -> tuple[list[torch.Tensor], float | None]:
    """(the backpropagated aux loss of each micro-batch, the step's logged aux) through RouterCapture."""
    capture = RouterCapture(K, "softmax-topk", scope=scope)
    capture.begin_step()
    backprop = []
    for layers in micro_logits:
        capture.logits[:] = layers
        backprop.append(capture.losses()[0])
    return backprop, capture.step_aux()


def random_logits(micro_batches: int, tokens: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """[micro-batch][layer] -> logits [tokens, N], skewed so that some experts are preferred."""
    gen = torch.Generator().manual_seed(seed)
    skew_N = torch.linspace(0, 2, N)
    return [
        [torch.randn(tokens, N, generator=gen) + skew_N for _ in range(LAYERS)] for _ in range(micro_batches)
    ]


def whole_batch_loss(micro_logits: list[list[torch.Tensor]]) -> float:
    """load_balancing_loss on the concatenation of all micro-batches' logits, averaged over the layers."""
    per_layer = []
    for layer in range(LAYERS):
        logits_TN = torch.cat([layers[layer] for layers in micro_logits])
        per_layer.append(load_balancing_loss(logits_TN, route(logits_TN, K, "softmax-topk")[1], N))
    return float(torch.stack(per_layer).mean())


def test_global_step_loss_is_the_loss_of_the_concatenated_batch():
    micro = random_logits(4, 16)
    expected = whole_batch_loss(micro)
    _, step_aux = step_losses("global", micro)
    assert step_aux == pytest.approx(expected, rel=1e-6)
    # The same tokens split into 2 micro-batches of 32: the same step loss.
    halves = [[torch.cat([a[i], b[i]]) for i in range(LAYERS)] for a, b in (micro[:2], micro[2:])]
    assert step_losses("global", halves)[1] == pytest.approx(step_aux, rel=1e-6)
    # The micro scope logs no step loss, and the mean of its per-micro-batch losses is another number.
    backprop, none = step_losses("micro", micro)
    assert none is None
    assert abs(float(torch.stack(backprop).mean()) - expected) > 1e-3


def test_backpropagated_loss_uses_f_of_the_micro_batches_so_far():
    micro = [[lg.requires_grad_() for lg in layers] for layers in random_logits(3, 16, seed=1)]
    backprop, _ = step_losses("global", micro)
    for m, loss in enumerate(backprop):
        expected = []
        for layer in range(LAYERS):
            seen_TN = torch.cat([layers[layer] for layers in micro[: m + 1]]).detach()
            slots_N = torch.bincount(route(seen_TN, K, "softmax-topk")[1].flatten(), minlength=N)
            f_N = slots_N / (seen_TN.shape[0] * K)  # share of the T * K slots so far
            mean_probs_N = torch.softmax(micro[m][layer], dim=-1).mean(dim=0)
            expected.append(N * (f_N * mean_probs_N).sum())
        assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6), m
    # At the first micro-batch f is that micro-batch's own, so loss and gradient are the micro scope's:
    # the global scope keeps the gradient scale of moe.aux_loss_coef.
    first = [lg.detach().requires_grad_() for lg in micro[0]]
    (micro_loss,), _ = step_losses("micro", [first])
    grads_global = torch.autograd.grad(backprop[0], micro[0])
    grads_micro = torch.autograd.grad(micro_loss, first)
    assert backprop[0].item() == pytest.approx(micro_loss.item(), rel=1e-6)
    for g_global, g_micro in zip(grads_global, grads_micro, strict=True):
        torch.testing.assert_close(g_global, g_micro, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scope", ["batch", "Global", ""])
def test_unknown_scope_is_refused_naming_the_key(scope):
    cfg = load_run_config(
        None, ["--model.path", "m", "--data.path", "d", "--moe.aux_loss_scope", repr(scope)]
    )
    with pytest.raises(UserError, match="moe.aux_loss_scope=.*must be micro or global"):
        validate(cfg, 1, cuda=False)


def test_default_scope():
    assert load_run_config(None, []).moe.aux_loss_scope == DEFAULT_AUX_LOSS_SCOPE == "micro"


# ---- in process: 2 gloo ranks ---------------------------------------------------------------------------


def rank_step_losses(micro_batches: int, tokens: int) -> tuple[list[float], float]:
    """On each rank: its own micro-batches' logits (seeded by the rank) through one global-scope step."""
    backprop, step_aux = step_losses("global", random_logits(micro_batches, tokens, seed=dist.get_rank()))
    return [loss.item() for loss in backprop], step_aux


def test_ranks_share_f_and_p_over_the_whole_step():
    """The backpropagated loss of a rank's micro-batch m counts f over every rank's micro-batches up to m;
    the logged step loss is the whole global batch's on every rank."""
    ranks = [random_logits(3, 16, seed=r) for r in range(2)]
    (backprop0, aux0), (backprop1, aux1) = run_on_ranks(rank_step_losses, 3, 16)
    assert aux0 == aux1 == pytest.approx(whole_batch_loss(ranks[0] + ranks[1]), rel=1e-6)
    for rank, backprop in enumerate((backprop0, backprop1)):
        for m, loss in enumerate(backprop):
            expected = []
            for layer in range(LAYERS):
                seen_TN = torch.cat([micro[layer] for r in range(2) for micro in ranks[r][: m + 1]])
                slots_N = torch.bincount(route(seen_TN, K, "softmax-topk")[1].flatten(), minlength=N)
                mean_probs_N = torch.softmax(ranks[rank][m][layer], dim=-1).mean(dim=0)
                expected.append(N * (slots_N / (seen_TN.shape[0] * K) * mean_probs_N).sum())
            assert loss == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6), (rank, m)
    # Not the loss of the rank's own tokens alone: the sums over the ranks matter.
    assert aux0 != pytest.approx(whole_batch_loss(ranks[0]), rel=1e-4)


def trainer_first_step(ranks: int, micro_batch: int, scope: str) -> dict:
    """The stats Trainer.train_step logs for step 1 (the same on every rank)."""
    overrides = ["--train.micro_batch", str(micro_batch), "--moe.aux_loss_scope", scope]
    rows = [result["stats"][0] for result in run_on_ranks(train_steps, overrides, 1, world_size=ranks)]
    logged = [{k: row[k] for k in ("loss", "lm_loss", "aux_loss")} for row in rows]
    assert all(numbers == logged[0] for numbers in logged)
    return rows[0]


def test_trainer_logs_the_global_aux_loss_of_the_whole_batch_whatever_the_split():
    """Trainer.train_step on 1 rank x 4 micro-batches and on 2 ranks x 2: the same logged step, which is the
    whole batch's; the micro scope's differs by far more than the tolerance."""
    whole = whole_batch_steps([], 1)[0]
    one_rank = trainer_first_step(1, 2, "global")
    two_ranks = trainer_first_step(2, 2, "global")
    assert two_ranks["lm_loss"] == pytest.approx(one_rank["lm_loss"], rel=1e-6)  # the same batch and weights
    assert two_ranks["aux_loss"] == pytest.approx(one_rank["aux_loss"], rel=1e-6, abs=0)
    for row in (one_rank, two_ranks):
        assert row["lm_loss"] == pytest.approx(whole["lm_loss"], rel=1e-6)
        assert row["aux_loss"] == pytest.approx(whole["aux_loss"], rel=0, abs=3e-7)  # as the real run's
        assert row["loss"] == pytest.approx(row["lm_loss"] + 1e-2 * row["aux_loss"], rel=1e-12)
    micro = trainer_first_step(2, 2, "micro")
    assert abs(micro["aux_loss"] - whole["aux_loss"]) > 1e-3


# ---- a real run -----------------------------------------------------------------------------------------

ONE_STEP = (
    *("--train.steps", "1", "--train.global_batch", "8", "--data.eval_batches", "1"),
    *("--output.eval_interval", "0", "--output.checkpoint_interval", "0"),
)


def first_step(workspace, out: str, micro_batch: int, scope: str) -> dict:
    """Step 1's train_log.jsonl row of a real 2-rank (EP=2) run."""
    split = ("--train.micro_batch", str(micro_batch), "--parallel.ep_size", "2")
    launch(workspace, out, *ONE_STEP, *split, "--moe.aux_loss_scope", scope, launcher="torchrun")
    row = json.loads((workspace / out / "train_log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    return row


def whole_batch_reference(workspace) -> tuple[float, float]:
    """(lm loss, aux loss) of step 1's global batch as one batch, in this process without DeepSpeed: our
    model on all 8 sequences at once; its router logits through `load_balancing_loss`, averaged over the
    layers."""
    from data_prep.reader import DistributedBatches, PackedTokenDataset
    from pipeline.hf_io import load_model

    paths = ["--model.path", str(workspace / "moe"), "--data.path", str(workspace / "data")]
    t = load_run_config(TINY_CONFIG, [*paths, *ONE_STEP]).train
    data = PackedTokenDataset([str(workspace / "data")], "train", t.seq_len, t.seed, None)
    tokens_BT1 = next(DistributedBatches(data, t.global_batch, 0, 1))
    model = load_model(str(workspace / "moe"), dtype=torch.float32)
    with torch.no_grad():
        logits_BTV = model(tokens_BT1[:, :-1])
    lm = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten())
    per_layer = []
    for _, block in model.moe_blocks():
        logits_TN = block.last_router_logits_TN
        experts_TK = route(logits_TN, block.top_k, block.routing)[1]
        per_layer.append(load_balancing_loss(logits_TN, experts_TK, block.num_experts))
    return float(lm), float(torch.stack(per_layer).mean())


@pytest.mark.slow
def test_a_real_run_logs_the_global_aux_loss_of_its_whole_batch(train_workspace):
    """DeepSpeed's engine and AutoEP's routers, 2 ranks x 2 micro-batches: the logged aux loss is the whole
    batch's. That it is whatever the split is shown in process (Trainer.train_step on 1 and 2 ranks)."""
    two_ranks = first_step(train_workspace, "r2_global", micro_batch=2, scope="global")
    whole_lm, whole_aux = whole_batch_reference(train_workspace)
    print(f"lm {two_ranks['lm_loss']!r} vs {whole_lm!r}, aux {two_ranks['aux_loss']!r} vs {whole_aux!r}")
    assert two_ranks["lm_loss"] == pytest.approx(whole_lm, rel=1e-6)  # the same batch and weights
    # The loss of the whole batch at once, up to the fp32 rounding of a loss near 1.
    assert two_ranks["aux_loss"] == pytest.approx(whole_aux, rel=0, abs=3e-7)
    assert two_ranks["loss"] == pytest.approx(two_ranks["lm_loss"] + 1e-2 * two_ranks["aux_loss"], rel=1e-12)
