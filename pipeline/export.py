"""`upcycle export`: an upcycled or dense model directory, or a DeepSpeed training checkpoint of either,
becomes a stock Hugging Face checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads
without `trust_remote_code`.

The target class is the one that computes our model exactly. A dense model (no `moe` section in config.json)
keeps its own family's class (Llama, Mistral, Qwen2, Qwen3 ...ForCausalLM): its config.json is a
stock one already and is written back with only `dtype` (and `architectures`) set, the weights under the same
names. That is how a dense training run's weights leave DeepSpeed; for a dense model directory it is a re-save
in the chosen dtype. For an upcycled model:

    routing        MoE in every layer, no q/k/v biases   otherwise (partial MoE layers, Qwen2 q/k/v biases)
    topk-softmax   MixtralForCausalLM                    Qwen2MoeForCausalLM, norm_topk_prob=true
    softmax-topk   Qwen2MoeForCausalLM, norm_topk_prob=false (softmax over all N, top-K, no renormalising)

Other families export to their own MoE class where one computes them (`FAMILY_TARGETS`: OLMo 2 ->
FlexOlmoForCausalLM, ERNIE 4.5 -> Ernie4_5_MoeForCausalLM) and are refused with the reason otherwise.
A model with a shared expert (`upcycle convert --shared-shards`) always becomes Qwen2MoeForCausalLM, whose
sigmoid-gated shared expert is ours under the same names. Qwen2MoE always has a shared expert; a model
without one gets one of the routed experts' width whose weights are all zero, so its output, and the
sigmoid-gated sum, is exactly 0 (a width of 0 is refused by vLLM and read as "the dense width" by
llama.cpp), tied embeddings are written out as the output matrix (llama.cpp's
Qwen2MoE loader needs one), and `mlp_only_layers` names the layers that stayed dense. A Qwen3 model (q/k
norms) always becomes Qwen3MoeForCausalLM (`norm_topk_prob` from the routing, `mlp_only_layers`, no shared
expert). Sliding windows are kept: Mixtral's and Qwen3MoE's `sliding_window` (every layer), Qwen2MoE's
`use_sliding_window` with an explicit `layer_types`. Settings no stock MoE class represents exactly (expert
biases from Llama `mlp_bias`, an `o_proj` bias from Llama `attention_bias`, a Qwen3 window on some layers
only) are refused with the reason, and so is a run's non-zero expert bias (`moe.balance bias`) unless
`--drop-expert-bias` (docs/design.md §3).

The weights are written in the Hub layout by default: one tensor per expert, under exactly the names and
shapes transformers' own `save_pretrained` writes for the class (`state_dict_adapters`), which transformers
4.x and the serving engines read; `config.json` also carries the keys transformers 4.x reads (`rope_theta`,
`rope_scaling`, `torch_dtype`, Qwen3MoE's `num_experts`, Qwen2MoE's `max_window_layers`). `--layout fused`
writes transformers 5's in-memory layout instead.

Training checkpoints: `output.dir`, `output.dir/checkpoints` or one `step_*` directory (docs/design.md §6).
ZeRO-1/2 weights are read from DeepSpeed's model-state and per-expert files; ZeRO-3 checkpoints (no
per-expert files) go through DeepSpeed's universal-checkpoint converter first; AutoEP's names are mapped back
to ours (docs/design.md §4). `config.json` and the tokenizer come from the model directory the run started
from (`config.model.path` in run_state.json, or `--model`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import checkpointing
from pipeline.config import ModelConfig, read_hf_config
from pipeline.errors import UserError
from pipeline.hf_io import (
    DTYPE_CHOICES,
    CheckpointReader,
    ShardWriter,
    build_model,
    copy_tokenizer_files,
    dtype_name,
    expected_shapes,
    resolve_dtype,
)
from pipeline.state_dict_adapters import (
    EXPERT_BIAS,
    LAYOUTS,
    OUR_SHARED_GATE,
    autoep_to_ours,
    ours_to_hub,
    stack_experts,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a stock Hugging Face checkpoint (Mixtral / Qwen2MoE / Qwen3MoE, or the dense family's "
        "class) from an upcycled, dense or trained model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="upcycled or dense model directory, or a training output.dir / checkpoints dir / step_* dir",
    )
    p.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
    p.add_argument(
        "--model",
        default=None,
        help="for training checkpoints: the model directory the run started from (config.json, "
        "tokenizer); default: config.model.path recorded in run_state.json",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: the model's dtype")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per output safetensors shard")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="hub",
        help="hub: one tensor per expert under the names transformers' own save_pretrained writes for the "
        "class (what transformers 4.x, vLLM, SGLang and llama.cpp read); fused: transformers 5's in-memory "
        "layout (experts.gate_up_proj [N, 2I, H], experts.down_proj [N, H, I])",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the export with the stock class (an error on any missing, unexpected or mismatched "
        "tensor) and compare its fp32 logits with ours on random tokens",
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    p.add_argument(
        "--drop-expert-bias",
        action="store_true",
        help="a run trained with moe.balance bias: export without its expert bias (no stock class has a "
        "selection-only bias with softmax routing) and print how much that changes the model",
    )
    p.set_defaults(func=run_cli)


# ---- where the weights come from ---------------------------------------------------------------------


class DictReader:
    """The `CheckpointReader` interface over an in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def shape(self, name: str) -> list[int]:
        return list(self.state[name].shape)


