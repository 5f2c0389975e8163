"""A faster forward for DeepSpeed AutoEP's MoE layers, installed after `deepspeed.initialize`.

AutoEP swaps every MoE block for an `AutoEPMoELayer` (router, `GroupedExperts`, all-to-all). Its stock
forward costs more than the layer's FLOPs (bench/moe_layer.py measures it):
- the CPU expert loop indexes `w1[e]` per expert, so autograd builds a full `[N, ...]` zero gradient for
  every expert: N^2 memory traffic, which is what makes fine-grained (E64) layers slow;
- tokens already sorted by expert are permuted a second time into alignment-padded groups (a host
  loop of `.item()` calls on CPU), then unpermuted;
- the combine zero-fills a `[T*K, H]` buffer and scatters into it before the weighted sum.

`install_fast_path` keeps DeepSpeed's modules, parameters, router, split plan and all-to-all, so expert
parallelism, ZeRO and the per-expert checkpoint files are DeepSpeed's own; only the forward of each
layer (and of its experts) changes, by switching the instance's class to a subclass. The math is the
same: one gather into expert order, the experts on unpadded groups (unbound weights on the loop path,
`torch._grouped_mm` on GPU), one gather back, and the same fp32 weighted sum over the K slots. The
permutation gathers have gather backwards, not scatter-adds. The router call is the stock one, including
the layer's `expert_bias` (moe.balance bias, docs/design.md §3: `install_expert_bias` registers it), which
it adds to the probabilities for the top-K choice only.
A shared expert (and its sigmoid gate) is added by the stock `_finalize_output`, as in the stock forward.
Layers using features this path does not cover (DeepEP, AutoTP folding, scores applied before the
experts, fused combine kernels, Triton grouped GEMM) keep the stock forward.

Shapes: T tokens, H hidden, N experts (N_local on this rank), K per token, S = T*K routed slots,
R = slots received by this rank after the all-to-all.
"""

from __future__ import annotations

import torch
from deepspeed.module_inject import auto_ep_layer
from deepspeed.moe import ep_experts

from pipeline.moe import DispatchSlots, PermuteRows, inverse_permutation, run_per_expert


def expert_loop(experts: ep_experts.GroupedExperts, x_SH: torch.Tensor, counts_N: torch.Tensor):
    """SwiGLU experts over slots grouped by expert, one set of matmuls per non-empty expert.

    `unbind` once: its backward stacks the N weight gradients once, where `w1[e]` per expert would make
    autograd add a full-size zero gradient for every expert.
    """
    w1_N, w2_N, w3_N = (w.to(x_SH.dtype).unbind(0) for w in (experts.w1, experts.w2, experts.w3))
    act = (experts.activation, experts.activation_alpha, experts.activation_limit)

    def expert(e: int, x_eH: torch.Tensor) -> torch.Tensor:
        gate_eI, up_eI = x_eH @ w1_N[e].T, x_eH @ w3_N[e].T
        return ep_experts.apply_expert_activation(gate_eI, up_eI, *act, fused=False) @ w2_N[e].T

    return run_per_expert(expert, x_SH, counts_N)


class FastGroupedExperts(ep_experts.GroupedExperts):
    """`GroupedExperts` that take unpadded groups: grouped GEMM on GPU, the unbound loop elsewhere."""

    def forward(self, x_SH: torch.Tensor, counts_N: torch.Tensor) -> torch.Tensor:
        if self.use_grouped_mm and x_SH.is_cuda:
            # Offsets are cumulative counts, computed on the device: no host synchronisation.
            run = (
                ep_experts._run_experts_grouped_mm_fused_gate_up
                if self.gate_up_impl == "fused"
                else ep_experts._run_experts_grouped_mm
            )
            act = (self.activation, self.activation_alpha, self.activation_limit)
            return run(self.w1, self.w2, self.w3, x_SH, counts_N, *act)
        return expert_loop(self, x_SH, counts_N)


