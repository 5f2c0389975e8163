"""Multi-node training for real: two hosts with their own addresses, joined by a network link.

The hosts are two Linux network namespaces joined by a veth pair (tests/helpers/netns.py): each has its own
network stack and address, and the only way between them is the link, as between two cluster nodes.
On each host the DeepSpeed launcher runs with the shared hostfile and `--no_ssh --node_rank i`
(launch/node.sh, what launch/slurm.sbatch runs on each node; there is no SSH between namespaces), one
rank per host, EP=2, so the expert all-to-all, the gradient all-reduce and the rendezvous on host 0's
address all cross the link. Both hosts write into one output.dir, as on a cluster with a shared
filesystem. launch/mpirun.sh is run once, on host 0: Open MPI starts host 1's rank through an ssh
stand-in that enters host 1's namespace (Hosts.ssh_agent).

Needs root (CI runs as root); elsewhere the tests skip with the reason. UPCYCLE_REQUIRE_NETNS=1 turns
that skip into a failure. Runs are shared between tests: the launches cost ~20 s each on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import REPO, TINY_CONFIG, TRAIN, launch, losses, run_paths
from netns import Hosts, Unavailable, two_hosts, unavailable_reason

pytestmark = pytest.mark.slow

# Constant lr after warmup: a run's losses do not depend on train.steps, so runs of different lengths
# can be compared step by step.
STEPS = 8
COMMON = (
    "--train.steps",
    str(STEPS),
    "--train.schedule",
    "constant",
    "--output.checkpoint_interval",
    "4",
    "--output.eval_interval",
    "0",
    "--parallel.ep_size",
    "2",
)
KILL_TIMEOUT_S = 30  # parallel.timeout_s of the run whose host-1 process is killed
CUT_TIMEOUT_S = 20  # parallel.timeout_s of the run whose network link is cut
STOP_SLACK_S = 40  # beyond the timeout: error handling, interpreter and launcher exit on a loaded machine
REPORT: dict = {}  # measurements, printed at the end of the module (pytest -s) and written to a file


def _unavailable(reason: str):
    if os.environ.get("UPCYCLE_REQUIRE_NETNS") == "1":
        pytest.fail(f"two-host tests required (UPCYCLE_REQUIRE_NETNS=1) but unavailable: {reason}")
    pytest.skip(f"two-host tests: {reason}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        _unavailable(reason)
    with contextlib.ExitStack() as stack:
        try:
            made = stack.enter_context(two_hosts(tmp_path_factory.mktemp("hosts")))
        except Unavailable as exc:
            _unavailable(str(exc))
        yield made
    assert not Path(f"/run/netns/{made.namespaces[0]}").exists(), "namespace left behind"


_ports = iter(range(29600, 29700))


def start_two_hosts(hosts: Hosts, train_workspace: Path, out: str, *overrides: str) -> list[subprocess.Popen]:
    """The same command on both hosts, as a cluster user types it on each node: launch/node.sh, i.e.
    `deepspeed --hostfile H --no_ssh --node_rank i --master_addr ADDR pipeline/train.py ...`."""
    port = str(next(_ports))
    procs = []
    for node in (0, 1):
        cmd = [
            "bash",
            str(REPO / "launch" / "node.sh"),
            TINY_CONFIG,
            *run_paths(train_workspace, out),
            *overrides,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(
            HOSTFILE=str(hosts.hostfile),
            NODE_RANK=str(node),
            MASTER_ADDR=hosts.master_addr,
            MASTER_PORT=port,
            GLOO_SOCKET_IFNAME=hosts.interfaces[node],
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
        )
        procs.append(hosts.popen(node, cmd, env, train_workspace / f"{out}.host{node}.log", cwd=str(REPO)))
    return procs


def wait_all(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [proc.returncode for proc in procs]


def host_log(train_workspace: Path, out: str, node: int) -> str:
    return (train_workspace / f"{out}.host{node}.log").read_text()


def wait_for_checkpoint(train_workspace: Path, out: str, tag: str, procs, timeout: float = 240) -> None:
    latest = train_workspace / out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text().strip() == tag):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            wait_all(procs, 1)
            pytest.fail(f"{out}: {tag} never became latest\n{host_log(train_workspace, out, 0)[-3000:]}")
        time.sleep(0.05)


def rank_process(hosts: Hosts, node: int) -> int:
    """The training process on `node` (not its launchers)."""
    for pid in hosts.pids(node):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if TRAIN in argv and any(a.startswith("--local_rank") for a in argv):
                if "deepspeed.launcher.launch" not in argv:
                    return pid
    raise AssertionError(f"no training process on host {node}: {hosts.pids(node)}")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its launcher to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def single(train_workspace) -> dict[int, float]:
    """The reference: step -> loss of a 2-rank run on one host (loopback), the DeepSpeed launcher."""
    started = time.monotonic()
    launch(train_workspace, "single", *COMMON)
    REPORT["single_host_launch_s"] = round(time.monotonic() - started, 1)
    return losses(train_workspace, "single")


@pytest.fixture(scope="module")
def runs(hosts, train_workspace, single):
    """A two-host run whose host-1 process is killed after the step-4 checkpoint, then the same command
    again on both hosts (resumes and finishes); compared with the single-host reference run."""
    traffic_before = [hosts.traffic(n) for n in (0, 1)]
    overrides = (*COMMON, "--parallel.timeout_s", str(KILL_TIMEOUT_S))
    procs = start_two_hosts(hosts, train_workspace, "twohost", *overrides)
    wait_for_checkpoint(train_workspace, "twohost", "step_00000004", procs)
    victim, survivor = rank_process(hosts, 1), rank_process(hosts, 0)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    survivor_exit_s = None
    while procs[0].poll() is None and time.monotonic() - killed_at < KILL_TIMEOUT_S + STOP_SLACK_S:
        if survivor_exit_s is None and not running(survivor):
            survivor_exit_s = time.monotonic() - killed_at  # the training process itself
        time.sleep(0.05)
    stop_s = time.monotonic() - killed_at  # host 0's launcher, i.e. the node's whole job
    codes = wait_all(procs, 30)
    traffic_after = [hosts.traffic(n) for n in (0, 1)]
    before_rerun = {
        "losses": losses(train_workspace, "twohost"),
        "latest": (train_workspace / "twohost" / "checkpoints" / "latest").read_text().strip(),
        "files": {p.name for p in (train_workspace / "twohost" / "checkpoints" / "step_00000004").iterdir()},
        "log0": host_log(train_workspace, "twohost", 0),
        "codes": codes,
        "stop_s": stop_s,
        "left": [hosts.pids(0), hosts.pids(1)],
    }
    REPORT["survivor_stop_after_kill_s"] = {
        "training_process": survivor_exit_s and round(survivor_exit_s, 2),
        "launcher": round(stop_s, 2),
    }

    started = time.monotonic()
    rerun = wait_all(start_two_hosts(hosts, train_workspace, "twohost", *overrides), 300)
    REPORT["two_host_rerun_s"] = round(time.monotonic() - started, 1)
    assert rerun == [0, 0], (
        host_log(train_workspace, "twohost", 0)[-3000:] + host_log(train_workspace, "twohost", 1)[-2000:]
    )
    return {
        "single": single,
        "before_rerun": before_rerun,
        "after_rerun": losses(train_workspace, "twohost"),
        "traffic": [(a[0] - b[0], a[1] - b[1]) for a, b in zip(traffic_after, traffic_before, strict=True)],
        "dir": train_workspace / "twohost",
    }


def test_two_hosts_train_like_one(runs, hosts):
    """Steps 1-4 of the two-host run (before any fault) equal the single-host 2-rank run, and the traffic
    went over the link: both veth ends sent and received megabytes (all-to-all, all-reduce)."""
    single, two = runs["single"], runs["before_rerun"]["losses"]
    for step in range(1, 5):
        assert two[step] == pytest.approx(single[step], abs=1e-6), step
    REPORT["loss_match"] = {s: (single[s], two[s]) for s in range(1, 5)}
    REPORT["max_abs_loss_diff_steps_1_4"] = max(abs(single[s] - two[s]) for s in range(1, 5))
    for node, (sent, received) in enumerate(runs["traffic"]):
        assert sent > 1_000_000 and received > 1_000_000, (node, sent, received)
    REPORT["veth_bytes_sent_received"] = runs["traffic"]
    log0 = runs["before_rerun"]["log0"]
    assert "nnodes=2" in log0 and "dist_world_size=2" in log0  # the launcher's hostfile path
    assert f"'{hosts.addresses[0]}': [0], '{hosts.addresses[1]}': [1]" in log0


def test_each_host_writes_its_checkpoint_parts(runs):
    """Every rank's shard is in the checkpoints: the one written before the fault and the final one.

    Under EP=2 rank 1 (host 1) owns experts 4-7 of every layer and its half of the ZeRO-2 optimizer."""
    final = {p.name for p in (runs["dir"] / "checkpoints" / f"step_{STEPS:08d}").iterdir()}
    for files in (runs["before_rerun"]["files"], final):
        for rank in (0, 1):
            assert f"rng_rank{rank}.pt" in files
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        for layer in (0, 1):
            for expert in range(8):
                assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in files
        assert {"mp_rank_00_model_states.pt", "run_state.json"} <= files


def test_survivor_stops_when_its_peer_is_killed(runs, hosts):
    """SIGKILL of the training process on host 1: host 0 exits non-zero, within parallel.timeout_s (plus
    slack for exiting), with a message naming the likely cause, not a bare traceback; nothing is left."""
    before = runs["before_rerun"]
    assert before["stop_s"] < KILL_TIMEOUT_S + STOP_SLACK_S, before["stop_s"]
    assert before["codes"][0] != 0 and before["codes"][1] != 0, before["codes"]
    log0 = before["log0"]
    assert "train (rank 0): error: lost contact with the other ranks" in log0, log0[-3000:]
    assert "a peer process died" in log0 and f"parallel.timeout_s={KILL_TIMEOUT_S}" in log0
    assert "exits with return code = 3" in log0  # the trainer's own exit code, seen by the launcher
    assert "Traceback" not in log0, log0[-3000:]
    assert before["left"] == [[], []], before["left"]


def test_rerun_resumes_on_both_hosts(runs):
    """The same command again on both hosts resumes from the last complete checkpoint (step 4) and
    finishes with the single-host run's losses: rank 1 restored its experts, optimizer shard and RNG."""
    assert runs["before_rerun"]["latest"] == "step_00000004"
    log0 = (runs["dir"].parent / "twohost.host0.log").read_text()
    assert "resumed from step_00000004" in log0
    single, resumed = runs["single"], runs["after_rerun"]
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(single[step], abs=1e-6), step
    REPORT["max_abs_loss_diff_after_resume"] = max(abs(single[s] - resumed[s]) for s in single)


