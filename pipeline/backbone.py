"""The model: transformers' own `...ForCausalLM` of the checkpoint's family, in which the MLP of every MoE
layer (`config.moe.layers`) is our `MoEBlock` (pipeline/moe.py). Everything outside those MLPs is
transformers' code (attention, norms, rope, sliding windows, embeddings, head), so an upcycled model keeps
the dense function there by construction. No distributed code lives here: parallelism is applied from
`pipeline/ds_adapter.py`.

The class is built from the dense `config.json` (`ModelConfig.hf`) with its parameters on the meta device,
then filled tensor by tensor (`build`): nothing is initialised twice, and a checkpoint's names are the
module's names (`model.layers.0.self_attn.q_proj.weight`, `model.layers.0.mlp.experts.gate_up_proj`).
Non-persistent buffers (rotary frequencies) are computed by transformers on the CPU as usual.

The module returned is the family's class with two things added (`UpcycledLM`): `forward(input_ids)`
returns the logits `[B, T, V]` (the trainer, eval and verify call it so), and `moe_blocks()` /
`parameter_counts()`. Attention runs as `sdpa` by default; `eager` where a test wants it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from pipeline.config import ModelConfig
from pipeline.moe import MoEBlock

ATTENTION = "sdpa"


def hf_config(config: ModelConfig, attention: str = ATTENTION):
    """transformers' own config object of the family, from the checkpoint's config.json dict."""
    import transformers

    hf = transformers.AutoConfig.for_model(**config.hf)
    hf._attn_implementation = attention
    return hf


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device at once (before any init touches it);
    buffers stay where they are created, so transformers computes its rotary frequencies as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class UpcycledLM:
    """Mixed into the family's `...ForCausalLM` (`skeleton`): logits from `forward(input_ids)`."""

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(input_ids=input_ids, use_cache=False, **kwargs).logits

    def moe_blocks(self) -> list[tuple[int, MoEBlock]]:
        """(layer index, block) for every MoE layer, in order."""
        layers = enumerate(decoder_layers(self))
        return [(i, layer.mlp) for i, layer in layers if isinstance(layer.mlp, MoEBlock)]

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token): routed experts count K/N of their parameters as active."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for _, block in self.moe_blocks():
            expert_params = sum(p.numel() for p in block.experts.parameters())
            inactive += expert_params - expert_params * block.top_k // block.num_experts
        return total, total - inactive


@functools.cache
def upcycled_class(cls: type) -> type:
    return type(cls.__name__, (UpcycledLM, cls), {"__module__": __name__})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.layers


def moe_block(config: ModelConfig) -> MoEBlock:
    moe = config.moe
    return MoEBlock(
        config.hidden_size,
        moe.num_experts,
        moe.top_k,
        moe.expert_intermediate_size,
        routing=moe.routing,
        bias=config.mlp_bias,
        shared_intermediate_size=moe.shared_intermediate_size,
    )


def skeleton(config: ModelConfig, attention: str = ATTENTION) -> nn.Module:
    """The model with every parameter on the meta device: for shapes, parameter counts, or `build`."""
    import transformers
    from transformers import initialization

    with parameters_on_meta(), initialization.no_init_weights():
        hf = hf_config(config, attention)
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
        for layer in config.moe.layers if config.moe else ():
            decoder_layers(model)[layer].mlp = moe_block(config)
    model.__class__ = upcycled_class(type(model))
    return model


def expected_state(config: ModelConfig) -> dict[str, torch.Size]:
    """name -> shape of every tensor in the module's state dict (`lm_head.weight` included when tied)."""
    return {name: t.shape for name, t in skeleton(config).state_dict().items()}


def build(
    config: ModelConfig, reader, dtype: torch.dtype, device: str, names, attention: str = ATTENTION
) -> nn.Module:
    """`skeleton` filled with the tensors `names` from `reader` (already checked against the config), in
    `dtype` on `device`, the output embedding tied to the input one where the config ties them."""
    model = skeleton(config, attention)
    state = {name: reader.get(name).to(device=device, dtype=dtype) for name in names}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"parameters not loaded: {still_meta[:4]}")
    return model.to(device).eval()
