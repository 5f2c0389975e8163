"""The MoE block's dropless forward, routing and losses against a naive per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.moe import MoEBlock, load_balancing_loss, route, router_z_loss


def naive_moe(block: MoEBlock, x_TH: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition, with no sorting or grouping."""
    logits_TN = x_TH @ block.gate.weight.T
    out = torch.zeros_like(x_TH)
    I = block.experts.intermediate_size
    for t in range(x_TH.shape[0]):
        if block.routing == "softmax-topk":
            weights, experts = F.softmax(logits_TN[t], -1).topk(block.top_k)
        else:
            top, experts = logits_TN[t].topk(block.top_k)
            weights = F.softmax(top, -1)
        for w, e in zip(weights, experts, strict=False):
            gate_up = block.experts.gate_up_proj[e] @ x_TH[t]
            h = F.silu(gate_up[:I]) * gate_up[I:]
            out[t] += w * (block.experts.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("routing", ["softmax-topk", "topk-softmax"])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (6, 1), (16, 4)])
def test_block_matches_naive_reference(routing, num_experts, top_k):
    torch.manual_seed(0)
    block = MoEBlock(32, num_experts, top_k, 24, routing=routing)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x_BTH = torch.randn(3, 7, 32)
    with torch.no_grad():
        out = block(x_BTH)
    torch.testing.assert_close(out.view(-1, 32), naive_moe(block, x_BTH.view(-1, 32)), atol=1e-5, rtol=1e-5)
    assert block.last_tokens_per_expert_N.sum() == 21 * top_k
    assert block.last_router_logits_TN.dtype == torch.float32


def test_block_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    block = MoEBlock(16, 4, 2, 8)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block(torch.randn(2, 5, 16)).square().sum().backward()
    assert block.gate.weight.grad.abs().sum() > 0
    assert block.experts.gate_up_proj.grad.abs().sum() > 0


def test_route_softmax_topk_does_not_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, experts = route(logits, 2, "softmax-topk")
    full = F.softmax(logits, -1)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, full[:, :2])
    assert weights.sum() < 1
    weights, _ = route(logits, 2, "topk-softmax")
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
    T, N, K = 64, 8, 2
    uniform_logits = torch.zeros(T, N)
    experts_uniform = torch.arange(T * K).remainder(N).view(T, K)
    assert load_balancing_loss(uniform_logits, experts_uniform, N).item() == pytest.approx(1.0)
    skewed_logits = torch.zeros(T, N)
    skewed_logits[:, 0] = 5.0
    _, experts_skewed = route(skewed_logits, K, "softmax-topk")
    assert load_balancing_loss(skewed_logits, experts_skewed, N).item() > 2.0


def test_z_loss_penalises_large_logits():
    assert router_z_loss(torch.zeros(4, 8)).item() == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2)
    assert router_z_loss(torch.full((4, 8), 10.0)) > router_z_loss(torch.zeros(4, 8))
