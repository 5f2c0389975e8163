"""The MoE block: router (`gate`) plus fused experts, in the layout DeepSpeed AutoEP and transformers use.

Shapes: T tokens, H hidden, N experts, K experts per token, I expert width.

    gate                  nn.Linear(H, N, bias=False)        router, logits_TN = gate(x_TH)
    experts.gate_up_proj  [N, 2I, H]   rows [0, I) gate, rows [I, 2I) up
    experts.down_proj     [N, H, I]
    experts.act_fn        the dense MLP's activation (transformers' ACT2FN[hidden_act]: SiLU, GELUTanh, ...)
    shared_expert         GatedMLP of width S*I, always active (only with moe.shared_shards = S > 0)
    shared_expert_gate    nn.Linear(H, 1, bias=False): shared_expert(x) is scaled by sigmoid(gate(x))

The forward is dropless (every token reaches its K experts). Routing math runs in fp32:
- "softmax-topk" (default): probs_TN = softmax(logits); keep the top K probabilities, no renormalisation;
- "topk-softmax" (Mixtral): take the top K logits, softmax over those K.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def route(
    logits_TN: torch.Tensor, top_k: int, routing: str, bias_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weights_TK fp32, experts_TK int64) for router logits of any dtype.

    `bias_N` (`moe.balance: bias`, docs/design.md §3): an expert bias added to the probabilities for the
    top-K choice only; the weights stay the unbiased probabilities.
    """
    logits_TN = logits_TN.float()
    if bias_N is not None:
        return route_biased(logits_TN, top_k, routing, bias_N)
    if routing == "softmax-topk":
        # Select on the logits, weight with the probabilities: the same experts as top-K of the softmax
        # (it is monotonic), except where two logits ~1e-8 apart round to one fp32 probability. At step 0
        # the copies' logits are that close, and top-K over tied probabilities can split a virtual group
        # (seen on SmolLM2-135M, E64T8G8: 2 of 7680 routings; docs/design.md §3).
        experts_TK = logits_TN.topk(top_k, dim=-1).indices
        return F.softmax(logits_TN, dim=-1).gather(-1, experts_TK), experts_TK
    if routing == "topk-softmax":
        top_logits_TK, experts_TK = logits_TN.topk(top_k, dim=-1)
        return F.softmax(top_logits_TK, dim=-1), experts_TK
    raise ValueError(f"unknown routing {routing!r}")


