"""The automatic markers (tests/helpers/marking.py, applied by tests/conftest.py): a test that launches
processes or uses the training workspace is `slow` without a decorator, so `-m "not slow"` (the fast tier)
cannot pick it up; its in-process neighbours stay fast.

The rule is checked on a generated test module, collected in this process by pytester (nothing runs)."""

from __future__ import annotations

from pathlib import Path

import marking

pytest_plugins = ["pytester"]

CONFTEST = """
import subprocess

import marking
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    marking.mark_items(items)


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture
def built_by_a_process(tmp_path):
    subprocess.run(["true"], check=True)
    return tmp_path


@pytest.fixture
def built_in_process(tmp_path):
    return tmp_path
"""

TESTS = """
import multiprocessing
import os
import subprocess
import sys

import torch.multiprocessing as tmp
from launching import launch
from netns import two_hosts

import pytest


def run_it(*cmd):
    return subprocess.run([sys.executable, *cmd], check=True)


def through_a_helper():
    return run_it("-c", "pass")


def pure(x):
    return x + 1


def test_in_process():
    assert pure(1) == 2


def test_uses_the_workspace(train_workspace):
    assert train_workspace.is_dir()


def test_requests_the_workspace_by_name(request):
    request.getfixturevalue("train_workspace")


def test_subprocess_in_the_test():
    subprocess.run(["true"])


def test_subprocess_two_helpers_down():
    through_a_helper()


def test_launching_helper(tmp_path):
    launch(tmp_path, "run", "--train.steps", "1", launcher="mpirun")


def test_fixture_that_launches(built_by_a_process):
    pass


def test_fixture_in_process(built_in_process):
    pass


def test_fork():
    os.fork


def test_pool():
    multiprocessing.Pool


def test_torch_spawn():
    tmp.spawn


def test_two_hosts(tmp_path):
    with two_hosts(tmp_path):
        pass


def test_mpirun_in_a_command():
    subprocess.run(["mpirun", "-n", "2", "true"])


def test_mpirun_only_in_a_string():
    assert "mpirun" in "use mpirun"


def test_docstring_mentions_mpirun():
    '''Not run under mpirun; it only says so.'''
    launch


class TestInAClass:
    def test_method_in_process(self):
        assert pure(0) == 1

    def test_method_that_launches(self):
        through_a_helper()
"""

EXPECTED = {
    "test_in_process": set(),
    "test_uses_the_workspace": {"slow"},
    "test_requests_the_workspace_by_name": {"slow"},
    "test_subprocess_in_the_test": {"slow"},
    "test_subprocess_two_helpers_down": {"slow"},
    "test_launching_helper": {"slow", "mpi"},
    "test_fixture_that_launches": {"slow"},
    "test_fixture_in_process": set(),
    "test_fork": {"slow"},
    "test_pool": {"slow"},
    "test_torch_spawn": {"slow"},
    "test_two_hosts": {"slow", "netns"},
    "test_mpirun_in_a_command": {"slow", "mpi"},
    "test_mpirun_only_in_a_string": set(),  # names mpirun, starts nothing
    "test_docstring_mentions_mpirun": {"slow"},  # a launching helper; the docstring is no mpirun
    "test_method_in_process": set(),
    "test_method_that_launches": {"slow"},
}
AUTOMATIC = {"slow", "mpi", "netns"}


def test_markers_follow_what_each_test_does(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_generated=TESTS)
    items, _ = pytester.inline_genitems()
    got = {item.name: {m.name for m in item.iter_markers()} & AUTOMATIC for item in items}
    assert got == EXPECTED


def test_not_slow_deselects_them(pytester):
    """The hook runs before `-m` selects: the fast tier is exactly the unmarked tests."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_generated=TESTS)
    result = pytester.inline_run("--collect-only", "-m", "not slow")
    selected = {item.name for item in result.getcalls("pytest_collection_finish")[0].session.items}
    assert selected == {name for name, marks in EXPECTED.items() if not marks}


def test_this_session_marks_every_workspace_user(request):
    """The real hook is installed: no collected test of this session uses the workspace unmarked."""
    unmarked = [
        item.nodeid
        for item in request.session.items
        if set(getattr(item, "fixturenames", ())) & marking.LAUNCHING_FIXTURES
        and not item.get_closest_marker("slow")
    ]
    assert not unmarked
    assert marking.markers(request.node) == set()  # and this very test is fast


def test_the_launching_fixtures_exist(request):
    """A renamed fixture would silently leave the set: each name is a fixture of tests/conftest.py."""
    (conftest,) = [
        plugin
        for plugin in request.config.pluginmanager.get_plugins()
        if Path(getattr(plugin, "__file__", None) or "/").resolve() == marking.TESTS / "conftest.py"
    ]
    assert all(hasattr(conftest, name) for name in marking.LAUNCHING_FIXTURES)
