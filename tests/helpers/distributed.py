"""Collectives in the fast tier: run a function on N ranks as real processes with a gloo process group, no
launcher (the idea of DeepSpeed's tests/unit/common.py `DistributedTest`, with plain torch.distributed).

    from distributed import run_on_ranks

    def rank_sum(x):                     # module level: the ranks import it by name
        t = torch.tensor([x + dist.get_rank()])
        dist.all_reduce(t)
        return t.item()

    assert run_on_ranks(rank_sum, 10, world_size=2) == [21, 21]   # each rank's result, by rank

Each rank is a process forked from a forkserver (started once per session with torch preloaded: a fork
costs milliseconds, a spawn re-imports torch, seconds; a plain fork of the pytest process could inherit
OpenMP's threads mid-state and hang). The group meets through a FileStore in a fresh temporary directory, so
no port can clash. An exception in any rank becomes a `RankError` naming the rank, with its traceback and
output; a rank still running `timeout` seconds after the start is killed (its Python stack first dumped
into its output), and so are the others once one has failed. Each rank destroys its group; every process
has exited when `run_on_ranks` returns or raises.

Assertions inside a rank are not rewritten by pytest: return values and assert in the test.
The ranks inherit the forkserver's environment (the session's at its start, not a test's monkeypatch).
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import forkserver
from pathlib import Path

import torch
import torch.distributed as dist
from ports import free_port

from pipeline.ds_adapter import remove_leftover_shm

# Imported once by the forkserver, so that each rank starts with them loaded.
PRELOAD = ["torch", "torch.distributed", "pytest", "pipeline.train"]
FAILURE_GRACE_S = 2.0  # after one rank fails, how long the others may take to report before being killed
EXIT_GRACE_S = 10.0  # after a clean run, how long a rank may take to destroy its group and exit
OUTPUT_TAIL = 4000  # characters of a rank's output shown with its failure


DIED = "died without reporting"


class RankError(Exception):
    """A rank raised, died or timed out. `failures`: rank -> what went wrong (traceback or reason)."""

    def __init__(self, world_size: int, failures: dict[int, str], outputs: dict[int, str]):
        # A rank that died is named first: the others then fail in a collective, and which of the two
        # reports arrives first is a race (seen under load). Otherwise in order of arrival.
        failures = dict(sorted(failures.items(), key=lambda item: not item[1].startswith(DIED)))
        self.failures, self.outputs = failures, outputs
        self.rank = next(iter(failures))  # the first to fail: the others usually fail because of it
        parts = [f"rank {rank} of {world_size} {what}" for rank, what in failures.items()]
        for rank, text in outputs.items():
            if text.strip():
                parts.append(f"---- rank {rank} output (last {OUTPUT_TAIL} characters) ----\n{text}")
        super().__init__("\n".join(parts))


def run_on_ranks(fn, *args, world_size: int = 2, timeout: float = 60.0) -> list:
    """fn(*args) on `world_size` ranks, each inside an initialised gloo group; returns their results by rank.

    `fn` must be importable by name (a module-level function); args and results must pickle.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # once per session, seconds: before the clock starts
    with tempfile.TemporaryDirectory(prefix="ranks_") as tmp:
        run = _Run(ctx, Path(tmp), world_size, timeout, free_port())
        try:
            run.start(fn, args)
            run.collect()
        finally:
            run.stop()
        outputs = {rank: run.output(rank) for rank in range(world_size)}
    if run.failures:
        raise RankError(world_size, run.failures, {r: outputs[r][-OUTPUT_TAIL:] for r in run.failures})
    for rank, text in outputs.items():  # captured by pytest with the test, shown when it fails
        if text.strip():
            print(f"---- rank {rank} output ----\n{text}", end="" if text.endswith("\n") else "\n")
    return [run.results[rank] for rank in range(world_size)]


