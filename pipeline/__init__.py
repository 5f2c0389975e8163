"""Upcycle dense Llama-family checkpoints into Mixture-of-Experts models and train them with DeepSpeed."""

__all__ = ["ModelConfig", "MoEConfig", "load_model"]


def __getattr__(name: str):
    # Lazy, so that `pipeline.errors` (used by data_prep) does not import torch: that cost ~2 s per
    # `upcycle prep` call.
    if name in ("ModelConfig", "MoEConfig"):
        from pipeline import config

        return getattr(config, name)
    if name == "load_model":
        from pipeline.hf_io import load_model

        return load_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
