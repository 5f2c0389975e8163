"""Run by tests/test_fast_ep.py under torchrun: DeepSpeed AutoEP layers, stock forward against the fast one.

Every rank builds the same MoE block, lets `deepspeed.initialize` replace it with an AutoEP layer at the
given EP size, then runs forward and backward on its own tokens twice: with DeepSpeed's stock forward,
then after `install_fast_path`. It writes the largest differences (output, input gradient, every
parameter gradient) to OUT/rank{r}.json, and how far our own `MoEBlock` (the same weights, before
DeepSpeed swapped it) is from the stock forward.

    fast_ep_worker.py OUT            CPU, fp32, gloo, the per-expert loop (2 ranks)
    fast_ep_worker.py OUT cuda       GPU, bf16, nccl, torch._grouped_mm (stock pads groups, fast does not)
"""

from __future__ import annotations

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.nn as nn

from pipeline.ds_adapter import autoep_section
from pipeline.fast_ep import FastAutoEPMoELayer, install_fast_path
from pipeline.moe import MoEBlock

H, I, T = 32, 48, 40
CASES = [  # name, N, K, routing, ep_size, extra AutoEP keys
    ("E8K2_ep1", 8, 2, "softmax-topk", 1, {}),
    ("E8K2_ep2", 8, 2, "softmax-topk", 2, {}),
    ("E64K8_ep2", 64, 8, "softmax-topk", 2, {}),
    ("E16K4_topk_softmax_ep2", 16, 4, "topk-softmax", 2, {}),
    ("E8K2_all_to_rank0_ep2", 8, 2, "softmax-topk", 2, {}),  # rank 1's experts get no tokens
    ("E8K2_shared_ep2", 8, 2, "softmax-topk", 2, {}),  # a shared expert with its sigmoid gate
    ("E8K4_shared_topk_softmax_ep1", 8, 4, "topk-softmax", 1, {}),
    ("legacy_bmm_is_left_alone", 8, 2, "softmax-topk", 2, {"combine_impl": "legacy_bmm"}),
]


class Decoder(nn.Module):
    def __init__(self, block: MoEBlock):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = block


def autoep_layer(name, n, k, routing, ep_size, extra, cuda: bool):
    torch.manual_seed(0)  # the same weights on every rank
    shared = "_shared" in name
    block = MoEBlock(H, n, k, I, routing=routing, shared_intermediate_size=2 * I if shared else 0)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    if name.startswith("E8K2_all_to_rank0"):
        with torch.no_grad():
            block.gate.weight[:k] += 10.0  # with inputs > 0, experts 0..K-1 win every token
    ours = copy.deepcopy(block)
    section = autoep_section(k, routing, ep_size, cuda=cuda, layer_pattern=r"layers\.\d+\.mlp", shared=shared)
    config = {"train_batch_size": 2, "expert_parallel": {**section, **extra}}
    engine, *_ = deepspeed.initialize(model=Decoder(block), config=config)
    layer = engine.module.layers[0].mlp
    return (layer.to("cuda", torch.bfloat16), ours.to("cuda", torch.bfloat16)) if cuda else (layer, ours)


def forward_backward(layer, x, grad):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def main(out_dir: str, device: str = "cpu") -> None:
    cuda = device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    results = {}
    for name, n, k, routing, ep_size, extra in CASES:
        if ep_size > world:
            continue
        layer, ours = autoep_layer(name, n, k, routing, ep_size, extra, cuda)
        torch.manual_seed(100 + rank)  # different tokens on each rank
        x = torch.randn(2, T // 2, H)
        if name.startswith("E8K2_all_to_rank0"):
            x = x.abs() + 0.1
        grad = torch.randn(2, T // 2, H)
        if cuda:
            x, grad = x.to("cuda", torch.bfloat16), grad.to("cuda", torch.bfloat16)
        stock = forward_backward(layer, x, grad)
        with torch.no_grad():
            ours_out = ours(x)
        switched, skipped = install_fast_path(layer)
        fast = forward_backward(layer, x, grad)
        results[name] = {
            "switched": switched,
            "skipped": skipped,
            "fast_class": type(layer) is FastAutoEPMoELayer,
            "out": (fast[0] - stock[0]).float().abs().max().item(),
            "out_scale": stock[0].float().abs().max().item(),
            "ours_out": (ours_out - stock[0]).float().abs().max().item(),
            "x_grad": (fast[1] - stock[1]).float().abs().max().item(),
            "param_grads": {p: (fast[2][p] - stock[2][p]).float().abs().max().item() for p in stock[2]},
            "experts_class": type(layer.experts).__name__,
            "grouped_mm": bool(layer.experts.use_grouped_mm),
            "tokens_per_expert": layer.tokens_per_expert.tolist(),  # this rank's slots, both passes
            "local_experts": layer.num_local_experts,
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    # Without this, gloo's destructors at interpreter exit sometimes abort the process (SIGABRT,
    # "terminate called without an active exception") after the work is done.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
