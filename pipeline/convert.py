"""`upcycle convert`: a dense Hugging Face checkpoint becomes an upcycled MoE checkpoint, tensor by tensor.

Memory stays near one output shard plus one layer's expert tensors: dense tensors are read one at a time
from memory-mapped safetensors and shards are flushed as soon as they fill.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.backbone import FUSED, SEPARATE
from pipeline.config import ROUTINGS, ModelConfig, MoEConfig, read_hf_config
from pipeline.errors import UserError
from pipeline.hf_io import (
    DTYPE_CHOICES,
    CheckpointReader,
    ShardWriter,
    check_against_config,
    copy_tokenizer_files,
    dtype_name,
    resolve_dtype,
)
from pipeline.upcycle import make_moe_config, upcycle_mlp, upcycle_shared_expert, virtual_group_router


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="upcycle a dense checkpoint into an MoE checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dense", required=True, help="dense Hugging Face model directory (config.json + safetensors)"
    )
    p.add_argument("--out", required=True, help="output directory for the upcycled checkpoint")
    p.add_argument("--experts", type=int, required=True, help="N: routed experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="K: experts per token (a multiple of G)")
    p.add_argument("--granularity", type=int, default=1, help="G: shards per dense MLP (default 1)")
    p.add_argument(
        "--shared-shards",
        type=int,
        default=0,
        help="S: the first S of the G shards become one always-active shared expert of width S*I with a "
        "sigmoid gate (DeepSeekMoE's shared-expert isolation, Qwen2MoE's gate); the other G - S are "
        "routed: N and K are multiples of G - S (default 0: no shared expert)",
    )
    p.add_argument("--routing", choices=ROUTINGS, default="softmax-topk")
    p.add_argument("--moe-layers", default="all", help="all | every:k | comma list such as 0,3,5")
    p.add_argument(
        "--router-init-std",
        type=float,
        default=None,
        help="std of the virtual-group router init (default 1e-3/sqrt(hidden_size))",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the router init and --drop-ratio's draws")
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=0.0,
        help="Drop-Upcycling: re-initialise this share (in [0, 1)) of each expert's intermediate neurons "
        "from the dense weights' mean and std (default 0: off; 0.5 in the paper)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the written weights (auto: the dense checkpoint's)",
    )
    p.add_argument(
        "--no-weight-scaling",
        action="store_true",
        help="do not scale the experts (ablation only: the MoE then starts at dense(x)/c)",
    )
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per output safetensors shard")
    p.add_argument(
        "--verify", action="store_true", help="compare dense and upcycled logits on a few hundred tokens"
    )
    p.add_argument("--verify-tokens", type=int, default=256)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    raw, config = read_hf_config(args.dense)
    moe = make_moe_config(
        config,
        num_experts=args.experts,
        top_k=args.top_k,
        granularity=args.granularity,
        shared_shards=args.shared_shards,
        routing=args.routing,
        layers=args.moe_layers,
        router_init_std=args.router_init_std,
        seed=args.seed,
        weight_scaling=not args.no_weight_scaling,
        drop_ratio=args.drop_ratio,
    )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out {out} exists and is not empty; choose another directory or pass --force")
    reader = CheckpointReader(args.dense)  # validates the weight files before any work
    check_against_config(reader, config)
    print(format_plan(config, moe))
    started = time.perf_counter()
    files = convert(
        raw, config, reader, moe, out, resolve_dtype(args.dtype, config), int(args.max_shard_size * 2**30)
    )
    copied = copy_tokenizer_files(args.dense, out)
    print(
        f"wrote {len(files)} weight file(s) and {copied or 'no tokenizer files'} to {out} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    if args.verify:
        from pipeline.verify import format_report, verify_upcycled

        print(format_report(verify_upcycled(args.dense, out, n_tokens=args.verify_tokens, seed=args.seed)))
    return 0


def convert(
    raw_config: dict,
    config: ModelConfig,
    reader: CheckpointReader,
    moe: MoEConfig,
    out: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[str]:
    """Write the upcycled checkpoint (weights, index, config.json) to `out`; return the weight files."""
    expected = [f"{mlp_prefix(i)}{part}.weight" for i in moe.layers for part in mlp_parts(config)]
    missing = [name for name in expected if name not in reader]
    if missing:
        raise UserError(f"{reader.dir}: dense MLP tensors not found: {missing[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    moe_prefixes = tuple(mlp_prefix(i) for i in moe.layers)
    for name in tqdm(reader.names(), desc="copy dense tensors", unit="tensor"):
        if not name.startswith(moe_prefixes):
            writer.add(name, reader.get(name).to(dtype))
    for layer in tqdm(moe.layers, desc="upcycle MLPs", unit="layer"):
        prefix = mlp_prefix(layer)
        writer.add(prefix + "gate.weight", virtual_group_router(moe, config.hidden_size, layer).to(dtype))
        for name, tensor in _upcycle_layer(reader, config, moe, layer, dtype).items():
            writer.add(prefix + name, tensor)
    files = writer.close()
    out_config = dict(raw_config)
    out_config["moe"] = moe.to_dict()
    out_config["dtype"] = dtype_name(dtype)
    out_config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    return files


def mlp_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp."


def mlp_parts(config: ModelConfig) -> tuple[str, ...]:
    """The dense MLP's projections under the names of its form (backbone.MLPForm)."""
    if not config.mlp_gated:
        return config.mlp_names  # (up, down)
    return FUSED if config.mlp_fused else SEPARATE


