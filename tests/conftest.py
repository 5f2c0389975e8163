"""Shared fixtures: tiny random models built with `transformers`, the reference we did not write."""

from __future__ import annotations

import contextlib
import glob
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
    """Build a tiny random `transformers` model of a family ('llama', 'mistral', 'qwen2', 'qwen3') and save
    it."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
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


@pytest.fixture(scope="session", autouse=True)
def no_leftover_deepspeed_shm():
    """Tests kill ranks on purpose; a killed rank cannot unlink DeepSpeed's ~67 MB CPU all-reduce segment
    in /dev/shm (RAM). Remove the ones this session made, so repeated test runs do not fill memory."""
    from pipeline.ds_adapter import shm_buffer_name

    pattern = "/dev/shm/" + shm_buffer_name("*", "*", "*")
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):
            os.unlink(path)


@pytest.fixture(scope="session")
def dense_llama(tmp_path_factory):
    """(directory, transformers model) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("dense_llama")
    return path, save_hf_model("llama", path)


def prepare_train_workspace(root):
    """What tests/test_train.py's `workspace` builds: a prepared tiny corpus (`data`, tokenizer `tok`), a tiny
    dense model (`dense`) and its E8 top-2 upcycled version (`moe`)."""
    from pipeline.cli import main as upcycle

    corpus = root / "corpus.jsonl"
    steps = [
        ["prep", "corpus", "--out", str(corpus), "--max-mb", "1"],
        ["prep", "tokenizer", "--input", str(corpus), "--vocab-size", "384", "--out", str(root / "tok")],
        ["prep", "tokenize", "--input", str(corpus), "--tokenizer", str(root / "tok"), "--out",
         str(root / "data"), "--valid-fraction", "0.05", "--no-progress"],
        ["init", "--out", str(root / "dense"), "--tokenizer", str(root / "tok"), "--hidden-size", "64",
         "--intermediate-size", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2"],
        ["convert", "--dense", str(root / "dense"), "--out", str(root / "moe"), "--experts", "8",
         "--top-k", "2"],
    ]  # fmt: skip
    for argv in steps:
        assert upcycle(argv) == 0, argv
    return root


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory):
    """A fresh `prepare_train_workspace` per test module (launch it with test_train.launch)."""
    return prepare_train_workspace(tmp_path_factory.mktemp("train"))
