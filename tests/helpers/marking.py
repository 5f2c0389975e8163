"""Which tests are `slow`, `mpi` and `netns`, decided from what they do (tests/conftest.py applies it to every
collected test), so that a test cannot reach the fast tier by forgetting a decorator.

A test is `slow` when it uses the training workspace (a fixture of LAUNCHING_FIXTURES is in its fixture
closure) or when the code it runs reaches something that starts processes: the modules of PROCESS_MODULES
(subprocess, multiprocessing, mpi4py and the helpers `launching` and `netns`) or one of os's process
functions (os.system, os.fork, ...). "The code it runs" is the test function and the fixtures of its
closure defined under tests/, followed through every function and class of tests/ (test modules,
conftest, helpers) they name; a module that has one launching test keeps its in-process tests fast.
Of the slow tests, `mpi` marks those whose code names mpirun or mpi4py, `netns` those that reach the
network-namespace hosts (helpers/netns.py).

Not seen: processes started in-process by our own packages (`pipeline.cli.main(["train", ...])` would start
a launcher) and functions reached only through module-level data (a dict of functions).
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import sys
import types
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# The training workspace (conftest.py): building it runs the whole prep pipeline; its users train.
LAUNCHING_FIXTURES = frozenset({"train_inputs", "train_workspace", "reference_run", "clipped_runs"})
PROCESS_MODULES = frozenset(
    {"subprocess", "multiprocessing", "torch.multiprocessing", "concurrent.futures.process", "mpi4py"}
    | {"launching", "netns"}
)
# The in-process multi-rank harness (helpers/distributed.py, as DeepSpeed's DistributedTest): it forks gloo
# ranks from a preloaded forkserver in well under a second each, starts no launcher, and its tests are the
# fast tier's collectives. Not followed into, so a test that uses it is not slow for that reason.
IN_PROCESS_HELPERS = frozenset({TESTS / "helpers" / "distributed.py"})
NETNS_MODULES = frozenset({"netns"})
MPI_WORDS = re.compile(r"\b(mpirun|mpiexec|mpi4py)\b")
OS_PROCESS_CALLS = frozenset(
    getattr(os, name)
    for name in dir(os)
    if name in {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}
    or name.startswith(("exec", "spawn"))
)
SLOW, MPI, NETNS = "slow", "mpi", "netns"


def markers(item, roots: frozenset[Path] = frozenset({TESTS})) -> set[str]:
    """The markers the facts call for on a collected test; `roots`: the directories of our test code."""
    fixtures = set(getattr(item, "fixturenames", ()))
    functions = [item.function] if hasattr(item, "function") else []
    fixture_info = getattr(item, "_fixtureinfo", None)
    for name in fixtures:
        for fixture_def in fixture_info.name2fixturedefs.get(name, ()) if fixture_info else ():
            functions.append(fixture_def.func)
    facts = set()
    for obj in reachable(functions, roots):
        found, requested, _ = scan(obj, roots)
        facts |= found
        fixtures |= requested
    if fixtures & LAUNCHING_FIXTURES:
        facts.add(SLOW)
    if SLOW not in facts:
        return set()
    return {SLOW} | ({MPI} & facts) | ({NETNS} & facts)


def mark_items(items) -> None:
    """Add the markers to every item; our test code is tests/ and wherever the collected test files are."""
    roots = frozenset({TESTS} | {Path(item.path).resolve().parent for item in items})
    for item in items:
        for name in sorted(markers(item, roots)):
            item.add_marker(name)


def reachable(functions, roots: frozenset[Path]) -> list:
    """The functions and classes of our test code that `functions` name, transitively (them included)."""
    seen, order, todo = set(), [], [unwrapped(f) for f in functions]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or not ours(obj, roots):
            continue
        seen.add(id(obj))
        order.append(obj)
        todo.extend(scan(obj, roots)[2])
    return order


def source_file(obj) -> str | None:
    if isinstance(obj, types.FunctionType):
        return obj.__code__.co_filename
    if isinstance(obj, type):
        return getattr(sys.modules.get(obj.__module__), "__file__", None)
    return None


def ours(obj, roots: frozenset[Path]) -> bool:
    """A function or class defined under `roots` (tests, not the packages they test), outside the
    in-process harness."""
    path = source_file(obj)
    return path is not None and file_is_under(path, roots) and Path(path).resolve() not in IN_PROCESS_HELPERS


@functools.cache
def file_is_under(path: str, roots: frozenset[Path]) -> bool:
    return any(Path(os.path.realpath(path)).is_relative_to(root) for root in roots)


@functools.cache
def definitions(path: str) -> dict[str, ast.AST]:
    """qualified name -> its def or class node, of every function and class of a source file (parsed once:
    inspect.getsource per function costs seconds over a whole suite)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    found, todo = {}, [(tree, "")]
    while todo:
        node, prefix = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                found[name] = child
                todo.append((child, name + (".<locals>." if not isinstance(child, ast.ClassDef) else ".")))
            else:
                todo.append((child, prefix))
    return found


