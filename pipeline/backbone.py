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
import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.moe import MoEBlock, activation

ATTENTION = "sdpa"


def family_config(d: dict, source: str = "config.json"):
    """transformers' own config object of the family, from a config.json dict (our `moe` section left out);
    UserError naming `source` for a model type transformers does not know."""
    import transformers

    d = {key: value for key, value in d.items() if key != "moe"}
    try:
        return transformers.AutoConfig.for_model(**d)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"{source}: model_type={d.get('model_type')!r} is not a model type transformers "
            f"{transformers.__version__} knows ({exc})"
        ) from None


def hf_config(config: ModelConfig, attention: str = ATTENTION):
    """The backbone's config: transformers' config of the family with the attention implementation set
    (`eager` for a class without `sdpa` support, e.g. Gemma 2 with its soft-capped attention)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    hf = family_config(config.hf)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)]
    if attention == "sdpa" and not getattr(model_class, "_supports_sdpa", False):
        attention = "eager"
    hf._attn_implementation = attention
    return hf


# ---- the dense MLP's form ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPForm:
    """What `upcycle convert` needs to know of a dense MLP. Gated: down(act(gate(x)) * up(x)), with gate and
    up as `gate_proj`/`up_proj` or fused in `gate_up_proj` [2F, H] (gate rows first). Non-gated:
    down(act(up(x))) under the family's projection names (`names`: up, down)."""

    act: str  # transformers' `hidden_act` name
    fused: bool
    bias: bool
    gated: bool = True
    names: tuple[str, str] = ("up_proj", "down_proj")


SEPARATE, FUSED = ("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj")
# (up, down) of the non-gated MLPs: Nemotron, Arcee, Jais2; GPT-NeoX; Phi; Starcoder2
NON_GATED = (("up_proj", "down_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2"), ("c_fc", "c_proj"))
TINY_MLP = {"hidden_size": 8, "intermediate_size": 12}  # the sizes of the behaviour check's MLP


def dense_mlp_form(hf, source: str) -> MLPForm:
    """The form of the MLP of every decoder layer of `hf`'s model class, checked twice: by its projections'
    names and by its behaviour (a small MLP of the same class against the form's formula with the config's
    activation). UserError naming the module's class otherwise."""
    with parameters_on_meta(), _no_init_weights():
        model = _auto_model(hf)
    kinds = {type(layer.mlp) for layer in _layers(model, source)}
    if len(kinds) != 1:
        names = sorted(kind.__name__ for kind in kinds)
        raise UserError(f"{source}: the decoder layers have MLPs of several classes ({names})")
    mlp = decoder_layers(model)[0].mlp
    linears = {name for name, module in mlp.named_children() if isinstance(module, nn.Linear)}
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
    bias = any(name.endswith("bias") for name, _ in mlp.named_parameters())
    non_gated = [pair for pair in NON_GATED if set(pair) == linears]
    if isinstance(act, str) and (set(SEPARATE) <= linears or set(FUSED) <= linears):
        form = MLPForm(act=act, fused=set(FUSED) <= linears, bias=bias)
    elif isinstance(act, str) and non_gated:
        form = MLPForm(act=act, fused=False, bias=bias, gated=False, names=non_gated[0])
    else:
        params = [name for name, _ in mlp.named_parameters()]
        raise UserError(
            f"{source}: the MLP of {hf.model_type} is {type(mlp).__name__} with parameters {params}: not a "
            "form upcycle convert knows (gated: gate_proj, up_proj, down_proj or gate_up_proj, down_proj; "
            f"non-gated: one of {[list(pair) for pair in NON_GATED]}; with the config's hidden_act)"
        )
    _check_behaviour(type(mlp), hf, form, source)
    return form


def _check_behaviour(mlp_class: type, hf, form: MLPForm, source: str) -> None:
    small = copy.deepcopy(hf)
    for key, value in TINY_MLP.items():
        setattr(small, key, value)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        mlp = mlp_class(small).float().eval()  # eval: an MLP's dropout (Seed-OSS) is not its form
        for p in mlp.parameters():
            nn.init.normal_(p, std=0.5)
        x = torch.randn(5, TINY_MLP["hidden_size"])
        with torch.no_grad():
            expected = _formula(mlp, form, x)
            same = torch.allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)
    finally:
        torch.random.set_rng_state(torch_state)
    if not same:
        formula = "down(act(gate(x)) * up(x))" if form.gated else "down(act(up(x)))"
        raise UserError(
            f"{source}: {mlp_class.__name__} does not compute {formula} with act = {form.act!r}: its form "
            "is not one `upcycle convert` knows"
        )


def _formula(mlp: nn.Module, form: MLPForm, x: torch.Tensor) -> torch.Tensor:
    act = activation(form.act)
    if not form.gated:
        up, down = (getattr(mlp, name) for name in form.names)
        return down(act(up(x)))
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1) if form.fused else (mlp.gate_proj(x), mlp.up_proj(x))
    return mlp.down_proj(act(gate) * up)


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


# Where every family this version upcycles keeps its decoder layers: the prefix of the checkpoint names, of
# AutoEP's layer pattern (state_dict_adapters.MOE_LAYER_PATTERN) and of the converter's MLP tensors.
LAYERS_MODULE = "model.layers"


def _layers(model: nn.Module, source: str) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    where = next((name for name, module in model.named_modules() if module is layers), None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
        raise UserError(
            f"{source}: model_type={model.config.model_type!r}: {type(model).__name__} keeps no decoder "
            "layers with an `mlp` under `.layers`: not a decoder this project can upcycle"
        )
    if where != LAYERS_MODULE:
        raise UserError(
            f"{source}: model_type={model.config.model_type!r}: {type(model).__name__} keeps its decoder "
            f"layers at `{where}`, and this version upcycles models whose layers are `{LAYERS_MODULE}` "
            "(the names its checkpoints, DeepSpeed AutoEP's layer pattern and the converter use)"
        )
    return layers


def _auto_model(hf) -> nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32)


def _no_init_weights():
    from transformers import initialization

    return initialization.no_init_weights()


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
        act=config.hidden_act,
        gated=config.mlp_gated,
    )


def skeleton(config: ModelConfig, attention: str = ATTENTION) -> nn.Module:
    """The model with every parameter on the meta device: for shapes, parameter counts, or `build`."""
    with parameters_on_meta(), _no_init_weights():
        model = _auto_model(hf_config(config, attention))
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
