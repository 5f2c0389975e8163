"""transformers 4.57.1, the last 4.x minor that many serving and fine-tuning stacks still pin, as a client
of our exports: installed once with `pip install --target` into the test cache (beside the SmolLM2 entry;
about 240 MB, ~30 s), and run in a subprocess whose `PYTHONPATH` puts it ahead of the transformers 5
this environment has, so the two never meet in one interpreter.

Cache entry `TRANSFORMERS4_ENTRY` under `smollm2.cache_root()`, built in a temporary directory and renamed
into place under a file lock, as the SmolLM2 entry is. Its numpy is pinned to this environment's, which
torch was built against.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from smollm2 import cache_root

VERSION = "4.57.1"
TRANSFORMERS4_ENTRY = f"transformers-{VERSION}-v1"  # bump the suffix when the entry's content changes
DONE = "installed.json"

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


def site(root: Path | None = None) -> Path:
    """The cached site directory holding transformers 4.57.1 and its own dependencies."""
    import numpy

    root = root or cache_root()
    entry = root / TRANSFORMERS4_ENTRY
    if (entry / DONE).is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{TRANSFORMERS4_ENTRY}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it: wait, then use its entry
        if not (entry / DONE).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{TRANSFORMERS4_ENTRY}.tmp-", dir=root))
            pins = [f"transformers=={VERSION}", f"numpy=={numpy.__version__}"]
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--target", str(tmp), *pins]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"pip could not install transformers {VERSION}:\n{result.stderr[-2000:]}")
            (tmp / DONE).write_text(json.dumps({"transformers": VERSION, "numpy": numpy.__version__}))
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(tmp, entry)
    return entry


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
