"""Training observability: MoE health from router logits, FLOP estimates, the expert-load picture, and
`RunLog`, where a run's numbers go (console, jsonl files, TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig

TRAIN_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm")  # train_log.jsonl, train/* scalars

# Dense bf16 peak of common accelerators, for the MFU estimate (TFLOP/s).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "GH200": 989.0}


def expert_load(
    logits_TN: torch.Tensor, top_k: int, routing: str, bias_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens per expert [N] float, summed router entropy over tokens) for one layer's logits; `bias_N`:
    the layer's expert bias (moe.balance bias), so the counts are those of the forward's selection."""
    from pipeline.moe import route

    probs_TN = F.softmax(logits_TN.detach().float(), dim=-1)
    _, experts_TK = route(logits_TN.detach(), top_k, routing, bias_N)
    counts_N = torch.bincount(experts_TK.flatten(), minlength=logits_TN.shape[-1]).float()
    entropy_sum = -(probs_TN * probs_TN.clamp_min(1e-20).log()).sum()
    return counts_N, entropy_sum


def window_losses(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """[B] float64 on the CPU: each window's mean next-token loss (validation in the trainer and `upcycle
    eval`, so both score a window the same way)."""
    per_token_BT = F.cross_entropy(logits_BTV.float().transpose(1, 2), targets_BT, reduction="none")
    return per_token_BT.double().mean(dim=1).cpu()


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of independent samples (e.g. per-window validation losses)."""
    n = values.numel()
    return float(values.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def bias_summary(bias_LN: torch.Tensor | None) -> dict[str, list[float]]:
    """train_log.jsonl fields for the expert bias (moe.balance bias): per MoE layer, its min and max."""
    if bias_LN is None:
        return {}
    return {
        "expert_bias_min": bias_LN.min(dim=1).values.tolist(),
        "expert_bias_max": bias_LN.max(dim=1).values.tolist(),
    }


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


class RunLog:
    """Rank 0 prints and writes; other ranks only compute. Files under output.dir:
    train_log.jsonl and val_loss.jsonl (one object per line), tensorboard/, expert_load.png."""

    def __init__(
        self,
        output_dir: str,
        config: ModelConfig,
        seq_len: int,
        global_batch: int,
        steps: int,
        rank: int,
        world: int,
        device: torch.device,
    ):
        self.dir, self.config, self.rank, self.world, self.device = output_dir, config, rank, world, device
        self.seq_len, self.global_batch, self.steps = seq_len, global_batch, steps
        self.flops_per_token = flops_per_token(config, seq_len)
        self.peak_tflops = peak_tflops(device)
        self.writer = None
        self.load_history: list[tuple[int, list[list[float]]]] = []

    def open(self) -> None:
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.dir, "tensorboard"))

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _append_jsonl(self, name: str, row: dict) -> None:
        if self.rank == 0:
            with open(os.path.join(self.dir, name), "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def train_step(self, step: int, stats: dict) -> None:
        """The step line, train_log.jsonl and the train/perf/moe scalars of one optimizer step."""
        tokens_per_s = self.global_batch * self.seq_len / stats["step_time"]
        tflops = self.flops_per_token * tokens_per_s / self.world / 1e12  # per device
        mfu = f"{100 * tflops / self.peak_tflops:.1f}%" if self.peak_tflops else "n/a"
        memory_gib = (
            torch.cuda.max_memory_allocated() / 2**30
            if self.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        self.log(
            f"step {step:>6}/{self.steps} | loss {stats['loss']:.4f} | lm {stats['lm_loss']:.4f} | "
            f"aux {stats['aux_loss']:.4f} | lr {stats['lr']:.2e} | grad norm {stats['grad_norm']:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s | MFU {mfu} | mem {memory_gib:.1f} GiB"
        )
        row = {"step": step, **{k: stats[k] for k in TRAIN_KEYS}, **bias_summary(stats.get("expert_bias"))}
        self._append_jsonl("train_log.jsonl", row)
        if not self.writer:
            return
        for key in TRAIN_KEYS:
            self.writer.add_scalar(f"train/{key}", stats[key], step)
        self.writer.add_scalar("perf/tokens_per_s", tokens_per_s, step)
        self.writer.add_scalar("perf/tflops_per_device", tflops, step)
        if "expert_counts" in stats:
            self._moe_step(step, stats["expert_counts"], stats["router_entropy"])
        if "expert_bias" in stats:
            self._bias_step(step, stats["expert_bias"])

    def _bias_step(self, step: int, bias_LN: torch.Tensor) -> None:
        """moe.balance bias: each layer's expert bias (min, max, spread and the whole vector)."""
        for row, layer in enumerate(self.config.moe.layers):
            bias_N = bias_LN[row]
            self.writer.add_scalar(f"moe/layer{layer:02d}/expert_bias_min", float(bias_N.min()), step)
            self.writer.add_scalar(f"moe/layer{layer:02d}/expert_bias_max", float(bias_N.max()), step)
            self.writer.add_scalar(
                f"moe/layer{layer:02d}/expert_bias_spread", float(bias_N.max() - bias_N.min()), step
            )
            self.writer.add_histogram(f"moe/layer{layer:02d}/expert_bias", bias_N, step)

    def _moe_step(self, step: int, counts_LN: torch.Tensor, entropy_L: list[float]) -> None:
        shares = []
        for row, layer in enumerate(self.config.moe.layers):
            for key, value in load_summary(counts_LN[row]).items():
                self.writer.add_scalar(f"moe/layer{layer:02d}/{key}", value, step)
            self.writer.add_scalar(f"moe/layer{layer:02d}/router_entropy", entropy_L[row], step)
            share = counts_LN[row] / counts_LN[row].sum().clamp_min(1)
            self.writer.add_histogram(f"moe/layer{layer:02d}/expert_share", share, step)
            shares.append(share.tolist())
        self.load_history.append((step, shares))

    def validation(self, step: int, val_loss: float, standard_error: float = float("nan")) -> None:
        perplexity = math.exp(min(val_loss, 50))
        se = f" +- {standard_error:.4f}" if math.isfinite(standard_error) else ""
        self.log(f"step {step:>6} | val loss {val_loss:.4f}{se} | val ppl {perplexity:.2f}")
        if self.writer:
            self.writer.add_scalar("val/loss", val_loss, step)
            self.writer.add_scalar("val/perplexity", perplexity, step)
        row = {"step": step, "val_loss": val_loss, "val_loss_se": standard_error}
        self._append_jsonl("val_loss.jsonl", row)

    def close(self, step: int) -> None:
        if self.rank == 0 and self.load_history:
            png = os.path.join(self.dir, "expert_load.png")
            save_load_heatmap(self.load_history, list(self.config.moe.layers), png)
            self.log(f"expert load picture: {png}")
        if self.writer:
            self.writer.close()
        self.log(f"done: {step} steps; tensorboard --logdir {self.dir}/tensorboard")
