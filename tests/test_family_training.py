"""A family beyond Llama/Qwen through upcycle's own launcher on 2 CPU ranks with DeepSpeed AutoEP:
transformers' own Gemma 3 (gated MLP with gelu_pytorch_tanh, AutoEP's geglu_tanh experts; sliding and full
attention layers) upcycled E8 top-2, trained at EP 2 with the fast path on every AutoEP layer, starting
from the dense model's loss, checkpointed and evaluated; an activation AutoEP does not compute (exact gelu)
is refused before any process starts. (Every family, Phi-3's fused projections included, trains at EP 2 in
tests/test_any_family.py through deepspeed.initialize; this file adds the launcher, preflight, checkpoint
and eval.)

One upcycled run (3 steps, EP 2) and one dense run (1 step, EP 1) per family, trained once for the module
(`family_run`, parametrized over FAMILIES).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model
from launching import TINY_CONFIG, launch, losses

from pipeline.cli import main
from pipeline.config import read_hf_config
from pipeline.errors import UserError
from pipeline.hf_io import copy_tokenizer_files

STEPS = 3
TINY = dict(
    vocab_size=384,  # the workspace tokenizer's
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,  # >= tiny_cpu.yaml's train.seq_len (64)
    bos_token_id=0,  # the workspace tokenizer's one special token, <|endoftext|> (Phi-3's default: 32000)
    eos_token_id=0,
    pad_token_id=0,
)
FAMILIES = {
    # id: (model_type, overrides, (hidden_act, fused gate_up_proj), AutoEP's expert_activation)
    "gemma3": (
        "gemma3_text", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
        ("gelu_pytorch_tanh", False), "geglu_tanh",
    ),
}  # fmt: skip
CONVERT = ("--experts", "8", "--top-k", "2")
RUN = ("--output.eval_interval", "0", "--output.checkpoint_interval", "0")  # one save, at the end
REPORT: dict = {}


def save_family_model(model_type: str, path: Path, tokenizer: Path, **overrides) -> None:
    """A tiny random transformers model of `model_type` (random norm weights: hf_models.save_hf_model) saved
    to `path` with the workspace's tokenizer."""
    save_hf_model(model_type, path, **{**TINY, **overrides})
    copy_tokenizer_files(tokenizer, path)


def train_log(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def timed_launch(ws: Path, out: str, *overrides: str) -> None:
    started = time.monotonic()
    launch(ws, out, *overrides)
    REPORT[f"{out}_run_s"] = round(time.monotonic() - started, 1)


@dataclass(frozen=True)
class FamilyRun:
    family: str
    workspace: Path
    dense: Path  # the tiny dense model
    moe: Path  # its E8 top-2 upcycled version
    run: Path  # output.dir of the upcycled model's STEPS steps at EP 2
    dense_run: Path  # output.dir of the dense model's 1 step at EP 1


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, train_workspace) -> FamilyRun:
    """The family's dense model, upcycled and trained for STEPS steps at EP 2 (tiny_cpu.yaml's default), and
    the dense model trained for 1 step at EP 1 on the same global batch; read-only."""
    family, ws = request.param, train_workspace
    model_type, overrides, form, _ = FAMILIES[family]
    dense, moe = ws / f"{family}_dense", ws / f"{family}_moe"
    save_family_model(model_type, dense, ws / "tok", **overrides)
    assert main(["convert", "--dense", str(dense), "--out", str(moe), *CONVERT]) == 0
    config = json.loads((moe / "config.json").read_text())
    assert config["model_type"] == model_type and config["moe"]["num_experts"] == 8
    parsed = read_hf_config(moe)[1]
    assert (parsed.hidden_act, parsed.mlp_fused) == form
    # --model.path after launching.run_paths': the later override wins.
    timed_launch(ws, family, "--model.path", str(moe), "--train.steps", str(STEPS), *RUN)
    timed_launch(ws, f"{family}_dense_step1", "--model.path", str(dense), "--train.steps", "1",
                 "--parallel.ep_size", "1", *RUN)  # fmt: skip
    yield FamilyRun(family, ws, dense, moe, ws / family, ws / f"{family}_dense_step1")
    print(f"\n{family} training:", json.dumps({k: v for k, v in REPORT.items() if k.startswith(family)}))


