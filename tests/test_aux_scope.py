"""The global-batch load-balancing loss (`moe.aux_loss_scope: global`, docs/design.md §3).

The logged aux loss of a step counts expert frequencies f and mean probabilities P over every token of the
step's global batch, so it cannot depend on how the batch is split into ranks and micro-batches; the micro
scope's (the mean of per-micro-batch losses) does. The real runs train one step of the same global batch
of 8 sequences in the global scope, split two ways: 1 rank x 4 micro-batches of 2 and 2 ranks (EP=2) x 2
micro-batches of 2. The reference is that batch through our model in this process, all 8 sequences at once.

At step 1 the upcycled router is nearly uniform, so the aux loss is 1 + ~3e-5: the excess over 1 is what
routing moves. Measured (excess over 1): the whole batch 2.5749e-5 (fp32; a DeepSpeed run with one
micro-batch of 8 gives the same bits), the global scope 2.5829e-5 at both 1 x 4 and 2 x 2 (the same
float64 bits). The micro scope gives 5.07e-5 at 1 x 4 and at 2 x 2 (the same micro-batches), 2.5e-5 away
from the whole batch's, so a trainer that ignored the scope fails here (tolerance 3e-7). No micro-scope run
is launched to show it (a launch costs ~20 s on 2 cores);
test_global_step_loss_is_the_loss_of_the_concatenated_batch shows it on the formula.
"""

from __future__ import annotations

import json

import pytest
import torch
from launching import TINY_CONFIG, launch

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


# ---- real runs ------------------------------------------------------------------------------------------

ONE_STEP = (
    *("--train.steps", "1", "--train.global_batch", "8", "--data.eval_batches", "1"),
    *("--output.eval_interval", "0", "--output.checkpoint_interval", "0"),
)


def first_step(workspace, out: str, ranks: int, micro_batch: int, scope: str) -> dict:
    launcher = "upcycle_1gpu" if ranks == 1 else "torchrun"
    split = ("--train.micro_batch", str(micro_batch), "--parallel.ep_size", str(ranks))
    launch(workspace, out, *ONE_STEP, *split, "--moe.aux_loss_scope", scope, launcher=launcher)
    row = json.loads((workspace / out / "train_log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    return row


def whole_batch_reference(workspace) -> float:
    """The aux loss of step 1's global batch as one batch, in this process without DeepSpeed: our model's
    router logits of all 8 sequences at once through `load_balancing_loss`, averaged over the layers."""
    from data_prep.reader import DistributedBatches, PackedTokenDataset
    from pipeline.hf_io import load_model

    paths = ["--model.path", str(workspace / "moe"), "--data.path", str(workspace / "data")]
    t = load_run_config(TINY_CONFIG, [*paths, *ONE_STEP]).train
    data = PackedTokenDataset([str(workspace / "data")], "train", t.seq_len, t.seed, None)
    tokens_BT1 = next(DistributedBatches(data, t.global_batch, 0, 1))
    model = load_model(str(workspace / "moe"), dtype=torch.float32)
    with torch.no_grad():
        model(tokens_BT1[:, :-1])
    per_layer = []
    for _, block in model.moe_blocks():
        logits_TN = block.last_router_logits_TN
        experts_TK = route(logits_TN, block.top_k, block.routing)[1]
        per_layer.append(load_balancing_loss(logits_TN, experts_TK, block.num_experts))
    return float(torch.stack(per_layer).mean())


@pytest.mark.slow
def test_logged_global_aux_loss_does_not_depend_on_the_split(train_workspace):
    one_rank = first_step(train_workspace, "r1_global", ranks=1, micro_batch=2, scope="global")
    two_ranks = first_step(train_workspace, "r2_global", ranks=2, micro_batch=2, scope="global")
    whole = whole_batch_reference(train_workspace)
    assert two_ranks["lm_loss"] == pytest.approx(one_rank["lm_loss"], rel=1e-6)  # the same batch and weights
    # Float64 sums of the same counts and probabilities, in another order.
    assert two_ranks["aux_loss"] == pytest.approx(one_rank["aux_loss"], rel=1e-6, abs=0)
    # Both are the loss of the whole batch at once, up to the fp32 rounding of a loss near 1.
    for row in (one_rank, two_ranks):
        assert row["aux_loss"] == pytest.approx(whole, rel=0, abs=3e-7)
        assert row["loss"] == pytest.approx(row["lm_loss"] + 1e-2 * row["aux_loss"], rel=1e-12)
