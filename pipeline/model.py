"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain PyTorch, readable top to bottom.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so a
Hugging Face state dict loads as it is. Decoder layers listed in `config.moe.layers` have an `MoEBlock`
as their `mlp`. No distributed code lives here: parallelism is applied from `pipeline/ds_adapter.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ModelConfig, rope_inv_freq
from pipeline.moe import MoEBlock, SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order Hugging Face uses, so bf16 results match.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin [T, head_dim] for the positions of one forward, as transformers' rotary embeddings.

    The frequencies are computed in fp32 (`config.rope_inv_freq`); yarn's and longrope's attention factor
    multiplies cos and sin. `dynamic` and `longrope` depend on the length of the forward, its largest
    position + 1 (a tensor: no host sync): every forward is computed as a fresh transformers model computes a
    single forward over the same positions, in training (seq_len tokens) as in inference.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rope, self.head_dim = config.rope, config.head_dim
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)
        if config.rope.type == "longrope":  # beyond the original context: long_factor
            long_seq_len = config.rope.original_max_position_embeddings + 1
            long_D = rope_inv_freq(config.rope, config.head_dim, seq_len=long_seq_len)
            self.register_buffer("long_inv_freq", long_D, persistent=False)

    def frequencies(self, positions_T: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies [head_dim / 2] this forward uses."""
        if self.rope.type == "dynamic":
            return rope_inv_freq(self.rope, self.head_dim, seq_len=positions_T.max() + 1)
        if self.rope.type == "longrope":
            long = positions_T.max() + 1 > self.rope.original_max_position_embeddings
            return torch.where(long, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def forward(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_D = self.frequencies(positions_T).float()  # D = head_dim / 2
        freqs_TD = positions_T.float()[:, None] * inv_freq_D[None, :]
        emb_T2D = torch.cat((freqs_TD, freqs_TD), dim=-1)
        cos_T2D, sin_T2D = emb_T2D.cos(), emb_T2D.sin()
        if self.rope.attention_factor != 1.0:
            cos_T2D, sin_T2D = cos_T2D * self.rope.attention_factor, sin_T2D * self.rope.attention_factor
        return cos_T2D.to(dtype), sin_T2D.to(dtype)


def apply_rotary(x_BNTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    half = x_BNTD.shape[-1] // 2
    rotated = torch.cat((-x_BNTD[..., half:], x_BNTD[..., :half]), dim=-1)
    return x_BNTD * cos_TD + rotated * sin_TD


class Attention(nn.Module):
    """Grouped-query causal self-attention through PyTorch SDPA, with Qwen3's per-head q/k RMSNorm
    (`config.qk_norm`) and the layer's sliding window (`config.attention_window`), both as transformers."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        H, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=config.o_bias)
        if config.qk_norm:  # over head_dim, shared by all heads (Qwen3's self_attn.q_norm / k_norm)
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = config.attention_window(layer_idx)

    def forward(self, x_BTH: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q = self.q_proj(x_BTH).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTH).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE, as Qwen3Attention does
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTH).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos_TD, sin_TD), apply_rotary(k, cos_TD, sin_TD)
        gqa = self.n_kv_heads != self.n_heads
        W = self.sliding_window
        if W is not None and W < T:
            # The query at position i sees keys j with i - W < j <= i (transformers' sliding-window mask).
            positions_T = torch.arange(T, device=x_BTH.device)
            distance_TT = positions_T[:, None] - positions_T[None, :]
            allowed_TT = (distance_TT >= 0) & (distance_TT < W)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_TT, enable_gqa=gqa)
        else:  # a window of at least T tokens is plain causal attention: keep SDPA's causal fast path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            moe = config.moe
            self.mlp = MoEBlock(
                config.hidden_size,
                moe.num_experts,
                moe.top_k,
                moe.expert_intermediate_size,
                routing=moe.routing,
                bias=config.mlp_bias,
                shared_intermediate_size=moe.shared_intermediate_size,
            )
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and final norm: Hugging Face's `model.` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Decoder-only language model: `forward(input_ids [B, T]) -> logits [B, T, V]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids_BT)
        positions_T = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)
        cos, sin = self.model.rotary_emb(positions_T, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def moe_blocks(self) -> list[tuple[int, MoEBlock]]:
        """(layer index, block) for every MoE layer, in order."""
        return [
            (i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoEBlock)
        ]

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token): experts count K/N of their parameters as active."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for _, block in self.moe_blocks():
            expert_params = sum(p.numel() for p in block.experts.parameters())
            inactive += expert_params - expert_params * block.top_k // block.num_experts
        return total, total - inactive
