"""Converter throughput and peak memory against model size: `upcycle convert` on random dense Llamas.

    python bench/convert.py        # dense 0.1B, 0.4B and 1.2B; plans E8 top-2 and E64 top-8 G8
    python bench/convert.py --sizes 0.1B --workdir /tmp/conv

Each dense model is written once by `upcycle init` (fp32), then converted to bf16 in a fresh process
per plan. Wall time, output size and the peak RSS of that process (from wait4) are measured; throughput
is output GB written per second. The work directory needs about 30 GB for the 1.2B model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "0.1B": (768, 2048, 12, 12, 4, 32000),
    "0.4B": (1024, 4096, 24, 16, 8, 32000),
    "1.2B": (2048, 8192, 16, 32, 8, 128256),  # Llama 3.2 1B shapes
}
PLANS = {"E8T2": ("8", "2", "1"), "E64T8G8": ("64", "8", "8")}


def upcycle(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors") / 1e9


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--workdir", default="bench_convert_work")
    args = parser.parse_args()
    work = Path(args.workdir)
    rows = []
    for size in args.sizes:
        h, f, layers, heads, kv, vocab = SIZES[size]
        dense = work / f"dense_{size}"
        if not (dense / "config.json").exists():
            shape = {
                "--hidden-size": h,
                "--intermediate-size": f,
                "--layers": layers,
                "--heads": heads,
                "--kv-heads": kv,
                "--vocab-size": vocab,
            }
            init = upcycle("init", "--out", str(dense), *[str(a) for item in shape.items() for a in item])
            subprocess.run(init, check=True, stdout=subprocess.DEVNULL)
        for plan in args.plans:
            n, k, g = PLANS[plan]
            out = work / f"moe_{size}_{plan}"
            shutil.rmtree(out, ignore_errors=True)
            convert = upcycle(
                "convert",
                "--dense",
                str(dense),
                "--out",
                str(out),
                "--experts",
                n,
                "--top-k",
                k,
                "--granularity",
                g,
                "--dtype",
                "bf16",
            )
            seconds, rss = run_measured(convert)
            gb = dir_gb(out)
            rows.append((size, plan, dir_gb(dense), gb, seconds, gb / seconds, rss))
            print(f"{size} {plan}: {gb:.2f} GB in {seconds:.1f} s, peak RSS {rss:.2f} GB", flush=True)
            shutil.rmtree(out)
    print(
        f"\n{'dense':>6}{'plan':>9}{'dense GB (fp32)':>17}{'out GB (bf16)':>15}{'s':>8}{'GB/s':>7}"
        f"{'peak RSS GB':>13}"
    )
    for size, plan, dense_gb, gb, seconds, rate, rss in rows:
        print(f"{size:>6}{plan:>9}{dense_gb:>17.2f}{gb:>15.2f}{seconds:>8.1f}{rate:>7.2f}{rss:>13.2f}")


if __name__ == "__main__":
    main()
