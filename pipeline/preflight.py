"""Everything checked before a process group starts: run config, model, data, tokenizer, topology.

`upcycle train` calls `prepare` once for the whole job (with the world size the launch will have), and
every rank calls it again on start-up, so that a bad run stops with one clear message naming the key,
file or flag, before any rank waits on another and before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch

from pipeline import checkpointing
from pipeline.config import ModelConfig, read_hf_config
from pipeline.ds_adapter import EXPERT_ACTIVATIONS
from pipeline.errors import UserError
from pipeline.run_config import (
    RunConfig,
    launch_world_size,
    load_run_config,
    validate,
    validate_against_model,
)

USAGE = """Training entry point: DeepSpeed ZeRO plus AutoEP expert parallelism, one CPU box to many GPU nodes.

    deepspeed [--hostfile launch/hostfile] pipeline/train.py --config FILE|NAME [--section.key value ...]
    torchrun --nproc_per_node 2 pipeline/train.py --config FILE ...
    mpirun -n 2 python pipeline/train.py --config FILE ...          (ranks found through mpi4py)
"""


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """--config FILE plus `--section.key value` overrides; the launcher's --local_rank is dropped."""
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML, or the name of a shipped one (e.g. tiny_cpu)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def prepare(argv: list[str], world_size: int | None = None) -> tuple[RunConfig, ModelConfig]:
    """Config, model config, data directories, tokenizer and resume topology, all checked.

    `world_size` defaults to what the launcher's environment says.
    """
    from data_prep.reader import PackedTokenDataset

    config_path, overrides = parse_args(argv)
    cfg = load_run_config(config_path, overrides)
    world_size = world_size or launch_world_size()
    validate(cfg, world_size, torch.cuda.is_available())
    _, model_config = read_hf_config(cfg.model.path)
    validate_against_model(cfg, model_config.moe.num_experts if model_config.moe else None)
    if model_config.moe and model_config.mlp_bias:
        raise UserError(
            f"model.path {cfg.model.path}: MoE experts with biases (mlp_bias) are not supported by "
            "DeepSpeed AutoEP training"
        )
    if model_config.moe and not model_config.mlp_gated:
        raise UserError(
            f"model.path {cfg.model.path}: the experts are non-gated (down(act(up(x))), "
            f"hidden_act={model_config.hidden_act!r}), and DeepSpeed AutoEP's experts are gated only: "
            "training them is not supported yet (convert, load_model and upcycle eval are)"
        )
    if model_config.moe and model_config.hidden_act not in EXPERT_ACTIVATIONS:
        raise UserError(
            f"model.path {cfg.model.path}: the experts apply hidden_act={model_config.hidden_act!r}, which "
            f"DeepSpeed AutoEP's gated experts do not compute (they compute {sorted(EXPERT_ACTIVATIONS)}); "
            "training this model would apply another function"
        )
    for split in ("train", "valid"):
        data = PackedTokenDataset(cfg.data.path, split, cfg.train.seq_len, cfg.train.seed, cfg.data.weights)
    check_tokenizer(cfg, model_config, data)
    expected = checkpointing.topology(cfg, world_size)
    checkpointing.resume_plan(cfg.output.dir, cfg.to_dict(), expected, cfg.output.on_damaged_checkpoint)
    if cfg.train.precision == "bf16" and not torch.cuda.is_available():
        print("warning: train.precision=bf16 on CPU is slow; fp32 is the CPU default", file=sys.stderr)
    return cfg, model_config


def check_tokenizer(cfg: RunConfig, model_config: ModelConfig, data) -> None:
    """Refuse data tokenized with a vocabulary the model does not have."""
    if data.vocab_size > model_config.vocab_size:
        raise UserError(
            f"data.path was tokenized with a vocabulary of {data.vocab_size} tokens, but the model at "
            f"model.path has vocab_size {model_config.vocab_size}: re-tokenize with the model's own tokenizer"
        )
    model_tok = os.path.join(cfg.model.path, "tokenizer.json")
    data_tok = data.tokenizer  # the tokenizer record of the data's manifest (docs/design.md §5)
    if not os.path.isfile(model_tok) or not data_tok.get("sha256"):
        return
    with open(model_tok, "rb") as fh:
        raw = fh.read()
    if hashlib.sha256(raw).hexdigest() == data_tok["sha256"]:
        return
    # Different bytes can still be the same vocabulary (a re-saved file): compare token -> id maps.
    from tokenizers import Tokenizer

    model_vocab = Tokenizer.from_str(raw.decode()).get_vocab(with_added_tokens=True)
    path = data_tok.get("path")
    if path and os.path.isfile(path):
        data_vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
        # Every id the data can hold must mean the same token to the model (a larger model vocabulary
        # that extends the data's is fine).
        differ = sorted(t for t, i in data_vocab.items() if model_vocab.get(t) != i)
        if differ:
            raise UserError(
                f"data.path was tokenized with {path}, whose vocabulary differs from the model's "
                f"{model_tok} ({len(differ)} tokens map to other ids, e.g. {differ[:3]}): re-tokenize the "
                "data with the model's tokenizer"
            )
        return
    print(
        f"warning: data.path was tokenized with a tokenizer ({path}) that is gone and whose sha256 differs "
        f"from {model_tok}; cannot check that the vocabularies agree",
        file=sys.stderr,
    )