def test_survivor_stops_after_timeout_when_the_network_is_cut(hosts, train_workspace):
    """Host 1's link goes down mid-run: no connection reset reaches host 0, so only the collective timeout
    (parallel.timeout_s, also on DeepSpeed's expert/data-parallel groups) can stop it, and it does."""
    procs = start_two_hosts(
        hosts,
        train_workspace,
        "cut",
        *COMMON,
        "--train.steps",
        "500",
        "--parallel.timeout_s",
        str(CUT_TIMEOUT_S),
    )
    try:
        wait_for_checkpoint(train_workspace, "cut", "step_00000004", procs)
        cut_at = time.monotonic()
        hosts.set_link(1, up=False)
        try:
            procs[0].wait(timeout=CUT_TIMEOUT_S + STOP_SLACK_S)
        except subprocess.TimeoutExpired:
            pass
        stop_s = time.monotonic() - cut_at
    finally:
        codes = wait_all(procs, 60)
        hosts.set_link(1, up=True)
    REPORT["survivor_stop_after_cut_s"] = round(stop_s, 2)
    log0 = host_log(train_workspace, "cut", 0)
    assert CUT_TIMEOUT_S * 0.9 < stop_s < CUT_TIMEOUT_S + STOP_SLACK_S, (stop_s, log0[-3000:])
    assert codes[0] != 0
    assert "lost contact with the other ranks" in log0 and "Timed out" in log0, log0[-3000:]


