"""Upcycle dense Llama-family checkpoints into Mixture-of-Experts models and train them with DeepSpeed."""

from pipeline.config import ModelConfig, MoEConfig
from pipeline.hf_io import load_model

__all__ = ["ModelConfig", "MoEConfig", "load_model"]
