"""Drop-Upcycling (`upcycle convert --drop-ratio D`, docs/design.md §2): per expert, round(D*I) neurons are
re-drawn from the dense matrix's statistics, the rest are the scaled dense ones bit for bit; D = 0 is the
plain conversion; bad D is refused by flag; --verify reports the expected step-0 gap instead of failing."""

from __future__ import annotations

import glob
import json
import math
import re

import pytest
import torch
from hf_models import save_hf_model
from safetensors.torch import load_file

from pipeline import load_model
from pipeline.cli import main
from pipeline.config import read_hf_config
from pipeline.errors import UserError
from pipeline.hf_io import CheckpointReader
from pipeline.verify import verify_upcycled

# Each dense MLP matrix gets its own mean and spread, so that drawing from the wrong matrix's statistics
# (or from pooled ones, or forgetting the sqrt(c) scaling) moves the new neurons' statistics visibly.
DENSE_SHIFT = {"gate_proj": (3.0, 0.05), "up_proj": (1.0, -0.04), "down_proj": (0.5, 0.02)}
RATIO = 0.5


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense_shifted")
    model = save_hf_model("llama", path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = name.split(".")[-2]
            if part in DENSE_SHIFT:
                scale, shift = DENSE_SHIFT[part]
                p.mul_(scale).add_(shift)
    model.save_pretrained(path)
    return path


def convert(dense_dir, out, *extra, experts=4, top_k=2, granularity=1) -> int:
    return main(
        ["convert", "--dense", str(dense_dir), "--out", str(out), "--experts", str(experts), "--top-k",
         str(top_k), "--granularity", str(granularity), *extra]
    )  # fmt: skip


def tensors(out) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(glob.glob(f"{out}/*.safetensors")):
        state |= load_file(path)
    return state


@pytest.fixture(scope="module")
def dropped(dense_dir, tmp_path_factory):
    """granularity -> directory of a D = 0.5 conversion (E4 top-2 for G = 1, E8 top-2 for G = 2)."""
    outs = {}
    for G, experts in ((1, 4), (2, 8)):
        outs[G] = tmp_path_factory.mktemp(f"drop_g{G}")
        assert convert(dense_dir, outs[G], "--drop-ratio", str(RATIO), experts=experts, granularity=G) == 0
    return outs


def experts_and_dense(dense_dir, out, layer: int):
    """The layer's experts (gate [N, I, H], up [N, I, H], down [N, H, I]) and, per expert, the scaled dense
    shard it started from, computed independently of the converter."""
    moe = read_hf_config(out)[1].moe
    G, I, root_c = moe.granularity, moe.expert_intermediate_size, math.sqrt(moe.expert_scale)
    state, dense = tensors(out), CheckpointReader(dense_dir)
    gate_up_NXH = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    experts = (gate_up_NXH[:, :I], gate_up_NXH[:, I:], state[f"model.layers.{layer}.mlp.experts.down_proj"])
    gate_FH, up_FH, down_HF = (dense.get(f"model.layers.{layer}.mlp.{p}.weight") for p in DENSE_SHIFT)
    H = gate_FH.shape[1]
    shard_of = torch.arange(moe.num_experts) % G  # expert e = r*G + s holds shard s
    expected = (
        gate_FH.reshape(G, I, H)[shard_of],
        (up_FH * root_c).reshape(G, I, H)[shard_of],
        (down_HF * root_c).reshape(H, G, I).permute(1, 0, 2)[shard_of],
    )
    return moe, experts, expected, (gate_FH, up_FH, down_HF)


def kept_neurons(experts, expected) -> torch.Tensor:
    """[N, I] bool: the neuron's gate row, up row and down column all equal the scaled dense ones; asserts
    the three agree, i.e. a neuron is kept or re-drawn as a whole."""
    gate_NIH, up_NIH, down_NHI = experts
    gate_ok = (gate_NIH == expected[0]).all(-1)
    up_ok = (up_NIH == expected[1]).all(-1)
    down_ok = (down_NHI == expected[2]).all(1)
    assert torch.equal(gate_ok, up_ok) and torch.equal(gate_ok, down_ok)
    return gate_ok


@pytest.mark.parametrize("granularity", [1, 2])
def test_each_expert_keeps_one_minus_r_of_its_neurons(dense_dir, dropped, granularity):
    for layer in range(3):
        moe, experts, expected, _ = experts_and_dense(dense_dir, dropped[granularity], layer)
        I = moe.expert_intermediate_size
        assert I == 128 // granularity
        kept_NI = kept_neurons(experts, expected)
        assert kept_NI.sum(1).tolist() == [I - round(RATIO * I)] * moe.num_experts
        # Different experts (copies of one shard included) re-draw different subsets.
        rows = {tuple(row.tolist()) for row in kept_NI}
        assert len(rows) == moe.num_experts


def test_new_neurons_have_the_dense_statistics(dense_dir, dropped):
    moe, experts, expected, dense = experts_and_dense(dense_dir, dropped[1], layer=1)
    dropped_NI = ~kept_neurons(experts, expected)
    root_c = math.sqrt(moe.expert_scale)
    gate_NIH, up_NIH, down_NHI = experts
    # Re-drawn neurons get the sqrt(c) of up and down like the kept ones: undo it to compare with dense.
    new = {
        "gate_proj": gate_NIH[dropped_NI],
        "up_proj": up_NIH[dropped_NI] / root_c,
        "down_proj": down_NHI.transpose(1, 2)[dropped_NI] / root_c,
    }
    for (part, values), dense_matrix in zip(new.items(), dense, strict=True):
        assert values.numel() == moe.num_experts * 64 * 64
        mean, std = dense_matrix.mean().item(), dense_matrix.std().item()
        assert abs(values.mean().item() - mean) < 0.1 * std, part
        assert abs(values.std().item() / std - 1) < 0.05, part


def test_zero_ratio_is_the_plain_conversion_bit_for_bit(dense_dir, tmp_path):
    assert convert(dense_dir, tmp_path / "plain", experts=8, granularity=2) == 0
    assert convert(dense_dir, tmp_path / "zero", "--drop-ratio", "0", experts=8, granularity=2) == 0
    plain, zero = tensors(tmp_path / "plain"), tensors(tmp_path / "zero")
    assert plain.keys() == zero.keys()
    for name, tensor in plain.items():
        assert tensor.dtype == zero[name].dtype and torch.equal(tensor, zero[name]), name
    config = json.loads((tmp_path / "zero" / "config.json").read_text())
    assert config == json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["moe"]["drop_ratio"] == 0.0


def test_seed_decides_the_draws_and_moves_nothing_else(dense_dir, dropped, tmp_path):
    again = tmp_path / "again"
    assert convert(dense_dir, again, "--drop-ratio", str(RATIO)) == 0
    first, second = tensors(dropped[1]), tensors(again)
    assert all(torch.equal(t, second[name]) for name, t in first.items())
    config = json.loads((again / "config.json").read_text())
    assert (config["moe"]["drop_ratio"], config["moe"]["seed"]) == (RATIO, 0)

    assert convert(dense_dir, tmp_path / "seed2", "--drop-ratio", str(RATIO), "--seed", "2") == 0
    other = tensors(tmp_path / "seed2")
    experts = [name for name in first if ".experts." in name]
    assert len(experts) == 6 and not any(torch.equal(first[n], other[n]) for n in experts)

    # The drop generator is its own: the router and every dense tensor are those of the D = 0 conversion.
    assert convert(dense_dir, tmp_path / "plain") == 0
    plain = tensors(tmp_path / "plain")
    assert all(torch.equal(t, first[name]) for name, t in plain.items() if ".experts." not in name)


@pytest.mark.parametrize("ratio", ["-0.1", "1", "1.5", "nan", "inf"])
def test_invalid_ratio_is_refused_before_anything_is_written(dense_dir, tmp_path, capsys, ratio):
    out = tmp_path / "out"
    assert convert(dense_dir, out, "--drop-ratio", ratio) == 2
    assert re.search(rf"--drop-ratio {ratio}.*must be a number in \[0, 1\)", capsys.readouterr().err)
    assert not out.exists()


def test_config_json_round_trip_old_files_and_hand_edits(dropped, tmp_path):
    source = dropped[1] / "config.json"
    config = json.loads(source.read_text())
    edited = tmp_path / "config.json"
    # A config.json written before the field existed loads as plain upcycling.
    del config["moe"]["drop_ratio"]
    edited.write_text(json.dumps(config))
    assert read_hf_config(tmp_path)[1].moe.drop_ratio == 0.0
    for bad in (1.0, -0.5, "0.5"):
        config["moe"]["drop_ratio"] = bad
        edited.write_text(json.dumps(config))
        with pytest.raises(UserError, match=re.escape(f"moe.drop_ratio={bad!r}")):
            read_hf_config(tmp_path)


def test_verify_reports_the_expected_deviation(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    args = ("--drop-ratio", str(RATIO), "--verify", "--verify-tokens", "64")
    assert convert(dense_dir, out, *args) == 0
    printed = capsys.readouterr().out
    assert "expected" in printed and "--drop-ratio 0.5" in printed
    max_diff = float(re.search(r"max \|logit diff\| (\S+),", printed).group(1))
    mean_diff = float(re.search(r"mean \|logit diff\| (\S+),", printed).group(1))
    assert max_diff > mean_diff > 1e-3  # plain upcycling stays near 1e-4 on this model
    assert re.search(r"LM loss \S+ \(dense\) -> \S+ \(upcycled\), difference [+-]\d", printed)
    report = verify_upcycled(dense_dir, out, n_tokens=64)
    assert report.drop_ratio == RATIO and report.moe_loss != report.dense_loss
    assert report.max_abs_logit_error == pytest.approx(max_diff, rel=1e-3)


def test_export_reproduces_a_drop_upcycled_model(dense_dir, tmp_path):
    import transformers

    moe, hf = tmp_path / "moe", tmp_path / "hf"
    assert convert(dense_dir, moe, "--drop-ratio", str(RATIO), "--routing", "topk-softmax") == 0
    assert main(["export", "--checkpoint", str(moe), "--out", str(hf)]) == 0
    ids = torch.randint(0, 211, (1, 32), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = load_model(moe)(ids), model(ids).logits
    assert float((ours - theirs).norm() / ours.norm()) < 1e-4


def test_biases_of_dropped_neurons_are_redrawn_with_them(tmp_path):
    """With mlp_bias a neuron's gate and up bias entries go with its weights: kept or re-drawn together."""
    save_hf_model("llama", tmp_path / "dense", mlp_bias=True)
    assert (
        convert(tmp_path / "dense", tmp_path / "moe", "--drop-ratio", "0.25", experts=8, granularity=2) == 0
    )
    moe, experts, expected, _ = experts_and_dense(tmp_path / "dense", tmp_path / "moe", layer=0)
    kept_NI = kept_neurons(experts, expected)
    assert kept_NI.sum(1).tolist() == [64 - 16] * 8
    I, root_c, shard_of = 64, math.sqrt(moe.expert_scale), torch.arange(8) % 2
    bias_NX = tensors(tmp_path / "moe")["model.layers.0.mlp.experts.gate_up_bias"]
    dense = CheckpointReader(tmp_path / "dense")
    gate_b_GI, up_b_GI = (
        dense.get(f"model.layers.0.mlp.{p}.bias").reshape(2, I) for p in ("gate_proj", "up_proj")
    )
    assert torch.equal(bias_NX[:, :I] == gate_b_GI[shard_of], kept_NI)
    assert torch.equal(bias_NX[:, I:] == (up_b_GI * root_c)[shard_of], kept_NI)
