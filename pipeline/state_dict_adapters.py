"""Every name map of the MoE weights, in one place (docs/design.md §4): ours, DeepSpeed AutoEP's, and the
Hub layout of each stock transformers class an export targets.

Legend: N experts, H hidden size, I expert width, L a layer index, e an expert index.

    ours (= transformers 5's in-memory fused layout, `upcycle export --layout fused`)
        model.layers.L.mlp.gate.weight               [N, H]
        model.layers.L.mlp.experts.gate_up_proj      [N, 2I, H]   gate rows, then up rows
        model.layers.L.mlp.experts.down_proj         [N, H, I]
        model.layers.L.mlp.shared_expert.{gate,up,down}_proj.weight   [W, H] [W, H] [H, W]  (W = S*I; only
        model.layers.L.mlp.shared_expert_gate.weight                  [1, H]   with moe.shared_shards)
    AutoEP (DeepSpeed's engine and checkpoints)
        model.layers.L.mlp.router.gate.weight        [N, H]
        model.layers.L.mlp.experts.w1 / w3 / w2      [N, I, H] gate / [N, I, H] up / [N, H, I] down
        model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight, mlp.shared_experts_gate.weight
    Hub layout (what transformers' own save_pretrained writes for the class, and what transformers 4.x,
    vLLM, SGLang and llama.cpp's converter read), one tensor per expert:
        Mixtral              model.layers.L.block_sparse_moe.gate.weight                 [N, H]
                             model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight [I, H] [I, H] [H, I]
        Qwen2MoE, Qwen3MoE,  model.layers.L.mlp.gate.weight                              [N, H]
        FlexOlmo, Ernie4.5   model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight     [I, H] [I, H] [H, I]
        Qwen2MoE's shared expert has our names (`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`).

Every other tensor (attention, norms, embeddings, dense MLPs) has the same name everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError

# ---- ours ----------------------------------------------------------------------------------------------
OUR_ROUTER, OUR_EXPERTS = "gate", "experts"
OUR_GATE_UP, OUR_DOWN = "gate_up_proj", "down_proj"
OUR_SHARED, OUR_SHARED_GATE = "shared_expert", "shared_expert_gate"  # MoEBlock's, Qwen2MoE's names
MOE_LAYER_PATTERN = r"model\.layers\.\d+\.mlp"  # our MoE blocks, as AutoEP's regex

# ---- AutoEP ----------------------------------------------------------------------------------------------
AUTOEP_ROUTER = "router.gate"  # AutoEP moves our `mlp.gate` Linear under its router module
AUTOEP_GATE, AUTOEP_UP, AUTOEP_DOWN = "w1", "w3", "w2"
ROUTER_SUFFIX = f"mlp.{AUTOEP_ROUTER}"  # module names of the routers inside the engine
# AutoEPMoELayer keeps our shared expert and its gate as modules under its own attribute names
AUTOEP_SHARED, AUTOEP_SHARED_GATE = "shared_experts", "shared_experts_gate"
# (ours, AutoEP's) module names inside an MoE block that are renamed, not reshaped
_RENAMED = (
    (f".mlp.{OUR_ROUTER}.", f".mlp.{AUTOEP_ROUTER}."),
    (f".mlp.{OUR_SHARED}.", f".mlp.{AUTOEP_SHARED}."),
    (f".mlp.{OUR_SHARED_GATE}.", f".mlp.{AUTOEP_SHARED_GATE}."),
)


def _renamed(name: str, to_autoep: bool) -> str:
    for ours, autoep in _RENAMED:
        old, new = (ours, autoep) if to_autoep else (autoep, ours)
        if old in name:
            return name.replace(old, new)
    return name


# The selection bias of `moe.balance: bias` (docs/design.md §3): `model.layers.L.mlp.expert_bias` [N] fp32,
# the same name in both (the attribute AutoEP's forward passes to its router, and our MoEBlock's buffer).
EXPERT_BIAS = "expert_bias"


def autoep_to_ours(raw: dict[str, torch.Tensor], where: Path | str) -> dict[str, torch.Tensor]:
    """A state dict under AutoEP's names -> under ours (`mlp.router.gate` -> `mlp.gate`, w1 + w3 ->
    gate_up_proj, w2 -> down_proj, `shared_experts[_gate]` -> `shared_expert[_gate]`); other names pass
    through unchanged."""
    state = {}
    for name, tensor in raw.items():
        base, _, leaf = name.rpartition(".")
        if not base.endswith(f".{OUR_EXPERTS}"):
            state[_renamed(name, to_autoep=False)] = tensor
        elif leaf == AUTOEP_GATE:
            up = raw.get(f"{base}.{AUTOEP_UP}")
            if up is None:
                raise UserError(f"{where}: {base}.{AUTOEP_UP} (up_proj) is missing")
            state[f"{base}.{OUR_GATE_UP}"] = torch.cat([tensor, up], dim=1)  # [N, 2I, H]: gate rows, then up
        elif leaf == AUTOEP_DOWN:
            state[f"{base}.{OUR_DOWN}"] = tensor  # [N, H, I]
        elif leaf != AUTOEP_UP:  # w3 went into gate_up_proj above
            state[name] = tensor
    return state


def ours_to_autoep(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `autoep_to_ours` (the layout of an engine's state dict)."""
    raw = {}
    for name, tensor in state.items():
        base, _, leaf = name.rpartition(".")
        if base.endswith(f".{OUR_EXPERTS}") and leaf == OUR_GATE_UP:
            gate_NIH, up_NIH = tensor.chunk(2, dim=1)
            raw[f"{base}.{AUTOEP_GATE}"], raw[f"{base}.{AUTOEP_UP}"] = gate_NIH, up_NIH
        elif base.endswith(f".{OUR_EXPERTS}") and leaf == OUR_DOWN:
            raw[f"{base}.{AUTOEP_DOWN}"] = tensor
        else:
            raw[_renamed(name, to_autoep=True)] = tensor
    return raw


