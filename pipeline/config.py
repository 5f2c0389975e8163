"""Typed model configuration: the single source of truth for shapes, read from a Hugging Face `config.json`.

`ModelConfig.from_hf_dict` accepts any decoder transformers knows whose MLP is gated (`pipeline/backbone.py`
checks the form): the backbone is transformers' own class, so only the shapes and the MLP's form are read
for every family. For Llama, Mistral, Qwen2 and Qwen3 (`EXPORT_FAMILIES`, the ones `upcycle export` writes
as a stock MoE class) the attention, rope (old `rope_scaling` + `rope_theta` and new `rope_parameters`
spellings) and sliding windows are parsed as well, as transformers applies them, and anything a stock MoE
class cannot represent exactly is refused naming the field. An upcycled checkpoint is the dense config plus
a `moe` section, parsed into `MoEConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError

EXPORT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
ROUTINGS = ("softmax-topk", "topk-softmax")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE as transformers 5 computes it (`modeling_rope_utils`), every default resolved by `_parse_rope`."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0  # linear, llama3, dynamic, yarn; longrope: only for the default attention_factor
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # The context the frequencies were pretrained for: llama3, yarn, longrope read it from the rope fields;
    # dynamic scales beyond max_position_embeddings (as transformers does), which is stored here.
    original_max_position_embeddings: int = 8192
    # yarn, longrope: multiplies cos and sin (1 for every other type)
    attention_factor: float = 1.0
    # yarn: the correction range (in rotations) between extrapolated and interpolated frequencies
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # longrope: divisors of the head_dim/2 frequencies, for forwards up to / beyond the original context
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


def _as_field(name: str, value) -> str:
    return f"moe.{name}={value!r}"


def check_moe_shape(
    num_experts: int, top_k: int, granularity: int, shared_shards: int = 0, describe=_as_field
) -> None:
    """The virtual-group invariants (docs/design.md §2): S of the G shards form the shared expert, the
    other G - S are routed, N = R*(G - S) experts, top-K picks whole groups of G - S.

    `describe(field, value)` names a value where the user set it: `moe.top_k=3` for a config.json
    (the default), `--top-k 3` for the converter's flags. Raises UserError with the first violation.
    """
    N, K, G, S = num_experts, top_k, granularity, shared_shards
    group = G - S  # routed shards per copy: the size of a virtual group

    def name(field: str) -> str:
        values = {"num_experts": N, "top_k": K, "granularity": G, "shared_shards": S}
        return describe(field, values[field])

    per_copy = f"{name('granularity')} - {name('shared_shards')}" if S else name("granularity")
    if G < 1:
        raise UserError(f"{name('granularity')}: must be >= 1")
    if not 0 <= S < G:
        raise UserError(
            f"{name('shared_shards')}: must be in [0, G) with G = {name('granularity')}: the shared "
            "expert takes S of the G shards of the dense MLP and at least one shard stays routed"
        )
    checks = [
        (N >= 1 and K >= 1, f"{name('num_experts')} and {name('top_k')} must be >= 1"),
        (K <= N, f"{name('top_k')} is larger than {name('num_experts')}"),
        (
            N % group == 0,
            f"{name('num_experts')} is not a multiple of {per_copy}: experts come in whole "
            "copies of the routed shards of the MLP (N = R*(G - S))",
        ),
        (
            K % group == 0,
            f"{name('top_k')} is not a multiple of {per_copy}: top-K must pick whole virtual "
            "groups (K = m*(G - S))",
        ),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    if problem:
        raise UserError(problem)


def check_drop_ratio(drop_ratio, describe=_as_field) -> None:
    """Drop-Upcycling's ratio (docs/design.md §2): a number in [0, 1); `describe` as in check_moe_shape.

    1 would re-initialise every neuron, leaving nothing of the dense model to upcycle; NaN fails the
    comparison and is refused with the rest.
    """
    is_number = isinstance(drop_ratio, (int, float)) and not isinstance(drop_ratio, bool)
    if not (is_number and 0 <= drop_ratio < 1):
        raise UserError(
            f"{describe('drop_ratio', drop_ratio)}: must be a number in [0, 1) (the share of each "
            "expert's intermediate neurons re-initialised; 0 turns Drop-Upcycling off, 0.5 is the paper's "
            "choice)"
        )


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """How the MLPs of `layers` were upcycled (notation: docs/design.md §1).

    Validates itself on construction (from the converter and from a hand-edited config.json alike);
    the checks that need the dense config (F == G*I, layers that exist) are in `ModelConfig`.
    """

    num_experts: int  # N = R * (G - S) routed experts
    top_k: int  # K = m * (G - S)
    granularity: int  # G shards per dense MLP; expert width I = F / G
    routing: str  # "softmax-topk" (default) or "topk-softmax"
    layers: tuple[int, ...]  # decoder layers whose MLP is an MoE block
    expert_intermediate_size: int  # I
    expert_scale: float  # c: up_proj and down_proj were multiplied by sqrt(c)
    router_init_std: float = 0.0
    seed: int = 0
    # Drop-Upcycling: share of each expert's neurons re-initialised (0: plain upcycling; configs written
    # before the field existed load with 0, which is what they were converted with).
    drop_ratio: float = 0.0
    # S of the G shards form one always-active shared expert of width S*I with a sigmoid gate (Qwen2MoE's
    # design; docs/design.md §2); 0: none (configs written before the field existed).
    shared_shards: int = 0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise UserError(f"moe.routing={self.routing!r}: expected one of {ROUTINGS}")
        check_moe_shape(self.num_experts, self.top_k, self.granularity, self.shared_shards)
        if self.expert_intermediate_size < 1:
            raise UserError(f"moe.expert_intermediate_size={self.expert_intermediate_size}: must be >= 1")
        if not self.layers:
            raise UserError("moe.layers is empty: an upcycled model has at least one MoE layer")
        if not self.expert_scale > 0:
            raise UserError(f"moe.expert_scale={self.expert_scale}: must be > 0")
        check_drop_ratio(self.drop_ratio)

    @property
    def group_size(self) -> int:
        """G - S: routed shards per copy, the experts of one virtual group (sharing one router logit)."""
        return self.granularity - self.shared_shards

    @property
    def expansion_rate(self) -> int:
        """R: how many copies of the routed shards of the dense MLP the experts hold."""
        return self.num_experts // self.group_size

    @property
    def shared_intermediate_size(self) -> int:
        """S*I: the shared expert's width (0 without one)."""
        return self.shared_shards * self.expert_intermediate_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> MoEConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["layers"] = tuple(known.get("layers", ()))
        required = [f for f in ("num_experts", "top_k", "granularity", "routing",
                                "expert_intermediate_size", "expert_scale") if f not in known]  # fmt: skip
        if required:
            raise UserError(f"{source}: the moe section lacks {required}; re-run `upcycle convert`")
        try:
            return cls(**known)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)."""

    model_type: str
    vocab_size: int
    hidden_size: int  # H
    intermediate_size: int  # F, width of the dense MLP
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of every q and k head (q_norm, k_norm), before RoPE
    # Sliding-window attention as transformers computes it: a layer in `sliding_layers` lets the query at
    # position q attend the keys at q - sliding_window < k <= q (itself and the W - 1 tokens before it).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    moe: MoEConfig | None = None
    # The config.json dict (without our `moe` section) that transformers' own config class of the family is
    # built from: the backbone (pipeline/backbone.py) is transformers' model class of that config.
    hf: dict = field(default_factory=dict, compare=False, repr=False)
    # The dense MLP's form (every family): its activation (transformers' `hidden_act` name) and whether gate
    # and up are one `gate_up_proj` [2F, H], gate rows first (Phi-3, GLM-4).
    hidden_act: str = "silu"
    mlp_fused: bool = False
    # Non-gated MLPs, down(act(up(x))) (Nemotron's squared ReLU, GPT-NeoX's gelu): the family's (up, down)
    # projection names.
    mlp_gated: bool = True
    mlp_names: tuple[str, str] = ("up_proj", "down_proj")

    def __post_init__(self) -> None:
        bad = [i for i in self.sliding_layers if not 0 <= i < self.num_hidden_layers]
        if bad or (self.sliding_layers and not (self.sliding_window or 0) >= 1):
            raise UserError(
                f"sliding_window={self.sliding_window!r} on layers {list(self.sliding_layers)}: the window "
                f"must be a positive integer and the layers must exist ({self.num_hidden_layers} layers)"
            )
        moe = self.moe
        if moe is None:
            return
        if moe.granularity * moe.expert_intermediate_size != self.intermediate_size:
            raise UserError(
                f"moe.granularity={moe.granularity} x moe.expert_intermediate_size="
                f"{moe.expert_intermediate_size} != intermediate_size={self.intermediate_size} (F = G*I)"
            )
        if moe.shared_shards and self.mlp_bias:
            raise UserError(
                f"moe.shared_shards={moe.shared_shards} with mlp_bias=true: a shared expert with biases is "
                "not supported (no stock class, nor DeepSpeed AutoEP's experts, has MLP biases)"
            )
        missing = [i for i in moe.layers if not 0 <= i < self.num_hidden_layers]
        if missing:
            raise UserError(
                f"moe.layers {missing} do not exist: the model has {self.num_hidden_layers} layers"
            )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    def attention_window(self, layer: int) -> int | None:
        """The sliding window W of a decoder layer, or None for full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def exportable_family(self) -> bool:
        """The attention fields above are parsed (EXPORT_FAMILIES); other families leave them at defaults."""
        return self.model_type in EXPORT_FAMILIES

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict; raise UserError naming the field for anything unsupported."""
        model_type = d.get("model_type")
        if model_type not in EXPORT_FAMILIES:
            return _any_family(cls, d, source)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise UserError(f"{source}: field {key!r} must be a positive integer, got {d.get(key)!r}")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(
                f"{source}: hidden_act={act!r}: only SwiGLU MLPs (hidden_act 'silu') are supported"
            )
        sliding_window, sliding_layers = _parse_sliding_window(d, model_type, source)
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UserError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        # Qwen3Config's head_dim defaults to 128 (independent of hidden_size); the others derive it.
        head_dim = d.get("head_dim") or (128 if model_type == "qwen3" else d["hidden_size"] // heads)
        # Biases as transformers builds each family: Llama's and Qwen3's `attention_bias` puts one on q, k, v
        # and o; Qwen2 always has q/k/v biases and none on o; Mistral has none; only Llama reads `mlp_bias`.
        attention_bias = model_type in ("llama", "qwen3") and bool(d.get("attention_bias", False))
        moe = MoEConfig.from_dict(d["moe"], source) if d.get("moe") else None
        rope = _parse_rope(d, source, head_dim)
        try:
            return cls(
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope=rope,
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=attention_bias,
                mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=sliding_window,
                sliding_layers=sliding_layers,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
                moe=moe,
                hf={key: value for key, value in d.items() if key != "moe"},
            )
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None


def _any_family(cls, d: dict, source: str) -> ModelConfig:
    """A decoder of any other family: the shapes from transformers' own config class of `model_type`, the
    MLP's form from its model class (`backbone.dense_mlp_form`); the attention is transformers' business."""
    from pipeline.backbone import dense_mlp_form, family_config

    hf = family_config(d, source)
    heads = hf.num_attention_heads
    moe = MoEConfig.from_dict(d["moe"], source) if d.get("moe") else None
    form = dense_mlp_form(hf, source)
    try:
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
            mlp_bias=form.bias,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            moe=moe,
            hf={key: value for key, value in d.items() if key != "moe"},
            hidden_act=form.act,
            mlp_fused=form.fused,
            mlp_gated=form.gated,
            mlp_names=form.names,
        )
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


# `layer_types` entries: sliding or not. "attention" is the legacy spelling transformers remaps to full.
LAYER_TYPES = {"full_attention": False, "attention": False, "sliding_attention": True}


def _parse_sliding_window(d: dict, model_type: str, source: str) -> tuple[int | None, tuple[int, ...]]:
    """(window W, layers that use it), decided exactly as transformers 5 decides it for the family.

    - mistral: `sliding_window` (not null) applies to every layer (MistralForCausalLM ignores layer_types);
    - qwen2, qwen3: only with `use_sliding_window`; the layers are `layer_types` when the config lists them,
      else those with index >= `max_window_layers` (default 28), as Qwen2Config/Qwen3Config derive them;
    - llama: has no sliding window; a `sliding_window` below max_position_embeddings is refused.

    A windowed layer's query at position q attends keys k with q - W < k <= q (transformers'
    `sliding_window_causal_mask_function`). What transformers would not run, or not run as written (unknown
    layer types, sliding layers without a window, a Mistral layer_types list it would ignore), is refused.
    """
    n = d["num_hidden_layers"]
    layer_types = d.get("layer_types")
    listed = None
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != n:
            raise UserError(
                f"{source}: layer_types={layer_types!r}: expected a list with one entry per layer "
                f"(num_hidden_layers={n})"
            )
        unknown = sorted({str(t) for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise UserError(
                f"{source}: layer_types has entries {unknown} that this model cannot compute; supported: "
                "'full_attention', 'sliding_attention'"
            )
        listed = tuple(i for i, t in enumerate(layer_types) if LAYER_TYPES[t])
    window = d.get("sliding_window")
    if model_type == "llama":
        if listed:
            raise UserError(
                f"{source}: layer_types marks layers {list(listed)} 'sliding_attention': Llama has no "
                "sliding-window attention"
            )
        if window is not None and window < d.get("max_position_embeddings", 0):
            raise UserError(
                f"{source}: sliding_window={window} is smaller than max_position_embeddings="
                f"{d.get('max_position_embeddings')}: LlamaForCausalLM ignores sliding_window, so it is "
                "unclear which attention the checkpoint was trained with; use model_type 'mistral' for a "
                "sliding window, or set sliding_window to null for full attention"
            )
        return None, ()
    if model_type == "mistral":
        layers = tuple(range(n)) if window is not None else ()
        if listed is not None and listed != layers:
            raise UserError(
                f"{source}: layer_types={layer_types!r} disagrees with sliding_window={window!r}: "
                "MistralForCausalLM ignores layer_types and applies sliding_window to every layer; remove "
                "layer_types or make it match"
            )
    else:  # qwen2, qwen3
        if not d.get("use_sliding_window", False):
            window = None
        if listed is None:
            first = d.get("max_window_layers", 28)
            if window is not None and not isinstance(first, int):
                raise UserError(f"{source}: max_window_layers={first!r} must be an integer")
            listed = tuple(i for i in range(n) if window is not None and i >= first)
        elif listed and window is None:
            raise UserError(
                f"{source}: layer_types marks layers {list(listed)} 'sliding_attention' but no window is in "
                f"effect (use_sliding_window={d.get('use_sliding_window', False)!r}, "
                f"sliding_window={d.get('sliding_window')!r}): transformers cannot run this config"
            )
        layers = listed
    if not layers:
        return None, ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{source}: sliding_window={window!r} must be a positive integer")
    return window, layers


class _RopeFields:
    """The rope dict of a config.json, read as transformers 5 reads it, with errors that name the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source
        self.key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        if not isinstance(d.get(self.key) or {}, dict):
            raise UserError(
                f"{source}: {self.key}={d[self.key]!r}: expected an object (a dict of rope fields)"
            )
        self.params = dict(d.get(self.key) or {})
        self.type = self.params.get("rope_type", self.params.get("type", "default"))

    def refuse(self, name: str, problem: str) -> UserError:
        value = self.params.get(name) if name in self.params else self.d.get(name)
        where = f"{self.key}.{name}" if name in self.params else name
        return UserError(f"{self.source}: {where}={value!r}: {problem}")

    def missing(self, name: str) -> UserError:
        return UserError(f"{self.source}: rope type {self.type!r} needs the field {self.key}.{name}")

    def number(self, name: str, default=None, *, positive: bool = False, integer: bool = False):
        value = self.params.get(name)
        if value is None:
            if default is None:
                raise self.missing(name)
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.refuse(name, "expected a number")
        if positive and not value > 0:
            raise self.refuse(name, "must be > 0")
        if integer and value != int(value):
            raise self.refuse(name, "expected an integer")
        return int(value) if integer else float(value)

    def original_context(self) -> int:
        return self.number("original_max_position_embeddings", positive=True, integer=True)

    def factor_or_context_ratio(self, original: int) -> float:
        """`factor`; a null one means max_position_embeddings / original_max_position_embeddings."""
        return self.number("factor", self.d.get("max_position_embeddings", 2048) / original, positive=True)


