"""The layering rules of docs/design.md §7, checked in fresh interpreters (nothing imported beforehand).

- data_prep is the lowest layer: none of its modules imports `pipeline`.
- The model code (model, moe, upcycle, convert, config, hf_io) does not import DeepSpeed, and a model
  runs forward without any process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line of stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_prep_imports_nothing_from_pipeline():
    result = _run(
        """
        import importlib, json, pkgutil, sys
        import data_prep

        named = ["data_prep.reader", "data_prep.tokenize_stage", "data_prep.cli", "data_prep.manifest",
                 "data_prep.stats", "data_prep.corpus"]
        every = sorted(f"data_prep.{m.name}" for m in pkgutil.iter_modules(data_prep.__path__))
        for name in named + every:
            importlib.import_module(name)
        print(json.dumps({"imported": every,
                          "pipeline": sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")}))
        """
    )
    assert {"data_prep.reader", "data_prep.manifest", "data_prep.cli"} <= set(result["imported"])
    assert result["pipeline"] == [], f"data_prep imported {result['pipeline']} (docs/design.md §7)"


def test_model_code_needs_no_deepspeed_and_no_process_group():
    result = _run(
        """
        import dataclasses, json, sys
        import torch

        import pipeline.backbone, pipeline.config, pipeline.convert, pipeline.hf_io, pipeline.moe
        import pipeline.upcycle
        from pipeline.backbone import build, expected_state
        from pipeline.config import ModelConfig
        from pipeline.upcycle import make_moe_config

        dense = ModelConfig.from_hf_dict(dict(
            model_type="llama", vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        config = dataclasses.replace(dense, moe=make_moe_config(dense, num_experts=4, top_k=2, granularity=2))
        torch.manual_seed(0)
        state = {name: torch.randn(shape) * 0.1 for name, shape in expected_state(config).items()}
        model = build(config, type("Reader", (), {"get": staticmethod(state.__getitem__)}), torch.float32,
                      "cpu", list(state))
        with torch.no_grad():
            logits = model(torch.randint(0, 211, (2, 9)))
        print(json.dumps({
            "deepspeed": sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed"),
            "moe_layers": len(model.moe_blocks()),
            "shape": list(logits.shape),
            "finite": bool(torch.isfinite(logits).all()),
            "process_group": torch.distributed.is_available() and torch.distributed.is_initialized(),
        }))
        """
    )
    assert result["deepspeed"] == [], f"the model code imported {result['deepspeed']} (docs/design.md §7)"
    assert result["moe_layers"] == 2
    assert result["shape"] == [2, 9, 211] and result["finite"]
    assert result["process_group"] is False
