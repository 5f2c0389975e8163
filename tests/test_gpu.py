"""GPU paths, run where CUDA exists (skipped on CPU-only machines such as CI): the grouped-GEMM MoE block,
the fast AutoEP forward on torch._grouped_mm against DeepSpeed's stock (padded) one, and bf16 training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, launch, losses

from pipeline.moe import MoEBlock

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.slow,
]


def needs_grouped_mm():
    if not (hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("torch._grouped_mm needs sm90+")


@pytest.mark.parametrize("n,i", [(8, 256), (64, 64)])
def test_grouped_gemm_experts_match_the_expert_loop(n, i):
    """Experts._forward_grouped (torch._grouped_mm, unpadded groups) against the per-expert loop."""
    needs_grouped_mm()
    torch.manual_seed(0)
    experts = MoEBlock(256, n, 2, i).experts.to("cuda", torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    counts = torch.randint(0, 300, (n,), device="cuda")
    counts[1] = 0  # an empty expert
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for forward in (experts._forward_grouped, experts._forward_loop):
        experts.zero_grad(set_to_none=True)
        y = forward(x, counts)
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append(experts.gate_up_proj.grad.float())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], atol=5e-2, rtol=5e-2)


def test_fast_autoep_forward_on_grouped_mm_matches_deepspeed(tmp_path):
    needs_grouped_mm()
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "fast_ep_worker.py"),
        str(tmp_path),
        "cuda",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "rank0.json").read_text())
    assert set(results) == {"E8K2_ep1"}
    r = results["E8K2_ep1"]
    assert r["switched"] == 1 and r["grouped_mm"] and r["experts_class"] == "FastGroupedExperts"
    # bf16: stock and fast differ only by summation order inside the GEMMs (padding rows are zeros).
    assert r["out"] <= 2e-2 * max(1.0, r["out_scale"]), r
    assert r["x_grad"] <= 5e-2 and max(r["param_grads"].values()) <= 5e-2, r


def test_bf16_training_on_gpu_uses_the_fast_path(train_workspace):
    common = (
        "--train.steps",
        "3",
        "--train.precision",
        "bf16",
        "--output.checkpoint_interval",
        "0",
        "--output.eval_interval",
        "0",
    )
    launch(train_workspace, "gpu", *common, launcher="upcycle_1gpu")
    steps = losses(train_workspace, "gpu")
    assert sorted(steps) == [1, 2, 3] and all(v == v and v < 20 for v in steps.values())
    assert "MoE fast path on 2 of 2 AutoEP layers" in (train_workspace / "gpu.log").read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