def _parse_rope(d: dict, source: str, head_dim: int) -> RopeConfig:
    """RoPE from `rope_scaling` + `rope_theta` (older configs) or `rope_parameters` (transformers >= 5), read
    as transformers 5 reads them (`modeling_rope_utils`): `rope_scaling` wins when both are set, `rope_type`
    over `type`, a `rope_theta` inside the dict over the top-level one. Every default is resolved here, so
    `RopeConfig` is complete; what our model would not compute as transformers does (partial rotary, unknown
    types, missing or malformed fields, fields transformers would silently ignore) is refused, naming the
    field (docs/design.md §9).
    """
    f = _RopeFields(d, source)
    if f.type not in SUPPORTED_ROPE_TYPES:
        name = "rope_type" if "rope_type" in f.params else "type"
        raise f.refuse(name, f"this rope type is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    for name, value in ((f"{f.key}.partial_rotary_factor", f.params.get("partial_rotary_factor")),
                        ("partial_rotary_factor", d.get("partial_rotary_factor"))):  # fmt: skip
        if value is not None and value != 1.0:
            raise UserError(
                f"{source}: {name}={value!r}: RoPE on part of each head is not supported (only 1.0)"
            )
    theta = f.params.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise f.refuse("rope_theta", "expected a positive number")
    if f.type not in ("yarn", "longrope") and f.params.get("attention_factor") not in (None, 1, 1.0):
        raise f.refuse(
            "attention_factor",
            f"transformers ignores attention_factor for rope type {f.type!r} (only yarn and longrope "
            "scale cos and sin); remove it or set it to 1",
        )
    return _ROPE_PARSERS[f.type](f, float(theta), head_dim)


