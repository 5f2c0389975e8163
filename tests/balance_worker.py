"""Run by tests/test_balance.py under torchrun: a real training run (pipeline.train's Trainer, as
`pipeline/train.py` runs it), then every rank writes what it holds to OUT/rank{r}.pt:

- `bias_LN`: its own copy of every MoE layer's expert bias (moe.balance bias keeps them identical);
- `fast`, `stock`, `unbiased`: the engine's logits on fixed tokens with the fast forward, with DeepSpeed's
  stock AutoEP forward, and with the fast forward and the bias set to zero (the bias must matter).

Then, in the same processes (one launch instead of two), a second run resumes a copy of the first run's
checkpoint TAG in `<output.dir>_resumed` and trains to the same last step: a new Trainer and engine, the
bias restored only from the checkpoint's files.

    balance_worker.py OUT TAG --config FILE --section.key value ...
"""

from __future__ import annotations

import os
import shutil
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


def resume_a_copy(run_dir: str, tag: str, argv: list[str], device) -> None:
    """Train `<run_dir>_resumed`, holding only a copy of `run_dir`'s checkpoint `tag`, to the last step."""
    resumed = run_dir + "_resumed"
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(run_dir, "checkpoints", tag), os.path.join(resumed, "checkpoints", tag))
        with open(os.path.join(resumed, "checkpoints", "latest"), "w") as fh:
            fh.write(tag)
    dist.barrier()
    cfg, model_config = prepare([*argv, "--output.dir", resumed])
    trainer = Trainer(cfg, model_config, device)
    trainer.train()
    trainer.close()


def what_the_rank_holds(trainer, vocab_size: int) -> dict:
    """This rank's bias and the engine's logits on fixed tokens: fast forward, unbiased, stock forward."""
    layers, engine = trainer.capture.layers, trainer.engine
    result = {"bias_LN": torch.stack([layer.expert_bias.clone() for layer in layers])}
    ids_BT = torch.randint(0, vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
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
    return result


def main(out: str, tag: str, argv: list[str]) -> None:
    cfg, model_config = prepare(argv)
    os.makedirs(cfg.output.dir, exist_ok=True)
    device = ds_adapter.init_distributed(cfg)
    trainer = Trainer(cfg, model_config, device)
    trainer.train()
    result = what_the_rank_holds(trainer, model_config.vocab_size)
    torch.save(result, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    trainer.close()  # as pipeline/train.py ends a run: the engine released before the process groups go
    trainer = None
    if dist.get_rank() == 0:
        print("---- resuming a copy ----", flush=True)
    resume_a_copy(cfg.output.dir, tag, argv, device)
    left = ds_adapter.shutdown_distributed()  # as pipeline/train.py's main, which reports, not fails
    if left:
        print(f"balance_worker: {len(left)} communication threads outlived shutdown: {left}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