class FastAutoEPMoELayer(auto_ep_layer.AutoEPMoELayer):
    """`AutoEPMoELayer` with a leaner dispatch and combine; same parameters, same state dict."""

    def _forward(self, hidden_states_BTH: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states_BTH.shape
        x_TH = hidden_states_BTH.reshape(-1, H)
        top_scores_TK, experts_TK, counts_N = self.router(x_TH, self.expert_bias)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts_N)

        order_S = experts_TK.reshape(-1).argsort(stable=True)  # slots grouped by expert, 0..N-1
        inverse_S = inverse_permutation(order_S)
        routed_SH = DispatchSlots.apply(x_TH, order_S, inverse_S, self.top_k)
        if self.ep_size == 1:
            y_SH = self.experts(routed_SH, counts_N)
        else:
            y_SH = self._experts_across_ranks(routed_SH, experts_TK, counts_N)

        # AutoEP's "weighted_sum" combine: score x output in fp32, summed over the K slots of a token,
        # rounded once to the activation dtype. (A batched [1, K] x [K, H] matmul is slower on CPU.)
        y_TKH = PermuteRows.apply(y_SH, inverse_S, order_S).view(B * T, self.top_k, H)
        out_TH = (y_TKH.float() * top_scores_TK.unsqueeze(-1).float()).sum(dim=1).to(y_SH.dtype)
        return self._finalize_output(out_TH.view(B, T, H), x_TH, hidden_states_BTH, H)

    def _experts_across_ranks(self, routed_SH, experts_TK, counts_N) -> torch.Tensor:
        """Send slots to the ranks owning their experts, run them there, and bring the outputs back."""
        plan = auto_ep_layer.compute_split_plan(
            experts_TK, self.num_experts, self.ep_size, self.num_local_experts, self.ep_group, counts_N
        )
        recv_RH = auto_ep_layer._AllToAllV.apply(
            self.ep_group, routed_SH, plan.input_splits, plan.output_splits
        )
        # Received rows are grouped by (source rank, local expert); regroup them by local expert.
        counts_by_source = plan.local_counts_by_source.reshape(-1).long()
        local_ids = torch.arange(self.num_local_experts, device=recv_RH.device).repeat(self.ep_size)
        expert_of_row_R = torch.repeat_interleave(local_ids, counts_by_source, output_size=recv_RH.shape[0])
        regroup_R = expert_of_row_R.argsort(stable=True)
        ungroup_R = inverse_permutation(regroup_R)
        x_RH = PermuteRows.apply(recv_RH, regroup_R, ungroup_R)
        y_RH = self.experts(x_RH, plan.local_counts_by_source.sum(dim=0))
        y_RH = PermuteRows.apply(y_RH, ungroup_R, regroup_R)
        return auto_ep_layer._AllToAllV.apply(self.ep_group, y_RH, plan.output_splits, plan.input_splits)


def fast_path_supported(layer: auto_ep_layer.AutoEPMoELayer) -> str | None:
    """None when the fast forward covers this layer's configuration, else the reason it does not."""
    experts = layer.experts
    checks = {
        "comm_backend is not the default all-to-all": layer.comm_backend != auto_ep_layer.COMM_BACKEND,
        "AutoTP folding is enabled": layer.folding_group_handles is not None,
        "scores are applied before the experts": layer.score_apply != "post",
        f"combine_impl is {layer.combine_impl!r}": layer.combine_impl != "weighted_sum",
        "the Triton grouped GEMM is selected": getattr(experts, "use_triton_grouped_mm", False),
        "async_split_plan is enabled": bool(layer.async_split_plan and layer.ep_size > 1),
        "the experts are not GroupedExperts": type(experts)
        not in (ep_experts.GroupedExperts, FastGroupedExperts),
    }
    return next((reason for reason, failed in checks.items() if failed), None)


def install_fast_path(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Switch every supported AutoEP layer of `model` to the fast forward.

    Returns (layers switched, one "name: reason" line per layer left on the stock forward).
    """
    switched, skipped = 0, []
    for name, module in model.named_modules():
        if type(module) not in (auto_ep_layer.AutoEPMoELayer, FastAutoEPMoELayer):
            continue
        reason = fast_path_supported(module)
        if reason is not None:
            skipped.append(f"{name or '<root>'}: {reason}")
            continue
        module.__class__ = FastAutoEPMoELayer
        module.experts.__class__ = FastGroupedExperts
        switched += 1
    return switched, skipped
