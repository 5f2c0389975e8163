"""Training observability: MoE health from router logits, FLOP estimates, the expert-load picture."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig

# Dense bf16 peak of common accelerators, for the MFU estimate (TFLOP/s).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "GH200": 989.0}


def expert_load(logits_TN: torch.Tensor, top_k: int, routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens per expert [N] float, summed router entropy over tokens) for one layer's logits."""
    from pipeline.moe import route

    probs_TN = F.softmax(logits_TN.detach().float(), dim=-1)
    _, experts_TK = route(logits_TN.detach(), top_k, routing)
    counts_N = torch.bincount(experts_TK.flatten(), minlength=logits_TN.shape[-1]).float()
    entropy_sum = -(probs_TN * probs_TN.clamp_min(1e-20).log()).sum()
    return counts_N, entropy_sum


def load_summary(counts_N: torch.Tensor) -> dict[str, float]:
    """Share-based statistics of one layer's expert load."""
    share_N = counts_N / counts_N.sum().clamp_min(1)
    return {
        "max_over_mean": float(share_N.max() / share_N.mean().clamp_min(1e-12)),
        "dead_experts": float((counts_N == 0).sum()),
        "min_share": float(share_N.min()),
        "max_share": float(share_N.max()),
    }


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x active matmul parameters + causal attention."""
    H, L, F_ = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    attn_params = H * (2 * q_dim + 2 * kv_dim)
    mlp_params = 0
    for layer in range(L):
        if config.is_moe_layer(layer):
            moe = config.moe
            mlp_params += 3 * H * moe.expert_intermediate_size * moe.top_k + H * moe.num_experts
        else:
            mlp_params += 3 * H * F_
    matmul_params = L * attn_params + mlp_params + H * config.vocab_size
    attention_scores = L * 2 * 2 * q_dim * seq_len / 2  # QK^T and AV, causal half, per token
    return 6 * matmul_params + 3 * attention_scores


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def save_load_heatmap(history: list[tuple[int, list[list[float]]]], layer_ids: list[int], path: Path) -> None:
    """PNG: one panel per MoE layer, expert share (colour) per expert (rows) over training steps (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history or not layer_ids:
        return
    steps = [s for s, _ in history]
    fig, axes = plt.subplots(len(layer_ids), 1, figsize=(8, 1.2 + 1.6 * len(layer_ids)), squeeze=False)
    for row, layer in enumerate(layer_ids):
        shares = torch.tensor([loads[row] for _, loads in history]).T  # [N, steps]
        ax = axes[row][0]
        image = ax.imshow(
            shares.numpy(),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0], steps[-1], shares.shape[0] - 0.5, -0.5),
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="token share")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("Expert load over training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
