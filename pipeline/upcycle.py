"""The upcycling math (He et al. 2024): dense SwiGLU MLP -> N experts with a virtual-group router.

Notation (docs/design.md §1; the math in §2): dense width F, hidden H, granularity G (expert width
I = F/G), S shards in the shared expert (0: none), expansion rate R (copies of the G - S routed shards),
N = R*(G - S) experts, top-K with K = m*(G - S). Expert e = r*(G - S) + s holds routed shard s of copy r,
which is shard S + s of the dense MLP; the shared expert holds shards 0..S-1.
"""

from __future__ import annotations

import math

import torch

from pipeline.config import ROUTINGS, ModelConfig, MoEConfig, check_drop_ratio, check_moe_shape
from pipeline.errors import UserError


def expert_scale(num_experts: int, top_k: int, group_size: int, routing: str) -> float:
    """c such that the routed experts compute their shards of dense(x) at step 0 once up and down are
    scaled by sqrt(c); `group_size` is g = G - S, the routed shards of a copy (G without a shared expert).

    With virtual groups the unscaled routed output is (the routed shards' part of dense(x)) / c:
    topk-softmax: the K selected weights sum to 1 over K/g whole groups of g shards -> c = g (exact);
    softmax-topk: K probabilities of about 1/N each -> c = N*g/K (exact while probabilities are uniform).
    """
    if routing == "topk-softmax":
        return float(group_size)
    return num_experts * group_size / top_k


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
FLAGS = {
    "num_experts": "--experts",
    "top_k": "--top-k",
    "granularity": "--granularity",
    "shared_shards": "--shared-shards",
    "drop_ratio": "--drop-ratio",
}


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
    drop_ratio: float = 0.0,
    shared_shards: int = 0,
) -> MoEConfig:
    """Validate an upcycling request against the dense config; every problem names its flag."""
    F_, N, K, G, S = config.intermediate_size, num_experts, top_k, granularity, shared_shards
    if router_init_std is None:
        router_init_std = default_router_init_std(config.hidden_size)
    if config.moe is not None:
        raise UserError(
            "the input checkpoint is already upcycled (config.json has a 'moe' section); "
            "pass the dense checkpoint as --dense"
        )
    if routing not in ROUTINGS:
        raise UserError(f"--routing {routing!r}: expected one of {ROUTINGS}")
    check_moe_shape(N, K, G, S, describe=lambda field, value: f"{FLAGS[field]} {value}")
    if S and not config.mlp_gated:
        raise UserError(
            f"--shared-shards {S}: the dense MLP is not gated ({config.hidden_act}), and the shared "
            "expert is Qwen2MoE's gated one"
        )
    if S and config.mlp_bias:
        raise UserError(
            f"--shared-shards {S}: the dense MLP has biases (mlp_bias=true), and a shared expert with "
            "biases is not supported (no stock class, nor DeepSpeed AutoEP's experts, has MLP biases)"
        )
    check_drop_ratio(drop_ratio, describe=lambda field, value: f"{FLAGS[field]} {value}")
    if F_ % G:
        raise UserError(
            f"--granularity {G} does not divide the dense intermediate_size F={F_} (F % G must be 0)"
        )
    if not router_init_std > 0:
        raise UserError(f"--router-init-std {router_init_std}: must be > 0")
    scale = expert_scale(N, K, G - S, routing) if weight_scaling else 1.0
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
        drop_ratio=drop_ratio,
        shared_shards=S,
    )


def default_router_init_std(hidden_size: int) -> float:
    """1e-3 / sqrt(H): router logits with a standard deviation near 1e-3 for unit-RMS (normed) inputs.

    softmax-topk is exact only for uniform router probabilities; its relative error at step 0 tracks
    the spread of the logits, so a small init keeps the upcycled model near 1e-4 of the dense one while
    Adam, being scale-free, still moves the router at full speed.
    """
    return 1e-3 / math.sqrt(hidden_size)


def virtual_group_router(moe: MoEConfig, hidden_size: int, layer: int) -> torch.Tensor:
    """Router weight [N, H]: row r*g + s = B[r] with B ~ N(0, std^2) of shape [R, H], g = G - S.

    The g routed shards of a copy share one logit, so top-K (a multiple of g) always selects whole copies.
    Seeded per layer so the result does not depend on the order layers are converted in.
    """
    generator = torch.Generator().manual_seed(moe.seed * 100_003 + layer)
    base_RH = torch.randn(moe.expansion_rate, hidden_size, generator=generator) * moe.router_init_std
    return base_RH.repeat_interleave(moe.group_size, dim=0)