def _default_rope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    return RopeConfig(theta=theta)


def _linear_rope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    return RopeConfig(theta=theta, type="linear", factor=f.number("factor", positive=True))


def _llama3_rope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=f.number("factor", positive=True),
        low_freq_factor=f.number("low_freq_factor"),
        high_freq_factor=f.number("high_freq_factor"),
        original_max_position_embeddings=f.original_context(),
    )


def _dynamic_rope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    # transformers' dynamic NTK starts scaling beyond max_position_embeddings; it ignores a rope-level
    # original_max_position_embeddings, which other implementations read: refuse one that disagrees.
    max_positions = f.d.get("max_position_embeddings")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise UserError(
            f"{f.source}: max_position_embeddings={max_positions!r}: rope type 'dynamic' scales beyond "
            "max_position_embeddings, which must be a positive integer"
        )
    if f.params.get("original_max_position_embeddings") not in (None, max_positions):
        raise f.refuse(
            "original_max_position_embeddings",
            f"transformers' dynamic NTK scaling ignores it and scales beyond max_position_embeddings="
            f"{max_positions}; remove it or make the two equal",
        )
    if head_dim <= 2:
        raise UserError(f"{f.source}: rope type 'dynamic' needs head_dim > 2, got {head_dim}")
    return RopeConfig(
        theta=theta,
        type="dynamic",
        factor=f.number("factor", positive=True),
        original_max_position_embeddings=max_positions,
    )


