"""Typed model configuration: the single source of truth for shapes, read from a Hugging Face `config.json`.

`ModelConfig.from_hf_dict` accepts Llama, Mistral and Qwen2 configs (old `rope_scaling` + `rope_theta`
and new `rope_parameters` spellings) and refuses, naming the field, anything the model cannot represent
exactly. An upcycled checkpoint is the dense config plus a `moe` section, parsed into `MoEConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROUTINGS = ("softmax-topk", "topk-softmax")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _as_field(name: str, value) -> str:
    return f"moe.{name}={value!r}"


def check_moe_shape(num_experts: int, top_k: int, granularity: int, describe=_as_field) -> None:
    """The virtual-group invariants (docs/design.md §2): N = R*G experts, top-K picks whole groups.

    `describe(field, value)` names a value where the user set it: `moe.top_k=3` for a config.json
    (the default), `--top-k 3` for the converter's flags. Raises UserError with the first violation.
    """
    N, K, G = num_experts, top_k, granularity

    def name(field: str) -> str:
        return describe(field, {"num_experts": N, "top_k": K, "granularity": G}[field])

    checks = [
        (G >= 1, f"{name('granularity')}: must be >= 1"),
        (N >= 1 and K >= 1, f"{name('num_experts')} and {name('top_k')} must be >= 1"),
        (K <= N, f"{name('top_k')} is larger than {name('num_experts')}"),
        (
            N % G == 0,
            f"{name('num_experts')} is not a multiple of {name('granularity')}: experts come in whole "
            "copies of the MLP (N = R*G)",
        ),
        (
            K % G == 0,
            f"{name('top_k')} is not a multiple of {name('granularity')}: top-K must pick whole virtual "
            "groups (K = m*G)",
        ),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    if problem:
        raise UserError(problem)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """How the MLPs of `layers` were upcycled (notation: docs/design.md §1).

    Validates itself on construction (from the converter and from a hand-edited config.json alike);
    the checks that need the dense config (F == G*I, layers that exist) are in `ModelConfig`.
    """

    num_experts: int  # N = R * G routed experts
    top_k: int  # K = m * G
    granularity: int  # G shards per dense MLP; expert width I = F / G
    routing: str  # "softmax-topk" (default) or "topk-softmax"
    layers: tuple[int, ...]  # decoder layers whose MLP is an MoE block
    expert_intermediate_size: int  # I
    expert_scale: float  # c: up_proj and down_proj were multiplied by sqrt(c)
    router_init_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise UserError(f"moe.routing={self.routing!r}: expected one of {ROUTINGS}")
        check_moe_shape(self.num_experts, self.top_k, self.granularity)
        if self.expert_intermediate_size < 1:
            raise UserError(f"moe.expert_intermediate_size={self.expert_intermediate_size}: must be >= 1")
        if not self.layers:
            raise UserError("moe.layers is empty: an upcycled model has at least one MoE layer")
        if not self.expert_scale > 0:
            raise UserError(f"moe.expert_scale={self.expert_scale}: must be > 0")

    @property
    def expansion_rate(self) -> int:
        """R: how many full copies of the dense MLP the experts hold."""
        return self.num_experts // self.granularity

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
    """Shapes and options of a Llama-family decoder (Llama, Mistral, Qwen2)."""

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
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        moe = self.moe
        if moe is None:
            return
        if moe.granularity * moe.expert_intermediate_size != self.intermediate_size:
            raise UserError(
                f"moe.granularity={moe.granularity} x moe.expert_intermediate_size="
                f"{moe.expert_intermediate_size} != intermediate_size={self.intermediate_size} (F = G*I)"
            )
        missing = [i for i in moe.layers if not 0 <= i < self.num_hidden_layers]
        if missing:
            raise UserError(
                f"moe.layers {missing} do not exist: the model has {self.num_hidden_layers} layers"
            )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict; raise UserError naming the field for anything unsupported."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source}: model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
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
        _refuse_sliding_window(d, model_type, source)
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UserError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        attention_bias = bool(d.get("attention_bias", False))
        moe = MoEConfig.from_dict(d["moe"], source) if d.get("moe") else None
        rope = _parse_rope(d, source)
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
                # Qwen2 always has q/k/v biases; Llama's `attention_bias` puts a bias on q, k, v and o.
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=model_type != "qwen2" and attention_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
                moe=moe,
            )
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None


def _refuse_sliding_window(d: dict, model_type: str, source: str) -> None:
    """Refuse configs whose sliding-window attention would actually restrict attention."""
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        return
    if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise UserError(f"{source}: layer_types={d['layer_types']!r}: only full attention is supported")
    if window is not None and window < d.get("max_position_embeddings", 0):
        raise UserError(
            f"{source}: sliding_window={window} is smaller than max_position_embeddings="
            f"{d.get('max_position_embeddings')}: sliding-window attention is not supported; "
            "set sliding_window to null if the checkpoint was trained with full attention"
        )


def _parse_rope(d: dict, source: str) -> RopeConfig:
    """Read RoPE from `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta` (older)."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    where = "rope_parameters.rope_type" if "rope_parameters" in d else "rope_scaling.rope_type"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"{source}: {where}={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise UserError(f"{source}: rope type {rope_type!r} needs a 'factor' field")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), type="linear", factor=float(params["factor"]))
    missing = [
        k
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k not in params
    ]
    if missing:
        raise UserError(f"{source}: rope type 'llama3' needs the fields {missing}")
    return RopeConfig(
        theta=float(theta),
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


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


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies [head_dim/2] in fp32, with linear or llama3 scaling (as in Hugging Face)."""
    import torch

    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
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
