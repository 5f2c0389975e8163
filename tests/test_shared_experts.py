"""Shared experts, upcycled exactly (`upcycle convert --shared-shards S`, docs/design.md §2): S of the G
shards of the dense MLP become one always-active shared expert with a sigmoid gate at 0 (x0.5, down_proj
x2), the other G - S shards are copied into routed experts with the virtual-group router. At step 0 shared
+ routed = dense: checked against transformers' own dense model, and after export against transformers'
Qwen2MoE."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import perturb, rel, save_hf_model

from pipeline import load_model
from pipeline.cli import main
from pipeline.config import read_hf_config
from pipeline.export import load_stock
from pipeline.verify import whole_group_mask

IDS = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(5))
TOLERANCE = {"topk-softmax": 1e-5, "softmax-topk": 1e-3}  # as tests/test_upcycle.py
H, F = 64, 128  # hf_models.TINY's hidden and intermediate sizes


def convert(dense_dir, out, experts, top_k, granularity, shared, *extra) -> int:
    args = ["--experts", str(experts), "--top-k", str(top_k), "--granularity", str(granularity)]
    args += ["--shared-shards", str(shared), *extra]
    return main(["convert", "--dense", str(dense_dir), "--out", str(out), *args])


@pytest.mark.parametrize("routing", ["topk-softmax", "softmax-topk"])
@pytest.mark.parametrize(
    "experts,top_k,granularity,shared",
    [(4, 2, 2, 1), (8, 2, 4, 2), (6, 3, 4, 1), (8, 4, 8, 4)],  # (8, 4, 8, 4): Qwen1.5-MoE's 4 of 8
)
def test_shared_plus_routed_is_the_dense_model(
    dense_llama, tmp_path, routing, experts, top_k, granularity, shared
):
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, experts, top_k, granularity, shared, "--routing", routing) == 0
    moe_model = load_model(tmp_path)
    with torch.no_grad():
        dense, ours = dense_model(IDS).logits, moe_model(IDS)
    assert rel(ours, dense) < TOLERANCE[routing]
    I, group = F // granularity, granularity - shared
    for layer, block in moe_model.moe_blocks():
        assert block.shared_expert.gate_proj.weight.shape == (shared * I, H)
        assert block.experts.gate_up_proj.shape == (experts, 2 * I, H)
        assert torch.count_nonzero(block.shared_expert_gate.weight) == 0  # sigmoid(0) = 0.5 for every token
        mlp = dense_model.model.layers[layer].mlp
        # the shared expert is the first S shards, its down_proj doubled; the routed shards are the others
        assert torch.equal(block.shared_expert.gate_proj.weight, mlp.gate_proj.weight[: shared * I])
        assert torch.equal(block.shared_expert.down_proj.weight, mlp.down_proj.weight[:, : shared * I] * 2)
        assert torch.equal(
            block.experts.gate_up_proj[0, :I], mlp.gate_proj.weight[shared * I : (shared + 1) * I]
        )
        # virtual groups of G - S experts share a logit, and top-K picks whole groups
        router = block.gate.weight
        assert torch.equal(router, router[::group].repeat_interleave(group, dim=0))
        _, experts_TK = torch.topk(block.last_router_logits_TN, top_k, dim=-1)
        assert whole_group_mask(experts_TK, group).all()


def test_the_shared_expert_carries_its_shards(dense_llama, tmp_path):
    """Not vacuous: without the shared expert's output the model is no longer the dense one."""
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 4, 2, "--routing", "topk-softmax") == 0
    moe_model = load_model(tmp_path)
    for _, block in moe_model.moe_blocks():
        with torch.no_grad():
            block.shared_expert.down_proj.weight.zero_()
    with torch.no_grad():
        assert rel(moe_model(IDS), dense_model(IDS).logits) > 0.05


def test_verify_and_plan_report_the_shared_expert(dense_llama, tmp_path, capsys):
    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 4, 2, "--verify") == 0
    out = capsys.readouterr().out
    assert (
        "R=4 copies x G - S = 2 routed shards" in out
        and "shared expert: shards 0..1 of G=4 (width 64)" in out
    )
    assert "MoE 8 x GLU[silu](I=32), top-2 + shared GLU[silu](64)" in out
    assert "whole virtual groups in 768/768 routings" in out  # 256 tokens x 3 layers
    moe = read_hf_config(tmp_path)[1].moe
    assert (moe.shared_shards, moe.group_size, moe.expansion_rate, moe.shared_intermediate_size) == (
        2,
        2,
        4,
        64,
    )
    assert json.loads((tmp_path / "config.json").read_text())["moe"]["shared_shards"] == 2


