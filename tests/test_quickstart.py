"""The quickstart end to end at `--size tiny`: every stage through the real `upcycle` commands.

It launches four 2-rank DeepSpeed runs (pretrain, continued dense, two MoE variants), so on 2 shared
cores it is start-up bound (about 20 s a launch unloaded); the numbers mean nothing at this size, only
the pipeline and the schema of results.json are checked. The 20-minute `--size cpu` run is not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_tiny_writes_results(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # one seed (the script's default is 3): the statistics over seeds are tests/test_report.py's
    cmd = [
        "bash",
        str(REPO / "launch" / "quickstart.sh"),
        "--size",
        "tiny",
        "--out",
        str(out),
        "--seeds",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    assert isinstance(result["dense_start"]["val_loss"], float)
    assert isinstance(result["dense_continued"]["val_loss"], float)
    names = [m["name"] for m in result["moe"]]
    assert names == ["moe_E8T2", "moe_E16T4G2"]
    for m in result["moe"]:
        assert isinstance(m["val_loss"], float) and m["val_loss"] > 0
        # equal token budget for every continued run
        assert m["tokens"] == result["dense_continued"]["tokens"]
    assert result["settings"]["size"] == "tiny"
    assert result["settings"]["nproc"] == 2
    assert (out / "val_curves.png").stat().st_size > 1000
    # the results table and the margins table (vs continued dense and vs the starting model) name each MoE
    assert (out / "results.md").read_text().count("| moe_") == 4
    for m in result["moe"]:
        assert len(m["vs_dense"]["diffs"]) == len(m["vs_start"]["diffs"]) == 1  # --seeds 1
        assert m["vs_dense"]["diffs"][0] == pytest.approx(
            m["val_loss"] - result["dense_continued"]["val_loss"]
        )
    # one TensorBoard directory per run (continued runs are per seed), and the exported dense model
    for run in ("pretrain_dense", *(f"{name}-s1234" for name in ["dense_continued", *names])):
        assert list((out / "runs" / run / "tensorboard").iterdir()), run
    assert (out / "dense" / "model.safetensors").is_file()

    # A second invocation finds every stage done and only rewrites the summary.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "s] training " not in again.stdout  # the "[  12s] training RUN: ..." line of a run that starts
    assert json.loads((out / "results.json").read_text())["moe"] == result["moe"]
