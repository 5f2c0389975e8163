"""`upcycle export` and `upcycle eval`: stock transformers must reproduce our logits, for both routings, a
fine-grained setting, partial MoE layers, Qwen2 biases, llama3 rope, tied embeddings, dense models and
DeepSpeed training checkpoints (MoE: ZeRO-2 EP=2 and ZeRO-3 EP=1; dense: ZeRO-2 and ZeRO-3); settings no
stock class computes exactly are refused."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import LLAMA3_ROPE_TIED, hf_logits, perturb, rel, save_hf_model
from launching import launch

from pipeline import load_model
from pipeline.cli import main

TOLERANCE = 1e-4  # relative L2 error of the logits, fp32


CASES = {
    # id: (family, dense overrides, experts, top_k, granularity, routing, extra convert args, class)
    "topk-softmax": ("llama", {}, 8, 2, 1, "topk-softmax", [], "MixtralForCausalLM"),
    "softmax-topk": ("llama", {}, 8, 2, 1, "softmax-topk", [], "Qwen2MoeForCausalLM"),
    "fine-grained-E16G4T4": ("llama", {}, 16, 4, 4, "softmax-topk", [], "Qwen2MoeForCausalLM"),
    "partial-layers-topk-softmax-G2": (
        "llama", {}, 8, 2, 2, "topk-softmax", ["--moe-layers", "0,2"], "Qwen2MoeForCausalLM",
    ),
    "qwen2-biases": ("qwen2", {}, 8, 2, 1, "topk-softmax", [], "Qwen2MoeForCausalLM"),
    "llama3-rope-tied": (
        "llama",
        LLAMA3_ROPE_TIED,
        8, 2, 1, "softmax-topk", ["--moe-layers", "1"], "Qwen2MoeForCausalLM",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_export_reproduces_logits(tmp_path, case, capsys):
    family, overrides, n, k, g, routing, extra, expected_class = CASES[case]
    save_hf_model(family, tmp_path / "dense", **overrides)
    moe_dir, out = tmp_path / "moe", tmp_path / "hf"
    args = ["--experts", str(n), "--top-k", str(k), "--granularity", str(g), "--routing", routing, *extra]
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(moe_dir), *args]) == 0
    perturb(moe_dir)
    # A small shard size forces several shards and an index.
    shard = ["--max-shard-size", "0.0003"]
    assert main(["export", "--checkpoint", str(moe_dir), "--out", str(out), *shard]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [expected_class]

    ids = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(1))
    ours_model = load_model(moe_dir)
    with torch.no_grad():
        ours = ours_model(ids)
    theirs, hf_model = hf_logits(out, ids)
    assert type(hf_model).__name__ == expected_class
    error = rel(theirs, ours)
    print(f"export round trip {case}: relative logit error {error:.2e}")
    assert error < TOLERANCE, error

    # Not vacuous: the other routing gives clearly different logits, so the class choice is what matched.
    for _, block in ours_model.moe_blocks():
        block.routing = "softmax-topk" if routing == "topk-softmax" else "topk-softmax"
    with torch.no_grad():
        assert rel(ours_model(ids), ours) > 1e-3
    if family == "llama" and expected_class == "Qwen2MoeForCausalLM":
        assert config["qkv_bias"] is False and config["shared_expert_intermediate_size"] == 128 // g
    if "rope_parameters" in overrides:
        assert config["rope_parameters"]["rope_type"] == "llama3"
        # Qwen2MoE: the tied embedding written out as the output matrix (llama.cpp's loader needs one)
        assert config["tie_word_embeddings"] is False
        assert torch.equal(hf_model.lm_head.weight, hf_model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attention_bias": True}, "o_proj"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_export_refuses_what_no_stock_class_computes(tmp_path, overrides, message, capsys):
    save_hf_model("llama", tmp_path / "dense", **overrides)
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"),
                 "--experts", "4", "--top-k", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert message in err and "no stock transformers class" in err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    # The dense model itself has a stock class (Llama has both biases): the export is a re-save.
    assert main(["export", "--checkpoint", str(tmp_path / "dense"), "--out", str(tmp_path / "hf2"),
                 "--verify"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "relative logit error" in capsys.readouterr().out


@pytest.mark.slow
def test_export_and_eval_of_training_checkpoints(train_workspace):
    workspace = train_workspace
    """ZeRO-2 EP=2 (per-expert files) and ZeRO-3 EP=1 (through DeepSpeed's universal checkpoint) exports
    load in stock transformers, agree with each other, and score the run's own validation loss."""
    from pipeline.evaluate import evaluate
    from pipeline.export import compare_logits, open_source

    common = ("--train.steps", "3", "--train.lr", "3e-3", "--output.checkpoint_interval", "0",
              "--output.eval_interval", "0")  # fmt: skip
    launch(workspace, "exp_z2", "--parallel.ep_size", "2", "--parallel.zero_stage", "2", *common)
    launch(workspace, "exp_z3", "--parallel.ep_size", "1", "--parallel.zero_stage", "3", *common,
           launcher="torchrun")  # fmt: skip
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(2))
    logits = {}
    for run in ("exp_z2", "exp_z3"):
        out = workspace / f"{run}_hf"
        # output.dir is accepted: the checkpoint `latest` names is exported.
        assert main(["export", "--checkpoint", str(workspace / run), "--out", str(out)]) == 0
        assert (out / "tokenizer.json").read_bytes() == (workspace / "moe" / "tokenizer.json").read_bytes()
        source = open_source(workspace / run)
        error = compare_logits(source, out)
        print(f"export round trip {run}: relative logit error {error:.2e}")
        assert error < TOLERANCE
        logits[run], _ = hf_logits(out, ids)

        # eval of the export over the trainer's validation windows = the trainer's own final val loss.
        val_loss = json.loads((workspace / run / "val_loss.jsonl").read_text().splitlines()[-1])["val_loss"]
        result = evaluate(str(out), [str(workspace / "data")], seq_len=64, batch_size=8, batches=2, seed=0)
        assert result["loss"] == pytest.approx(val_loss, rel=1e-5)
        assert result["tokens"] == 2 * 8 * 64
        # window for window, on data.eval_seed's windows (0 by default) although the run's train.seed is 1234
        windows = json.loads((workspace / run / "val_window_losses.json").read_text())
        assert windows["eval_seed"] == 0 and windows["losses"] == pytest.approx(
            result["window_losses"], rel=1e-5
        )
        assert sorted(result["layers"]) == ["0", "1"]
        for stats in result["layers"].values():
            assert sum(stats["share"]) == pytest.approx(1.0, abs=1e-4) and len(stats["share"]) == 8
        # The same numbers straight from the DeepSpeed checkpoint (our model) through the CLI.
        report = str(workspace / f"{run}.json")
        assert main(["eval", "--model", str(workspace / run), "--data", str(workspace / "data"),
                     "--batches", "2", "--seed", "0", "--json", report]) == 0  # fmt: skip
        direct = json.loads((workspace / f"{run}.json").read_text())
        assert direct["loss"] == pytest.approx(result["loss"], rel=1e-5)
        assert direct["layers"]["1"]["share"] == pytest.approx(result["layers"]["1"]["share"], abs=1e-6)

    # Both topologies trained the same math, and training moved the weights away from the upcycled init.
    assert rel(logits["exp_z3"], logits["exp_z2"]) < 1e-4
    with torch.no_grad():
        init = load_model(workspace / "moe")(ids)
    assert rel(logits["exp_z2"], init) > 1e-3