def test_drop_upcycling_keeps_the_shared_expert_whole(dense_llama, tmp_path):
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 4, 2, "--drop-ratio", "0.5") == 0
    for layer, block in load_model(tmp_path).moe_blocks():
        mlp = dense_model.model.layers[layer].mlp
        assert torch.equal(block.shared_expert.up_proj.weight, mlp.up_proj.weight[:64])
        routed_up = block.experts.gate_up_proj[0, 32:]  # expert 0 = shard 2, up rows, x sqrt(c), c = N*g/K
        kept = torch.isclose(routed_up, mlp.up_proj.weight[64:96] * 8**0.5).all(dim=1)
        assert kept.sum() == 16  # half of its 32 neurons were re-drawn


@pytest.mark.parametrize(
    "args,message",
    [
        (["--experts", "8", "--top-k", "2", "--granularity", "4", "--shared-shards", "4"],
         "--shared-shards 4: must be in [0, G) with G = --granularity 4"),
        (["--experts", "8", "--top-k", "2", "--granularity", "1", "--shared-shards", "1"],
         "--shared-shards 1: must be in [0, G)"),
        (["--experts", "8", "--top-k", "2", "--granularity", "4", "--shared-shards", "1"],
         "--experts 8 is not a multiple of --granularity 4 - --shared-shards 1"),
        (["--experts", "6", "--top-k", "2", "--granularity", "4", "--shared-shards", "1"],
         "--top-k 2 is not a multiple of --granularity 4 - --shared-shards 1"),
    ],
)  # fmt: skip
def test_bad_shapes_are_refused_naming_the_flags(dense_llama, tmp_path, capsys, args, message):
    dense_dir, _ = dense_llama
    assert main(["convert", "--dense", str(dense_dir), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_dense_mlp_with_biases_is_refused(tmp_path, capsys):
    save_hf_model("llama", tmp_path / "dense", mlp_bias=True)
    assert convert(tmp_path / "dense", tmp_path / "out", 8, 2, 4, 2) == 2
    assert "--shared-shards 2: the dense MLP has biases (mlp_bias=true)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_hand_edited_config_is_checked_like_the_flags(dense_llama, tmp_path):
    from pipeline.errors import UserError

    dense_dir, _ = dense_llama
    assert convert(dense_dir, tmp_path, 8, 2, 4, 2) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe"]["shared_shards"] = 4  # all 4 shards shared: nothing left to route
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: moe\.shared_shards=4: must be in \[0, G\)"):
        load_model(tmp_path)


# ---- export: Qwen2MoE's shared expert is ours ---------------------------------------------------------


@pytest.mark.parametrize("routing", ["topk-softmax", "softmax-topk"])
def test_export_is_qwen2moe_with_our_shared_expert(tmp_path, capsys, routing):
    """topk-softmax on every layer would be Mixtral without a shared expert; with one it is Qwen2MoE."""
    save_hf_model("llama", tmp_path / "dense", tie_word_embeddings=True)
    assert convert(tmp_path / "dense", tmp_path / "moe", 8, 2, 4, 2, "--routing", routing) == 0
    perturb(tmp_path / "moe")  # as after training: the gate is no longer 0
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(out), "--verify"]) == 0
    assert "note: the shared expert gates" not in capsys.readouterr().out  # trained-looking gates
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["shared_expert_intermediate_size"] == 64 and config["moe_intermediate_size"] == 32
    assert config["norm_topk_prob"] is (routing == "topk-softmax")
    model = load_stock(out)  # nothing missing, unexpected or mismatched
    ours = load_model(tmp_path / "moe")
    with torch.no_grad():
        assert rel(model(IDS).logits, ours(IDS)) < 1e-4
    gate = model.model.layers[0].mlp.shared_expert_gate.weight
    assert torch.equal(gate, ours.model.layers[0].mlp.shared_expert_gate.weight) and gate.abs().sum() > 0


def test_export_at_step_0_is_the_dense_model_in_transformers(dense_llama, tmp_path, capsys):
    """The untrained upcycled model exported: transformers' Qwen2MoE computes the dense Llama."""
    dense_dir, dense_model = dense_llama
    assert convert(dense_dir, tmp_path / "moe", 8, 2, 4, 2, "--routing", "topk-softmax") == 0
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "export")]) == 0
    assert "note: the shared expert gates of layers [0, 1, 2] are exactly 0" in capsys.readouterr().out
    with torch.no_grad():
        assert rel(load_stock(tmp_path / "export")(IDS).logits, dense_model(IDS).logits) < 1e-5


def test_a_qwen3_model_with_a_shared_expert_is_refused_at_export(tmp_path, capsys):
    save_hf_model("qwen3", tmp_path / "dense")
    assert convert(tmp_path / "dense", tmp_path / "moe", 8, 2, 4, 2) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "moe.shared_shards=2" in err and "Qwen3MoeForCausalLM" in err and "has no shared expert" in err
    assert not (tmp_path / "export").exists()