@dataclass
class Source:
    model_dir: Path  # config.json and tokenizer files
    raw_config: dict
    config: ModelConfig
    reader: CheckpointReader | DictReader  # tensors under our (Hugging Face style) names
    description: str
    # moe.balance bias: `model.layers.{i}.mlp.expert_bias` -> [N] fp32 (docs/design.md §3); not a weight
    # of any stock class, so kept apart from `reader`.
    expert_bias: dict[str, torch.Tensor] = field(default_factory=dict)


def open_source(path: str | Path, model_dir: str | Path | None = None) -> Source:
    """A model directory, or a training checkpoint (output.dir, checkpoints/ or step_*)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--checkpoint {path}: not found")
    if (path / "config.json").is_file():
        raw, config = read_hf_config(path)
        return Source(path, raw, config, CheckpointReader(path), f"model directory {path}")
    tag_dir = find_training_checkpoint(path)
    checkpointing.verify(tag_dir)  # sizes and sha256 recorded at save: never unpickle a damaged file
    run_state = checkpointing.read_run_state(tag_dir)
    if model_dir is None:
        model_dir = run_state.get("config", {}).get("model", {}).get("path")
        if not model_dir:
            raise UserError(f"{tag_dir}/run_state.json has no config.model.path; pass --model DIR")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"{model_dir}: no config.json (the model directory the run in {tag_dir} started from); "
            "pass --model DIR pointing at the model directory the run started from"
        )
    raw, config = read_hf_config(model_dir)
    state, expert_bias = split_expert_bias(load_training_state(tag_dir, config))
    return Source(model_dir, raw, config, DictReader(state), f"training checkpoint {tag_dir}", expert_bias)


def find_training_checkpoint(path: Path) -> Path:
    """The step directory meant by `path`: itself, or what `latest` names in it or in its checkpoints/."""
    if (path / checkpointing.RUN_STATE).is_file():
        return path
    for root in (path, checkpointing.checkpoint_root(path)):
        tag = checkpointing.read_latest(root)
        if tag is not None:
            return root / tag
    raise UserError(
        f"--checkpoint {path}: neither a model directory (config.json) nor a training checkpoint "
        f"({checkpointing.RUN_STATE}, or a '{checkpointing.LATEST}' file in it or in its checkpoints/ folder)"
    )


def load_training_state(tag_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) weights of a DeepSpeed checkpoint (dense, or MoE under AutoEP), our names."""
    if (tag_dir / "mp_rank_00_model_states.pt").is_file():
        raw = _read_zero12(tag_dir)
    elif list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        raw = _read_through_universal(tag_dir)
    else:
        raise UserError(
            f"{tag_dir}: no DeepSpeed model-state files (mp_rank_00_model_states.pt or zero_pp_rank_*)"
        )
    return _to_our_names(raw, config, tag_dir)


