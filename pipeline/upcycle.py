"""The upcycling math (He et al. 2024): dense SwiGLU MLP -> N experts with a virtual-group router.

Notation (docs/design.md §1; the math in §2): dense width F, hidden H, granularity G (expert width
I = F/G), expansion rate R (full copies), N = R*G experts, top-K with K = m*G. Expert e = r*G + s holds
shard s of copy r.
"""

from __future__ import annotations

import math

import torch

from pipeline.config import ROUTINGS, ModelConfig, MoEConfig, check_moe_shape
from pipeline.errors import UserError


def expert_scale(num_experts: int, top_k: int, granularity: int, routing: str) -> float:
    """c such that the upcycled block computes dense(x) at step 0 once up and down are scaled by sqrt(c).

    With virtual groups the unscaled MoE output is dense(x) / c:
    topk-softmax: the K selected weights sum to 1 over K/G whole groups of G shards -> c = G (exact);
    softmax-topk: K probabilities of about 1/N each -> c = N*G/K (exact while probabilities are uniform).
    """
    if routing == "topk-softmax":
        return float(granularity)
    return num_experts * granularity / top_k


def parse_moe_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`all`, `every:k` (layers 0, k, 2k, ...) or a comma list like `0,3,5`."""
    spec = spec.strip()
    if spec == "all":
        return tuple(range(num_layers))
    if spec.startswith("every:"):
        step = spec.removeprefix("every:")
        if not step.isdigit() or int(step) < 1:
            raise UserError(f"--moe-layers {spec!r}: 'every:k' needs a positive integer k")
        return tuple(range(0, num_layers, int(step)))
    try:
        layers = sorted({int(tok) for tok in spec.split(",") if tok.strip()})
    except ValueError as exc:
        raise UserError(f"--moe-layers {spec!r}: expected 'all', 'every:k' or a list like '0,3,5'") from exc
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise UserError(
            f"--moe-layers {spec!r}: layers {bad or '[]'} do not exist; the model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    return tuple(layers)


# The converter's flag for each MoEConfig field, so that its errors name what the user typed.
FLAGS = {"num_experts": "--experts", "top_k": "--top-k", "granularity": "--granularity"}


def make_moe_config(
    config: ModelConfig,
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    routing: str = "softmax-topk",
    layers: str = "all",
    router_init_std: float | None = None,
    seed: int = 0,
    weight_scaling: bool = True,
) -> MoEConfig:
    """Validate an upcycling request against the dense config; every problem names its flag."""
    F_, N, K, G = config.intermediate_size, num_experts, top_k, granularity
    if router_init_std is None:
        router_init_std = default_router_init_std(config.hidden_size)
    if config.moe is not None:
        raise UserError(
            "the input checkpoint is already upcycled (config.json has a 'moe' section); "
            "pass the dense checkpoint as --dense"
        )
    if routing not in ROUTINGS:
        raise UserError(f"--routing {routing!r}: expected one of {ROUTINGS}")
    check_moe_shape(N, K, G, describe=lambda field, value: f"{FLAGS[field]} {value}")
    if F_ % G:
        raise UserError(
            f"--granularity {G} does not divide the dense intermediate_size F={F_} (F % G must be 0)"
        )
    if not router_init_std > 0:
        raise UserError(f"--router-init-std {router_init_std}: must be > 0")
    scale = expert_scale(N, K, G, routing) if weight_scaling else 1.0
    return MoEConfig(
        num_experts=N,
        top_k=K,
        granularity=G,
        routing=routing,
        layers=parse_moe_layers(layers, config.num_hidden_layers),
        expert_intermediate_size=F_ // G,
        expert_scale=scale,
        router_init_std=router_init_std,
        seed=seed,
    )


def default_router_init_std(hidden_size: int) -> float:
    """1e-3 / sqrt(H): router logits with a standard deviation near 1e-3 for unit-RMS (normed) inputs.

    softmax-topk is exact only for uniform router probabilities; its relative error at step 0 tracks
    the spread of the logits, so a small init keeps the upcycled model near 1e-4 of the dense one while
    Adam, being scale-free, still moves the router at full speed.
    """
    return 1e-3 / math.sqrt(hidden_size)


def virtual_group_router(moe: MoEConfig, hidden_size: int, layer: int) -> torch.Tensor:
    """Router weight [N, H]: row r*G + s = B[r] with B ~ N(0, std^2) of shape [R, H].

    The G shards of a copy share one logit, so top-K (a multiple of G) always selects whole copies.
    Seeded per layer so the result does not depend on the order layers are converted in.
    """
    generator = torch.Generator().manual_seed(moe.seed * 100_003 + layer)
    base_RH = torch.randn(moe.expansion_rate, hidden_size, generator=generator) * moe.router_init_std
    return base_RH.repeat_interleave(moe.granularity, dim=0)


def upcycle_mlp(
    moe: MoEConfig,
    gate_FH: torch.Tensor,
    up_FH: torch.Tensor,
    down_HF: torch.Tensor,
    gate_bias_F: torch.Tensor | None = None,
    up_bias_F: torch.Tensor | None = None,
    down_bias_H: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Expert tensors in `dtype` for one dense MLP, names relative to the MoE block's `experts`.

    Shard s takes rows [s*I, (s+1)*I) of gate and up and the same columns of down. up and down are both
    multiplied by sqrt(c): SwiGLU is linear in each, so the product restores dense(x) exactly. The
    scaling runs in fp32 on the G shards once; only then are they cast and replicated R times.
    """
    G, R, I = moe.granularity, moe.expansion_rate, moe.expert_intermediate_size
    H = gate_FH.shape[1]
    root_c = math.sqrt(moe.expert_scale)
    gate_GIH = gate_FH.float().reshape(G, I, H).to(dtype)
    up_GIH = (up_FH.float().reshape(G, I, H) * root_c).to(dtype)
    down_GHI = (down_HF.float().reshape(H, G, I).permute(1, 0, 2) * root_c).to(dtype)
    tensors = {
        "gate_up_proj": torch.cat([gate_GIH, up_GIH], dim=1).repeat(R, 1, 1),  # [N, 2I, H], e = r*G + s
        "down_proj": down_GHI.repeat(R, 1, 1),  # [N, H, I]
    }
    if gate_bias_F is not None:
        up_bias_GI = up_bias_F.float().reshape(G, I) * root_c
        tensors["gate_up_bias"] = torch.cat([gate_bias_F.float().reshape(G, I), up_bias_GI], dim=1).repeat(
            R, 1
        )
        # The dense output bias belongs once to the sum: K/G groups x G shards, each weighted ~1/c,
        # must add up to b, so every expert carries b * c / G.
        tensors["down_bias"] = (
            (down_bias_H.float() * moe.expert_scale / G).expand(moe.num_experts, -1).clone()
        )
    return {name: t.to(dtype) for name, t in tensors.items()}
