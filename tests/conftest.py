"""Shared fixtures, and the markers every test gets from what it does (helpers/marking.py).

Helpers live in tests/helpers (on pytest's pythonpath: `from launching import launch`); no test module
imports from another test module or from this file.
"""

from __future__ import annotations

import contextlib
import glob
import os

import marking
import pytest
import torch
from hf_models import save_hf_model
from workspace import INPUTS, copy_inputs, fingerprint, launch_reference, prepare_train_workspace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


# tryfirst: before `-m` deselects by the markers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    marking.mark_items(items)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_deepspeed_shm():
    """Tests kill ranks on purpose; a killed rank cannot unlink DeepSpeed's ~67 MB CPU all-reduce segment
    in /dev/shm (RAM). Remove the ones this session made, so repeated test runs do not fill memory."""
    from pipeline.ds_adapter import shm_buffer_name

    pattern = "/dev/shm/" + shm_buffer_name("*", "*", "*")
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):
            os.unlink(path)


@pytest.fixture(scope="session")
def dense_llama(tmp_path_factory):
    """(directory, transformers model) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("dense_llama")
    return path, save_hf_model("llama", path)


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory):
    """The session's one `prepare_train_workspace`; read-only: use `train_workspace`, a copy."""
    root = prepare_train_workspace(tmp_path_factory.mktemp("train_inputs"))
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
    """The session's uninterrupted reference run (workspace.REFERENCE); read-only: start from a copy of it
    (workspace.copy_run)."""
    run = launch_reference(train_inputs)
    before = fingerprint(run.dir)
    yield run
    assert fingerprint(run.dir) == before, f"a test wrote into the reference run {run.dir}; copy_run it"