def test_mpirun_two_hosts_train_like_one(hosts, train_workspace, single, tmp_path):
    """launch/mpirun.sh with a two-host hostfile, started on host 0: Open MPI starts the rank on host 1
    itself, through its plm_ssh_agent (here an ssh stand-in that runs the command in host 1's namespace,
    `Hosts.ssh_agent`), one rank per host, EP=2 across the link. NETWORK (the link's subnet) pins Open MPI's
    daemons and each node's gloo interface, which has another name on each host; the rendezvous is host
    0's address from the hostfile. Every step's loss equals the single-host 2-rank run's."""
    if shutil.which("unshare") is None:
        _unavailable("needs unshare (util-linux) to give each namespace host its own hostname")
    port = str(next(_ports))
    agent = hosts.ssh_agent(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(
        NP="2",
        HOSTFILE=str(hosts.hostfile),
        NETWORK=hosts.network,
        MASTER_PORT=port,
        MPIRUN_ARGS=f"--mca plm_ssh_agent {agent}",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    env.pop("MASTER_ADDR", None)  # the first host of the hostfile
    cmd = [
        "bash",
        str(REPO / "launch" / "mpirun.sh"),
        TINY_CONFIG,
        *run_paths(train_workspace, "mpi"),
        *COMMON,
    ]
    traffic_before = [hosts.traffic(n) for n in (0, 1)]
    started = time.monotonic()
    proc = hosts.popen(0, hosts.with_hostname(0, cmd), env, train_workspace / "mpi.log", cwd=str(REPO))
    code = wait_all([proc], 300)[0]
    REPORT["mpirun_two_hosts_s"] = round(time.monotonic() - started, 1)
    log = (train_workspace / "mpi.log").read_text()
    assert code == 0, log[-3000:]
    traffic_after = [hosts.traffic(n) for n in (0, 1)]
    traffic = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(traffic_after, traffic_before, strict=True)]

    two = losses(train_workspace, "mpi")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(single[step], rel=1e-6, abs=0), step
    REPORT["mpirun_max_abs_loss_diff"] = max(abs(single[s] - two[s]) for s in single)
    REPORT["mpirun_losses_bitwise_equal"] = two == single
    for node, (sent, received) in enumerate(traffic):
        assert sent > 1_000_000 and received > 1_000_000, (node, sent, received)
    REPORT["mpirun_veth_bytes_sent_received"] = traffic
    # The launcher's settings, and each node's own hostname and interface (resolved from NETWORK there).
    master = f"{hosts.addresses[0]}:{port}"
    assert f"mpirun.sh: 2 ranks on {hosts.hostfile}, master {master}, interface {hosts.network}" in log
    for node in (0, 1):
        ns = hosts.namespaces[node]
        assert f"node {ns} runs 1 of the 2 ranks (its local rank 0 is rank {node}), interface {ns}" in log
    final = {p.name for p in (train_workspace / "mpi" / "checkpoints" / f"step_{STEPS:08d}").iterdir()}
    assert {"rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= final
    assert "layer_1_expert_7_mp_rank_00_model_states.pt" in final  # rank 1's experts (4-7)
    deadline = time.monotonic() + 10  # host 1's Open MPI daemon exits after mpirun
    while (hosts.pids(0) or hosts.pids(1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [hosts.pids(0), hosts.pids(1)] == [[], []]


@pytest.fixture(scope="module", autouse=True)
def report(tmp_path_factory):
    yield
    if REPORT:
        text = json.dumps(REPORT, indent=1, default=str)
        print(f"\ntwo-host measurements:\n{text}")
        (tmp_path_factory.getbasetemp() / "multinode_report.json").write_text(text)
