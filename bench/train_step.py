"""Tokens/s and MFU of full training steps (forward, backward, AdamW) in one process, dense vs upcycled.

    python bench/train_step.py           # CPU: a small Llama (H=256, 4 layers), fp32
    python bench/train_step.py --gpu     # GPU: ~1B active parameters (H=2048, 16 layers), bf16

Every MoE variant is built from the same dense shapes, so the table shows what upcycling costs per
token at each (N, K, G); K/G = 1 settings have the dense model's active FLOPs. Each model runs as:
  plain           the model and torch AdamW, no DeepSpeed
  deepspeed       the DeepSpeed engine that `upcycle train` builds (its ds config, ZeRO-2), with AutoEP's
                  stock MoE forward
  deepspeed+fast  the same engine after pipeline.fast_ep.install_fast_path (what training runs)
x dense compares with the dense model run the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from pipeline.backbone import build, expected_state, skeleton
from pipeline.config import ModelConfig, MoEConfig
from pipeline.metrics import flops_per_token, peak_tflops

for key, value in (
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", str(29700 + os.getpid() % 1000)),
    ("RANK", "0"),
    ("LOCAL_RANK", "0"),
    ("WORLD_SIZE", "1"),
):
    os.environ.setdefault(key, value)

SETTINGS = [None, (8, 1, 1), (32, 4, 4), (8, 2, 1), (64, 8, 8)]  # None = dense
RUNNERS = ("plain", "deepspeed", "deepspeed+fast")


def base_config(gpu: bool) -> ModelConfig:
    h, f, layers, heads = (2048, 8192, 16, 16) if gpu else (256, 1024, 4, 4)
    return ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 32000,
            "hidden_size": h,
            "intermediate_size": f,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "max_position_embeddings": 4096,
        }
    )


def with_moe(config: ModelConfig, setting) -> ModelConfig:
    if setting is None:
        return config
    n, k, g = setting
    moe = MoEConfig(
        num_experts=n,
        top_k=k,
        granularity=g,
        routing="softmax-topk",
        layers=tuple(range(config.num_hidden_layers)),
        expert_intermediate_size=config.intermediate_size // g,
        expert_scale=n * g / k,
    )
    return replace(config, moe=moe)


def plain_step(model, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(ids):
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def deepspeed_step(model, config: ModelConfig, batch: int, gpu: bool, fast: bool):
    """The engine `upcycle train` builds: its DeepSpeed config (ZeRO-2, AdamW, AutoEP at EP 1)."""
    import deepspeed

    from pipeline.ds_adapter import build_ds_config
    from pipeline.fast_ep import install_fast_path
    from pipeline.run_config import RunConfig

    cfg = RunConfig()
    cfg.train.global_batch = cfg.train.micro_batch = batch
    cfg.train.precision = "bf16" if gpu else "fp32"
    ds_config = build_ds_config(cfg, config, world_size=1, cuda=gpu)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if fast and config.moe is not None:
        assert install_fast_path(engine.module)[0] == len(config.moe.layers)

    def step(ids):
        logits = engine(ids[:, :-1])
        engine.backward(F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()))
        engine.step()

    return step


def random_model(config: ModelConfig, device) -> torch.nn.Module:
    """The training model (`pipeline.backbone`: transformers' class, our MoE blocks) with N(0, 0.02^2)
    weights, fp32 (the DeepSpeed engine casts to bf16 itself)."""
    torch.manual_seed(0)
    state = {name: torch.randn(shape) * 0.02 for name, shape in expected_state(config).items()}
    reader = type("RandomWeights", (), {"get": staticmethod(state.__getitem__)})
    return build(config, reader, torch.float32, str(device), list(state)).train()


def time_steps(config: ModelConfig, runner: str, device, dtype, batch: int, seq_len: int, iters: int):
    model = random_model(config, device)
    if runner == "plain":
        step = plain_step(model.to(dtype), device)
    else:
        step = deepspeed_step(model, config, batch, device.type == "cuda", fast=runner == "deepspeed+fast")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    times = []
    for i in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    batch, seq_len = (8, 2048) if args.gpu else (4, 256)
    base = base_config(args.gpu)
    peak = peak_tflops(device)
    print(f"device {device}, {dtype}, batch {batch} x {seq_len} tokens, median of {args.iters} steps")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.gpu else "gloo", verbose=False)
    print(
        f"{'model':10}{'runner':>16}{'total M':>9}{'active M':>10}{'ms/step':>10}{'tok/s':>10}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'x dense':>9}"
    )
    dense_time = {}
    for setting in SETTINGS:
        config = with_moe(base, setting)
        with torch.device("meta"):
            total, active = skeleton(config).parameter_counts()
        name = "dense" if setting is None else "E{}T{}G{}".format(*setting)
        for runner in RUNNERS:
            if setting is None and runner == "deepspeed+fast":
                continue  # no MoE layers: the same as "deepspeed"
            try:
                seconds = time_steps(config, runner, device, dtype, batch, seq_len, args.iters)
            except torch.OutOfMemoryError:  # the E8/E64 1B-active models have 6.9B parameters in all
                print(f"{name:10}{runner:>16}{total / 1e6:>9.1f}{active / 1e6:>10.1f}  out of memory")
                torch.cuda.empty_cache()
                continue
            dense_time.setdefault(runner.split("+")[0], seconds)
            tokens = batch * seq_len
            tflops = flops_per_token(config, seq_len) * tokens / seconds / 1e12
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
            print(
                f"{name:10}{runner:>16}{total / 1e6:>9.1f}{active / 1e6:>10.1f}{seconds * 1e3:>10.1f}"
                f"{tokens / seconds:>10,.0f}{tflops:>9.3f}{mfu:>7}"
                f"{seconds / dense_time[runner.split('+')[0]]:>9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
