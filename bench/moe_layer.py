"""Forward+backward cost of one upcycled MoE layer against the dense SwiGLU MLP it came from, same run.

    python bench/moe_layer.py            # CPU: small sizes (H=256, F=1024, 2048 tokens, fp32)
    python bench/moe_layer.py --gpu      # GPU: H=2048, F=8192, 8192 tokens, bf16
    torchrun --nproc_per_node 2 bench/moe_layer.py   # expert parallelism: AutoEP at EP = world size

Variants per (N, K, G) setting, all on the same tokens:
  ours            pipeline.moe.MoEBlock (the project's block: fp32 router, sort, grouped GEMM or loop)
  ds_autoep       the AutoEPMoELayer that deepspeed.initialize puts in its place, stock forward
  ds_autoep_fast  the same layer after pipeline.fast_ep.install_fast_path (what training runs)
  ds_classic      deepspeed.moe.layer.MoE, capacity factor 1.0 (drops tokens)
Ideal time = dense time x K/G (same active FLOPs). Routing is "balanced" (the router as initialised,
random) or "skewed" (half of all tokens prefer expert 0's group). Under torchrun with several ranks,
each rank times its own tokens (and its own dense MLP) and only the AutoEP variants run, with the
experts split over the ranks and tokens exchanged by all-to-all; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

from pipeline.moe import MoEBlock  # noqa: E402

SETTINGS = [(8, 2, 1), (64, 8, 8), (32, 4, 4), (8, 1, 1)]  # (N, K, G)
ROUTINGS = ("balanced", "skewed")


class DenseMLP(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OneLayerModel(nn.Module):
    """Just enough of a decoder for AutoEP to find the block at `model.layers.0.mlp`."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = block


def autoep_layer(block: MoEBlock, fast: bool, device, dtype, ep_size: int = 1) -> nn.Module:
    """Let `deepspeed.initialize` replace the block by its AutoEP layer, as training does."""
    import deepspeed

    from pipeline.ds_adapter import autoep_section
    from pipeline.fast_ep import install_fast_path

    section = autoep_section(block.top_k, block.routing, ep_size=ep_size, cuda=device.type == "cuda")
    engine, *_ = deepspeed.initialize(
        model=OneLayerModel(block), config={"train_batch_size": ep_size, "expert_parallel": section}
    )
    layer = engine.module.model.layers[0].mlp.to(device, dtype)
    if fast:
        assert install_fast_path(layer)[0] == 1
    return layer


def ds_classic(h, i, n, k):
    from deepspeed.moe.layer import MoE

    layer = MoE(
        hidden_size=h,
        expert=DenseMLP(h, i),
        num_experts=n,
        ep_size=1,
        k=k,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=4,
        drop_tokens=True,
    )
    layer.set_deepspeed_parallelism()
    return layer


def upcycled_block(h, f, n, k, g, skewed: bool) -> MoEBlock:
    """An MoE block initialised as the upcycler does: virtual-group router, shards of one dense MLP."""
    from pipeline.config import MoEConfig
    from pipeline.upcycle import upcycle_mlp, virtual_group_router

    moe = MoEConfig(
        num_experts=n,
        top_k=k,
        granularity=g,
        routing="softmax-topk",
        layers=(0,),
        expert_intermediate_size=f // g,
        expert_scale=n * g / k,
        router_init_std=0.02,
    )
    block = MoEBlock(h, n, k, f // g)
    dense = DenseMLP(h, f)
    with torch.no_grad():
        router = virtual_group_router(moe, h, 0) * 50  # spread logits so routing is not degenerate
        if skewed:
            router[:g] += router[:g].abs().mean() * 4  # copy 0 wins for most tokens
        block.gate.weight.copy_(router)
        tensors = upcycle_mlp(moe, dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight)
        block.experts.gate_up_proj.copy_(tensors["gate_up_proj"])
        block.experts.down_proj.copy_(tensors["down_proj"])
    return block


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(module, x, iters, warmup) -> float:
    grad = torch.randn_like(x)
    times = []
    for i in range(warmup + iters):
        xi = x.detach().requires_grad_(True)
        sync(x.device)
        start = time.perf_counter()
        out = module(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    h, f, tokens = (2048, 8192, 8192) if args.gpu else (256, 1024, 2048)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.gpu else "gloo", verbose=False)
    world = dist.get_world_size()
    torch.manual_seed(dist.get_rank())  # each rank its own tokens
    x = torch.randn(1, tokens, h, device=device, dtype=dtype)
    t_dense = time_fwd_bwd(DenseMLP(h, f).to(device, dtype), x, args.iters, 2)
    rows = [dict(variant="dense", routing="-", N=1, K=1, G=1, ms=t_dense * 1e3, x_ideal=1.0, x_dense=1.0)]
    for n, k, g in SETTINGS:
        ideal = t_dense * k / g
        variants = []
        for routing in ROUTINGS:
            block = partial(upcycled_block, h, f, n, k, g, skewed=routing == "skewed")
            variants += [
                *([("ours", routing, block)] if world == 1 else []),
                ("ds_autoep", routing, lambda b=block: autoep_layer(b(), False, device, dtype, world)),
                ("ds_autoep_fast", routing, lambda b=block: autoep_layer(b(), True, device, dtype, world)),
            ]
        if world == 1:
            variants.append(("ds_classic_cf1", "balanced", partial(ds_classic, h, f // g, n, k)))
        for name, routing, make in variants:
            try:
                t = time_fwd_bwd(make().to(device, dtype), x, args.iters, 2)
                rows.append(
                    dict(
                        variant=name,
                        routing=routing,
                        N=n,
                        K=k,
                        G=g,
                        ms=t * 1e3,
                        x_ideal=t / ideal,
                        x_dense=t / t_dense,
                    )
                )
            except Exception as exc:  # keep measuring the others
                rows.append(dict(variant=name, routing=routing, N=n, K=k, G=g, error=repr(exc)[:120]))
    dist.barrier()
    dist.destroy_process_group()  # gloo's destructors at exit can otherwise abort the process
    if int(os.environ["RANK"]) != 0:
        return
    print(
        f"device {device}, dtype {dtype}, H={h}, F={f}, {tokens} tokens per rank, fwd+bwd, median of "
        f"{args.iters}, {world} rank(s), EP {world}"
    )
    print(f"{'variant':16}{'routing':>10}{'N':>4}{'K':>3}{'G':>3}{'ms':>10}{'x ideal':>9}{'x dense':>9}")
    for r in rows:
        head = f"{r['variant']:16}{r['routing']:>10}{r['N']:>4}{r['K']:>3}{r['G']:>3}"
        print(
            head
            + (
                f"  ERROR {r['error']}"
                if "error" in r
                else f"{r['ms']:>10.2f}{r['x_ideal']:>9.2f}{r['x_dense']:>9.2f}"
            )
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
