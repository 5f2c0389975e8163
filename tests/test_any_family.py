"""Any transformers decoder with a gated MLP is upcycled (issue: Gemma, Phi, OLMo, Granite, SmolLM3, ERNIE,
GLM, Seed-OSS): the backbone is transformers' own class of the family (pipeline/backbone.py), so the dense
model we load computes exactly what transformers computes, and the upcycled one computes the dense model
within the routing's tolerance. Each tiny model comes from transformers' own classes with perturbed norms
and biases, and with the family's distinctive features switched on (soft-capping, sandwich norms and
local/global windows, fused projections and partial rotary, multipliers, NoPE layers)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hf_models import rel, save_hf_model
from launching import free_port

from pipeline import load_model
from pipeline.cli import main
from pipeline.config import EXPORT_FAMILIES, read_hf_config
from pipeline.moe import activation
from pipeline.verify import whole_group_mask

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # ids inside the tiny vocabulary
WINDOW = 16  # shorter than the 40 tokens compared
FAMILIES = {
    # model_type: config overrides that switch the family's own features on
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 24},
    "gemma3_text": {"head_dim": 16, "sliding_window": WINDOW,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {},
    "olmo3": {"sliding_window": WINDOW, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.1,
                "logits_scaling": 8.0},
    "smollm3": {"no_rope_layer_interval": 2},
    "ernie4_5": {"use_bias": True},
    "glm4": {"partial_rotary_factor": 0.5},
    "seed_oss": {"attention_bias": True},
    # non-gated MLPs, down(act(up(x))): the paper's Nemotron (squared ReLU, LayerNorm1P, partial rotary),
    # Arcee (squared ReLU), Jais2 (squared ReLU with biases), Starcoder2 (gelu_tanh with biases), Phi-2
    # (gelu_new with biases, attention and MLP in parallel)
    "nemotron": {"partial_rotary_factor": 0.5},
    "arcee": {},
    "jais2": {},
    "starcoder2": {"sliding_window": WINDOW},
    "phi": {"partial_rotary_factor": 0.5},
    # the families export writes as a stock MoE class (their own tests: test_families.py, test_rope.py)
    "llama": {"attention_bias": True},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
}  # fmt: skip
IDS = torch.randint(3, 211, (2, 40), generator=torch.Generator().manual_seed(1))


def dense(family: str, path, **changes):
    """(directory, transformers model) of the family's tiny dense model, 4 layers (FAMILIES' overrides, and
    `changes` to them)."""
    model = save_hf_model(family, path, num_hidden_layers=4, **SPECIAL, **{**FAMILIES[family], **changes})
    return path, model


def convert(dense_dir, out, *args: str) -> None:
    assert main(["convert", "--dense", str(dense_dir), "--out", str(out), *args]) == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_logits_are_transformers(tmp_path, family):
    path, model = dense(family, tmp_path)
    with torch.no_grad():
        error = rel(load_model(path)(IDS), model(IDS).logits)
    print(f"\n{family}: dense {error:.1e}")
    assert error <= 1e-6
    assert read_hf_config(path)[1].exportable_family == (family in EXPORT_FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_upcycled_logits_match_dense(tmp_path, family, capsys):
    path, model = dense(family, tmp_path / "dense")
    with torch.no_grad():
        expected = model(IDS).logits
    convert(path, tmp_path / "e8t2", "--experts", "8", "--top-k", "2", "--routing", "topk-softmax")
    moe = load_model(tmp_path / "e8t2")
    with torch.no_grad():
        e8t2 = rel(moe(IDS), expected)
    blocks = moe.moe_blocks()
    act = read_hf_config(path)[1].hidden_act  # the dense MLP's: gelu_pytorch_tanh for Gemma
    assert act == getattr(model.config, "hidden_activation", None) or model.config.hidden_act
    assert len(blocks) == 4 and all(
        type(block.experts.act_fn) is type(activation(act)) for _, block in blocks
    )
    for _, block in blocks:
        assert whole_group_mask(block.last_router_logits_TN.topk(2, dim=-1).indices, 1).all()
    args = ["--experts", "16", "--top-k", "4", "--granularity", "2", "--moe-layers", "every:2"]
    convert(path, tmp_path / "e16t4g2", *args)
    moe = load_model(tmp_path / "e16t4g2")
    with torch.no_grad():
        e16 = rel(moe(IDS), expected)
    assert [i for i, _ in moe.moe_blocks()] == [0, 2]
    with capsys.disabled():
        print(f"\n{family}: E8T2 topk-softmax {e8t2:.1e}, E16T4G2 softmax-topk every:2 {e16:.1e}")
    assert e8t2 <= 1e-5 and e16 <= 2e-3


def test_the_fused_projection_is_split_gate_rows_first(tmp_path):
    """Phi-3's gate_up_proj [2F, H]: gate rows, then up rows; expert 0 of E8T2 G1 is the whole MLP."""
    path, model = dense("phi3", tmp_path / "dense")
    convert(path, tmp_path / "moe", "--experts", "4", "--top-k", "1", "--no-weight-scaling")
    experts = load_model(tmp_path / "moe").model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], model.model.layers[1].mlp.gate_up_proj.weight)


