"""Which gloo threads outlive DeepSpeed's documented teardown? A reproducer outside the trainer.

    python bench/deepspeed_group_leak.py [--stage 0|1|2|3]

Starts 2 CPU ranks (gloo), builds a 2-layer model with `deepspeed.initialize` and, without a single step,
tears it down as DeepSpeed documents it (`engine.destroy()`, the last reference dropped, a collection,
`deepspeed.comm.destroy_process_group()`, a collection), then lists the threads of each rank that belong
to process groups (gloo's `gloo_tcp_loop` / `pt_gloo_runloop`, the TCPStore's `pt_tcpstore_uv`). With
DeepSpeed 0.19.8 and torch 2.13 one gloo group (three threads, and the store's thread on rank 0) stays
alive on every rank, held from C++ (no Python object refers to it); `deepspeed.init_distributed` alone,
or torch's own `new_group`, leaves none. The trainer's shutdown (`pipeline.ds_adapter.
shutdown_distributed`) reports the same group at the end of every run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing
import os
import socket
import sys


def rank_main(rank: int, port: int, stage: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import deepspeed.comm
    import torch

    from pipeline.ds_adapter import communication_threads

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    after_init = communication_threads()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]
    engine.destroy()
    del engine, model
    gc.collect()
    deepspeed.comm.destroy_process_group()
    gc.collect()
    results.put((rank, after_init, communication_threads()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (default 0)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=rank_main, args=(r, port, args.stage, results)) for r in (0, 1)]
    for proc in ranks:
        proc.start()
    rows = sorted(results.get(timeout=300) for _ in ranks)
    for proc in ranks:
        proc.join()
    left = 0
    for rank, after_init, after_teardown in rows:
        left += len(after_teardown)
        print(f"rank {rank}: {len(after_init)} threads after init_distributed, "
              f"{len(after_teardown)} after the teardown: {after_teardown}")  # fmt: skip
    print(f"ZeRO-{args.stage}: {left} communication threads outlived DeepSpeed's teardown on 2 ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
