"""launch/report.py statistics: per-seed differences, their spread, and the window-paired standard error."""

from __future__ import annotations

import math
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

import report  # noqa: E402


def run(seed: int, windows: list[float], variant: str = "x") -> dict:
    return {"seed": seed, "variant": variant, "val_loss": statistics.fmean(windows), "window_losses": windows}


def test_paired_difference_uses_the_same_windows():
    rng = random.Random(0)
    base = [3.0 + rng.gauss(0, 0.5) for _ in range(400)]  # windows differ a lot in difficulty
    better = [w - 0.01 + rng.gauss(0, 0.002) for w in base]  # a small, consistent improvement
    c = report.compare([run(1, better)], [run(1, base)])
    assert c["diffs"] == [pytest.approx(statistics.fmean(better) - statistics.fmean(base))]
    # Paired: the window difficulty cancels, so the error is ~0.002 / 20, far below the unpaired ~0.035.
    assert c["window_se"] < 0.001
    unpaired = math.sqrt(statistics.variance(base) / 400 + statistics.variance(better) / 400)
    assert unpaired > 20 * c["window_se"]
    assert c["verdict"] == "one seed: no spread"


def test_verdict_needs_the_same_sign_on_every_seed_and_t_above_2():
    assert report.verdict([-0.010, -0.012, -0.011]).startswith("yes")
    assert report.verdict([-0.010, 0.002, -0.011]).startswith("no")  # one seed disagrees
    assert report.verdict([-0.001, -0.020, -0.0005]).startswith("no")  # same sign, but t < 2


def test_compare_pairs_runs_by_seed_not_by_order():
    a = [run(7, [1.0, 2.0]), run(1234, [2.0, 3.0])]
    b = [run(1234, [2.5, 3.5]), run(7, [1.0, 2.0])]
    assert report.compare(a, b)["diffs"] == [pytest.approx(0.0), pytest.approx(-0.5)]


def test_runs_scored_on_other_windows_are_refused():
    with pytest.raises(ValueError, match="different windows"):
        report.compare([run(1, [1.0, 2.0, 3.0])], [run(1, [1.0, 2.0])])
