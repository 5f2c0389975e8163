"""Run by tests/test_balance.py under torchrun: a real training run (pipeline.train's Trainer, as
`pipeline/train.py` runs it), then every rank writes what it holds to OUT/rank{r}.pt:

- `bias_LN`: its own copy of every MoE layer's expert bias (moe.balance bias keeps them identical);
- `fast`, `stock`, `unbiased`: the engine's logits on fixed tokens with the fast forward, with DeepSpeed's
  stock AutoEP forward, and with the fast forward and the bias set to zero (the bias must matter).

    balance_worker.py OUT --config FILE --section.key value ...
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from deepspeed.module_inject import auto_ep_layer
from deepspeed.moe import ep_experts

from pipeline import ds_adapter
from pipeline.preflight import prepare
from pipeline.train import Trainer


def to_stock_forward(engine) -> None:
    """Undo `install_fast_path`: the layers' and experts' classes back to DeepSpeed's own."""
    for module in engine.module.modules():
        if isinstance(module, auto_ep_layer.AutoEPMoELayer):
            module.__class__ = auto_ep_layer.AutoEPMoELayer
            module.experts.__class__ = ep_experts.GroupedExperts


def main(out: str, argv: list[str]) -> None:
    cfg, model_config = prepare(argv)
    os.makedirs(cfg.output.dir, exist_ok=True)
    trainer = Trainer(cfg, model_config, ds_adapter.init_distributed(cfg))
    trainer.train()
    layers = trainer.capture.layers
    result = {"bias_LN": torch.stack([layer.expert_bias.clone() for layer in layers])}
    ids_BT = torch.randint(0, model_config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    engine = trainer.engine
    engine.eval()
    with torch.no_grad():
        result["fast"] = engine(ids_BT)
        saved = [layer.expert_bias.clone() for layer in layers]
        for layer in layers:
            layer.expert_bias.zero_()
        result["unbiased"] = engine(ids_BT)
        for layer, bias_N in zip(layers, saved, strict=True):
            layer.expert_bias.copy_(bias_N)
        to_stock_forward(engine)
        result["stock"] = engine(ids_BT)
    result["ids"] = ids_BT
    torch.save(result, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