def route_biased(
    logits_TN: torch.Tensor, top_k: int, routing: str, bias_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` with an expert bias, as DeepSpeed AutoEP's router computes it (`deepspeed.moe.ep_router`):
    top-K (unsorted) of `softmax(logits) + bias`, weights gathered from the unbiased softmax, renormalised
    for topk-softmax. The same expressions in the same order, so our block, the trainer's capture and the
    engine's forward pick the same experts and the same weights."""
    if routing not in ("softmax-topk", "topk-softmax"):
        raise ValueError(f"unknown routing {routing!r}")
    probs_TN = F.softmax(logits_TN.float(), dim=-1)
    experts_TK = torch.topk(probs_TN + bias_N.float(), k=top_k, dim=-1, sorted=False).indices
    weights_TK = probs_TN.gather(dim=1, index=experts_TK)
    if routing == "topk-softmax":
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK, experts_TK


def load_balancing_loss(logits_TN: torch.Tensor, experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer loss N * sum_e f_e * P_e.

    f_e: share of the T*K routed slots that went to expert e (no gradient);
    P_e: mean router probability of e over the T tokens (carries the gradient to the router).
    Equals 1 for perfectly uniform routing.
    """
    probs_TN = F.softmax(logits_TN.float(), dim=-1)
    slots_N = torch.bincount(experts_TK.flatten(), minlength=num_experts).float()
    f_N = slots_N / experts_TK.numel()
    return num_experts * torch.sum(f_N * probs_TN.mean(dim=0))


def router_z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TN.float(), dim=-1).square().mean()


def inverse_permutation(order_S: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i, so `y[inverse]` undoes `x[order]`."""
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return inverse_S


class PermuteRows(torch.autograd.Function):
    """rows[order] for a permutation `order`; the backward is a gather by the inverse, not a scatter-add."""

    @staticmethod
    def forward(ctx, rows, order, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class DispatchSlots(torch.autograd.Function):
    """x_TH -> routed_SH = x[order // K]: each token copied to its K slots, slots in expert order.

    The backward gathers the slot gradients back into [T, K, H] order and sums over K, instead of the
    scatter-add with accumulation that advanced indexing would record.
    """

    @staticmethod
    def forward(ctx, x_TH, order_S, inverse_S, top_k):
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TH.index_select(0, order_S // top_k)

    @staticmethod
    def backward(ctx, grad_SH):
        (inverse_S,) = ctx.saved_tensors
        grad_TKH = grad_SH.index_select(0, inverse_S).view(-1, ctx.top_k, grad_SH.shape[-1])
        return grad_TKH.sum(dim=1), None, None, None


def run_per_expert(expert, x_SH: torch.Tensor, counts_N: torch.Tensor) -> torch.Tensor:
    """`expert(e, x_eH)` on each non-empty group of `x_SH` (rows grouped by expert), outputs concatenated.

    With no rows at all (a rank that received no tokens under expert parallelism), one empty call keeps
    the weights in the graph, so they get zero gradients rather than none and ZeRO's gradient hooks fire
    on every rank alike.
    """
    groups = x_SH.split(counts_N.tolist())
    outputs = [expert(e, x_eH) for e, x_eH in enumerate(groups) if x_eH.shape[0] > 0]
    return torch.cat(outputs) if outputs else expert(0, x_SH)


def _grouped_mm_available(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def unbound(param: torch.Tensor | None, num_experts: int) -> list:
    """The N experts' slices of a [N, ...] parameter (N Nones for a missing bias). unbind once: indexing
    `param[e]` per expert would make autograd build a full-size zero gradient for every expert (N^2 memory
    traffic); unbind's backward stacks the N grads once."""
    return [None] * num_experts if param is None else list(param.unbind(0))


class Experts(nn.Module):
    """N gated experts, down(act(gate(x)) * up(x)), stored as 3-D tensors; `forward` takes tokens already
    sorted by expert."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        act: str = "silu",
    ):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Biases exist only when the dense MLP had them (Llama `mlp_bias`).
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.act_fn = activation(act)

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_N: torch.Tensor) -> torch.Tensor:
        """x_SH: S = T*K routed slots, grouped by expert in order 0..N-1; returns y_SH."""
        if _grouped_mm_available(x_SH) and self.gate_up_bias is None:
            return self._forward_grouped(x_SH, tokens_per_expert_N)
        return self._forward_loop(x_SH, tokens_per_expert_N)

    def _swiglu(self, gate_up_S2I: torch.Tensor) -> torch.Tensor:
        gate_SI, up_SI = gate_up_S2I.split(self.intermediate_size, dim=-1)
        return self.act_fn(gate_SI) * up_SI

    def _forward_loop(self, x_SH: torch.Tensor, tokens_per_expert_N: torch.Tensor) -> torch.Tensor:
        N = self.num_experts
        gate_up_N, down_N, gate_up_bias_N, down_bias_N = (
            unbound(p, N) for p in (self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias)
        )

        def expert(e: int, x_eH: torch.Tensor) -> torch.Tensor:
            h_eI = self._swiglu(F.linear(x_eH, gate_up_N[e], gate_up_bias_N[e]))
            return F.linear(h_eI, down_N[e], down_bias_N[e])

        return run_per_expert(expert, x_SH, tokens_per_expert_N)

    def _forward_grouped(self, x_SH: torch.Tensor, tokens_per_expert_N: torch.Tensor) -> torch.Tensor:
        # One grouped GEMM per projection, no host sync: offsets are the cumulative token counts.
        offsets_N = tokens_per_expert_N.cumsum(0).to(torch.int32)
        gate_up_S2I = torch._grouped_mm(x_SH, self.gate_up_proj.transpose(-2, -1), offs=offsets_N)
        return torch._grouped_mm(self._swiglu(gate_up_S2I), self.down_proj.transpose(-2, -1), offs=offsets_N)


class NonGatedExperts(nn.Module):
    """N non-gated experts, down(act(up(x))) (Nemotron's squared ReLU, GPT-NeoX's gelu), as 3-D tensors:
    `up_proj` [N, I, H], `down_proj` [N, H, I], optional `up_bias` [N, I] and `down_bias` [N, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias=False, act="relu2"):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.up_bias = nn.Parameter(torch.empty(num_experts, intermediate_size)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.act_fn = activation(act)

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_N: torch.Tensor) -> torch.Tensor:
        N = self.num_experts
        up_N, down_N, up_bias_N, down_bias_N = (
            unbound(p, N) for p in (self.up_proj, self.down_proj, self.up_bias, self.down_bias)
        )

        def expert(e: int, x_eH: torch.Tensor) -> torch.Tensor:
            return F.linear(self.act_fn(F.linear(x_eH, up_N[e], up_bias_N[e])), down_N[e], down_bias_N[e])

        return run_per_expert(expert, x_SH, tokens_per_expert_N)


def activation(name: str) -> nn.Module:
    """transformers' module for a `hidden_act` name (`silu`, `gelu_pytorch_tanh`, ...): the same function the
    dense model's MLP applies."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), SwiGLU for `act = silu`: the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Router + experts, a drop-in replacement for the dense MLP of a decoder layer.

    After each forward, `last_router_logits_TN` and `last_tokens_per_expert_N` hold this step's router
    logits (for the auxiliary losses) and expert loads (for metrics).

    `expert_bias` [N] fp32: the selection bias of a model trained with `moe.balance: bias` (set with
    `set_expert_bias`, docs/design.md §3); None otherwise, and then not part of the state dict, so the
    checkpoints of `upcycle convert` and every existing load keep their names.

    `shared_intermediate_size` > 0 adds Qwen2MoE's always-active shared expert: out = routed(x) +
    sigmoid(shared_expert_gate(x)) * shared_expert(x), in the activations' dtype, as transformers'
    Qwen2MoeSparseMoeBlock and DeepSpeed AutoEP's `_finalize_output` compute it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        routing: str = "softmax-topk",
        bias: bool = False,
        shared_intermediate_size: int = 0,
        act: str = "silu",
        gated: bool = True,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.routing = num_experts, top_k, routing
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        experts = Experts if gated else NonGatedExperts
        self.experts = experts(num_experts, hidden_size, intermediate_size, bias=bias, act=act)
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, act=act)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.last_router_logits_TN: torch.Tensor | None = None
        self.last_tokens_per_expert_N: torch.Tensor | None = None
        self.register_buffer("expert_bias", None, persistent=True)

    def set_expert_bias(self, bias_N: torch.Tensor | None) -> None:
        """Route with this selection bias from now on (None: without one, today's routing)."""
        if bias_N is not None and tuple(bias_N.shape) != (self.num_experts,):
            raise ValueError(f"expert bias of shape {list(bias_N.shape)}, expected [{self.num_experts}]")
        self.expert_bias = (
            None if bias_N is None else bias_N.detach().to(self.gate.weight.device, torch.float32).clone()
        )

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        B, T, H = x_BTH.shape
        x_TH = x_BTH.reshape(-1, H)
        # Router in fp32 even for bf16 weights: at step 0 the virtual groups' logits differ by ~1e-3, and
        # bf16 rounding could make two copies tie and top-K then split a group.
        logits_TN = F.linear(x_TH.float(), self.gate.weight.float())
        weights_TK, experts_TK = route(logits_TN, self.top_k, self.routing, self.expert_bias)

        # Sort the T*K (token, expert) slots by expert so each expert sees one contiguous block.
        experts_S = experts_TK.flatten()
        order_S = experts_S.argsort(stable=True)
        inverse_S = inverse_permutation(order_S)
        # scatter_add into a known size: bincount would sync with the host on GPU to size its output
        ones_S = torch.ones_like(experts_S)
        tokens_per_expert_N = experts_S.new_zeros(self.num_experts).scatter_add_(0, experts_S, ones_S)
        y_SH = self.experts(DispatchSlots.apply(x_TH, order_S, inverse_S, self.top_k), tokens_per_expert_N)
        # Weighted sum over each token's K slots in fp32, rounded once (as DeepSpeed AutoEP combines).
        y_TKH = PermuteRows.apply(y_SH, inverse_S, order_S).view(B * T, self.top_k, H)
        out_TH = (y_TKH.float() * weights_TK.unsqueeze(-1)).sum(dim=1).to(x_TH.dtype)
        if self.shared_expert is not None:
            out_TH = out_TH + torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)

        self.last_router_logits_TN = logits_TN
        self.last_tokens_per_expert_N = tokens_per_expert_N.detach()
        return out_TH.view(B, T, H)
