"""Tiny random `transformers` models, the reference we did not write, and what the tests compare with them:
logits of a saved model loaded by stock transformers, and a relative error."""

from __future__ import annotations

import copy

import torch

TINY = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# Tied embeddings and llama3 rope with a short original context: the dense overrides of the export tests'
# "rope and tied" cases (the export must write both the tie and every rope field).
LLAMA3_ROPE_TIED = {
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
}  # fmt: skip


def save_hf_model(family: str, path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build a tiny random `transformers` model of a family (its `model_type`: 'llama', 'gemma3_text', ...)
    with transformers' own classes, and save it."""
    import transformers

    kwargs = {**TINY, **copy.deepcopy(overrides)}  # config classes may edit nested dicts in place
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(family, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random norm weights, so that a wrong norm implementation cannot hide behind weight = 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def perturb(moe_dir, seed=0):
    """Make the upcycled model look trained: distinct experts, a router with spread logits, and a shared
    expert (if any) changed, its gate no longer 0."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for path in sorted(moe_dir.glob("*.safetensors")):
        state = load_file(path)
        for name, t in state.items():
            if name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight")):
                state[name] = torch.randn(t.shape, generator=g) * 0.5
            elif ".experts." in name or ".shared_expert." in name:
                state[name] = t + torch.randn(t.shape, generator=g) * t.std() * 0.5
        save_file(state, path, metadata={"format": "pt"})


def hf_logits(out_dir, ids):
    """(logits, model) of the checkpoint in `out_dir` loaded by stock transformers, fp32, every tensor from
    the files (`export.load_stock`)."""
    from pipeline.export import load_stock

    model = load_stock(out_dir)
    with torch.no_grad():
        return model(ids).logits, model
