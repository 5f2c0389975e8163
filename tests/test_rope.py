"""RoPE scaling types yarn, dynamic (NTK) and longrope against transformers' own models, at sequence lengths
within and beyond the original context: dense logits, upcycled logits (`upcycle convert`) and exported
checkpoints (`upcycle export`) loaded by stock transformers; what cannot be represented is refused."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from hf_models import perturb, save_hf_model

from pipeline import load_model
from pipeline.cli import main
from pipeline.config import RopeConfig, read_hf_config, rope_inv_freq
from pipeline.errors import UserError

ORIGINAL = 16  # yarn's and longrope's original context; dynamic scales beyond max_position_embeddings = 16
SHORT, LONG = 12, 48  # sequence lengths within and beyond it
HALF = 8  # head_dim / 2 of hf_models.TINY (64 / 4 heads = 16)

# id: (rope_parameters, other config overrides)
ROPES = {
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
         "rope_theta": 5000.0},
        {},
    ),
    "yarn-mscale-betas-no-truncate": (
        {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL, "mscale": 1.0,
         "mscale_all_dim": 0.5, "beta_fast": 8, "beta_slow": 2, "truncate": False},
        {},
    ),
    "yarn-attention-factor": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
         "attention_factor": 1.3},
        {},
    ),
    "dynamic": (
        {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 5000.0},
        {"max_position_embeddings": ORIGINAL},
    ),
    "longrope": (
        {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
         "short_factor": [1 + 0.1 * i for i in range(HALF)],
         "long_factor": [1 + 0.7 * i for i in range(HALF)]},
        {},
    ),
    "longrope-no-factor-attention-factor": (
        {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL, "attention_factor": 1.1,
         "short_factor": [1.0] * HALF, "long_factor": [1 + 0.5 * i for i in range(HALF)]},
        {},
    ),
}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def token_ids(seq_len: int) -> torch.Tensor:
    return torch.randint(0, 211, (2, seq_len), generator=torch.Generator().manual_seed(1))


def fresh_hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a freshly loaded transformers model: its dynamic RoPE keeps state between forwards."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def ours(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def save_dense(family: str, case: str, path):
    rope, overrides = ROPES[case]
    return save_hf_model(family, path, rope_parameters=dict(rope), **overrides)


# ---- the frequencies themselves ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ROPES))
def test_frequencies_are_bitwise_those_of_transformers(tmp_path, case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_model = save_dense("llama", case, tmp_path)
    hf_config = hf_model.config
    _, config = read_hf_config(tmp_path)
    init_fn = ROPE_INIT_FUNCTIONS[config.rope.type]
    expected, attention_factor = init_fn(hf_config)
    assert torch.equal(rope_inv_freq(config.rope, config.head_dim), expected)
    assert config.rope.attention_factor == attention_factor
    for seq_len in (SHORT, ORIGINAL, ORIGINAL + 1, LONG):
        if config.rope.type == "dynamic" and seq_len <= ORIGINAL:
            continue  # transformers keeps its initial frequencies there (checked through the logits below)
        hf_freq, _ = init_fn(hf_config, seq_len=torch.tensor(seq_len))
        assert torch.equal(
            rope_inv_freq(config.rope, config.head_dim, seq_len=torch.tensor(seq_len)), hf_freq
        )
        assert torch.equal(rope_inv_freq(config.rope, config.head_dim, seq_len=seq_len), hf_freq)


# ---- dense logits, both spellings -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("case", list(ROPES))
def test_dense_logits_match_transformers(tmp_path, family, case):
    save_dense(family, case, tmp_path)
    model = load_model(tmp_path)
    for seq_len in (SHORT, LONG):
        ids = token_ids(seq_len)
        expected = fresh_hf_logits(tmp_path, ids)
        error = rel(ours(model, ids), expected)
        print(f"dense {family} {case} T={seq_len}: relative logit error {error:.1e}")
        assert error <= 1e-5, error
    # Not vacuous: plain RoPE with the same theta gives clearly different logits beyond the original context.
    plain = copy.deepcopy(model.config)  # transformers' config of the backbone
    plain.rope_parameters = {"rope_type": "default", "rope_theta": plain.rope_parameters["rope_theta"]}
    model.model.rotary_emb = type(model.model.rotary_emb)(config=plain)
    assert rel(ours(model, token_ids(LONG)), expected) > 1e-3


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
@pytest.mark.parametrize("case", ["yarn-mscale-betas-no-truncate", "dynamic", "longrope"])
def test_old_rope_scaling_spelling(tmp_path, case, type_key):
    """Before transformers 5: `rope_scaling` (with `type` or `rope_type`) and a top-level `rope_theta`."""
    save_dense("qwen2", case, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params[type_key] = params.pop("rope_type")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path)
    assert read_hf_config(tmp_path)[1].rope.type == params[type_key]
    for seq_len in (SHORT, LONG):
        ids = token_ids(seq_len)
        assert rel(ours(model, ids), fresh_hf_logits(tmp_path, ids)) <= 1e-5


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers(tmp_path):
    save_dense("llama", "yarn", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    config["rope_theta"] = 3000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path)
    assert read_hf_config(tmp_path)[1].rope == RopeConfig(
        theta=3000.0, type="dynamic", factor=2.0, original_max_position_embeddings=64
    )
    ids = token_ids(80)  # beyond max_position_embeddings = 64
    assert rel(ours(model, ids), fresh_hf_logits(tmp_path, ids)) <= 1e-5


def test_dynamic_keeps_transformers_state_between_forwards(tmp_path):
    """The backbone is transformers' model, so its dynamic RoPE keeps the frequencies of the longest forward
    it has seen until a forward is shorter than max_position_embeddings, exactly as transformers does (the
    hand-written decoder before it recomputed them per forward; docs/design.md §9)."""
    import transformers

    save_dense("llama", "dynamic", tmp_path)
    model = load_model(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = token_ids(30)
    with torch.no_grad():
        hf(token_ids(LONG))
        stateful = hf(ids).logits  # still the frequencies of T = 48
    ours(model, token_ids(LONG))
    assert rel(ours(model, ids), stateful) <= 1e-5
    assert rel(stateful, fresh_hf_logits(tmp_path, ids)) > 1e-4  # the state is real


# ---- upcycled and exported ------------------------------------------------------------------------------


UPCYCLE = {
    # id: (family, routing, granularity, exported class)
    "llama-topk-softmax": ("llama", "topk-softmax", 2, "MixtralForCausalLM"),
    "qwen2-softmax-topk": ("qwen2", "softmax-topk", 1, "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("setting", list(UPCYCLE))
@pytest.mark.parametrize("case", ["yarn-mscale-betas-no-truncate", "dynamic", "longrope"])
def test_upcycled_and_exported_logits(tmp_path, case, setting, capsys):
    family, routing, granularity, expected_class = UPCYCLE[setting]
    dense, moe_dir, out = tmp_path / "dense", tmp_path / "moe", tmp_path / "hf"
    save_dense(family, case, dense)
    args = ["--experts", "4", "--top-k", "2", "--granularity", str(granularity), "--routing", routing]
    assert main(["convert", "--dense", str(dense), "--out", str(moe_dir), *args]) == 0
    model = load_model(moe_dir)
    assert read_hf_config(moe_dir)[1].rope == read_hf_config(dense)[1].rope  # the rope fields are kept
    tolerance = 1e-5 if routing == "topk-softmax" else 1e-3  # softmax-topk: exact for a uniform router only
    for seq_len in (SHORT, LONG):
        ids = token_ids(seq_len)
        error = rel(ours(model, ids), fresh_hf_logits(dense, ids))
        with capsys.disabled():
            print(f"upcycled {case} {setting} T={seq_len}: relative logit error vs dense {error:.1e}")
        assert error <= tolerance, error

    perturb(moe_dir)  # distinct experts, spread router logits: the class must route as ours does
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(moe_dir), "--out", str(out), "--verify"]) == 0
    verify_error = float(re.search(r"against our model: (\S+)", capsys.readouterr().out).group(1))
    with capsys.disabled():
        print(f"export --verify {case} {setting}: {verify_error:.1e}")
    assert verify_error <= 1e-5, verify_error
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == [expected_class]
    rope = exported["rope_parameters"]
    assert rope["rope_type"] == ROPES[case][0]["rope_type"]
    if case.startswith("yarn"):
        assert {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                "truncate"} <= set(rope) and rope["truncate"] is False  # fmt: skip
    if case == "longrope":
        assert rope["long_factor"] == ROPES[case][0]["long_factor"] and "attention_factor" in rope
    if case == "dynamic":
        assert exported["max_position_embeddings"] == 16 and "original_max_position_embeddings" not in rope
    model = load_model(moe_dir)
    for seq_len in (SHORT, LONG):
        ids = token_ids(seq_len)
        error = rel(fresh_hf_logits(out, ids), ours(model, ids))
        print(f"exported {case} {setting} T={seq_len}: relative logit error vs ours {error:.1e}")
        assert error <= 1e-5, error


# ---- refused, naming the field, before anything is written ----------------------------------------------

YARN = ROPES["yarn"][0]
LONGROPE = ROPES["longrope"][0]


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"rope_parameters": {"rope_type": "su", "factor": 2.0}}, "rope_parameters.rope_type"),
        ({"rope_scaling": {"type": "ntk", "factor": 2.0}, "rope_theta": 1e4}, "rope_scaling.type"),
        ({"rope_parameters": {**YARN, "partial_rotary_factor": 0.5}},
         "rope_parameters.partial_rotary_factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_parameters": without(YARN, "original_max_position_embeddings")},
         "rope_parameters.original_max_position_embeddings"),
        ({"rope_parameters": without(YARN, "factor")}, "rope_parameters.factor"),
        ({"rope_parameters": {**YARN, "factor": "4"}}, "rope_parameters.factor"),
        ({"rope_parameters": {**YARN, "truncate": "yes"}}, "rope_parameters.truncate"),
        ({"rope_scaling": {"type": "dynamic"}}, "rope_scaling.factor"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}},
         "rope_parameters.original_max_position_embeddings"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "attention_factor": 1.2}},
         "rope_parameters.attention_factor"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}},
         "rope_parameters.attention_factor"),
        ({"rope_parameters": {**LONGROPE, "short_factor": [1.0] * (HALF - 1)}},
         "rope_parameters.short_factor"),
        ({"rope_parameters": without(LONGROPE, "long_factor")}, "rope_parameters.long_factor"),
        ({"rope_parameters": without(LONGROPE, "original_max_position_embeddings")},
         "rope_parameters.original_max_position_embeddings"),
    ],
)  # fmt: skip
def test_unrepresentable_rope_is_refused_naming_the_field(dense_llama, tmp_path, edit, field, capsys):
    src, _ = dense_llama
    bad = tmp_path / "bad"
    bad.mkdir()
    config = {**json.loads((src / "config.json").read_text()), **edit}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    pattern = re.escape(field) + r"\b"
    with pytest.raises(UserError, match=pattern):
        load_model(bad)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", "--dense", str(bad), "--out", str(out), "--experts", "4", "--top-k", "2"]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()
    assert main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()