NON_GATED = ("nemotron", "arcee", "jais2", "starcoder2", "phi")  # not trained: AutoEP's experts are gated
GATED = [family for family in FAMILIES if family not in NON_GATED]


def test_squared_relu_experts_carry_the_papers_cube_root_scaling(tmp_path):
    """Nemotron, down(relu(up x)^2): relu^2 is homogeneous of degree 2, so up and down each x c^(1/3) give
    exactly c (docs/design.md §2); softmax-topk E8 top-2: c = N/K = 4."""
    path, model = dense("nemotron", tmp_path / "dense")
    convert(path, tmp_path / "moe", "--experts", "8", "--top-k", "2", "--verify", "--drop-ratio", "0")
    experts = load_model(tmp_path / "moe").model.layers[0].mlp.experts
    mlp, root = model.model.layers[0].mlp, 4 ** (1 / 3)
    torch.testing.assert_close(experts.up_proj[5], mlp.up_proj.weight * root)
    torch.testing.assert_close(experts.down_proj[5], mlp.down_proj.weight * root)


@pytest.mark.parametrize(
    "family,problem",
    [
        ("gpt_neox", "keeps its decoder layers at `gpt_neox.layers`"),  # the next layout to support
        ("apertus", "ApertusMLP does not compute down(act(up(x))) with act = 'xielu'"),  # learned activation
    ],
)
def test_a_decoder_of_another_form_is_refused_naming_it(tmp_path, family, problem, capsys):
    save_hf_model(family, tmp_path / "dense", **SPECIAL)
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "out"),
                 "--experts", "8", "--top-k", "2"]) == 2  # fmt: skip
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_type_is_refused(tmp_path, capsys):
    path, _ = dense("olmo2", tmp_path / "dense")
    config = (path / "config.json").read_text().replace('"olmo2"', '"not_a_family"')
    (path / "config.json").write_text(config)
    assert main(["convert", "--dense", str(path), "--out", str(tmp_path / "out"), "--experts", "8",
                 "--top-k", "2"]) == 2  # fmt: skip
    assert "model_type='not_a_family' is not a model type transformers" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_export_refuses_with_a_reason_and_the_model_stays_usable(tmp_path, family, capsys):
    path, _ = dense(family, tmp_path / "dense")
    convert(path, tmp_path / "moe", "--experts", "8", "--top-k", "2")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"model_type='{family}': no stock transformers MoE class computes an upcycled" in err
    assert "pipeline.load_model" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_a_dense_model_of_any_family_exports_to_its_own_class(tmp_path, family, capsys):
    path, model = dense(family, tmp_path / "dense")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    assert f"as {type(model).__name__}" in capsys.readouterr().out


# ---- training: every family at EP 2 through DeepSpeed AutoEP (tests/family_ep_worker.py) ---------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """rank -> family -> {losses, dense_loss, fast_path, local_experts}: one torchrun of 2 ranks for all."""
    out = tmp_path_factory.mktemp("family_ep")
    repo = Path(__file__).resolve().parents[1]
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(repo / "tests" / "family_ep_worker.py"), str(out), *GATED]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "OMP_NUM_THREADS": "1",
        # ERNIE without its use_bias here: MLP biases would make biased experts, which training refuses
        "FAMILY_OVERRIDES": json.dumps({**FAMILIES, "ernie4_5": {}}),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("family", GATED)