def _yarn_rope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    original = f.original_context()
    if "factor" not in f.params:
        raise f.missing("factor")
    factor = f.factor_or_context_ratio(original)
    if f.params.get("attention_factor") is not None:
        attention_factor = f.number("attention_factor", positive=True)
    elif f.params.get("mscale") and f.params.get("mscale_all_dim"):
        attention_factor = yarn_get_mscale(factor, f.number("mscale")) / yarn_get_mscale(
            factor, f.number("mscale_all_dim")
        )
    else:
        attention_factor = yarn_get_mscale(factor)
    truncate = f.params.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise f.refuse("truncate", "expected true or false")
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        # transformers: `beta_fast or 32`, `beta_slow or 1` (a 0 is the default too); a null truncate is
        # false, a missing one true.
        beta_fast=f.number("beta_fast", 32.0) or 32.0,
        beta_slow=f.number("beta_slow", 1.0) or 1.0,
        truncate=bool(truncate),
    )


def _longrope(f: _RopeFields, theta: float, head_dim: int) -> RopeConfig:
    original = f.original_context()
    lists = {}
    for name in ("short_factor", "long_factor"):
        value = f.params.get(name)
        if value is None:
            raise f.missing(name)
        if (
            not isinstance(value, list)
            or len(value) != head_dim // 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value)
        ):
            raise f.refuse(name, f"expected a list of head_dim/2 = {head_dim // 2} positive numbers")
        lists[name] = tuple(float(x) for x in value)
    factor = f.factor_or_context_ratio(original)
    if f.params.get("attention_factor") is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        attention_factor = f.number("attention_factor", positive=True)
    return RopeConfig(
        theta=theta,
        type="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=attention_factor,
        **lists,
    )


