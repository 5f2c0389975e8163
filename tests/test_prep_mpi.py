"""`prep tokenize` under mpirun (data_prep/mpi_prep.py): the output is byte-identical to one process's.

Real `mpirun` ranks (Open MPI) on a 500-document corpus with --shard-tokens 2500: about 22 steps, the
2-rank split at record 250 falls inside a step, so that step is written from both ranks' spills. Also
across the two network-namespace hosts of tests/helpers/netns.py (skipped where they cannot be made, as in
tests/test_multinode.py), and after one rank is killed at a fault point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from corpora import make_documents, prep_outputs, tiny_tokenizer, write_jsonl
from launching import process_group_alive
from netns import Unavailable, two_hosts, unavailable_reason

from data_prep.faults import FAULT_ENV, fault_spec
from data_prep.mpi_prep import FAULT_RANK_ENV, SPILL_PREFIX
from data_prep.tokenize_stage import STATE_FILE, TokenizeConfig, run_tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_TOKENS = 2500
RANK_SPLIT = 250  # first record of rank 1 of 2 (500 records)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Corpus, tokenizer and the single-process reference output."""
    root = tmp_path_factory.mktemp("prep_mpi")
    tok = tiny_tokenizer(str(root / "tok"))
    write_jsonl(str(root / "a.jsonl"), make_documents(300, seed=3))
    write_jsonl(str(root / "b.jsonl"), make_documents(200, seed=4))
    run_tokenize(_config(root, tok, "ref"))
    return root, tok


def _config(root, tok, out) -> TokenizeConfig:
    return TokenizeConfig(
        inputs=[str(root / "*.jsonl")],
        tokenizer=tok,
        out=str(root / out),
        workers=1,
        shard_tokens=SHARD_TOKENS,
        valid_fraction=0.1,
        progress=False,
    )


def _prep_args(root, tok, out, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "data_prep.cli", "prep", "tokenize", "--input", str(root / "*.jsonl"),
        "--tokenizer", tok, "--out", str(root / out), "--workers", "1", "--shard-tokens", str(SHARD_TOKENS),
        "--valid-fraction", "0.1", "--no-progress", *extra,
    ]  # fmt: skip


def _mpirun_args(n: int) -> list[str]:
    root_flag = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    passed = ["-x", "PYTHONPATH", "-x", FAULT_ENV, "-x", FAULT_RANK_ENV]
    return ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none", *root_flag, *passed]


def _mpirun(root, tok, out, n=2, fault=None, fault_rank=None, extra=()):
    """`mpirun -n N ... prep tokenize` on this host; `fault` (UPCYCLE_FAULT) fires on `fault_rank` only."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env[FAULT_ENV] = fault or ""
    env[FAULT_RANK_ENV] = str(fault_rank) if fault_rank is not None else ""
    started = time.monotonic()
    proc = subprocess.Popen(
        _mpirun_args(n) + _prep_args(root, tok, out, *extra),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log, time.monotonic() - started, proc.pid


def _end_records(out) -> list[int]:
    with open(os.path.join(out, STATE_FILE)) as f:
        return [s["end_record"] for s in json.load(f)["steps"]]


def test_two_ranks_write_what_one_process_writes(corpus):
    root, tok = corpus
    code, log, seconds, _ = _mpirun(root, tok, "two")
    assert code == 0, log[-3000:]
    assert prep_outputs(root / "two") == prep_outputs(root / "ref")
    assert len(_end_records(root / "ref")) > 6
    assert RANK_SPLIT not in _end_records(root / "ref"), "no step crosses the ranks' boundary"
    assert "rank 0: wrote" in log and "rank 1: wrote" in log, log[-3000:]  # both ranks wrote steps
    assert not [n for n in os.listdir(root / "two") if n.startswith(SPILL_PREFIX) or n.endswith(".tmp")]
    print(f"mpirun -n 2 prep tokenize: {seconds:.1f} s")


def test_bad_argument_refused_once_before_anything_is_written(corpus):
    """Rank 0 validates and broadcasts the verdict: every rank exits 2, the message is printed once."""
    root, tok = corpus
    code, log, _, _ = _mpirun(root, tok, "bad", extra=("--shard-tokens", "0"))
    assert code == 2, log[-3000:]
    assert log.count("error: --shard-tokens 0: must be at least 1") == 1, log[-3000:]
    assert not (root / "bad").exists()


def test_kill_one_rank_then_rerun_gives_identical_output(corpus):
    """SIGKILL of rank 1 while it writes a step: mpirun stops the whole job (no rank waits for the dead
    one); the same command again reuses both ranks' complete spills and finishes identically."""
    root, tok = corpus
    step = len(_end_records(root / "ref")) - 3  # written by rank 1 (its first document is past record 250)
    fault = fault_spec("prep.before_rename", step, "kill")
    code, log, seconds, pgid = _mpirun(root, tok, "kill", fault=fault, fault_rank=1)
    assert code != 0, log[-3000:]
    assert seconds < 60 and not process_group_alive(pgid), log[-3000:]
    assert not (root / "kill" / "manifest.json").exists()
    assert [n for n in os.listdir(root / "kill") if n.startswith(SPILL_PREFIX)]
    code, log, _, _ = _mpirun(root, tok, "kill")
    assert code == 0, log[-3000:]
    assert log.count("already tokenized; reused") == 2, log[-3000:]
    assert prep_outputs(root / "kill") == prep_outputs(root / "ref")