def test_upcycled_training_starts_from_the_dense_loss(family_run):
    """The fast path takes both AutoEP layers (the experts' activation mapped to AutoEP's gated form),
    every loss is finite, and step 1's language-model loss is the dense model's on the same global batch
    (upcycling preserves the function; softmax-topk routing is within ~1e-4 of it)."""
    f = family_run
    log = (f.workspace / f"{f.family}.log").read_text()
    assert "MoE fast path on 2 of 2 AutoEP layers" in log
    rows = train_log(f.run)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(math.isfinite(row[k]) for row in rows.values() for k in ("loss", "lm_loss")), rows
    dense = train_log(f.dense_run)
    assert sorted(dense) == [1]
    dense_lm, moe_lm = dense[1]["lm_loss"], rows[1]["lm_loss"]
    assert losses(f.workspace, f"{f.family}_dense_step1")[1] == dense_lm  # no aux loss for a dense model
    REPORT[f"{f.family}_step1_lm_loss"] = {"dense": dense_lm, "upcycled": moe_lm}
    REPORT[f"{f.family}_step1_rel_diff"] = abs(moe_lm - dense_lm) / dense_lm
    assert moe_lm == pytest.approx(dense_lm, rel=1e-4)


def test_the_trained_checkpoint_evaluates(family_run, capsys):
    """The run saved its last step, with the engine's AutoEP config applying the family's activation (the
    tiny models' losses hardly depend on it: step 1's loss cannot tell silu from tanh-gelu), and `upcycle
    eval` reads that training checkpoint: a finite perplexity."""
    f = family_run
    saved = f.run / "checkpoints" / f"step_{STEPS:08d}"
    assert (f.run / "checkpoints" / "latest").read_text().strip() == saved.name
    states = torch.load(saved / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    autoep = states["ds_config"]["expert_parallel"]
    assert autoep["expert_activation"] == FAMILIES[f.family][3], autoep
    assert autoep["autoep_size"] == 2
    report = f.workspace / f"{f.family}_eval.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(f.run), "--data", str(f.workspace / "data"), "--batches", "2",
                 "--json", str(report)]) == 0  # fmt: skip
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(report.read_text())
    REPORT[f"{f.family}_eval_perplexity"] = result["perplexity"]
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1


def upcycled_and_refused(ws: Path, tmp_path: Path, model_type: str, message: str, **overrides):
    """The workspace-tokenizer model of `model_type` upcycles; the trainer's preflight then refuses it with
    `message` before any process group starts and writes nothing. Its parsed config, for more checks."""
    from pipeline.preflight import prepare

    dense, moe, out = tmp_path / "dense", tmp_path / "moe", tmp_path / "run"
    save_family_model(model_type, dense, ws / "tok", **overrides)
    assert main(["convert", "--dense", str(dense), "--out", str(moe), *CONVERT]) == 0
    argv = ["--config", TINY_CONFIG, "--model.path", str(moe), "--data.path", str(ws / "data"),
            "--output.dir", str(out)]  # fmt: skip
    with pytest.raises(UserError, match=message):
        prepare(argv, world_size=2)
    assert not out.exists()
    return read_hf_config(moe)[1]


def test_an_activation_autoep_does_not_compute_is_refused(train_workspace, tmp_path):
    """Exact gelu upcycles (our experts apply the dense MLP's own activation), but AutoEP's gated experts
    compute only silu and tanh-gelu: refused naming hidden_act='gelu'."""
    windows = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}
    config = upcycled_and_refused(
        train_workspace, tmp_path, "gemma3_text", r"hidden_act='gelu'", hidden_activation="gelu", **windows
    )
    assert config.hidden_act == "gelu"


def test_non_gated_experts_are_refused_for_training(train_workspace, tmp_path):
    """Nemotron's squared-ReLU MLP upcycles (and loads and evaluates), but DeepSpeed AutoEP's experts are
    gated only."""
    message = r"non-gated .*hidden_act='relu2'.*gated only"
    assert upcycled_and_refused(train_workspace, tmp_path, "nemotron", message).mlp_gated is False
