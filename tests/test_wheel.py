"""Packaging: the wheel carries its package data (ds_configs/, launch/configs/) and nothing else, and an
installed wheel runs the whole workflow from any folder; `--config NAME` takes a shipped run config
(docs/design.md §8)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from launching import free_port

from pipeline.errors import UserError
from pipeline.resources import ds_config_template, run_config_text, shipped_run_configs
from pipeline.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
RUN_CONFIGS = sorted(p.name for p in (REPO / "launch" / "configs").glob("*.yaml"))

# ---- --config NAME ------------------------------------------------------------------------------------


def test_shipped_run_configs_are_launch_configs():
    assert shipped_run_configs() == [name.removesuffix(".yaml") for name in RUN_CONFIGS]
    assert {"tiny_cpu", "multi_gpu", "quickstart"} <= set(shipped_run_configs())


@pytest.mark.parametrize("name", [n.removesuffix(".yaml") for n in RUN_CONFIGS])
def test_config_name_reads_the_shipped_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names do not depend on the working folder
    by_path = load_run_config(str(REPO / "launch" / "configs" / f"{name}.yaml"), [])
    assert load_run_config(name, []) == by_path
    overridden = load_run_config(name, ["--train.steps", "3", "--model.path", "m"])
    assert (overridden.train.steps, overridden.model.path) == (3, "m")


@pytest.mark.parametrize("name", [n.removesuffix(".json") for n in DS_CONFIGS])
def test_ds_config_templates_are_readable(name):
    assert ds_config_template(name) == json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_cpu").write_text("train:\n  steps: 7\n")
    assert load_run_config("tiny_cpu", []).train.steps == 7
    assert run_config_text("tiny_cpu")[1] == "tiny_cpu"


@pytest.mark.parametrize("config", ["nope", "tiny_cpu.yaml", "configs/tiny_cpu", "missing/dir.yaml", "."])
def test_unknown_config_names_the_flag_and_the_shipped_configs(config, tmp_path, monkeypatch):
    """A name has no suffix and no directory: those are paths, and a missing path is an error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_run_config(config, [])
    message = str(info.value)
    assert message.startswith(f"--config {config}: ")
    assert ("is not a file" if config == "." else "no such file") in message
    assert all(name in message for name in shipped_run_configs())


@pytest.mark.parametrize(
    "text, message",
    [("train: [1, 2", "invalid YAML"), ("- a list\n", "must be a mapping"), ("train: 5\n", "not a mapping")],
)
def test_bad_config_files_name_the_flag(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"{message}") as info:
        load_run_config(str(path), ["--train.steps", "2"])
    assert "--config" in str(info.value) or "--train.steps" in str(info.value)


def test_an_empty_config_file_is_all_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_run_config(str(tmp_path / "empty.yaml"), []) == load_run_config(None, [])


# ---- the wheel ----------------------------------------------------------------------------------------

# Written as sitecustomize.py next to the installed wheel: every process of the run (the CLI, the
# deepspeed launcher, its ranks) inherits PYTHONPATH and so runs it first. It removes the way back to the
# repository (an editable install's finder, which would otherwise supply pipeline.ds_configs from the
# checkout if the wheel lacked it) and logs where each of our modules is found.
SHIM = """
import os, sys
from importlib.machinery import PathFinder
from pathlib import Path

REPO, LOG = Path({repo!r}), {log!r}
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if not Path(os.path.abspath(p or ".")).is_relative_to(REPO)]


class RecordOrigins:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ("pipeline", "data_prep"):
            spec = PathFinder.find_spec(fullname, path)
            with open(LOG, "a") as log:
                log.write(f"{{os.getpid()}} {{fullname}} {{spec.origin if spec else None}}\\n")
        return None


sys.meta_path.insert(0, RecordOrigins)
"""

IGNORED = ("__pycache__", "*.egg-info", ".git", "build", "dist", "runs", ".venv", ".*_cache", "wheelhouse")


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the checkout: an in-tree build would reuse (and pollute) REPO/build."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*IGNORED))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True)
    (wheel,) = dist.glob("moe_upcycle-*.whl")
    return wheel


