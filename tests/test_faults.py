"""Faults a long run must survive: kill -9 inside a checkpoint save, a NaN/inf loss, a full disk during a
save, and a tokenizer that does not match the model (refused before any process group starts).

Kill during data prep (identical shards after a rerun) is covered by tests/test_prep_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from launching import REPO, TINY_CONFIG, TRAIN, launch

from data_prep.faults import FAULT_ENV, fault_spec, pause_banner
from pipeline.cli import main as upcycle
from pipeline.errors import UserError

NO_EVAL = ("--output.eval_interval", "0")


def latest(workspace, out) -> str:
    return (workspace / out / "checkpoints" / "latest").read_text().strip()


def wait_for(path, text, timeout=240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path}")


def finish(proc, timeout=240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_finite_checkpoint(workspace, out, tag):
    from pipeline.config import read_hf_config
    from pipeline.export import load_training_state

    _, config = read_hf_config(workspace / "moe")
    state = load_training_state(workspace / out / "checkpoints" / tag, config)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_mismatched_tokenizer_is_refused_before_start(train_workspace, tmp_path):
    workspace = train_workspace
    from pipeline.preflight import prepare

    data, out = str(workspace / "data"), str(tmp_path / "o")
    args = ["--config", TINY_CONFIG, "--data.path", data, "--output.dir", out]
    # 1. A model whose vocabulary is smaller than the data's ids.
    shape = ["--hidden-size", "64", "--intermediate-size", "128", "--layers", "2", "--heads", "4"]
    assert upcycle(["init", "--out", str(tmp_path / "small"), "--vocab-size", "256", *shape]) == 0
    assert upcycle(["convert", "--dense", str(tmp_path / "small"), "--out", str(tmp_path / "small_moe"),
                    "--experts", "8", "--top-k", "2"]) == 0  # fmt: skip
    with pytest.raises(UserError, match="vocabulary of 384 tokens.*vocab_size 256"):
        prepare([*args, "--model.path", str(tmp_path / "small_moe")], world_size=2)
    # 2. Same size, other tokenizer: ids mean other tokens. Trained on the corpus with every text reversed.
    corpus = tmp_path / "reversed.jsonl"
    lines = (workspace / "corpus.jsonl").read_text().splitlines()
    corpus.write_text("".join(json.dumps({"text": json.loads(x)["text"][::-1]}) + "\n" for x in lines))
    assert upcycle(["prep", "tokenizer", "--input", str(corpus), "--vocab-size", "384",
                    "--out", str(tmp_path / "tok2")]) == 0  # fmt: skip
    other = tmp_path / "other_moe"
    (other).mkdir()
    for f in (workspace / "moe").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer.json").write_bytes((tmp_path / "tok2" / "tokenizer.json").read_bytes())
    with pytest.raises(UserError, match="vocabulary differs from the model's"):
        prepare([*args, "--model.path", str(other)], world_size=2)
    # The matching tokenizer passes; through the real entry point the refusal is exit code 2, no ranks.
    prepare([*args, "--model.path", str(workspace / "moe")], world_size=2)
    result = subprocess.run(
        [sys.executable, TRAIN, *args, "--model.path", str(other)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 2 and "vocabulary differs" in result.stderr


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous(train_workspace, monkeypatch):
    workspace = train_workspace
    steps = ("--train.steps", "6", "--output.checkpoint_interval", "2", *NO_EVAL)
    monkeypatch.setenv(FAULT_ENV, fault_spec("checkpoint.before_latest", 4, "pause"))
    proc = launch(workspace, "killsave", *steps, wait=False)
    try:
        wait_for(workspace / "killsave.log", pause_banner("checkpoint.before_latest", 4))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = workspace / "killsave" / "checkpoints"
    assert latest(workspace, "killsave") == "step_00000002"
    assert (ckpt / "step_00000004").is_dir() and not (ckpt / "step_00000004" / "run_state.json").exists()
    monkeypatch.delenv(FAULT_ENV)
    launch(workspace, "killsave", *steps)  # the same command resumes from the previous checkpoint
    log = (workspace / "killsave.log").read_text()
    assert "removed incomplete checkpoint step_00000004" in log
    assert "resumed from step_00000002" in log
    assert latest(workspace, "killsave") == "step_00000006"
    state = json.loads((ckpt / "step_00000006" / "run_state.json").read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 6 * 8


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(train_workspace):
    workspace = train_workspace
    # A real trigger: lr 1e30 makes the first update blow the weights up, the next loss is not finite.
    args = ("--train.steps", "6", "--train.lr", "1e30", "--train.min_lr", "1e29", "--train.warmup_steps", "1",
            "--output.checkpoint_interval", "1", *NO_EVAL)  # fmt: skip
    proc = launch(workspace, "nan", *args, wait=False)
    assert finish(proc) != 0
    log = (workspace / "nan.log").read_text()
    assert "non-finite training values at step" in log and "Stopped without saving" in log
    bad_step = int(log.split("non-finite training values at step ")[1].split(":")[0])
    rows = [json.loads(x) for x in (workspace / "nan" / "train_log.jsonl").read_text().splitlines()]
    assert rows and all(r["step"] < bad_step for r in rows)
    tag = latest(workspace, "nan")
    assert int(tag.removeprefix("step_")) < bad_step
    assert not (workspace / "nan" / "checkpoints" / f"step_{bad_step:08d}").exists()
    assert_finite_checkpoint(workspace, "nan", tag)


@pytest.mark.slow
def test_full_disk_during_save_fails_clearly(train_workspace):
    workspace = train_workspace
    mount = workspace / "small_fs"
    mount.mkdir()
    # Room for one checkpoint (~7.3 MiB) but not two.
    cmd = ["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mount)]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        (workspace / "diskfull").mkdir()
        (workspace / "diskfull" / "checkpoints").symlink_to(mount)
        proc = launch(workspace, "diskfull", "--train.steps", "4", "--output.checkpoint_interval", "2",
                      *NO_EVAL, wait=False)  # fmt: skip
        assert finish(proc) != 0
        log = (workspace / "diskfull.log").read_text()
        ckpt = workspace / "diskfull" / "checkpoints"
        assert f"not enough free space to save checkpoint {ckpt}/step_00000004" in log
        assert "latest still names step_00000002" in log
        assert latest(workspace, "diskfull") == "step_00000002"
        assert not (mount / "step_00000004").exists()
        assert_finite_checkpoint(workspace, "diskfull", "step_00000002")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_write_error_during_save_names_the_directory(tmp_path):
    """The other path: the file system fails mid-write (ENOSPC from the OS). One gloo rank, a fake engine."""
    import torch.distributed as dist

    from pipeline import checkpointing

    class FullDisk:
        def save_checkpoint(self, save_dir, tag, save_latest):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            raise OSError(28, "No space left on device")

    root = tmp_path / "out" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "run_state.json").write_text("{}")
    (root / "latest").write_text("step_00000002")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(UserError) as info:
            checkpointing.save(FullDisk(), tmp_path / "out", 4, {"step": 4}, keep=2)
    finally:
        dist.destroy_process_group()
    message = str(info.value)
    assert str(root / "step_00000004") in message and "No space left on device" in message
    assert "latest still names step_00000002" in message
    assert (root / "latest").read_text() == "step_00000002"
