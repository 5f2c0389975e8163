"""Repeated short 2-rank training runs under CPU load: does every finished run exit 0, cleanly?

    python bench/exit_stress.py [--runs 20] [--load 2] [--concurrent 1] [--launcher deepspeed|upcycle]
                                [--work DIR] [--keep-going]

Each run trains a few steps of the tiny E8 top-2 model at EP 2, evaluates (the per-window validation
losses are all-gathered right before the end), saves and exits. `--load N` starts N busy processes
beside the runs and `--concurrent M` runs M trainings at once, to widen the races of the ranks' last
moments. A run passes when the launcher exits 0, no rank log says "terminate called" or "Fatal Python
error", `latest` names the final step and the run left no DeepSpeed segment in /dev/shm.

Ranks run with PYTHONFAULTHANDLER=1 and core dumps enabled (`ulimit -c unlimited`, cores land in the run's
directory), so that an abort leaves the Python stacks of every thread and a core for gdb.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "launch" / "configs" / "tiny_cpu.yaml"
STEPS = 4
ABORT_MARKERS = ("terminate called", "Fatal Python error", "core dumped", "Aborted")


@dataclass
class RunResult:
    name: str
    code: int
    seconds: float
    abort_lines: list[str]
    latest: str
    shm_left: list[str]
    threads_left: list[str]  # ranks' reports of communication threads still alive after their shutdown

    @property
    def ok(self) -> bool:
        return (
            self.code == 0
            and not self.abort_lines
            and self.latest == f"step_{STEPS:08d}"
            and not self.shm_left
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_workspace(root: Path) -> Path:
    """The tests' tiny workspace (tests/helpers/workspace.py): corpus, tokenizer, shards, a tiny dense
    Llama and its E8 top-2 upcycled version; built once."""
    if (root / "moe" / "config.json").is_file():
        return root
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from workspace import prepare_train_workspace

    root.mkdir(parents=True, exist_ok=True)
    return prepare_train_workspace(root)


def command(launcher: str, port: int, workspace: Path, out: Path) -> list[str]:
    train = str(REPO / "pipeline" / "train.py")
    head = {
        "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", str(port), train],
        "upcycle": [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            "--nproc",
            "2",
            "--master-port",
            str(port),
        ],
    }[launcher]
    return [
        *head,
        "--config", str(TINY_CONFIG),
        "--model.path", str(workspace / "moe"),
        "--data.path", str(workspace / "data"),
        "--output.dir", str(out),
        "--train.steps", str(STEPS),
        "--output.eval_interval", "2",
        "--output.checkpoint_interval", "2",
    ]  # fmt: skip


def start_run(launcher: str, workspace: Path, out: Path):
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}

    def allow_cores():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(
        command(launcher, port, workspace, out), stdout=log, stderr=subprocess.STDOUT, env=env,
        cwd=out, preexec_fn=allow_cores, start_new_session=True,
    )  # fmt: skip
    return proc, port, time.perf_counter()


def finish_run(name: str, proc, port: int, started: float, out: Path, timeout: float) -> RunResult:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        code = -9
    seconds = time.perf_counter() - started
    text = out.with_suffix(".log").read_text(errors="replace")
    abort_lines = [line for line in text.splitlines() if any(m in line for m in ABORT_MARKERS)]
    latest_file = out / "checkpoints" / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else "none"
    shm_left = sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    threads_left = [line for line in text.splitlines() if "outlived shutdown" in line]
    return RunResult(name, code, seconds, abort_lines, latest, shm_left, threads_left)


def busy(_: int) -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--load", type=int, default=2, help="busy background processes (default 2)")
    p.add_argument("--concurrent", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--launcher", choices=("deepspeed", "upcycle"), default="deepspeed")
    p.add_argument("--work", type=Path, default=Path("/tmp/exit_stress"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failed run")
    args = p.parse_args(argv)

    workspace = prepare_workspace(args.work / "workspace")
    load = [multiprocessing.Process(target=busy, args=(i,), daemon=True) for i in range(args.load)]
    for proc in load:
        proc.start()
    results: list[RunResult] = []
    try:
        done = 0
        while done < args.runs:
            batch = range(done, min(args.runs, done + args.concurrent))
            started = {i: start_run(args.launcher, workspace, args.work / f"run{i:03d}") for i in batch}
            for i, (proc, port, t0) in started.items():
                result = finish_run(f"run{i:03d}", proc, port, t0, args.work / f"run{i:03d}", args.timeout)
                results.append(result)
                verdict = "ok" if result.ok else "FAILED"
                print(
                    f"{result.name}: {verdict} exit {result.code} in {result.seconds:.1f} s, "
                    f"latest {result.latest}"
                    + (f", shm left {result.shm_left}" if result.shm_left else "")
                    + (f", threads left on {len(result.threads_left)} rank(s)" if result.threads_left else "")
                    + "".join(f"\n    {line}" for line in result.abort_lines[:5]),
                    flush=True,
                )
            done += len(batch)
            if not args.keep_going and not all(r.ok for r in results):
                break
    finally:
        for proc in load:
            proc.terminate()
    failed = [r for r in results if not r.ok]
    times = sorted(r.seconds for r in results)
    print(
        f"{len(results) - len(failed)} of {len(results)} runs exited cleanly "
        f"(launcher {args.launcher}, load {args.load}, {args.concurrent} at once; "
        f"{times[0]:.1f}-{times[-1]:.1f} s a run)"
    )
    return 0 if not failed and len(results) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
