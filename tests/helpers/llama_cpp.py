"""llama.cpp, a serving engine that runs on CPU, as a client of our exports: its own converter
(`convert_hf_to_gguf.py`) and its `llama-completion` tool, greedy (`--top-k 1 --temp 0`), with as many
threads as cores (its default of 4 spins two threads against each other on a 2-core machine, 100x slower).

The source comes from PyPI: the `llama-cpp-python` sdist vendors the llama.cpp tree (converter, gguf-py,
C++ sources). It is fetched with `pip download --no-binary :all:` (never installed), `llama-completion` is
built with cmake (CPU only, a few minutes on 2 cores: the cold cost), and the tree with the binary is kept
in the test cache (tests/helpers/cached.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from cached import cached_entry

SDIST_VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the engine checked
LLAMA_CPP_ENTRY = f"llama.cpp-from-llama-cpp-python-{SDIST_VERSION}-v3"
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=OFF"]  # fmt: skip


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return result


def llama_cpp() -> Path:
    """The cached llama.cpp tree with build/bin/llama-completion, built on first use."""
    return cached_entry(LLAMA_CPP_ENTRY, build)


def build(target: Path) -> dict:
    """Fetch the sdist, build llama-completion in its llama.cpp tree, move the tree to `target`."""
    download = target / "sdist"
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={SDIST_VERSION}", "-d", str(download)])  # fmt: skip
    (sdist,) = download.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(download, filter="data")
    source = download / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    run(["cmake", "-S", str(source), "-B", str(source / "build"), *CMAKE_OPTIONS])
    run(
        ["cmake", "--build", str(source / "build"), "--target", "llama-completion", "-j", str(os.cpu_count())]
    )
    for objects in ("src", "ggml", "common", "tools", "examples"):  # object files; the binary is static
        shutil.rmtree(source / "build" / objects, ignore_errors=True)
    for item in source.iterdir():
        item.rename(target / item.name)
    shutil.rmtree(download)
    return {"llama-cpp-python": SDIST_VERSION}


def convert(export: Path, gguf: Path) -> None:
    """llama.cpp's own converter, fp32 weights (the closest to the transformers fp32 reference)."""
    tree = llama_cpp()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}  # its own gguf, not the one installed here
    run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(export), "--outfile", str(gguf),
         "--outtype", "f32"], env=env, cwd=tree)  # fmt: skip


def generate(gguf: Path, prompt: str, n_tokens: int) -> str:
    """Up to `n_tokens` greedy tokens after `prompt`, as the text llama.cpp prints (the prompt not shown)."""
    binary = llama_cpp() / "build" / "bin" / "llama-completion"
    # its log goes to stderr, the text to stdout
    cmd = [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(n_tokens), "--top-k", "1", "--temp", "0",
           "-t", str(os.cpu_count()), "-c", "256", "-ngl", "0", "-no-cnv", "--no-warmup",
           "--no-display-prompt", "--simple-io"]  # fmt: skip
    return run(cmd, stdin=subprocess.DEVNULL).stdout