_ROPE_PARSERS = {
    "default": _default_rope,
    "linear": _linear_rope,
    "llama3": _llama3_rope,
    "dynamic": _dynamic_rope,
    "yarn": _yarn_rope,
    "longrope": _longrope,
}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scaling for a context `scale` times longer (transformers' `get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def read_hf_config(model_dir: str | Path) -> tuple[dict, ModelConfig]:
    """Load `DIR/config.json`; return the raw dict (kept for writing back) and its typed form."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; expected a Hugging Face model directory with config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from exc
    return raw, ModelConfig.from_hf_dict(raw, source=str(path))


def rope_inv_freq(rope: RopeConfig, head_dim: int, seq_len=None):
    """Inverse frequencies [head_dim/2] in fp32, computed as transformers 5 computes them
    (`modeling_rope_utils`: the same operations in the same order, so that the results agree to the last bit).

    `seq_len` is the length of the forward (its largest position + 1), an int or a 0-dim integer tensor (then
    the result is on its device and nothing waits for it). Only `dynamic` and `longrope` depend on it; None
    gives the frequencies transformers starts with, those of a forward within the original context:

    - dynamic: for seq_len > L = max_position_embeddings the base becomes
      `theta * (factor * seq_len / L - (factor - 1)) ** (D / (D - 2))` (D = head_dim), else it stays theta;
    - longrope: `1 / (long_factor * theta ** (2i / D))` for seq_len > original_max_position_embeddings,
      else `short_factor`.
    """
    import torch

    device = seq_len.device if isinstance(seq_len, torch.Tensor) else None
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    if rope.type == "dynamic":
        L, ntk = rope.original_max_position_embeddings, head_dim / (head_dim - 2)
        # At seq_len <= L transformers keeps its initial frequencies, computed in Python floats.
        base = rope.theta * ((rope.factor * L / L) - (rope.factor - 1)) ** ntk
        inv_freq = 1.0 / (base**exponent)
        if seq_len is None:
            return inv_freq
        length = torch.as_tensor(seq_len, device=device).clamp(min=L)  # an int64 tensor, as in transformers
        scaled_base = rope.theta * ((rope.factor * length / L) - (rope.factor - 1)) ** ntk  # fp32
        return torch.where(length > L, 1.0 / (scaled_base**exponent), inv_freq)
    if rope.type == "longrope":
        long = seq_len is not None and seq_len > rope.original_max_position_embeddings
        if isinstance(long, torch.Tensor):
            return torch.where(long, _longrope(rope, exponent, "long"), _longrope(rope, exponent, "short"))
        return _longrope(rope, exponent, "long" if long else "short")
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "yarn":
        return _yarn(rope, head_dim, exponent)
    if rope.type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def _longrope(rope: RopeConfig, exponent, which: str):
    import torch

    factors = torch.tensor(getattr(rope, f"{which}_factor"), dtype=torch.float32, device=exponent.device)
    return 1.0 / (factors * rope.theta**exponent)


def _yarn(rope: RopeConfig, dim: int, exponent):
    """YaRN: frequencies that turn fewer than `beta_slow` times over the original context are interpolated
    (divided by factor), those turning more than `beta_fast` times are kept, a linear ramp in between."""
    import torch

    def correction_dim(rotations: float) -> float:  # the dimension index turning `rotations` times
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(device=exponent.device)  # the share of each frequency kept as it is
    pos_freqs = rope.theta**exponent
    kept, interpolated = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    return interpolated * (1 - extrapolation) + kept * extrapolation