def dense_mlp(reader: CheckpointReader, config: ModelConfig, layer: int) -> tuple[list, list]:
    """([gate_FH, up_FH, down_HF], [their biases] or []) of a dense MLP, a fused gate_up_proj split; a
    non-gated MLP's gate (and its bias) is None."""
    prefix, parts = mlp_prefix(layer), mlp_parts(config)
    weights = [reader.get(f"{prefix}{part}.weight") for part in parts]
    biases = [reader.get(f"{prefix}{part}.bias") for part in parts] if config.mlp_bias else []
    if not config.mlp_gated:  # (up, down): no gate
        return [None, *weights], [None, *biases] if biases else []
    if config.mlp_fused:  # (gate_up, down), gate rows first; a fused MLP has no biases (Phi-3, GLM-4)
        return [*weights[0].chunk(2, dim=0), weights[1]], []
    return weights, biases


def _upcycle_layer(reader: CheckpointReader, config: ModelConfig, moe: MoEConfig, layer: int, dtype) -> dict:
    """The MoE block's tensors but the router, named relative to `model.layers.{layer}.mlp.`."""
    weights, biases = dense_mlp(reader, config, layer)
    routed = upcycle_mlp(moe, *weights, *biases, dtype=dtype, layer=layer, act=config.hidden_act)
    tensors = {f"experts.{name}": tensor for name, tensor in routed.items()}
    if moe.shared_shards:
        tensors |= upcycle_shared_expert(moe, *weights, dtype=dtype)
    return tensors


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters computed on the meta device: no memory is allocated."""
    from pipeline.backbone import skeleton

    return skeleton(config).parameter_counts()


def _shared_plan(moe: MoEConfig) -> list[str]:
    if not moe.shared_shards:
        return []
    return [
        f"shared expert: shards 0..{moe.shared_shards - 1} of G={moe.granularity} (width "
        f"{moe.shared_intermediate_size}), always active, sigmoid gate at 0 (x0.5) with down_proj x2"
    ]


def _drop_plan(moe: MoEConfig) -> list[str]:
    if moe.drop_ratio == 0:
        return []
    I = moe.expert_intermediate_size
    return [
        f"drop-upcycling: each expert re-initialises {round(moe.drop_ratio * I)} of its {I} neurons "
        f"(--drop-ratio {moe.drop_ratio:g}, seed {moe.seed}); the model starts near, not at, the dense one"
    ]


def format_plan(dense: ModelConfig, moe: MoEConfig) -> str:
    """A human summary: the (N, K, G) plan, parameter counts and which layers become MoE."""
    from dataclasses import replace

    upcycled = replace(dense, moe=moe)
    dense_total, _ = parameter_counts(dense)
    total, active = parameter_counts(upcycled)
    F_, I = dense.intermediate_size, moe.expert_intermediate_size
    shards = f"G - S = {moe.group_size} routed shards" if moe.shared_shards else f"G={moe.granularity} shards"
    rows = [
        f"upcycling plan: N={moe.num_experts} experts (R={moe.expansion_rate} copies x {shards}), "
        f"top-K={moe.top_k}, routing={moe.routing}, expert scale c={moe.expert_scale:g}, "
        f"router init std {moe.router_init_std:.3g}",
        *_shared_plan(moe),
        *_drop_plan(moe),
        f"parameters: dense {dense_total / 1e6:,.1f}M -> total {total / 1e6:,.1f}M, "
        f"active {active / 1e6:,.1f}M "
        "per token",
        f"{'layer':>5}  mlp",
    ]
    glu = f"GLU[{dense.hidden_act}]" if dense.mlp_gated else f"MLP[{dense.hidden_act}]"
    shared = f" + shared {glu}({moe.shared_intermediate_size})" if moe.shared_shards else ""
    for i in range(dense.num_hidden_layers):
        kind = (
            f"MoE {moe.num_experts} x {glu}(I={I}), top-{moe.top_k}{shared}"
            if i in moe.layers
            else f"dense {glu}(F={F_})"
        )
        rows.append(f"{i:>5}  {kind}")
    return "\n".join(rows)
