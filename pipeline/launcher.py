"""`upcycle train`: validate the run config, then start `pipeline/train.py` under the DeepSpeed launcher.

upcycle train --config tiny_cpu --nproc 2 [--section.key value ...]
upcycle train --config multi_gpu --hostfile launch/hostfile [--section.key value ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train with DeepSpeed (runs the deepspeed launcher)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--nproc", type=int, help="processes on this machine (default: all GPUs, or 2 on CPU)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true", help="validate and print the command without running it")
    p.set_defaults(func=run_cli, allow_overrides=True)


def hostfile_slots(path: str) -> int:
    """Total `slots=N` over the hosts of a DeepSpeed hostfile."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--hostfile {path}: file not found (see launch/hostfile.example)")
    total = 0
    for number, line in enumerate(file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        if not fields.get("slots", "").isdigit():
            raise UserError(f"--hostfile {path}, line {number}: expected 'hostname slots=N', got {line!r}")
        total += int(fields["slots"])
    if total == 0:
        raise UserError(f"--hostfile {path}: lists no hosts")
    return total


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from pipeline.ds_adapter import remove_leftover_shm
    from pipeline.preflight import prepare

    if args.hostfile:
        world = hostfile_slots(args.hostfile)
        where = ["--hostfile", args.hostfile]
    else:
        world = args.nproc or (torch.cuda.device_count() or 2)
        where = ["--num_gpus", str(world)]
    prepare(["--config", args.config, *args.overrides], world_size=world)
    if shutil.which("deepspeed") is None:
        raise UserError("the `deepspeed` launcher is not on PATH: pip install deepspeed")
    cmd = [
        "deepspeed",
        *where,
        "--master_port",
        str(args.master_port),
        "--module",
        "pipeline.train",
        "--config",
        args.config,
        *args.overrides,
    ]
    print("running:", " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    try:
        return subprocess.call(cmd)
    finally:
        remove_leftover_shm(args.master_port)
