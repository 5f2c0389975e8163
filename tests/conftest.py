"""Shared fixtures, and the markers every test gets from what it does (helpers/marking.py).

Helpers live in tests/helpers (on pytest's pythonpath: `from launching import launch`); no test module
imports from another test module or from this file.
"""

from __future__ import annotations

import os

import marking
import ports
import pytest
import torch
from hf_models import save_hf_model
from sharing import build_once, shared_root
from workspace import (
    INPUTS,
    clipped_run_in,
    copy_inputs,
    fingerprint,
    prepare_train_workspace,
    reference_run_in,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


# tryfirst: before `-m` deselects by the markers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    marking.mark_items(items)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_deepspeed_shm():
    """Tests kill ranks on purpose; a killed rank cannot unlink DeepSpeed's ~67 MB CPU all-reduce segment
    in /dev/shm (RAM). Remove the ones of the runs this process started (by their ports), so repeated
    test runs do not fill memory and runs of other processes (parallel workers) keep theirs."""
    from pipeline.ds_adapter import remove_leftover_shm

    yield
    for port in ports.HANDED_OUT:
        remove_leftover_shm(port)


@pytest.fixture(scope="session")
def dense_llama(tmp_path_factory):
    """(directory, transformers model) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("dense_llama")
    return path, save_hf_model("llama", path)


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory):
    """The test run's one `prepare_train_workspace` (shared by parallel workers); read-only: use
    `train_workspace`, a copy."""
    root = shared_root(tmp_path_factory) / "train_inputs"

    def build():
        root.mkdir()
        prepare_train_workspace(root)

    build_once(root, build)
    before = fingerprint(root, INPUTS)
    yield root
    assert fingerprint(root, INPUTS) == before, f"a test wrote into the shared inputs in {root}"


@pytest.fixture(scope="module")
def train_workspace(train_inputs, tmp_path_factory, request):
    """This module's copy of the prepared workspace (corpus.jsonl, tok, data, dense, moe): its runs go to
    workspace/<out> (launching.launch), out of sight of other modules' runs of the same name."""
    return copy_inputs(train_inputs, tmp_path_factory.mktemp(f"train_{request.module.__name__}"))


@pytest.fixture(scope="session")
def reference_run(train_inputs):
    """The test run's uninterrupted reference run (workspace.REFERENCE); read-only: start from a copy of it
    (workspace.copy_run)."""
    run = reference_run_in(train_inputs)
    before = fingerprint(run.dir)
    yield run
    assert fingerprint(run.dir) == before, f"a test wrote into the reference run {run.dir}; copy_run it"


@pytest.fixture(scope="session")
def clipped_runs(train_inputs):
    """(precision, zero_stage, ep_size) -> output.dir of that clipped run (workspace.CLIPPED), trained on
    first request; read-only."""
    return lambda precision, zero_stage, ep_size: clipped_run_in(train_inputs, precision, zero_stage, ep_size)
