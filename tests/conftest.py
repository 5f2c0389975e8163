"""Shared fixtures: tiny random models built with `transformers`, the reference we did not write."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def save_hf_model(family: str, path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build a tiny random `transformers` model of a family ('llama', 'mistral', 'qwen2') and save it."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    kwargs = {**TINY, **overrides}
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # Random norm weights, so that a wrong norm implementation cannot hide behind weight = 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


@pytest.fixture(scope="session")
def dense_llama(tmp_path_factory):
    """(directory, transformers model) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("dense_llama")
    return path, save_hf_model("llama", path)
