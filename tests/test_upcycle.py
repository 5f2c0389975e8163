"""The converter: upcycled logits against the dense model, virtual groups, layers, biases, bad settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from hf_models import save_hf_model

from pipeline import load_model
from pipeline.cli import main
from pipeline.hf_io import CheckpointReader
from pipeline.verify import verify_upcycled, whole_group_mask

TOLERANCE = {"topk-softmax": 1e-5, "softmax-topk": 1e-3}


def convert(dense_dir, out_dir, experts, top_k, granularity=1, routing="softmax-topk", *extra) -> int:
    return main(
        [
            "convert",
            "--dense",
            str(dense_dir),
            "--out",
            str(out_dir),
            "--experts",
            str(experts),
            "--top-k",
            str(top_k),
            "--granularity",
            str(granularity),
            "--routing",
            routing,
            *extra,
        ]
    )


def relative_error(dense_model, moe_dir, seq_len=64):
    ids = torch.randint(
        0, dense_model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(3)
    )
    moe_model = load_model(moe_dir)
    with torch.no_grad():
        dense, moe = dense_model(ids).logits, moe_model(ids)
    return ((moe - dense).norm() / dense.norm()).item(), moe_model, ids


@pytest.mark.parametrize("routing", ["topk-softmax", "softmax-topk"])
@pytest.mark.parametrize("experts,top_k,granularity", [(8, 2, 1), (8, 1, 1), (16, 4, 2), (64, 8, 8)])
def test_upcycled_logits_match_dense(dense_llama, tmp_path, routing, experts, top_k, granularity):
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, experts, top_k, granularity, routing) == 0
    error, moe_model, ids = relative_error(dense_model, tmp_path)
    assert error < TOLERANCE[routing], error
    # The check is not vacuous: the model really is an MoE of the requested shape.
    blocks = moe_model.moe_blocks()
    assert len(blocks) == dense_model.config.num_hidden_layers
    for _, block in blocks:
        assert block.experts.gate_up_proj.shape == (experts, 2 * 128 // granularity, 64)
        assert block.experts.down_proj.shape == (experts, 64, 128 // granularity)
        # Every token's selected experts form whole virtual groups at step 0.
        _, experts_TK = torch.topk(block.last_router_logits_TN, top_k, dim=-1)
        assert whole_group_mask(experts_TK, granularity).all()


def test_without_weight_scaling_the_model_is_not_dense(dense_llama, tmp_path):
    """Guards the scaling itself: switching it off must break function preservation."""
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 1, "softmax-topk", "--no-weight-scaling") == 0
    assert relative_error(dense_model, tmp_path)[0] > 0.1


def test_router_rows_are_replicated_within_groups(dense_llama, tmp_path):
    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 16, 4, 2, "softmax-topk", "--seed", "7") == 0
    router = CheckpointReader(tmp_path).get("model.layers.0.mlp.gate.weight")
    assert torch.equal(router[0], router[1]) and torch.equal(router[14], router[15])
    assert not torch.equal(router[1], router[2])
    config = json.loads((tmp_path / "config.json").read_text())
    expected = {
        "num_experts": 16,
        "top_k": 4,
        "granularity": 2,
        "routing": "softmax-topk",
        "expert_scale": 8.0,
        "expert_intermediate_size": 64,
        "seed": 7,
        "layers": [0, 1, 2],
    }
    assert {k: config["moe"][k] for k in expected} == expected


@pytest.mark.parametrize("spec,layers", [("every:2", [0, 2]), ("1", [1]), ("0,2", [0, 2])])
def test_partial_moe_layers(dense_llama, tmp_path, spec, layers):
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 1, "topk-softmax", "--moe-layers", spec) == 0
    error, moe_model, _ = relative_error(dense_model, tmp_path)
    assert [i for i, _ in moe_model.moe_blocks()] == layers
    assert error < 1e-5


@pytest.mark.parametrize(
    "family,overrides", [("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True})]
)
@pytest.mark.parametrize("routing", ["topk-softmax", "softmax-topk"])
def test_biases_survive_upcycling(tmp_path, family, overrides, routing):
    dense_model = save_hf_model(family, tmp_path / "dense", **overrides)
    assert convert(tmp_path / "dense", tmp_path / "moe", 16, 4, 2, routing) == 0
    assert relative_error(dense_model, tmp_path / "moe")[0] < TOLERANCE[routing]


def test_sharded_input_and_output(tmp_path):
    dense_model = save_hf_model("llama", tmp_path / "dense", max_shard_size="100KB")
    assert (
        convert(tmp_path / "dense", tmp_path / "moe", 8, 2, 1, "topk-softmax", "--max-shard-size", "0.0002")
        == 0
    )
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert relative_error(dense_model, tmp_path / "moe")[0] < 1e-5


def test_verify_reports_small_error(dense_llama, tmp_path):
    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 64, 8, 8, "softmax-topk") == 0
    report = verify_upcycled(dense_dir, tmp_path, n_tokens=128)
    assert report.tokens == 128
    assert report.relative_logit_error < 1e-3
    assert report.whole_group_share == 1.0
    assert report.top1_changed < 0.02


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--experts", "8", "--top-k", "3", "--granularity", "2"],
            "--top-k 3 is not a multiple of --granularity 2",
        ),
        (["--experts", "9", "--top-k", "2", "--granularity", "2"], "--experts 9 is not a multiple"),
        (
            ["--experts", "24", "--top-k", "6", "--granularity", "3"],
            "does not divide the dense intermediate_size",
        ),
        (["--experts", "4", "--top-k", "8"], "--top-k 8 is larger than --experts 4"),
        (["--experts", "8", "--top-k", "2", "--moe-layers", "0,7"], "layers \\[7\\] do not exist"),
        (["--experts", "8", "--top-k", "2", "--moe-layers", "every:x"], "every:k"),
    ],
)
def test_invalid_settings_stop_before_any_work(dense_llama, tmp_path, capsys, args, message):
    dense_dir, _ = dense_llama
    out = tmp_path / "out"
    assert main(["convert", "--dense", str(dense_dir), "--out", str(out), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"top_k": 3}, r"moe\.top_k=3 is not a multiple of moe\.granularity=2"),
        ({"num_experts": 9}, r"moe\.num_experts=9 is not a multiple of moe\.granularity=2"),
        ({"top_k": 32}, r"moe\.top_k=32 is larger than moe\.num_experts=16"),
        (
            {"expert_intermediate_size": 32},
            r"expert_intermediate_size=32 != intermediate_size=128 \(F = G\*I\)",
        ),
        ({"layers": [0, 5]}, r"moe\.layers \[5\] do not exist"),
        ({"routing": "sigmoid"}, r"moe\.routing='sigmoid'"),
        ({"granularity": None}, r"lacks \['granularity'\]"),
    ],
)
def test_hand_edited_moe_section_is_refused_naming_the_field(dense_llama, tmp_path, edit, message):
    """MoEConfig checks its invariants on construction, so a config.json edited by hand cannot load."""
    from pipeline.config import read_hf_config
    from pipeline.errors import UserError

    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 16, 4, 2) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe"].update(edit)
    config["moe"] = {k: v for k, v in config["moe"].items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as caught:
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)


def test_moe_settings_are_keyword_only(dense_llama):
    from pipeline.config import MoEConfig, read_hf_config
    from pipeline.upcycle import make_moe_config

    _, config = read_hf_config(dense_llama[0])
    with pytest.raises(TypeError):
        make_moe_config(config, 8, 2, 2)  # which is top_k and which granularity? refused, not guessed
    with pytest.raises(TypeError):
        MoEConfig(8, 2, 1, "softmax-topk", (0,), 128, 4.0)
    assert make_moe_config(config, num_experts=8, top_k=2, granularity=2).expert_intermediate_size == 64


def test_refuses_to_upcycle_twice_and_to_overwrite(dense_llama, tmp_path, capsys):
    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path / "moe", 8, 2) == 0
    assert convert(tmp_path / "moe", tmp_path / "again", 8, 2) == 2
    assert "already upcycled" in capsys.readouterr().err
    assert convert(dense_dir, tmp_path / "moe", 8, 2) == 2
    assert "--force" in capsys.readouterr().err


def test_console_script_prints_plan_and_verify(dense_llama, tmp_path):
    dense_dir, _ = dense_llama
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "convert",
            "--dense",
            str(dense_dir),
            "--out",
            str(tmp_path),
            "--experts",
            "8",
            "--top-k",
            "2",
            "--verify",
            "--force",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "N=8 experts" in result.stdout and "active" in result.stdout
    assert "relative logit error" in result.stdout


def test_init_writes_a_model_transformers_loads(tmp_path):
    import transformers

    assert (
        main(
            [
                "init",
                "--out",
                str(tmp_path),
                "--vocab-size",
                "300",
                "--hidden-size",
                "32",
                "--intermediate-size",
                "64",
                "--layers",
                "2",
                "--heads",
                "4",
                "--kv-heads",
                "2",
            ]
        )
        == 0
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_streamed_forward_equals_the_loaded_model(dense_llama, tmp_path):
    """--verify's one-layer-at-a-time forward must compute what the full model computes."""
    from pipeline.verify import streamed_forward

    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 16, 4, 2, "softmax-topk") == 0
    ids = torch.randint(0, 211, (1, 40), generator=torch.Generator().manual_seed(5))
    for path in (dense_dir, tmp_path):
        with torch.no_grad():
            expected = load_model(path)(ids)
        torch.testing.assert_close(streamed_forward(path, ids), expected, atol=1e-5, rtol=1e-5)
