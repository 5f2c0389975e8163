"""`upcycle init`: a new dense Llama-family checkpoint with random weights, for demos, tests and pretraining.

The directory it writes is a standard Hugging Face one (config.json + model.safetensors), so it loads in
`transformers` as well as here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.hf_io import copy_tokenizer_files

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="write a new dense model with random weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=tuple(ARCHITECTURES), default="llama")
    p.add_argument("--vocab-size", type=int, help="default: the --tokenizer's vocabulary size")
    p.add_argument("--tokenizer", help="tokenizer.json (or its directory) to copy next to the weights")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    vocab_size = args.vocab_size or _tokenizer_vocab_size(args.tokenizer)
    raw = {
        "architectures": [ARCHITECTURES[args.family]],
        "model_type": args.family,
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden_size // args.heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if args.family == "mistral":
        raw["sliding_window"] = None
    config = ModelConfig.from_hf_dict(raw, source="upcycle init arguments")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = random_init_state(config, args.init_std, args.seed)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
        copy_tokenizer_files(tokenizer if tokenizer.is_dir() else tokenizer.parent, out)
    n_params = sum(t.numel() for t in state.values())
    print(f"wrote a random {args.family} model with {n_params / 1e6:.2f}M parameters to {out}")
    return 0


def random_init_state(config: ModelConfig, std: float, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2 style init: normal(0, std), output projections scaled by 1/sqrt(2 * layers), norms at 1."""
    from pipeline.backbone import expected_state

    torch.manual_seed(seed)
    model = {name: torch.nn.Parameter(torch.empty(shape)) for name, shape in expected_state(config).items()}
    residual_std = std / (2 * config.num_hidden_layers) ** 0.5
    for name, param in model.items():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(param)
        else:
            is_residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
            torch.nn.init.normal_(param, std=residual_std if is_residual_out else std)
    if config.tie_word_embeddings:
        model.pop("lm_head.weight")
    return {name: t.detach().contiguous() for name, t in model.items()}


def _tokenizer_vocab_size(tokenizer: str | None) -> int:
    if not tokenizer:
        raise UserError("give --vocab-size, or --tokenizer to take the vocabulary size from")
    from tokenizers import Tokenizer

    path = Path(tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