def stack_experts(by_index: dict[int, torch.Tensor], what: str) -> torch.Tensor:
    """One tensor per expert, by expert index, stacked along a new first dim [N, ...]; UserError naming
    `what` unless the indices are exactly 0..N-1."""
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise UserError(f"{what} is incomplete: {sorted(by_index)}")
    return torch.stack([by_index[e] for e in range(len(by_index))])


# ---- the Hub layout of each stock class ----------------------------------------------------------------


@dataclass(frozen=True)
class HubLayout:
    block: str  # the MoE block's module name in a decoder layer
    gate: str  # per-expert names of the gate, up and down projections
    up: str
    down: str


HUB_LAYOUTS = {
    "MixtralForCausalLM": HubLayout("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": HubLayout("mlp", "gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeForCausalLM": HubLayout("mlp", "gate_proj", "up_proj", "down_proj"),
    "FlexOlmoForCausalLM": HubLayout("mlp", "gate_proj", "up_proj", "down_proj"),
    "Ernie4_5_MoeForCausalLM": HubLayout("mlp", "gate_proj", "up_proj", "down_proj"),
}
LAYOUTS = ("hub", "fused")  # `upcycle export --layout`
_OUR_MOE_NAME = re.compile(
    rf"^(model\.layers\.\d+)\.mlp\.({OUR_ROUTER}\.weight|{OUR_EXPERTS}\.(?:{OUR_GATE_UP}|{OUR_DOWN}))$"
)
_HUB_EXPERT_NAME = re.compile(r"^(model\.layers\.\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")


def ours_to_hub(name: str, tensor: torch.Tensor, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hub-layout tensors of `arch` that one tensor of ours becomes (itself, for a non-MoE tensor or a
    class without a Hub layout here). Each expert's tensor is its own copy: safetensors refuses to write
    tensors that share memory."""
    match = _OUR_MOE_NAME.match(name)
    layout = HUB_LAYOUTS.get(arch)
    if match is None or layout is None:
        yield name, tensor
        return
    layer, leaf = match.groups()
    prefix = f"{layer}.{layout.block}"
    if leaf == f"{OUR_ROUTER}.weight":
        yield f"{prefix}.gate.weight", tensor
    elif leaf.endswith(OUR_GATE_UP):
        gate_NIH, up_NIH = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}.experts.{e}.{layout.gate}.weight", gate_NIH[e].clone()
            yield f"{prefix}.experts.{e}.{layout.up}.weight", up_NIH[e].clone()
    else:
        for e in range(tensor.shape[0]):
            yield f"{prefix}.experts.{e}.{layout.down}.weight", tensor[e].clone()


def hub_to_ours(state: dict[str, torch.Tensor], arch: str, where: Path | str) -> dict[str, torch.Tensor]:
    """A state dict in `arch`'s Hub layout -> ours: per-expert tensors stacked, gate and up fused."""
    layout = HUB_LAYOUTS[arch]
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _HUB_EXPERT_NAME.match(name)
        if match and match.group(2) == layout.block:
            layer, _, e, proj = match.groups()
            experts.setdefault((layer, proj), {})[int(e)] = tensor
        elif name.endswith(f".{layout.block}.gate.weight"):
            ours[name.replace(f".{layout.block}.gate.", f".mlp.{OUR_ROUTER}.")] = tensor
        else:
            ours[name] = tensor
    for layer in sorted({layer for layer, _ in experts}):
        stacked = {
            proj: stack_experts(
                experts.get((layer, proj), {}), f"{where}: {layer}.{layout.block}.experts.*.{proj}"
            )
            for proj in (layout.gate, layout.up, layout.down)
        }
        prefix = f"{layer}.mlp.{OUR_EXPERTS}"
        ours[f"{prefix}.{OUR_GATE_UP}"] = torch.cat([stacked[layout.gate], stacked[layout.up]], dim=1)
        ours[f"{prefix}.{OUR_DOWN}"] = stacked[layout.down]
    return ours