def check_wheel_contents(wheel: Path, src: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    # No stray top-level packages (tests, bench, launch, docs ...): only ours.
    assert {n.split("/")[0] for n in names} == {"pipeline", "data_prep", dist_info}
    # Every module of the checkout, and the package data under its package names.
    for package in ("pipeline", "data_prep"):
        modules = {str(p.relative_to(src)) for p in (src / package).glob("*.py")}
        assert modules <= set(names), modules - set(names)
    assert sorted(n.split("/")[-1] for n in names if n.startswith("pipeline/ds_configs/")) == sorted(
        ["__init__.py", *DS_CONFIGS]
    )
    assert sorted(n.split("/")[-1] for n in names if n.startswith("pipeline/run_configs/")) == sorted(
        ["__init__.py", *RUN_CONFIGS]
    )
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"upcycle": "pipeline.cli:main"}


@pytest.mark.slow
def test_installed_wheel_runs_the_workflow_outside_the_repository(tmp_path):
    """Build, install (not editable) and run prep -> init -> convert -> train (`--config tiny_cpu`, 2 ranks)
    -> export from a folder outside the checkout, with only the wheel's code importable."""
    wheel = build_wheel(tmp_path)
    check_wheel_contents(wheel, tmp_path / "src")

    target, shim, work = tmp_path / "site", tmp_path / "shim", tmp_path / "work"
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
         "--target", target, wheel],
        check=True,
    )  # fmt: skip
    upcycle = target / "bin" / "upcycle"
    assert upcycle.is_file(), "the wheel installs no `upcycle` console script"
    origins = tmp_path / "origins.log"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM.format(repo=str(REPO), log=str(origins)))
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)
    env = {
        **os.environ,
        "PYTHONPATH": f"{target}{os.pathsep}{shim}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }

    def run(*args: str, timeout: int = 300) -> str:
        started = time.perf_counter()
        proc = subprocess.run(
            [str(upcycle), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        print(
            f"upcycle {args[0]} {args[1] if args[0] == 'prep' else ''}: {time.perf_counter() - started:.1f} s"
        )
        assert proc.returncode == 0, (
            f"upcycle {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc.stdout

    probe = (
        "import json, pipeline, pipeline.resources as r\n"
        "data = r.resources.files(r.DS_CONFIGS)\n"
        "print(json.dumps([pipeline.__file__, str(data), r.shipped_run_configs()]))"
    )
    probe = subprocess.run(
        [sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, check=True
    )
    package_file, ds_configs, shipped = json.loads(probe.stdout)
    assert Path(package_file).is_relative_to(target) and Path(ds_configs).is_relative_to(target)
    assert shipped == [name.removesuffix(".yaml") for name in RUN_CONFIGS]

    run("prep", "corpus", "--out", "corpus.jsonl", "--max-mb", "1")
    run("prep", "tokenizer", "--input", "corpus.jsonl", "--vocab-size", "384", "--out", "tok")
    run("prep", "tokenize", "--input", "corpus.jsonl", "--tokenizer", "tok", "--out", "data",
        "--valid-fraction", "0.05", "--no-progress")  # fmt: skip
    run("init", "--out", "dense", "--tokenizer", "tok", "--hidden-size", "64", "--intermediate-size", "128",
        "--layers", "2", "--heads", "4", "--kv-heads", "2")  # fmt: skip
    run("convert", "--dense", "dense", "--out", "moe", "--experts", "8", "--top-k", "2")
    run("train", "--config", "tiny_cpu", "--nproc", "2", "--master-port", str(free_port()),
        "--model.path", "moe", "--data.path", "data", "--output.dir", "train", "--train.steps", "2",
        "--output.eval_interval", "0", "--output.checkpoint_interval", "0", "--data.eval_batches", "1",
        timeout=240)  # fmt: skip
    steps = [
        json.loads(line)["step"] for line in (work / "train" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == 2
    run("export", "--checkpoint", "train", "--out", "hf")

    # Every process (CLI, launcher, both ranks) found each of our modules, package data included, in the
    # installed wheel and nowhere else.
    records = [line.split(" ", 2) for line in origins.read_text().splitlines()]
    outside = {(name, origin) for _, name, origin in records if not Path(origin).is_relative_to(target)}
    assert not outside, outside
    assert {"pipeline.ds_configs", "pipeline.run_configs"} <= {name for _, name, _ in records}
    assert len({pid for pid, name, _ in records if name == "pipeline.train"}) >= 2  # the ranks

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 8
    assert config["num_experts_per_tok"] == 2
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.arange(16).remainder(vocab)[None]).logits
    assert logits.shape == (1, 16, vocab) and torch.isfinite(logits).all()