def test_every_gated_family_trains_at_ep2_from_the_dense_loss(trained, family):
    """3 AdamW steps on the same micro-batch through AutoEP's layers on the fast path, 4 of the 8 experts on
    each rank: the engine's loss before them is the dense model's (upcycling keeps the function; softmax-topk,
    so within the router's deviation from uniform), and training lowers it."""
    for per_rank in trained:
        r = per_rank[family]
        assert r["fast_path"] == "MoE fast path on 4 of 4 AutoEP layers (moe.fast_path)", r
        assert r["local_experts"] == [4] * 4
        assert all(math.isfinite(loss) for loss in r["losses"])
        assert r["step0_loss"] == pytest.approx(r["dense_loss"], rel=1e-4)
        assert r["losses"][2] < r["losses"][0]


# ---- export: a stock MoE class of the family where one computes it -------------------------------------

FAMILY_EXPORTS = {
    # id: (family, routing, class): FlexOlmo has OLMo 2's attention and post-norms and OlmoE's router
    # (softmax over all, top-K, `norm_topk_prob`); Ernie4_5_Moe has ERNIE 4.5's attention and renormalises
    "olmo2-topk-softmax": ("olmo2", "topk-softmax", "FlexOlmoForCausalLM"),
    "olmo2-softmax-topk": ("olmo2", "softmax-topk", "FlexOlmoForCausalLM"),
    "ernie4_5-topk-softmax": ("ernie4_5", "topk-softmax", "Ernie4_5_MoeForCausalLM"),
}
WITHOUT_MLP_BIAS = {"ernie4_5": {"use_bias": False}}  # its MoE class's experts have no biases


@pytest.mark.parametrize("case", list(FAMILY_EXPORTS))
def test_a_family_with_a_stock_moe_class_exports_there(tmp_path, case, capsys):
    """The upcycled model exports to the family's MoE class, files key for key what transformers saves."""
    from hf_models import perturb
    from safetensors.torch import load_file

    from pipeline.export import load_stock

    family, routing, arch = FAMILY_EXPORTS[case]
    path, _ = dense(family, tmp_path / "dense", **WITHOUT_MLP_BIAS.get(family, {}))
    convert(path, tmp_path / "moe", "--experts", "8", "--top-k", "2", "--routing", routing)
    perturb(tmp_path / "moe")  # as after training: distinct experts, a spread router
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(out), "--verify"]) == 0
    assert f"as {arch}" in capsys.readouterr().out
    model = load_stock(out)  # nothing missing, unexpected or mismatched
    with torch.no_grad():
        error = rel(model(IDS).logits, load_model(tmp_path / "moe")(IDS))
    print(f"\n{case} -> {arch}: relative logit error {error:.1e}")
    assert error <= 1e-4
    model.save_pretrained(tmp_path / "resaved")
    theirs, ours = load_file(tmp_path / "resaved" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[n], ours[n]) for n in theirs)


@pytest.mark.parametrize(
    "family,args,problem",
    [
        ("olmo2", ["--moe-layers", "0,2"], "FlexOlmoForCausalLM, the stock MoE class of olmo2, cannot "
         "compute this model: MoE on some layers only"),
        ("ernie4_5", ["--routing", "softmax-topk"], "Ernie4_5_MoeForCausalLM, the stock MoE class of "
         "ernie4_5, cannot compute this model: softmax-topk routing"),
    ],
)  # fmt: skip
def test_a_family_moe_class_refuses_what_it_cannot_represent(tmp_path, capsys, family, args, problem):
    path, _ = dense(family, tmp_path / "dense", **WITHOUT_MLP_BIAS.get(family, {}))
    convert(path, tmp_path / "moe", "--experts", "8", "--top-k", "2", *args)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 2
    assert problem in capsys.readouterr().err and not (tmp_path / "hf").exists()
