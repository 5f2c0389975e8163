"""Run by tests/test_any_family.py under torchrun (2 ranks, gloo): every family's upcycled tiny model trains
at EP 2 through DeepSpeed AutoEP with the fast path, ZeRO-2, 3 AdamW steps on the same batch.
Expert biases are not trained (DeepSpeed's experts have none: preflight refuses them), so the families run
here without MLP biases.

For each family: rank 0 saves the tiny dense model (transformers' own class) and upcycles it E8 top-2; both
ranks load it (`pipeline.load_model`), `deepspeed.initialize` swaps the MoE blocks for AutoEP layers (4
experts per rank), `install_fast_path` switches them, and the losses of 3 steps are recorded with the dense
model's loss on the same tokens. Results: OUT/rank{r}.json.

    family_ep_worker.py OUT FAMILY [FAMILY ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from hf_models import save_hf_model  # noqa: E402

from pipeline import load_model  # noqa: E402
from pipeline.cli import main as upcycle  # noqa: E402
from pipeline.config import read_hf_config  # noqa: E402
from pipeline.ds_adapter import autoep_section, install_fast_path  # noqa: E402

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def prepare(family: str, root: Path, overrides: dict) -> Path:
    dense, moe = root / family / "dense", root / family / "moe"
    if dist.get_rank() == 0:
        save_hf_model(family, dense, num_hidden_layers=4, **SPECIAL, **overrides)
        argv = ["convert", "--dense", str(dense), "--out", str(moe), "--experts", "8", "--top-k", "2"]
        assert upcycle(argv) == 0
    dist.barrier()
    return dense


def train(family: str, dense: Path) -> dict:
    moe_dir = dense.parent / "moe"
    config = read_hf_config(moe_dir)[1]
    section = autoep_section(2, config.moe.routing, ep_size=2, cuda=False, hidden_act=config.hidden_act)
    ds_config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "zero_optimization": {"stage": 2},
        "expert_parallel": section,
    }
    engine, *_ = deepspeed.initialize(model=load_model(moe_dir).train(), config=ds_config)
    fast = install_fast_path(engine)[0]
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own micro-batch
    tokens = torch.randint(3, 211, (2, 33), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        dense_loss = F.cross_entropy(load_model(dense)(inputs).flatten(0, 1), targets.flatten()).item()
    engine.eval()  # dropout off (Seed-OSS has some): the engine's forward, compared with the dense model's
    with torch.no_grad():
        step0_loss = F.cross_entropy(engine(inputs).float().flatten(0, 1), targets.flatten()).item()
    engine.train()
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(engine(inputs).float().flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    local = [m.num_local_experts for m in engine.module.modules() if hasattr(m, "num_local_experts")]
    engine.destroy()
    return {"losses": losses, "step0_loss": step0_loss, "dense_loss": dense_loss, "fast_path": fast,
            "local_experts": local}  # fmt: skip


def main(out: str, *families: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    overrides = json.loads(os.environ.get("FAMILY_OVERRIDES", "{}"))
    results = {}
    for family in families:
        torch.manual_seed(0)
        results[family] = train(family, prepare(family, Path(out), overrides.get(family, {})))
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
