"""Our Llama-family model against Hugging Face `transformers` on tiny random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import save_hf_model

from pipeline import load_model
from pipeline.errors import UserError

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def assert_same_logits(hf_model, path, seq_len=96, atol=2e-5):
    ours = load_model(path)
    ids = torch.randint(
        0, hf_model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = ours(ids)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}}),
        ("llama", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ],
    ids=[
        "llama",
        "llama-linear-rope",
        "llama3-rope",
        "llama-tied",
        "llama-biases",
        "mistral",
        "qwen2",
        "qwen2-tied-mqa",
    ],
)
def test_dense_logits_match_transformers(tmp_path, family, overrides):
    # seq_len 96 > max_position_embeddings (64) > llama3 original context (16): positions past the context.
    hf_model = save_hf_model(family, tmp_path, **overrides)
    assert_same_logits(hf_model, tmp_path)


def test_old_rope_scaling_spelling(tmp_path):
    """Checkpoints from before transformers 5 carry `rope_scaling` + `rope_theta`; both are honoured."""
    hf_model = save_hf_model("llama", tmp_path, rope_parameters={**LLAMA3_ROPE, "rope_theta": 123456.0})
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_logits(hf_model, tmp_path)


def test_sharded_checkpoint_with_index(tmp_path):
    hf_model = save_hf_model("llama", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_same_logits(hf_model, tmp_path)


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"model_type": "gpt2"}, "model_type"),
        ({"sliding_window": 16}, "sliding_window"),
    ],
)
def test_unrepresentable_configs_are_refused_naming_the_field(dense_llama, tmp_path, edit, field):
    src, _ = dense_llama
    config = {**json.loads((src / "config.json").read_text()), **edit}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_model(tmp_path)


def test_shape_mismatch_is_refused(dense_llama, tmp_path):
    src, _ = dense_llama
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(UserError, match=r"gate_proj.weight.*shape"):
        load_model(tmp_path)


def test_missing_weights_are_refused(dense_llama, tmp_path):
    src, _ = dense_llama
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path)
