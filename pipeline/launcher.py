"""`upcycle train`: validate the run config, then start `pipeline/train.py` under the DeepSpeed launcher.

upcycle train --config tiny_cpu --nproc 2 [--section.key value ...]
upcycle train --config multi_gpu --hostfile HOSTFILE [--section.key value ...]   (hosts of this machine only)

The launching process outlives the ranks' last save (`supervise`): on SIGTERM (SLURM's pre-emption
signal) it waits until every rank has saved its checkpoint and exited, so that a scheduler which ends
the job when its main process exits cannot cut the pre-emption checkpoint short. launch/node.sh runs
the same supervisor: `python -m pipeline.launcher [--stop-timeout S] -- deepspeed ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

# Ranks blocked on a dead peer leave after parallel.timeout_s (600 s by default); a save takes less.
STOP_TIMEOUT_S = 600
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PER_NODE_LAUNCHER = "deepspeed.launcher.launch"  # the module the `deepspeed` runner starts on each node


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train with DeepSpeed (runs the deepspeed launcher)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--nproc", type=int, help="processes on this machine (default: all GPUs, or 2 on CPU)")
    p.add_argument(
        "--hostfile",
        help="DeepSpeed hostfile naming this machine only (several nodes: launch/node.sh on each node)",
    )
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--dry-run", action="store_true", help="validate and print the command without running it")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        help="after SIGTERM/SIGINT, seconds to wait for the ranks to save and exit before killing them "
        f"(default {STOP_TIMEOUT_S})",
    )
    p.set_defaults(func=run_cli, allow_overrides=True)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) of each line of a DeepSpeed hostfile (`hostname slots=N`, `#` comments)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--hostfile {path}: file not found (see launch/hostfile.example)")
    hosts = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        if not fields.get("slots", "").isdigit():
            raise UserError(f"--hostfile {path}, line {number}: expected 'hostname slots=N', got {line!r}")
        hosts.append((line.split()[0], int(fields["slots"])))
    return hosts


def hostfile_slots(path: str) -> int:
    """Total `slots=N` over the hosts of a DeepSpeed hostfile."""
    total = sum(slots for _, slots in read_hostfile(path))
    if total == 0:
        raise UserError(f"--hostfile {path}: lists no hosts")
    return total


def is_this_machine(host: str) -> bool:
    return host in ("localhost", socket.gethostname(), socket.getfqdn()) or host.startswith("127.")


def refuse_remote_hosts(path: str) -> None:
    """The supervisor sees only the processes of this machine: DeepSpeed's runner starts the ranks of other
    hosts over pdsh/SSH, outside it, and kills them at once on SIGTERM (a pre-emption save cut short)."""
    remote = [host for host, _ in read_hostfile(path) if not is_this_machine(host)]
    if remote:
        raise UserError(
            f"--hostfile {path} lists other machines ({', '.join(remote)}): `upcycle train` supervises the "
            "ranks of this machine only, so a SIGTERM (pre-emption) would kill theirs before they save. "
            "Start one supervised launcher per node instead: NODE_RANK=i launch/node.sh CONFIG on every node "
            "(or sbatch launch/slurm.sbatch CONFIG); see docs/multinode.md"
        )


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
    cfg, _ = prepare(["--config", args.config, *args.overrides], world_size=world)
    if args.hostfile:
        refuse_remote_hosts(args.hostfile)
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
        code = supervise(cmd, args.stop_timeout, "upcycle train")
    finally:
        remove_leftover_shm(args.master_port)
    return completed_despite_teardown(code, cfg.output.dir, cfg.train.steps, world)


def completed_despite_teardown(code: int, output_dir: str, steps: int, world: int) -> int:
    """0 for a run whose every rank saved the final checkpoint (`latest` names it) and then one failed in
    its teardown: nothing of the run is lost, and a scheduler must not retry it (a warning names the
    ranks). Any other failure keeps its exit code."""
    from pipeline import checkpointing

    if code == 0:
        return 0
    done = checkpointing.completion(output_dir, steps, world)
    if not done.complete:
        return code
    ranks = done.failed_in_teardown
    who = f"rank(s) {', '.join(map(str, ranks))}" if ranks else "a process"
    print(
        f"upcycle train: warning: {who} did not exit cleanly (exit code {code}) after every rank had saved "
        f"the final checkpoint {done.final_tag}, which `latest` names: the run is complete, exiting with 0. "
        "See the rank's log for what failed in its teardown",
        file=sys.stderr,
        flush=True,
    )
    return 0


# ---- the launching process outlives its ranks ----------------------------------------------------------
# DeepSpeed's `deepspeed` runner dies at once on SIGTERM, and its per-node `deepspeed.launcher.launch`
# SIGKILLs the ranks 30 s after a SIGTERM (terminate_process_tree), which can cut a large checkpoint short.
# So on a stop signal the supervisor forwards it to the ranks and kills the launcher processes above them;
# the ranks, orphaned, are re-parented to the supervisor (a Linux subreaper), which reaps them itself.


def supervise(cmd: list[str], stop_timeout: float, name: str) -> int:
    """Run a launcher command; return only once every process it started has exited.

    A stop signal (SIGTERM, SIGINT, SIGHUP) is forwarded to the ranks (on SIGTERM they finish the step,
    save and exit); whatever is still running `stop_timeout` s later is killed. Exit code: the
    launcher's; after a stop signal, the ranks' (0 when every rank saved and exited).
    """
    supervisor = Supervisor(name, stop_timeout)
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in STOP_SIGNALS}
    try:
        return supervisor.run(cmd)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Supervisor:
    def __init__(self, name: str, stop_timeout: float):
        self.name, self.stop_timeout = name, stop_timeout
        self.signum: int | None = None
        self.stopped_at = 0.0
        self.codes: dict[int, int] = {}  # exit codes of the processes reaped here, re-parented ranks too
        self.ranks: set[int] = set()  # ranks the stop signal was forwarded to
        self.child: subprocess.Popen | None = None
        self.child_signalled = False
        self.me = None  # psutil.Process of this supervisor, once it is the ranks' subreaper

    def request_stop(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.stopped_at = signum, time.monotonic()
            wait = f"waiting up to {self.stop_timeout:.0f} s for the ranks to save and exit (--stop-timeout)"
            self.say(f"{signal.Signals(signum).name}: {wait}")
            if self.me is not None:  # at once: the per-node launcher is already counting down
                self.take_over()

    def run(self, cmd: list[str]) -> int:
        if not _become_subreaper():  # not Linux: orphaned ranks would escape; wait for the launcher only
            return self.wait_for_launcher(subprocess.Popen(cmd))
        import psutil  # a dependency of DeepSpeed

        self.child = subprocess.Popen(cmd)
        me = self.me = psutil.Process()
        while self.signum is None and self.child.returncode is None:
            time.sleep(0.2)  # cheap until something happens: no process-table scans during training
            self.reap()
        deadline = (self.stopped_at if self.signum is not None else time.monotonic()) + self.stop_timeout
        while True:
            self.reap()
            if self.signum is not None:
                self.take_over()  # again: ranks started late, launchers not yet gone
            alive = _descendants(me)  # after the launcher's exit: anything it left behind
            if self.child.returncode is not None and not alive:
                return self.exit_code()
            if time.monotonic() > deadline:
                return self.kill_leftovers(alive)
            time.sleep(0.1)

    def take_over(self) -> None:
        """Forward the stop signal to ranks not yet signalled; kill the launchers between us and them.

        The ranks are the children of DeepSpeed's per-node launcher; the processes between them and us
        (that launcher and the `deepspeed` runner) are killed before that launcher's 30 s run out.
        """
        import psutil

        forwarded = signal.SIGINT if self.signum == signal.SIGINT else signal.SIGTERM  # Ctrl-C: stop now
        me = self.me
        ranks = [p for p in _descendants(me) if _is_rank(p, me)]
        if not ranks and not self.ranks and self.child.returncode is None and not self.child_signalled:
            self.child.send_signal(forwarded)  # no rank started yet: the launcher stops it all
            self.child_signalled = True
        for rank in ranks:
            try:
                if rank.pid not in self.ranks:
                    rank.send_signal(forwarded)
                    self.ranks.add(rank.pid)
                for launcher in rank.parents():
                    if launcher.pid == me.pid:
                        break
                    launcher.kill()
            except psutil.Error:
                continue

    def reap(self) -> None:
        """Collect every exited child (re-parented ranks too); the launcher's status goes to `child`."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.codes[pid] = os.waitstatus_to_exitcode(status)
            if pid == self.child.pid:
                self.child.returncode = self.codes[pid]

    def exit_code(self) -> int:
        if self.signum is None:
            return _shell_code(self.child.returncode)
        rank_codes = [_shell_code(self.codes[pid]) for pid in sorted(self.ranks) if pid in self.codes]
        # A rank ends by SIGTERM (143) only without its handler, i.e. outside the training loop: during
        # start-up (nothing to save yet) or after its last save, when a launcher's late SIGTERM meets the
        # interpreter's shutdown. Neither loses a checkpoint.
        code = next((c for c in rank_codes if c not in (0, 128 + signal.SIGTERM)), 0)
        if not rank_codes:  # the launcher reaped its ranks itself (before we took over): report its code
            code = _shell_code(self.child.returncode)
        after = f"{time.monotonic() - self.stopped_at:.1f} s after the stop signal"
        self.say(f"every rank has exited, {after} (rank exit codes {rank_codes}); exit code {code}")
        return code

    def kill_leftovers(self, leftovers: list) -> int:
        import psutil

        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        self.reap()
        self.say(
            f"{len(leftovers)} process(es) still running {self.stop_timeout:.0f} s after the stop signal (or "
            "the launcher's exit): killed them (--stop-timeout). A checkpoint being written is incomplete; "
            "`latest` still names the last complete one"
        )
        return 1

    def wait_for_launcher(self, child: subprocess.Popen) -> int:
        while child.poll() is None and self.signum is None:
            time.sleep(0.1)
        if child.poll() is None:
            child.send_signal(self.signum)
            try:
                child.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                child.kill()
        return _shell_code(child.wait())

    def say(self, message: str) -> None:
        print(f"{self.name}: {message}", file=sys.stderr, flush=True)


def _become_subreaper() -> bool:
    """Linux: orphaned descendants (the ranks, once their launcher is gone) are re-parented to us."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36  # <linux/prctl.h>
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0


def _is_rank(proc, me) -> bool:
    """A rank is a child of DeepSpeed's per-node launcher (`python -m deepspeed.launcher.launch`), which
    is never this process (whose own command line may name that launcher)."""
    import psutil

    try:
        parent = proc.parent()
        return parent is not None and parent.pid != me.pid and PER_NODE_LAUNCHER in parent.cmdline()
    except psutil.Error:  # gone, or a zombie
        return False


def _descendants(me) -> list:
    """Every process below us, zombies included: an exited rank counts until it is reaped here, so that
    none is left in the process group when we exit."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return me.children(recursive=True)
    return []


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.launcher [--stop-timeout S] [--name N] -- COMMAND ...` (launch/node.sh)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.launcher",
        description="Run a launcher command; on SIGTERM wait for its ranks to save and exit (`supervise`).",
    )
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S)
    parser.add_argument("--name", default="launcher", help="how messages name this process")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the command to run after --")
    return supervise(cmd, args.stop_timeout, args.name)


if __name__ == "__main__":
    sys.exit(main())