def test_single_process_run_resumes_under_mpirun_with_three_ranks(corpus):
    """The state records a prefix of steps, as one process writes it: a killed one-process run
    continues under `mpirun -n 3` from its last step and ends byte-identical."""
    root, tok = corpus
    env = dict(os.environ, PYTHONPATH=ROOT, **{FAULT_ENV: fault_spec("prep.after_state", 4, "kill")})
    killed = subprocess.run(_prep_args(root, tok, "mixed"), env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert len(_end_records(root / "mixed")) == 5
    code, log, _, _ = _mpirun(root, tok, "mixed", n=3)
    assert code == 0, log[-3000:]
    assert "resuming" in log
    assert prep_outputs(root / "mixed") == prep_outputs(root / "ref")


def test_two_hosts_write_what_one_process_writes(corpus, tmp_path):
    """mpirun on host 0 starts rank 1 on host 1 (tests/helpers/netns.py: its own network namespace, reached
    through an ssh stand-in); MPI traffic crosses the veth link, and both hosts write into one --out,
    as on a cluster with a shared filesystem (the namespaces share this machine's)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"two-host test: {reason}")
    root, tok = corpus
    try:
        with two_hosts(tmp_path) as hosts:
            agent = hosts.ssh_agent(tmp_path)
            pin = ["--mca", "oob_tcp_if_include", hosts.network, "--mca", "btl_tcp_if_include", hosts.network]
            cmd = [*_mpirun_args(2), "--hostfile", str(hosts.hostfile), "--mca", "plm_ssh_agent", str(agent),
                   *pin, "-x", "PATH", *_prep_args(root, tok, "hosts")]  # fmt: skip
            env = dict(
                os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **{FAULT_ENV: "", FAULT_RANK_ENV: ""}
            )
            before = hosts.traffic(1)
            proc = hosts.popen(0, hosts.with_hostname(0, cmd), env, tmp_path / "hosts.log", cwd=ROOT)
            try:
                code = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            sent, received = (a - b for a, b in zip(hosts.traffic(1), before, strict=True))
    except Unavailable as exc:
        pytest.skip(f"two-host test: {exc}")
    log = (tmp_path / "hosts.log").read_text()
    assert code == 0, log[-3000:]
    assert sent > 10_000 and received > 10_000, (sent, received)  # the allgathered document lengths
    assert "rank 0: wrote" in log and "rank 1: wrote" in log, log[-3000:]
    assert prep_outputs(root / "hosts") == prep_outputs(root / "ref")
