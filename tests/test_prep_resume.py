"""prep tokenize survives SIGKILL at any point: the rerun finishes with byte-identical shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from corpora import make_documents, prep_outputs, tiny_tokenizer, write_jsonl

from data_prep.errors import UserError
from data_prep.faults import FAULT_ENV, fault_spec
from data_prep.tokenize_stage import STATE_FILE, TokenizeConfig, run_tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = tiny_tokenizer(str(root / "tok"))
    write_jsonl(str(root / "a.jsonl"), make_documents(300, seed=3))
    write_jsonl(str(root / "b.jsonl"), make_documents(200, seed=4))
    _prep_in_process(root, tok, "ref")
    return root, tok


def _prep_in_process(root, tok, out, inputs=None):
    """Reference runs and reruns after a kill need no subprocess: the kill is what must be real."""
    cfg = TokenizeConfig(
        inputs=inputs or [str(root / "*.jsonl")],
        tokenizer=tok,
        out=str(root / out),
        workers=2,
        shard_tokens=2500,
        valid_fraction=0.1,
        progress=False,
    )
    return run_tokenize(cfg)


def _prep_cmd(root, tok, out, workers: int) -> list[str]:
    """`prep tokenize` of the setup corpus into `out`, as its own process."""
    return [
        sys.executable, "-m", "data_prep.cli", "prep", "tokenize", "--input", str(root / "*.jsonl"),
        "--tokenizer", tok, "--out", str(out), "--workers", str(workers), "--shard-tokens", "2500",
        "--valid-fraction", "0.1", "--no-progress",
    ]  # fmt: skip


def _prep(root, tok, out, fault=None, workers=2):
    """`prep tokenize` as its own process; `fault` is an UPCYCLE_FAULT value (data_prep.faults)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        _prep_cmd(root, tok, root / out, workers), env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "point, step", [("prep.after_state", 0), ("prep.before_rename", 2), ("prep.after_rename", 4)]
)
def test_kill_and_rerun_gives_identical_output(setup, point, step, capsys):
    root, tok = setup
    out = f"k_{point}_{step}"
    killed = _prep(root, tok, out, fault=fault_spec(point, step, "kill"), workers=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(root / out / "manifest.json")
    state = json.load(open(root / out / STATE_FILE))
    assert len(state["steps"]) == (step + 1 if point == "prep.after_state" else step)
    _prep_in_process(root, tok, out)
    resumed = "resuming" in capsys.readouterr().err
    assert resumed == (len(state["steps"]) > 0)
    assert not [n for n in os.listdir(root / out) if n.endswith(".tmp")]
    assert prep_outputs(root / out) == prep_outputs(root / "ref")


def test_external_kill_at_a_random_moment(setup):
    root, tok = setup
    out = root / "ext"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = _prep_cmd(root, tok, out, workers=1)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "train_00003.bin").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _prep_in_process(root, tok, "ext")
    assert prep_outputs(out) == prep_outputs(root / "ref")


def test_changed_input_refuses_to_resume(setup, tmp_path):
    root, tok = setup
    write_jsonl(str(tmp_path / "c.jsonl"), ["new"])
    with pytest.raises(UserError, match="'inputs' differs.*--overwrite"):
        _prep_in_process(root, tok, "ref", inputs=[str(root / "*.jsonl"), str(tmp_path / "c.jsonl")])
    _prep_in_process(root, tok, "ref")  # the same arguments: complete, nothing to redo


def test_reading_from_any_record_equals_the_tail_of_a_full_read(tmp_path):
    """Resume restarts the reader at a record index; JSONL and Parquet (read through `datasets`) alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.sources import RecordReader, expand_inputs, fingerprint

    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "json {i}"}}\n' for i in range(3)))
    pq.write_table(pa.table({"text": [f"parquet {i}" for i in range(10)]}), tmp_path / "b.parquet")
    files = expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")])
    fingerprint(files)

    def read(start):
        return list(RecordReader(files, "text", 10**6, lambda *_: None).records(start))

    full = read(0)
    expected = [f"json {i}" for i in range(3)] + [f"parquet {i}" for i in range(10)]
    assert [text for _, _, text, _ in full] == expected
    for start in (2, 3, 7, 12, 13):
        assert read(start) == full[start:], start