@pytest.mark.slow
def test_export_of_dense_training_checkpoints(train_workspace):
    """A run trained from a dense model (ZeRO-2 and ZeRO-3) exports to the family's own class: stock
    transformers reproduces our logits of the training checkpoint, and the weights are the trained ones."""
    from pipeline.export import compare_logits, open_source

    workspace = train_workspace
    dense = workspace / "dense"
    common = ("--model.path", str(dense), "--parallel.ep_size", "1", "--train.steps", "2", "--train.lr",
              "3e-3", "--output.checkpoint_interval", "0", "--output.eval_interval", "0")  # fmt: skip
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        init = load_model(dense)(ids)
    logits = {}
    for stage in ("2", "3"):
        run, out = workspace / f"dense_z{stage}", workspace / f"dense_z{stage}_hf"
        launch(workspace, run.name, "--parallel.zero_stage", stage, *common)
        assert main(["export", "--checkpoint", str(run), "--out", str(out), "--verify"]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and "moe" not in config
        assert (out / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()
        error = compare_logits(open_source(run), out)
        print(f"dense export round trip ZeRO-{stage}: relative logit error {error:.2e}")
        assert error < TOLERANCE
        logits[stage], hf_model = hf_logits(out, ids)
        assert type(hf_model).__name__ == "LlamaForCausalLM"
        assert rel(logits[stage], init) > 1e-3  # the trained weights, not the initial dense ones
    assert rel(logits["3"], logits["2"]) < 1e-4