# Offsets the drop generator's seed from the router's (`seed * 100003 + layer`), so the two streams differ.
DROP_STREAM = 1 << 40


def upcycle_mlp(
    moe: MoEConfig,
    gate_FH: torch.Tensor | None,
    up_FH: torch.Tensor,
    down_HF: torch.Tensor,
    gate_bias_F: torch.Tensor | None = None,
    up_bias_F: torch.Tensor | None = None,
    down_bias_H: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    layer: int = 0,
    act: str = "silu",
) -> dict[str, torch.Tensor]:
    """Routed expert tensors in `dtype` for the dense MLP of decoder `layer`, named as in the block's
    `experts` (the shared expert's shards, 0..S-1, are `shared_expert`'s). `gate_FH` None: a non-gated MLP,
    down(act(up(x))), whose `act` decides the scaling (`projection_scales`).

    Shard s takes rows [s*I, (s+1)*I) of gate and up and the same columns of down. up and down are scaled so
    that the product restores the shards' part of dense(x) exactly (`projection_scales`). The scaling runs in
    fp32 on the G - S routed shards once; only then are they cast and replicated R times. With
    moe.drop_ratio > 0 every one of the N experts is built on its own first (`drop_neurons`), then scaled.
    """
    G, I, S = moe.granularity, moe.expert_intermediate_size, moe.shared_shards
    H = up_FH.shape[1]
    # fp32 shards, the neuron on dim 1 except for down ([G, H, I]); views, never written to.
    shards = {"up": up_FH.float().reshape(G, I, H), "down": down_HF.float().reshape(H, G, I).permute(1, 0, 2)}
    if gate_FH is not None:
        shards["gate"] = gate_FH.float().reshape(G, I, H)
    if up_bias_F is not None:
        shards["up_bias"] = up_bias_F.float().reshape(G, I)
    if gate_bias_F is not None:
        shards["gate_bias"] = gate_bias_F.float().reshape(G, I)
    routed = {name: shards_G[S:] for name, shards_G in shards.items()}
    scales = projection_scales(moe.expert_scale, gate_FH is not None, act)
    if moe.drop_ratio > 0:
        # a dropped neuron is drawn from its whole dense matrix's statistics, shared shards included
        stats = {name: (shards_G.mean(), shards_G.std()) for name, shards_G in shards.items()}
        experts = drop_neurons(moe, routed, stats, drop_generator(moe, layer))
        return _scaled_experts(moe, experts, 1, down_bias_H, dtype, scales)
    return _scaled_experts(moe, routed, moe.expansion_rate, down_bias_H, dtype, scales)


# Activations positively homogeneous of a degree p, act(a z) = a^p act(z) for a > 0 (transformers' names).
HOMOGENEOUS = {"relu": 1, "relu2": 2}


def projection_scales(c: float, gated: bool, act: str) -> tuple[float, float]:
    """(up scale, down scale) whose effect on an expert's output is exactly the factor c (docs/design.md §2):
    gated, down(act(gate x) * a up x) b: linear in up and in down, so sqrt(c) each (act(gate) untouched);
    non-gated with act of degree p (squared ReLU: 2), b down(act(a up x)) = a^p b (...): c^(1/(p+1)) each,
    the paper's c^(1/3) for Nemotron's squared ReLU; any other activation (gelu): down alone, times c."""
    if gated:
        return math.sqrt(c), math.sqrt(c)
    if act in HOMOGENEOUS:
        root = c ** (1 / (HOMOGENEOUS[act] + 1))
        return root, root
    return 1.0, c


# The shared expert's sigmoid gate starts at w = 0, a gate of exactly 0.5 for every token; its down_proj
# is doubled (exact: a power of two) so that gate x shared expert = its shards of the dense MLP.
SHARED_GATE_AT_ZERO = 0.5