def _read_zero12(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0/1/2: non-expert weights in `module` of mp_rank_00; one file per global expert per MoE layer."""
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    raw = dict(states["module"])
    pattern = re.compile(r"^(.*\.experts)\.(w[123])\.(\d+)$")
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for name, tensor in torch.load(f, map_location="cpu", weights_only=True).items():
            m = pattern.match(name)
            if not m:
                raise UserError(f"{f}: unexpected tensor name {name!r} in a per-expert file")
            experts.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = tensor
    for (prefix, w), by_index in experts.items():
        raw[f"{prefix}.{w}"] = stack_experts(by_index, f"{tag_dir}: per-expert files for {prefix}.{w}")
    return raw


def _read_through_universal(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3 has no per-expert files and zero_to_fp32 fails on AutoEP: go through DeepSpeed's universal
    checkpoint converter (its fp32 files hold full expert tensors [N, ...] and flat dense tensors)."""
    with tempfile.TemporaryDirectory(prefix="universal_", dir=tag_dir.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(tag_dir),
            "--output_folder",
            str(Path(tmp) / "universal"),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(
                f"{tag_dir}: DeepSpeed's universal-checkpoint conversion failed:\n{result.stderr[-2000:]}"
            )
        raw = _buffers_of_zero3(tag_dir)
        for param_dir in sorted((Path(tmp) / "universal" / "zero").iterdir()):
            fp32 = param_dir / "fp32.pt"
            if fp32.is_file():
                entry = torch.load(fp32, map_location="cpu", weights_only=True)
                raw[param_dir.name] = entry["param"] if isinstance(entry, dict) else entry
        return raw


def _buffers_of_zero3(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The expert biases (moe.balance bias) of a ZeRO-3 checkpoint: buffers, not parameters, so the universal
    converter (optimizer state) has none; every rank's model-state file holds them whole."""
    states = torch.load(
        tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )
    return {n: t for n, t in states["module"].items() if n.endswith(f".mlp.{EXPERT_BIAS}")}


def expert_bias_shapes(config: ModelConfig, state: dict) -> dict[str, torch.Size]:
    """The expert biases `state` holds (a run with moe.balance bias): [N] per MoE layer."""
    if config.moe is None:
        return {}
    names = (f"model.layers.{layer}.mlp.{EXPERT_BIAS}" for layer in config.moe.layers)
    return {name: torch.Size([config.moe.num_experts]) for name in names if name in state}


def split_expert_bias(state: dict) -> tuple[dict, dict]:
    """(the weights, the expert biases) of a training state under our names."""
    names = [name for name in state if name.endswith(f".mlp.{EXPERT_BIAS}")]
    return state, {name: state.pop(name).float() for name in names}


def _to_our_names(raw: dict[str, torch.Tensor], config: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """AutoEP's names back to ours (`state_dict_adapters.autoep_to_ours`), checked against the config."""
    state = autoep_to_ours(raw, where)
    shapes = {**expected_shapes(config), **expert_bias_shapes(config, state)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise UserError(
            f"{where}: the checkpoint does not match the model config: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    for name, shape in shapes.items():
        t = state[name]
        if t.numel() != shape.numel():
            raise UserError(
                f"{where}: {name} has {t.numel()} elements, the model config implies {list(shape)}"
            )
        state[name] = t.reshape(shape)  # ZeRO-3 universal entries of dense parameters are flat
    return state


# ---- which stock class ---------------------------------------------------------------------------------


def rope_parameters(config: ModelConfig) -> dict:
    """The export's `rope_parameters`: every field transformers reads for the type, defaults written out
    (yarn's attention_factor, beta_fast, beta_slow, truncate; longrope's factor and attention_factor), so the
    stock class computes exactly our `RopeConfig`. Dynamic NTK scales beyond `max_position_embeddings`, which
    the export keeps (no original_max_position_embeddings field: transformers ignores it for dynamic)."""
    r = config.rope
    params = {"rope_type": r.type, "rope_theta": r.theta}
    if r.type in ("linear", "llama3", "dynamic", "yarn", "longrope"):
        params["factor"] = r.factor
    if r.type in ("llama3", "yarn", "longrope"):
        params["original_max_position_embeddings"] = r.original_max_position_embeddings
    if r.type == "llama3":
        params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.type == "yarn":
        params.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
    if r.type == "longrope":
        params.update(short_factor=list(r.short_factor), long_factor=list(r.long_factor))
    if r.type in ("yarn", "longrope"):
        params["attention_factor"] = r.attention_factor
    return params


# Stock MoE classes whose decoder is another family's (the dense model_type's): the attention, norms and rope
# are that family's, so an upcycled model of it exports there exactly, when its MoE layers fit the class.
FAMILY_TARGETS = {
    "olmo2": "FlexOlmoForCausalLM",  # OLMo 2's attention and post-norms, OlmoE's router (both routings)
    "ernie4_5": "Ernie4_5_MoeForCausalLM",  # ERNIE 4.5's attention; top-K weights renormalised
}
# Ernie4_5_Moe selects on its router's probabilities plus this bias [1, N]; ours has none: zeros.
ERNIE_SELECTION_BIAS = "model.layers.{}.mlp.moe_statics.e_score_correction_bias"


def family_target(config: ModelConfig) -> str:
    """FAMILY_TARGETS' class for `config`, or UserError with what the class cannot represent."""
    moe, arch = config.moe, FAMILY_TARGETS[config.model_type]
    problems = {
        "softmax-topk routing (it renormalises the top-K weights: topk-softmax)": arch
        == "Ernie4_5_MoeForCausalLM"
        and moe.routing != "topk-softmax",
        "MoE on some layers only (it has an MoE block in every layer)": tuple(moe.layers)
        != tuple(range(config.num_hidden_layers)),
        "a shared expert (it has none)": moe.shared_shards > 0,
        f"hidden_act={config.hidden_act!r} (its experts are SwiGLU)": config.hidden_act
        not in ("silu", "swish"),
        "MLP biases (its experts have none)": config.mlp_bias,
    }
    found = [problem for problem, present in problems.items() if present]
    if found:
        raise UserError(
            f"model_type={config.model_type!r}: {arch}, the stock MoE class of {config.model_type}, cannot "
            f"compute this model: {'; '.join(found)}"
        )
    return arch


def family_target_config(config: ModelConfig):
    """The target's config, from transformers' own config of the dense family (its rope, norms, biases)."""

    from pipeline.backbone import family_config

    dense, moe = family_config(config.hf), config.moe
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
            "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip
    common = {key: getattr(dense, key) for key in keys} | {"hidden_act": "silu"}
    target = _family_target_class_config(config, dense, moe, common)
    target.head_dim = config.head_dim  # ERNIE 4.5's explicit 128, not the class's hidden / heads default
    return target


def _family_target_class_config(config: ModelConfig, dense, moe, common: dict):
    import transformers

    if FAMILY_TARGETS[config.model_type] == "Ernie4_5_MoeForCausalLM":
        return transformers.Ernie4_5_MoeConfig(
            **common,
            use_bias=dense.use_bias,
            intermediate_size=dense.intermediate_size,
            moe_intermediate_size=moe.expert_intermediate_size,
            moe_k=moe.top_k,
            moe_num_experts=moe.num_experts,
            moe_num_shared_experts=0,
            moe_layer_start_index=0,  # every layer (family_target)
            moe_layer_end_index=config.num_hidden_layers - 1,
            moe_layer_interval=1,
        )
    return transformers.FlexOlmoConfig(
        **common,
        attention_bias=dense.attention_bias,
        intermediate_size=moe.expert_intermediate_size,
        attention_dropout=0.0,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.routing == "topk-softmax",
    )


def dense_class(config: ModelConfig) -> str:
    """The family's own ...ForCausalLM class name, as transformers maps the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def choose_target(config: ModelConfig) -> str:
    """The stock class name; UserError saying why when no stock class computes this model exactly."""
    moe = config.moe
    if moe is None:
        return dense_class(config)  # a dense model: its own family's class
    if config.model_type in FAMILY_TARGETS:
        return family_target(config)
    if not config.exportable_family:
        raise UserError(
            f"model_type={config.model_type!r}: no stock transformers MoE class computes an upcycled "
            f"{config.model_type} exactly (export writes Mixtral, Qwen2MoE and Qwen3MoE, which have "
            "Llama, Qwen2 or Qwen3 attention); the model stays loadable (pipeline.load_model), trainable "
            "(upcycle train) and evaluable (upcycle eval) from its own directory"
        )
    if config.mlp_bias:
        raise UserError(
            "the experts have biases (mlp_bias=true): neither MixtralForCausalLM nor Qwen2MoeForCausalLM has "
            "MLP or expert biases, so no stock transformers class computes this model exactly"
        )
    windowed = config.sliding_layers  # Mixtral and Qwen3MoE window every layer or none; Qwen2MoE any set
    every_layer_windowed = windowed == tuple(range(config.num_hidden_layers))
    if config.qk_norm and moe.shared_shards:
        raise UserError(
            f"moe.shared_shards={moe.shared_shards}: Qwen3MoeForCausalLM, the one stock MoE class with "
            "Qwen3's q/k norms, has no shared expert, and Qwen2MoeForCausalLM, which has one, has no q/k "
            "norms, so no stock transformers class computes this model exactly; upcycle a Qwen3 model "
            "without --shared-shards to export it"
        )
    if config.qk_norm:
        # Qwen3: only Qwen3MoE has the q/k norms; it has Qwen3's attention_bias (q, k, v and o), both
        # routings (norm_topk_prob) and mlp_only_layers, no shared expert.
        if windowed and not every_layer_windowed:
            raise UserError(
                f"sliding_window={config.sliding_window} is used by layers {list(windowed)} only (from "
                "layer_types / max_window_layers): Qwen3MoeForCausalLM, the one stock MoE class with "
                "Qwen3's q/k norms, applies sliding_window to every layer or to none, so no stock "
                "transformers class computes this model exactly"
            )
        return "Qwen3MoeForCausalLM"
    if config.o_bias:
        raise UserError(
            "attention_bias=true puts a bias on o_proj: MixtralForCausalLM has no attention biases and "
            "Qwen2MoeForCausalLM has q/k/v biases only, so no stock transformers class computes this model "
            "exactly"
        )
    all_layers = tuple(moe.layers) == tuple(range(config.num_hidden_layers))
    if (
        moe.routing == "topk-softmax"
        and not moe.shared_shards  # Mixtral has no shared expert
        and all_layers
        and not config.qkv_bias
        and (every_layer_windowed or not windowed)
    ):
        return "MixtralForCausalLM"
    # softmax-topk needs norm_topk_prob=false (Mixtral always renormalises), partial MoE mlp_only_layers,
    # q/k/v biases qkv_bias and a shared expert shared_expert: Qwen2MoE has all four.
    return "Qwen2MoeForCausalLM"


def hf_config_dict(
    raw: dict, config: ModelConfig, dtype: torch.dtype, layout: str = "hub"
) -> tuple[dict, str]:
    """The config.json of the export and its class name. A dense model's config.json is a stock one: written
    back with the dtype set. An MoE one is built by transformers' own config class."""
    import transformers

    moe = config.moe
    arch = choose_target(config)
    if moe is None:
        d = {key: value for key, value in raw.items() if key != "torch_dtype"}  # `dtype` is the current key
        return {**d, "architectures": [arch], "dtype": dtype_name(dtype)}, arch
    if arch in FAMILY_TARGETS.values():
        cfg = family_target_config(config)
        cfg.architectures = [arch]
        d = {**cfg.to_dict(), "dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype)}
        return {**d, "upcycle_moe": moe.to_dict()}, arch
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters(config),
        tie_word_embeddings=config.tie_word_embeddings and not writes_output_matrix(config, arch, layout),
        initializer_range=raw.get("initializer_range", 0.02),
        attention_dropout=0.0,
        num_experts_per_tok=moe.top_k,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    if arch == "MixtralForCausalLM":
        cfg = transformers.MixtralConfig(
            **common,
            intermediate_size=moe.expert_intermediate_size,
            num_local_experts=moe.num_experts,
            sliding_window=config.sliding_window if config.sliding_layers else None,
            router_jitter_noise=0.0,
        )
    elif arch == "Qwen3MoeForCausalLM":
        cfg = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=config.intermediate_size,  # the dense layers' MLP width
            moe_intermediate_size=moe.expert_intermediate_size,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.routing == "topk-softmax",
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.num_hidden_layers) if i not in moe.layers],
            attention_bias=config.qkv_bias,  # Qwen3's attention_bias: q, k, v and o alike
            use_sliding_window=bool(config.sliding_layers),  # then on every layer (choose_target)
            sliding_window=config.sliding_window,
        )
    else:
        cfg = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=config.intermediate_size,  # the dense layers' MLP width
            moe_intermediate_size=moe.expert_intermediate_size,
            # ours, or one of the routed width that adds exactly 0 (zero_shared_expert)
            shared_expert_intermediate_size=moe.shared_intermediate_size or moe.expert_intermediate_size,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.routing == "topk-softmax",
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.num_hidden_layers) if i not in moe.layers],
            qkv_bias=config.qkv_bias,
            use_sliding_window=bool(config.sliding_layers),
            sliding_window=config.sliding_window,
            # Explicit, not left to Qwen2MoeConfig's own derivation (even layers below max_window_layers),
            # which differs from Qwen2's (layers from max_window_layers on).
            layer_types=[
                "sliding_attention" if i in config.sliding_layers else "full_attention"
                for i in range(config.num_hidden_layers)
            ],
        )
    cfg.architectures = [arch]
    d = cfg.to_dict()
    d["dtype"] = dtype_name(dtype)
    if layout == "hub":  # transformers 4.x reads the Hub layout only
        check_hub_layout(config, arch)
        d.update(transformers4_keys(config, arch, dtype))
    d["upcycle_moe"] = moe.to_dict()  # provenance only: transformers ignores it
    # A key we set that the config class dropped would silently change the model.
    for key in ("head_dim", "rope_parameters", "num_experts_per_tok", "tie_word_embeddings"):
        if key not in d:
            raise RuntimeError(f"transformers {transformers.__version__} {arch} config dropped {key!r}")
    return d, arch


def writes_output_matrix(config: ModelConfig, arch: str, layout: str) -> bool:
    """Tied embeddings written out as an explicit `lm_head.weight` (a copy of the embedding, and
    `tie_word_embeddings: false`): llama.cpp's Qwen2MoE loader needs an output matrix and does not fall back
    to the embedding as its Llama/Mixtral and Qwen3MoE loaders do. The same function, one more V x H
    matrix on disk."""
    return layout == "hub" and arch == "Qwen2MoeForCausalLM" and config.tie_word_embeddings


def check_hub_layout(config: ModelConfig, arch: str) -> None:
    """Refuse what transformers 4.x, which reads the Hub layout, would compute differently from 5.x."""
    # Qwen2MoE in 4.x windows the layers from max_window_layers on with flash attention, and every layer with
    # eager and sdpa attention (one mask for all layers): only "every layer or none" is read alike.
    windowed = config.sliding_layers
    if (
        arch == "Qwen2MoeForCausalLM"
        and windowed
        and tuple(windowed) != tuple(range(config.num_hidden_layers))
    ):
        raise UserError(
            f"sliding_window={config.sliding_window} is used by layers {list(windowed)} only: "
            "Qwen2MoeForCausalLM in transformers 4.x windows every layer (eager and sdpa attention) or "
            "the layers from max_window_layers on (flash attention), so a Hub-layout export would "
            "compute another model there; pass --layout fused for a transformers 5 export (layer_types)"
        )


def transformers4_keys(config: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """The config.json keys transformers 4.x reads where 5.x reads others, with the same values, so that
    both build the same model (5.x reads `rope_parameters`, `dtype`, Qwen3MoE's `num_local_experts` and
    Qwen2MoE's `layer_types`)."""
    params = rope_parameters(config)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    keys = {
        "rope_theta": params["rope_theta"],
        "rope_scaling": None if params["rope_type"] == "default" else scaling,
        "torch_dtype": dtype_name(dtype),
    }
    if arch == "Qwen3MoeForCausalLM":
        keys["num_experts"] = config.moe.num_experts
    if arch == "Qwen2MoeForCausalLM":
        keys["max_window_layers"] = (
            0 if config.sliding_layers else config.num_hidden_layers
        )  # check_hub_layout
    return keys


# ---- writing -------------------------------------------------------------------------------------------


def export(
    source: Source, out: Path, dtype: torch.dtype, max_shard_bytes: int, layout: str = "hub"
) -> tuple[str, list[str]]:
    """Write config.json, safetensors shards (+ index) and the tokenizer to `out`; return (class, files)."""
    config = source.config
    hf_config, arch = hf_config_dict(source.raw_config, config, dtype, layout)
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in source.reader]
    if missing:
        raise UserError(f"{source.description}: tensors missing: {missing[:4]}")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    for name in shapes:
        tensor = source.reader.get(name).to(dtype)
        for written_name, written in ours_to_hub(name, tensor, arch) if layout == "hub" else [(name, tensor)]:
            writer.add(written_name, written)
    if arch == "Ernie4_5_MoeForCausalLM":
        for layer in config.moe.layers:
            writer.add(
                ERNIE_SELECTION_BIAS.format(layer), torch.zeros(1, config.moe.num_experts, dtype=dtype)
            )
    if arch == "Qwen2MoeForCausalLM" and not config.moe.shared_shards:
        for name, zeros in zero_shared_expert(config, dtype).items():
            writer.add(name, zeros)
    if writes_output_matrix(config, arch, layout):
        # A copy: the embedding itself may be the same tensor (a training state in memory at this dtype), and
        # safetensors refuses to write two names over one storage.
        writer.add("lm_head.weight", source.reader.get("model.embed_tokens.weight").to(dtype).clone())
    files = writer.close()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    copy_tokenizer_files(source.model_dir, out)
    return arch, files


def zero_shared_expert(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Qwen2MoE's shared expert for a model without one: the routed experts' width and every projection 0,
    so its output is exactly 0 whatever the input, and so is `sigmoid(gate . x)` times it.

    The gate's weight is all ones, not 0: llama.cpp computes that sigmoid as `silu(g) / g`, which is 0/0
    (NaN, and NaN logits) at g = 0; with ones, g is the sum of the normed hidden state, never exactly 0 in
    practice, and the product is 0 all the same."""
    H, W = config.hidden_size, config.moe.expert_intermediate_size
    shapes = {"gate_proj": (W, H), "up_proj": (W, H), "down_proj": (H, W)}
    tensors = {}
    for layer in config.moe.layers:
        prefix = f"model.layers.{layer}.mlp.shared_expert"
        tensors.update(
            {f"{prefix}.{proj}.weight": torch.zeros(shape, dtype=dtype) for proj, shape in shapes.items()}
        )
        tensors[f"{prefix}_gate.weight"] = torch.ones(1, H, dtype=dtype)
    return tensors


def our_model(source: Source, expert_bias: bool = True):
    """Our `CausalLM` (fp32) holding the source's weights: the reference an export must reproduce. With
    `expert_bias`, its MoE blocks route with the run's expert bias (if any), exactly as in training."""
    model = build_model(source.config, source.reader, torch.float32, "cpu", where=source.description)
    for name, bias_N in source.expert_bias.items() if expert_bias else ():
        model.get_submodule(name.removesuffix(f".{EXPERT_BIAS}")).set_expert_bias(bias_N)
    return model


def check_expert_bias(source: Source, drop: bool) -> list[str]:
    """Refuse a non-zero expert bias unless `--drop-expert-bias`; with it, measure what dropping changes
    and forget the bias (the export and `--verify` then stand for the model without it). Lines to print.

    No stock class computes our routing with a selection-only bias: Mixtral/Qwen2MoE/Qwen3MoE have none,
    DeepseekV3/Glm4Moe add theirs to sigmoid scores, Ernie4.5-MoE's correction bias comes with weights
    renormalised over the K experts. An all-zero bias selects as no bias does (up to exact ties in the
    probabilities, which the stock classes resolve alike) and is dropped silently.
    """
    if not any(bool(b.any()) for b in source.expert_bias.values()):
        source.expert_bias = {}
        return []
    if not drop:
        spread = max(float(b.max() - b.min()) for b in source.expert_bias.values())
        raise UserError(
            f"{source.description} was trained with moe.balance bias: its MoE layers select experts with a "
            f"bias (largest spread {spread:.3g}) that no stock transformers class represents. Pass "
            "--drop-expert-bias to export without it (the change it makes is measured and printed)"
        )
    max_diff, changed, slots = bias_change(source)
    source.expert_bias = {}
    return [
        f"--drop-expert-bias: without the expert bias, max |logit diff| {max_diff:.3e} on 128 random tokens; "
        f"{changed} of {slots} token-expert selections change ({100 * changed / max(slots, 1):.2f}%)"
    ]


def bias_change(source: Source, n_tokens: int = 128, seed: int = 0) -> tuple[float, int, int]:
    """(max |logit diff| of our model with and without the expert bias, token-expert selections the bias
    changes, all selections) on `n_tokens` random tokens. Selections are compared layer by layer on the
    same router logits (those of the biased model), so downstream drift is not counted twice."""
    from pipeline.moe import route

    ids = torch.randint(
        0, source.config.vocab_size, (2, n_tokens // 2), generator=torch.Generator().manual_seed(seed)
    )
    with_bias, without = our_model(source), our_model(source, expert_bias=False)
    with torch.no_grad():
        max_diff = float((with_bias(ids) - without(ids)).abs().max())
    changed = slots = 0
    for _, block in with_bias.moe_blocks():
        logits_TN, bias_N = block.last_router_logits_TN, block.expert_bias
        chosen = [
            route(logits_TN, block.top_k, block.routing, b)[1] for b in (bias_N, torch.zeros_like(bias_N))
        ]
        onehot = [torch.zeros_like(logits_TN).scatter_(1, experts_TK, 1.0) for experts_TK in chosen]
        changed += int((onehot[0] != onehot[1]).sum()) // 2
        slots += chosen[0].numel()
    return max_diff, changed, slots


def load_stock(out: Path):
    """The export loaded by stock transformers (fp32, eval); UserError naming every tensor it did not take
    from the files: missing (transformers would initialise it at random), unexpected (ignored) or of
    another shape. transformers itself only warns about these."""
    import transformers

    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, output_loading_info=True
        )
    except RuntimeError as exc:  # a tensor of another shape (transformers 5 raises; 4.x reports it)
        raise UserError(
            f"{out}: transformers {transformers.__version__} cannot load the export: {exc}"
        ) from None
    problems = {
        kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        found = "; ".join(
            f"{kind.replace('_', ' ')}: {names[:4]} ({len(names)})"
            for kind, names in problems.items()
            if names
        )
        raise UserError(
            f"{out}: transformers {transformers.__version__} loads {type(model).__name__} from the export "
            f"with {found}"
        )
    return model.eval()


def compare_logits(source: Source, out: Path, n_tokens: int = 128, seed: int = 0) -> float:
    """Relative L2 error between our fp32 logits and the exported model's, loaded by stock transformers
    (`load_stock`: every tensor from the files)."""
    ids = torch.randint(
        0, source.config.vocab_size, (2, n_tokens // 2), generator=torch.Generator().manual_seed(seed)
    )
    ours = our_model(source)
    theirs = load_stock(out)
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    return float((b - a).norm() / a.norm())


def untrained_shared_gates(source: Source) -> list[int]:
    """The MoE layers whose shared expert gate is all zero (a model not trained since `upcycle convert`)."""
    moe = source.config.moe
    if moe is None or not moe.shared_shards:
        return []
    gate = "model.layers.{}.mlp." + OUR_SHARED_GATE + ".weight"
    return [layer for layer in moe.layers if not source.reader.get(gate.format(layer)).any()]


def run_cli(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out {out} exists and is not empty; choose another directory or pass --force")
    source = open_source(args.checkpoint, args.model)
    choose_target(source.config)  # refuse before writing anything
    for line in check_expert_bias(source, args.drop_expert_bias):
        print(line)
    dtype = resolve_dtype(args.dtype, source.config)
    arch, files = export(source, out, dtype, int(args.max_shard_size * 2**30), args.layout)
    print(f"exported {source.description} as {arch} ({dtype_name(dtype)}) to {out}: {files}")
    untrained = untrained_shared_gates(source)
    if untrained:
        print(
            f"note: the shared expert gates of layers {untrained} are exactly 0, as `upcycle convert` writes "
            "them (sigmoid(0) = 0.5): transformers, vLLM and SGLang compute that exactly, but llama.cpp "
            "computes the gate as silu(g)/g, which is NaN at g = 0; serve a model trained for at least one "
            "step with llama.cpp (docs/design.md §4)"
        )
    if args.verify:
        print(f"verify: relative logit error (fp32) against our model: {compare_logits(source, out):.3e}")
    return 0
