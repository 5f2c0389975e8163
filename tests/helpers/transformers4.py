"""transformers 4.57.1, the last 4.x minor that many serving and fine-tuning stacks still pin, as a client
of our exports: installed once with `pip install --target` into the test cache (beside the SmolLM2 entry;
about 240 MB, ~30 s), and run in a subprocess whose `PYTHONPATH` puts it ahead of the transformers 5
this environment has, so the two never meet in one interpreter.

Cache entry `TRANSFORMERS4_ENTRY` (tests/helpers/cached.py). Its numpy is pinned to this environment's,
which torch was built against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from cached import cached_entry
from safetensors.torch import load_file, save_file

VERSION = "4.57.1"
TRANSFORMERS4_ENTRY = f"transformers-{VERSION}-v2"  # bump the suffix when the entry's content changes

# Runs inside the subprocess: load the export as transformers 4.x does, report what it did not load.
LOAD_AND_RUN = """
import json, sys, torch, transformers
from safetensors.torch import load_file, save_file
export, ids_file, out = sys.argv[1:4]
model, info = transformers.AutoModelForCausalLM.from_pretrained(
    export, torch_dtype=torch.float32, output_loading_info=True
)
with torch.no_grad():
    logits = model.eval()(load_file(ids_file)["ids"]).logits
save_file({"logits": logits.contiguous()}, out + ".safetensors")
report = {k: sorted(map(str, v)) for k, v in info.items()}
report.update(version=transformers.__version__, cls=type(model).__name__, file=transformers.__file__)
json.dump(report, open(out + ".json", "w"))
"""


@dataclass(frozen=True)
class Loaded:
    version: str
    cls: str
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    logits: torch.Tensor


def site() -> Path:
    """The cached site directory holding transformers 4.57.1 and its own dependencies."""
    return cached_entry(TRANSFORMERS4_ENTRY, install)


def install(target: Path) -> dict:
    import numpy

    pins = [f"transformers=={VERSION}", f"numpy=={numpy.__version__}"]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--target", str(target), *pins]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not install transformers {VERSION}:\n{result.stderr[-2000:]}")
    return {"transformers": VERSION, "numpy": numpy.__version__}


def load_and_run(export: Path, ids: torch.Tensor, work: Path) -> Loaded:
    """Load `export` with transformers 4.57.1 (fp32) in a subprocess and run it on `ids`."""
    work.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids.contiguous()}, work / "ids.safetensors")
    out = work / "transformers4"
    env = {**os.environ, "PYTHONPATH": str(site()), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-c", LOAD_AND_RUN, str(export), str(work / "ids.safetensors"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["version"] == VERSION and report["file"].startswith(str(site())), report
    return Loaded(
        report["version"],
        report["cls"],
        report["missing_keys"],
        report["unexpected_keys"],
        report["mismatched_keys"],
        load_file(out.with_suffix(".safetensors"))["logits"],
    )
