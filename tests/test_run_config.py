"""Run config: YAML + overrides, type checks, validation before any process group, ds_config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.ds_adapter import build_ds_config
from pipeline.errors import UserError
from pipeline.preflight import prepare
from pipeline.run_config import RunConfig, load_run_config, validate, validate_against_model
from pipeline.train import lr_multiplier

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "launch" / "configs").glob("*.yaml"))
MOE_MODEL = ModelConfig.from_hf_dict(
    {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "moe": {
            "num_experts": 8,
            "top_k": 2,
            "granularity": 1,
            "routing": "topk-softmax",
            "layers": [0, 1],
            "expert_intermediate_size": 32,
            "expert_scale": 1.0,
        },
    }
)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_validates_and_builds_a_ds_config(path):
    cfg = load_run_config(str(path), [])
    world = 16 if cfg.parallel.backend == "nccl" else 2
    validate(cfg, world, cuda=cfg.parallel.backend == "nccl")
    validate_against_model(cfg, num_experts=8)
    ds = build_ds_config(cfg, MOE_MODEL, world, cuda=False)
    assert ds["train_batch_size"] == cfg.train.global_batch
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    )
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage
    assert ds["bf16"]["enabled"] == (cfg.train.precision == "bf16")
    assert ds["expert_parallel"]["autoep_size"] == cfg.parallel.ep_size


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ds_config_templates_combine(stage, precision):
    cfg = load_run_config(
        None,
        [
            "--parallel.zero_stage",
            str(stage),
            "--train.precision",
            precision,
            "--train.global_batch",
            "8",
            "--train.micro_batch",
            "2",
        ],
    )
    ds = build_ds_config(cfg, MOE_MODEL, 2, cuda=False)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["gradient_accumulation_steps"] == 2
    # topk-softmax == softmax over all, top-K, renormalised: AutoEP's route_norm must be on.
    assert (
        ds["expert_parallel"]["route_norm"] is True and ds["expert_parallel"]["routed_scaling_factor"] == 1.0
    )


def test_overrides_are_typed():
    cfg = load_run_config(
        str(SHIPPED[-1]),
        ["--train.lr", "1e-4", "--data.path=a", "--train.steps=7", "--data.weights", "[1, 2]"],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7 and cfg.data.path == ["a"]
    assert cfg.data.weights == [1.0, 2.0]
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.stepz", "3"], r"unknown key\(s\) \['train.stepz'\]"),
        (["--train.steps", "many"], "config key train.steps: expected int"),
        (["--nosection", "1"], "overrides look like --section.key value"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_run_config(None, overrides)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["--parallel.ep_size", "3"], 2, "parallel.ep_size=3 does not divide the world size 2"),
        (
            ["--train.global_batch", "6", "--train.micro_batch", "2"],
            2,
            "train.global_batch=6 is not a multiple",
        ),
        (["--parallel.zero_stage", "4"], 2, "parallel.zero_stage=4"),
        (["--train.precision", "fp16"], 2, "train.precision='fp16'"),
        (["--parallel.backend", "nccl"], 2, "parallel.backend=nccl needs CUDA"),
        (["--data.weights", "[1, 2]"], 2, "data.weights has 2 entries for 1 data.path"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_key(overrides, world, message):
    cfg = load_run_config(None, ["--model.path", "m", "--data.path", "d", *overrides])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world, cuda=False)


@pytest.mark.parametrize(
    "ep_size,experts,message",
    [(4, 6, "parallel.ep_size=4 does not divide the model's 6 experts"), (2, None, "model.path is dense")],
)
def test_expert_parallel_size_must_fit_the_model(ep_size, experts, message):
    cfg = load_run_config(None, ["--parallel.ep_size", str(ep_size)])
    with pytest.raises(UserError, match=message):
        validate_against_model(cfg, experts)


def test_prepare_rejects_missing_model_and_data_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="config.json"):
        prepare(["--config", str(SHIPPED[-1]), "--model.path", str(tmp_path / "nope"), "--data.path", "x"])


def test_cosine_schedule_with_warmup():
    cfg = load_run_config(
        None,
        [
            "--train.steps",
            "100",
            "--train.warmup_steps",
            "10",
            "--train.lr",
            "1e-3",
            "--train.min_lr",
            "1e-4",
        ],
    )
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)


def test_hostfile_slots_and_errors(tmp_path):
    from pipeline.launcher import hostfile_slots

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-0 slots=8\n\nnode-1 slots=4  # smaller\n")
    assert hostfile_slots(str(hostfile)) == 12
    hostfile.write_text("node-0 gpus=8\n")
    with pytest.raises(UserError, match="line 1: expected 'hostname slots=N'"):
        hostfile_slots(str(hostfile))
    with pytest.raises(UserError, match="file not found"):
        hostfile_slots(str(tmp_path / "missing"))


def test_upcycle_train_validates_before_launching(tmp_path, capsys):
    from pipeline.cli import main

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=3\n")
    rc = main(["train", "--config", str(SHIPPED[-1]), "--hostfile", str(hostfile), "--dry-run"])
    assert rc == 2
    assert (
        "train.global_batch=8 is not a multiple of train.micro_batch (2) x world size (3)"
        in capsys.readouterr().err
    )


def test_launcher_removes_only_its_ports_leftover_shm_segments():
    from pipeline.ds_adapter import remove_leftover_shm

    uid = os.getuid()  # the literal name shm.cpp writes, not our helper's idea of it
    mine = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_{61011}_{r}") for r in (0, 1)]
    other = Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_{61012}_0")
    for path in (*mine, other):
        path.write_bytes(b"x")
    try:
        remove_leftover_shm(61011)
        assert not any(p.exists() for p in mine) and other.exists()
    finally:
        other.unlink(missing_ok=True)


def test_upcycle_prep_does_not_import_torch():
    """Only the subcommand being run is imported: data prep must not pay ~2 s for torch per call."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pipeline.cli import main\n"
            "try:\n    main(['prep', 'stats', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == "False"
