"""The training workspace of the tests and the session's reference run.

The workspace (a prepared tiny corpus, its tokenizer, a tiny dense model and its E8 top-2 upcycled version)
costs tens of seconds to build, so a session builds it once; each test module gets a copy of it
(tests/conftest.py: `train_workspace`), so that no module can see another's runs or edits.

The reference run is one uninterrupted training run, also made once per session. Tests that resume, damage
or re-shard a run start from a copy of it (`copy_run`) instead of training their own.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from launching import launch, losses
from sharing import build_once

INPUTS = ("corpus.jsonl", "tok", "data", "dense", "moe")


def prepare_train_workspace(root: Path) -> Path:
    """A prepared tiny corpus (`data`, tokenizer `tok`), a tiny dense model (`dense`) and its E8 top-2
    upcycled version (`moe`), in `root`."""
    from pipeline.cli import main as upcycle

    corpus = root / "corpus.jsonl"
    steps = [
        ["prep", "corpus", "--out", str(corpus), "--max-mb", "1"],
        ["prep", "tokenizer", "--input", str(corpus), "--vocab-size", "384", "--out", str(root / "tok")],
        ["prep", "tokenize", "--input", str(corpus), "--tokenizer", str(root / "tok"), "--out",
         str(root / "data"), "--valid-fraction", "0.05", "--no-progress"],
        ["init", "--out", str(root / "dense"), "--tokenizer", str(root / "tok"), "--hidden-size", "64",
         "--intermediate-size", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2"],
        ["convert", "--dense", str(root / "dense"), "--out", str(root / "moe"), "--experts", "8",
         "--top-k", "2"],
    ]  # fmt: skip
    for argv in steps:
        assert upcycle(argv) == 0, argv
    return root


def copy_inputs(source: Path, dest: Path) -> Path:
    """The prepared inputs of workspace `source` copied into `dest` (a few MB: cheaper than building)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in INPUTS:
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, dest / name)
    return dest


def fingerprint(root: Path, names=None) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file under `root` (or under its entries `names`): a write
    anywhere changes it."""
    tops = [root / n for n in names] if names is not None else [root]
    files = [f for top in tops for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file()]
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def run_args(settings: dict) -> tuple[str, ...]:
    """Run-config overrides as command-line arguments: {"train.steps": 12} -> ("--train.steps", "12")."""
    return tuple(arg for key, value in settings.items() for arg in (f"--{key}", str(value)))


# The reference run: tests/test_train.py checks that it learns and logs, and resumes a copy killed with
# SIGKILL; tests/test_checkpoint_integrity.py falls back from a damaged step 8 to step 4 and reproduces it;
# tests/test_elastic.py resumes its step 8 under other topologies. Everything else is tiny_cpu.yaml's
# (EP 2, ZeRO-2, 2 ranks, cosine schedule after 2 warmup steps: the learning rate differs at every step,
# so a resume that got the schedule's step wrong shows in the losses).
REFERENCE = {
    "train.steps": 12,
    "output.checkpoint_interval": 4,
    "output.keep_checkpoints": 0,  # all of step 4, 8 and 12 stay: resumes start from 4 or from 8
    "output.eval_interval": 6,
    "train.lr": 3e-3,  # enough for the loss to fall clearly within 12 steps
}
REFERENCE_OUT = "reference"


@dataclass(frozen=True)
class ReferenceRun:
    dir: Path  # the run's output.dir; read it, never write it (copy_run)
    args: tuple[str, ...]  # the overrides it ran with (on launching.TINY_CONFIG)
    losses: dict[int, float]


def reference_run_in(workspace: Path) -> ReferenceRun:
    """The reference run of `workspace`, trained with `upcycle train` (the convenience command) unless this
    or another test process did already."""
    args = run_args(REFERENCE)
    build_once(workspace / REFERENCE_OUT, lambda: launch(workspace, REFERENCE_OUT, *args, launcher="upcycle"))
    return ReferenceRun(workspace / REFERENCE_OUT, args, losses(workspace, REFERENCE_OUT))


# The clipped runs: tests/test_grad_clip.py compares each pair differing only in parallel.ep_size with each
# other and with a plain PyTorch run; tests/test_train.py takes the fp32 ones as its EP 1 / EP 2 / ZeRO-3
# "same math" runs, launched by each of the three launchers.
CLIP = 1e-6
CLIPPED = {
    "train.steps": 5,
    "train.grad_clip": CLIP,
    "train.lr": 1e-2,  # a large enough step for the loss to notice
    "train.min_lr": 1e-3,
    "output.checkpoint_interval": 0,
    "output.eval_interval": 0,  # validation only at the end
}
CLIPPED_LAUNCHERS = {("fp32", 2, 2): "deepspeed", ("fp32", 2, 1): "torchrun", ("fp32", 3, 2): "mpirun"}


def clipped_run_in(workspace: Path, precision: str, zero_stage: int, ep_size: int) -> Path:
    """The output.dir of the clipped run with these settings in `workspace`, trained unless this or another
    test process did already (its log: `<output.dir>.log`)."""
    out = f"clipped_{precision}_zero{zero_stage}_ep{ep_size}"
    settings = {**CLIPPED, "parallel.ep_size": ep_size, "parallel.zero_stage": zero_stage}
    args = run_args({**settings, "train.precision": precision})
    launcher = CLIPPED_LAUNCHERS.get((precision, zero_stage, ep_size), "torchrun")
    return build_once(workspace / out, lambda: launch(workspace, out, *args, launcher=launcher))


def copy_run(source: Path, dest: Path, at_step: int) -> Path:
    """Run directory `source` copied to `dest` as it was right after step `at_step` was saved: the later
    checkpoints and log rows are dropped and `latest` names step `at_step`."""
    shutil.copytree(source, dest)
    root = dest / "checkpoints"
    for step_dir in root.glob("step_*"):
        if int(step_dir.name.removeprefix("step_")) > at_step:
            shutil.rmtree(step_dir)
    tag = f"step_{at_step:08d}"
    assert (root / tag).is_dir(), f"{source} has no checkpoint {tag}"
    (root / "latest").write_text(tag)
    # The step logs (train_log.jsonl, val_loss.jsonl, ...) end where the checkpoint does, so that what a
    # resume logs is the only record of the later steps.
    for log in dest.glob("*.jsonl"):
        rows = [row for row in log.read_text().splitlines() if json.loads(row).get("step", 0) <= at_step]
        log.write_text("".join(row + "\n" for row in rows))
    return dest
