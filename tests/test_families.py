"""Qwen3 and sliding-window attention (Mistral, Qwen2, Qwen3) against transformers' own tiny random models:
dense logits, upcycling, export to the stock MoE classes (Qwen3MoE, Mixtral, Qwen2MoE) and training at EP 2
with sequences longer than the window; configs that cannot be represented are refused naming the field.

Window semantics (transformers' `sliding_window_causal_mask_function`): a windowed layer's query at
position q attends the keys at q - W < k <= q, so W = 8 at T = 48 really cuts most of the context away.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hf_models import hf_logits, perturb, rel, save_hf_model
from launching import launch, losses

from pipeline import load_model
from pipeline.cli import main
from pipeline.config import read_hf_config
from pipeline.errors import UserError
from pipeline.hf_io import copy_tokenizer_files
from pipeline.verify import verify_upcycled

T = 48  # tokens per sequence in the logit checks: larger than every window below
WINDOW = 8
QWEN3 = {"head_dim": 24}  # != hidden_size / heads = 16
QWEN2_WINDOW = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}  # layers 1, 2

DENSE_CASES = {
    # id: (family, overrides, sliding layers expected)
    "qwen3": ("qwen3", QWEN3, ()),
    "qwen3-tied-bias-mqa": (
        "qwen3", {**QWEN3, "tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 1}, (),
    ),
    "qwen3-default-head-dim-128": ("qwen3", {}, ()),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}, (0, 1, 2)),
    "mistral-window-above-T": ("mistral", {"sliding_window": T + 16}, (0, 1, 2)),
    "qwen2-window-max-window-layers": ("qwen2", QWEN2_WINDOW, (1, 2)),
    "qwen2-window-layer-types": (
        "qwen2",
        {**QWEN2_WINDOW, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        (0, 2),
    ),
    "qwen2-window-off": ("qwen2", {**QWEN2_WINDOW, "use_sliding_window": False}, ()),
    "qwen3-window-some-layers": (
        "qwen3", {**QWEN3, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        (2,),
    ),
}  # fmt: skip


def ids(seq_len: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 211, (2, seq_len), generator=torch.Generator().manual_seed(seed))


def set_window(model, window) -> None:
    """The window of the backbone's sliding layers (transformers builds the masks from its config); None:
    wider than any forward here, i.e. full attention."""
    model.config.sliding_window = window if window is not None else 10**9


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_logits_match_transformers(tmp_path, case):
    family, overrides, sliding = DENSE_CASES[case]
    hf_model = save_hf_model(family, tmp_path, **overrides)
    ours = load_model(tmp_path)
    parsed = read_hf_config(tmp_path)[1]
    assert parsed.sliding_layers == sliding
    tokens = ids()
    with torch.no_grad():
        expected, actual = hf_model(tokens).logits, ours(tokens)
    error = rel(actual, expected)
    print(f"dense {case}: relative logit error {error:.2e}")
    assert error <= 1e-5
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)
    if family == "qwen3":
        assert ours.model.layers[0].self_attn.q_norm.weight.shape == (parsed.head_dim,)
        assert parsed.head_dim == overrides.get("head_dim", 128)
    if sliding and parsed.sliding_window < T:
        # Not vacuous: full attention, and a window one token wider or narrower, all give other logits.
        for window in (None, WINDOW - 1, WINDOW + 1):
            set_window(ours, window)
            with torch.no_grad():
                assert rel(ours(tokens), expected) > 1e-4, window


UPCYCLE_CASES = {
    "qwen3-tied-bias": ("qwen3", {**QWEN3, "tie_word_embeddings": True, "attention_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}),
    "qwen2-window": ("qwen2", QWEN2_WINDOW),
}


@pytest.mark.parametrize("routing,tolerance", [("topk-softmax", 1e-5), ("softmax-topk", 1e-3)])
@pytest.mark.parametrize("case", list(UPCYCLE_CASES))
def test_upcycled_logits_match_dense(tmp_path, case, routing, tolerance):
    family, overrides = UPCYCLE_CASES[case]
    dense = save_hf_model(family, tmp_path / "dense", **overrides)
    args = ["--experts", "8", "--top-k", "2", "--granularity", "2", "--routing", routing]
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *args]) == 0
    moe = load_model(tmp_path / "moe")
    assert len(moe.moe_blocks()) == 3
    tokens = ids()
    with torch.no_grad():
        error = rel(moe(tokens), dense(tokens).logits)
    print(f"upcycled {case} {routing}: relative logit error vs dense {error:.2e}")
    assert error <= tolerance
    if routing == "softmax-topk":
        # --verify's one-layer-at-a-time forward (256 tokens, beyond the window) agrees too.
        report = verify_upcycled(tmp_path / "dense", tmp_path / "moe", n_tokens=256)
        print(f"verify {case}: {report.relative_logit_error:.2e}")
        assert report.relative_logit_error <= tolerance and report.whole_group_share == 1.0


EXPORT_CASES = {
    # id: (family, overrides, routing, extra convert args, class, checks on the exported config.json)
    "qwen3-topk-softmax": (
        "qwen3", QWEN3, "topk-softmax", [], "Qwen3MoeForCausalLM",
        {"norm_topk_prob": True, "mlp_only_layers": [], "head_dim": 24, "use_sliding_window": False},
    ),
    "qwen3-softmax-topk-partial": (
        "qwen3", QWEN3, "softmax-topk", ["--moe-layers", "0,2"], "Qwen3MoeForCausalLM",
        {"norm_topk_prob": False, "mlp_only_layers": [1], "decoder_sparse_step": 1},
    ),
    "qwen3-tied-bias-partial": (
        "qwen3", {**QWEN3, "tie_word_embeddings": True, "attention_bias": True}, "topk-softmax",
        ["--moe-layers", "1"], "Qwen3MoeForCausalLM",
        {"attention_bias": True, "tie_word_embeddings": True, "mlp_only_layers": [0, 2]},
    ),
    "qwen3-window-every-layer": (
        "qwen3", {**QWEN3, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
        "softmax-topk", [], "Qwen3MoeForCausalLM", {"use_sliding_window": True, "sliding_window": WINDOW},
    ),
    "mistral-window-topk-softmax": (
        "mistral", {"sliding_window": WINDOW}, "topk-softmax", [], "MixtralForCausalLM",
        {"sliding_window": WINDOW},
    ),
    "mistral-window-softmax-topk": (
        "mistral", {"sliding_window": WINDOW}, "softmax-topk", [], "Qwen2MoeForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": ["sliding_attention"] * 3},
    ),
    "qwen2-window-partial": (
        "qwen2", QWEN2_WINDOW, "topk-softmax", ["--moe-layers", "0,1"], "Qwen2MoeForCausalLM",
        {"use_sliding_window": True, "mlp_only_layers": [2],
         "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    ),
}  # fmt: skip
# Windows on some Qwen2MoE layers only: transformers 4.x reads no such set, so only the fused layout
# (transformers 5, `layer_types`) exports them (tests/test_hub_layout.py checks the refusal).
EXPORT_LAYOUTS = {"qwen2-window-partial": "fused"}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_reproduces_logits(tmp_path, case, capsys):
    family, overrides, routing, extra, expected_class, expected_config = EXPORT_CASES[case]
    save_hf_model(family, tmp_path / "dense", **overrides)
    moe_dir, out = tmp_path / "moe", tmp_path / "hf"
    args = ["--experts", "8", "--top-k", "2", "--granularity", "2", "--routing", routing, *extra]
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(moe_dir), *args]) == 0
    perturb(moe_dir)  # distinct experts and spread router logits: the routing really matters
    layout = EXPORT_LAYOUTS.get(case, "hub")
    assert (
        main(["export", "--checkpoint", str(moe_dir), "--out", str(out), "--verify", "--layout", layout]) == 0
    )
    assert "relative logit error" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [expected_class]
    assert {key: config.get(key) for key in expected_config} == expected_config
    if expected_class == "Qwen3MoeForCausalLM":
        assert not any("shared_expert" in name for name in _tensor_names(out))

    tokens = ids()
    ours_model = load_model(moe_dir)
    with torch.no_grad():
        ours = ours_model(tokens)
    theirs, hf_model = hf_logits(out, tokens)
    assert type(hf_model).__name__ == expected_class
    error = rel(theirs, ours)
    assert error <= 1e-4

    # Not vacuous: the window and the routing each move the logits far more than the export's error (a
    # peaked router over one MoE layer makes the two routings differ by little, but still by 100x the error).
    if read_hf_config(moe_dir)[1].sliding_layers:
        set_window(ours_model, None)
        with torch.no_grad():
            assert rel(ours_model(tokens), ours) > 1e-3
        set_window(ours_model, WINDOW)
    for _, block in ours_model.moe_blocks():
        block.routing = "softmax-topk" if routing == "topk-softmax" else "topk-softmax"
    with torch.no_grad():
        other_routing = rel(ours_model(tokens), ours)
    with capsys.disabled():
        print(f"export {case}: relative logit error {error:.2e} (other routing: {other_routing:.2e})")
    assert other_routing > max(100 * error, 1e-6)


def _tensor_names(model_dir) -> list[str]:
    from pipeline.hf_io import CheckpointReader

    return CheckpointReader(model_dir).names()


@pytest.mark.parametrize(
    "family,overrides,arch",
    [
        ("qwen3", {**QWEN3, "attention_bias": True}, "Qwen3ForCausalLM"),
        ("qwen2", QWEN2_WINDOW, "Qwen2ForCausalLM"),
    ],
)
def test_dense_export(tmp_path, family, overrides, arch, capsys):
    save_hf_model(family, tmp_path / "dense", **overrides)
    assert (
        main(["export", "--checkpoint", str(tmp_path / "dense"), "--out", str(tmp_path / "hf"), "--verify"])
        == 0
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    theirs, _ = hf_logits(tmp_path / "hf", ids())
    with torch.no_grad():
        assert rel(theirs, load_model(tmp_path / "dense")(ids())) <= 1e-5


def test_qwen3_window_on_some_layers_converts_but_does_not_export(tmp_path, capsys):
    """Qwen3MoE windows every layer or none: a Qwen3 window on layer 2 only upcycles (our model computes it)
    and exports as a dense model, but the MoE export is refused before anything is written."""
    overrides = {**QWEN3, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}
    dense = save_hf_model("qwen3", tmp_path / "dense", **overrides)
    moe_dir, out = tmp_path / "moe", tmp_path / "hf"
    convert = ["--experts", "4", "--top-k", "2", "--routing", "topk-softmax"]
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(moe_dir), *convert]) == 0
    with torch.no_grad():
        assert rel(load_model(moe_dir)(ids()), dense(ids()).logits) <= 1e-5
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(moe_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sliding_window=8 is used by layers [2] only" in err and "no stock transformers class" in err
    assert not out.exists()


REFUSALS = {
    # id: (family, overrides, config.json edit, the field the message must name)
    "unknown-layer-type": (
        "qwen2", QWEN2_WINDOW, {"layer_types": ["full_attention", "chunked_attention", "sliding_attention"]},
        "layer_types has entries \\['chunked_attention'\\]",
    ),
    "layer-types-length": ("qwen3", QWEN3, {"layer_types": ["full_attention"]}, "layer_types="),
    "sliding-layers-without-window": (
        "qwen2", {}, {"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
        "layer_types marks layers \\[0\\] 'sliding_attention' but no window is in effect",
    ),
    "mistral-layer-types-ignored": (
        "mistral", {"sliding_window": WINDOW}, {"layer_types": ["full_attention"] * 3},
        "layer_types=.*MistralForCausalLM ignores layer_types",
    ),
    "window-zero": ("mistral", {}, {"sliding_window": 0}, "sliding_window=0 must be a positive integer"),
    "max-window-layers": (
        "qwen3", QWEN3,
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": None, "layer_types": None},
        "max_window_layers",
    ),
    "llama-window": ("llama", {}, {"sliding_window": 16}, "sliding_window=16 is smaller than"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unrepresentable_configs_are_refused_before_any_work(tmp_path, case, capsys):
    family, overrides, edit, message = REFUSALS[case]
    dense = tmp_path / "dense"
    save_hf_model(family, dense, **overrides)
    config = {**json.loads((dense / "config.json").read_text()), **edit}
    (dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        read_hf_config(dense)
    out = tmp_path / "moe"
    assert main(["convert", "--dense", str(dense), "--out", str(out), "--experts", "4", "--top-k", "2"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
    assert main(["export", "--checkpoint", str(dense), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_training_with_a_window_shorter_than_the_sequence(train_workspace):
    """A Mistral model with a 16-token window trains at EP 2 on 64-token sequences (our attention applies the
    window in training; AutoEP wraps only the MLPs), and the trained checkpoint exports to Mixtral with the
    window, reproducing our logits."""
    from pipeline.export import compare_logits, open_source

    ws = train_workspace
    dense, moe = ws / "mistral_dense", ws / "mistral_moe"
    save_hf_model("mistral", dense, vocab_size=384, num_hidden_layers=2, sliding_window=16)
    copy_tokenizer_files(ws / "dense", dense)
    assert main(["convert", "--dense", str(dense), "--out", str(moe), "--experts", "4", "--top-k", "2",
                 "--routing", "topk-softmax"]) == 0  # fmt: skip
    assert load_model(moe).config.sliding_window == 16
    launch(ws, "mistral_sw", "--model.path", str(moe), "--parallel.ep_size", "2", "--train.steps", "2",
           "--output.checkpoint_interval", "2", "--output.eval_interval", "0")  # fmt: skip
    run = losses(ws, "mistral_sw")
    print(f"training losses with a 16-token window at seq_len 64: {run}")
    assert sorted(run) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in run.values())

    out = ws / "mistral_sw_hf"
    assert main(["export", "--checkpoint", str(ws / "mistral_sw"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["sliding_window"] == 16
    error = compare_logits(open_source(ws / "mistral_sw"), out)  # 2 x 64 tokens, beyond the window
    print(f"trained Mistral-window export: relative logit error {error:.2e}")
    assert error <= 1e-4