def upcycle_shared_expert(
    moe: MoEConfig, gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The shared expert of a layer, named as in the block (`shared_expert.*`, `shared_expert_gate`):
    shards 0..S-1 of the dense MLP, i.e. its first S*I neurons, unscaled, and a zero gate."""
    W = moe.shared_intermediate_size
    H = gate_FH.shape[1]
    return {
        "shared_expert.gate_proj.weight": gate_FH[:W].to(dtype),
        "shared_expert.up_proj.weight": up_FH[:W].to(dtype),
        "shared_expert.down_proj.weight": (down_HF[:, :W].float() / SHARED_GATE_AT_ZERO).to(dtype),
        "shared_expert_gate.weight": torch.zeros(1, H, dtype=dtype),
    }


def _scaled_experts(
    moe: MoEConfig, parts: dict, copies: int, down_bias_H, dtype, scales: tuple[float, float]
) -> dict[str, torch.Tensor]:
    """Scale up and down (`scales`) in fp32, cast, and repeat `copies` times along the expert dim.

    `parts` hold the G - S routed shards (copies = R) or, after `drop_neurons`, all N experts (copies = 1);
    with a "gate" they are gated experts (`gate_up_proj`), without one non-gated (`up_proj`).
    """
    up_scale, down_scale = scales
    up = (parts["up"] * up_scale).to(dtype)
    if "gate" in parts:  # [N, 2I, H], e = r*G + s
        tensors = {"gate_up_proj": torch.cat([parts["gate"].to(dtype), up], dim=1).repeat(copies, 1, 1)}
    else:
        tensors = {"up_proj": up.repeat(copies, 1, 1)}  # [N, I, H]
    tensors["down_proj"] = (parts["down"] * down_scale).to(dtype).repeat(copies, 1, 1)  # [N, H, I]
    if "up_bias" in parts:
        up_bias = parts["up_bias"] * up_scale  # part of the up projection, scaled with it
        if "gate_bias" in parts:
            tensors["gate_up_bias"] = torch.cat([parts["gate_bias"], up_bias], dim=1).repeat(copies, 1)
        else:
            tensors["up_bias"] = up_bias.repeat(copies, 1)
    if down_bias_H is not None:
        # The dense output bias belongs once to the sum: K/G groups x G shards, each weighted ~1/c,
        # must add up to b, so every expert carries b * c / G (biases come without a shared expert: S = 0).
        tensors["down_bias"] = (
            (down_bias_H.float() * moe.expert_scale / moe.granularity).expand(moe.num_experts, -1).clone()
        )
    return {name: t.to(dtype) for name, t in tensors.items()}


def drop_generator(moe: MoEConfig, layer: int) -> torch.Generator:
    """A generator of its own, seeded per layer like the router, so Drop-Upcycling moves no other draw."""
    return torch.Generator().manual_seed(moe.seed * 100_003 + layer + DROP_STREAM)


def dropped_neurons(moe: MoEConfig, generator: torch.Generator) -> torch.Tensor:
    """[N, I] bool: round(drop_ratio * I) neurons per expert, a random subset drawn for every expert."""
    N, I = moe.num_experts, moe.expert_intermediate_size
    order_NI = torch.rand(N, I, generator=generator).argsort(dim=1)
    dropped_NI = torch.zeros(N, I, dtype=torch.bool)
    return dropped_NI.scatter_(1, order_NI[:, : round(moe.drop_ratio * I)], True)


def drop_neurons(
    moe: MoEConfig, shards: dict, stats: dict, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Drop-Upcycling (Nakamura et al. 2025): the [G - S, ...] fp32 routed shards become [N, ...]
    experts, each with its own round(drop_ratio * I) neurons re-drawn.

    Expert e = r*(G - S) + s starts from routed shard s; a dropped neuron's gate row, up row, down column
    (and gate/up bias entries) are drawn from N(mean, std^2) of the whole dense matrix (or bias) they
    belong to, `stats[name]` = (mean, std). They are drawn unscaled: `_scaled_experts` then multiplies
    new and kept up/down neurons by sqrt(c) alike. The shared expert keeps every neuron.
    """
    dropped_NI = dropped_neurons(moe, generator)
    experts = {}
    for name, shards_G in shards.items():
        experts_N = shards_G.repeat(moe.expansion_rate, *[1] * (shards_G.dim() - 1))  # a copy we may write
        neuron_first = experts_N.transpose(1, 2) if name == "down" else experts_N  # a view: [N, I, ...]
        fresh = torch.randn(int(dropped_NI.sum()), *neuron_first.shape[2:], generator=generator)
        mean, std = stats[name]
        neuron_first[dropped_NI] = fresh * std + mean
        experts[name] = experts_N
    return experts