class _Run:
    """The processes of one `run_on_ranks` call and what they reported."""

    def __init__(self, ctx, tmp: Path, world_size: int, timeout: float, port: int):
        self.ctx, self.tmp, self.world_size, self.port = ctx, tmp, world_size, port
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.procs: list = []
        self.conns: dict = {}  # reading end -> rank, until the rank reported or died
        # Held here only: a rank sees its end close if this process dies, even by SIGKILL, and exits.
        self.lifeline, self.lifeline_w = ctx.Pipe(duplex=False)
        self.results: dict[int, object] = {}
        self.failures: dict[int, str] = {}  # in the order they were seen

    def start(self, fn, args: tuple) -> None:
        for rank in range(self.world_size):
            reader, writer = self.ctx.Pipe(duplex=False)
            setup = (rank, self.world_size, str(self.tmp / "store"), self.port, self.timeout, self.lifeline)
            proc = self.ctx.Process(
                target=_rank_main, args=(fn, args, setup, writer, str(self.log(rank))), daemon=True
            )
            proc.start()
            writer.close()  # the rank holds the only writing end: its death reads as end of file here
            self.procs.append(proc)
            self.conns[reader] = rank

    def collect(self) -> None:
        while self.conns:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._time_out()
                return
            for conn in multiprocessing.connection.wait(list(self.conns), timeout=left):
                self._receive(conn)
            if self.failures:
                # One failed: the others are likely waiting on it in a collective, give them a moment.
                self.deadline = min(self.deadline, time.monotonic() + FAILURE_GRACE_S)

    def _receive(self, conn) -> None:
        rank = self.conns.pop(conn)
        try:
            status, value = pickle.loads(conn.recv_bytes())
        except EOFError:
            self.procs[rank].join(5)
            code = self.procs[rank].exitcode
            # A rank that cannot unpickle fn dies before it has a log: Python prints that to the forkserver.
            status, value = "error", f"{DIED} (exit code {code}; did fn import?)"
        conn.close()
        if status == "ok":
            self.results[rank] = value
        else:
            self.failures[rank] = value

    def _time_out(self) -> None:
        """Dump the Python stacks of the ranks still running into their output, then record them."""
        hung = sorted(self.conns.values())
        for rank in hung:
            if self.procs[rank].is_alive():
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
        time.sleep(0.5)
        reason = (
            "killed after another rank failed" if self.failures else f"still running after {self.timeout} s"
        )
        for rank in hung:
            self.failures[rank] = f"{reason} (its stack is in its output)"

    def stop(self) -> None:
        """Every process ends here: after a clean run each rank gets a moment to take its group down (and
        fails the run if it cannot); otherwise whatever still runs is killed."""
        exit_by = time.monotonic() + EXIT_GRACE_S
        for rank, proc in enumerate(self.procs):
            if not self.failures and rank in self.results:
                proc.join(max(0.0, exit_by - time.monotonic()))
                if proc.exitcode != 0:
                    self.failures[rank] = _teardown_failure(proc.exitcode)
            if proc.is_alive():
                proc.kill()
            proc.join()
            proc.close()
        for conn in [*self.conns, self.lifeline, self.lifeline_w]:
            conn.close()
        remove_leftover_shm(self.port)  # only DeepSpeed's CPU all-reduce would have made one

    def log(self, rank: int) -> Path:
        return self.tmp / f"rank{rank}.log"

    def output(self, rank: int) -> str:
        path = self.log(rank)
        return path.read_text(errors="replace") if path.is_file() else ""


def _teardown_failure(exitcode: int | None) -> str:
    if exitcode is None:
        return f"reported, then did not exit within {EXIT_GRACE_S} s (teardown hung)"
    return f"reported, then exited with code {exitcode} (teardown failed: see its output)"


def _exit_with_the_test(lifeline) -> None:
    """Block until the test's process closes the lifeline: it only does when it dies (it kills its ranks
    otherwise), and then this rank must not linger (the forkserver, its parent, does not kill it)."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(70)


def _rank_main(fn, args: tuple, setup: tuple, conn, log_path: str) -> None:
    """One rank: output to its log, the group up, fn, then the report and the group down."""
    rank, world_size, store, port, timeout, lifeline = setup
    threading.Thread(target=_exit_with_the_test, args=(lifeline,), daemon=True).start()
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # the ranks share the machine's cores: oversubscribed OpenMP crawls
    try:
        report = _run_fn(fn, args, rank, world_size, store, timeout)
        conn.send_bytes(report)
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_fn(fn, args: tuple, rank: int, world_size: int, store: str, timeout: float) -> bytes:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(*args)
        dist.barrier()  # no rank takes its group down while another is still in one of fn's collectives
        return pickle.dumps(("ok", result))
    except BaseException:
        return pickle.dumps(("error", "raised:\n" + traceback.format_exc()))