@functools.cache
def scan(obj, roots: frozenset[Path]) -> tuple[frozenset, frozenset, tuple]:
    """(facts, fixtures it requests by name, functions and classes of our test code it names) of one
    function or class; facts: SLOW (it reaches something that starts processes), MPI, NETNS."""
    node = definitions(source_file(obj)).get(obj.__qualname__)
    if node is None:
        return frozenset(), frozenset(), ()
    module = sys.modules.get(obj.__module__)
    namespace = obj.__globals__ if isinstance(obj, types.FunctionType) else vars(module) if module else {}
    chains, texts, requested = read_code(node)
    facts, callees = set(), []
    for chain in chains:
        for value in resolve(chain, namespace):
            kind = process_kind(value)
            if kind:
                facts |= {SLOW} | ({NETNS} if kind in NETNS_MODULES else set())
                facts |= {MPI} if kind == "mpi4py" else set()
            elif ours(unwrapped(value), roots):
                callees.append(unwrapped(value))
    if any(MPI_WORDS.search(text) for text in texts):
        facts.add(MPI)
    return frozenset(facts), frozenset(requested), tuple(callees)


def read_code(tree) -> tuple[set[tuple[str, ...]], list[str], set[str]]:
    """What a definition names, in one walk: every name and dotted attribute chain on a name
    (`subprocess.run` -> ("subprocess", "run")); its string constants and names, docstrings left out (they
    may mention mpirun freely); the fixtures it requests with request.getfixturevalue("name")."""
    chains, texts, requested, docstrings = set(), [], set(), set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
        if isinstance(node, ast.Name):
            chains.add((node.id,))
            texts.append(node.id)
        elif isinstance(node, ast.Attribute):
            parts, base = [], node
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                chains.add((base.id, *reversed(parts)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts.append(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getfixturevalue":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                requested.add(node.args[0].value)
    return chains, texts, requested


def unwrapped(value):
    """What a decorated function wraps (functools.wraps), or the value itself."""
    try:
        return inspect.unwrap(value) if callable(value) else value
    except ValueError:  # a cycle of __wrapped__
        return value


def resolve(chain: tuple[str, ...], namespace: dict) -> list:
    """The objects a chain names, prefix by prefix; attributes are read only from modules, from their
    __dict__, so that nothing is imported or computed."""
    if chain[0] not in namespace:
        return []
    values = [namespace[chain[0]]]
    for attr in chain[1:]:
        if not isinstance(values[-1], types.ModuleType) or attr not in vars(values[-1]):
            break
        values.append(vars(values[-1])[attr])
    return values


def process_kind(value) -> str | None:
    """The process-starting module `value` is or belongs to, or "os" for os's process calls."""
    try:
        if value in OS_PROCESS_CALLS:
            return "os"
    except TypeError:  # unhashable
        return None
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    if not isinstance(name, str):
        return None
    for module in PROCESS_MODULES:
        if name == module or name.startswith(module + "."):
            return module
    return None
