"""The result files of `launch/reproduce.py`: the results table, the paper-comparison table, the plots.

    quickstart: results.json, results.md, val_curves.png
    paper:      reproduce.json, reproduce.md, reproduce.png

A run record (what reproduce.py keeps in runs/NAME-sSEED/done.json, plus `variant`, `params_total` and
`moe`) has the run's `seed`, final `val_loss`, its `window_losses` (one per validation window, the same
windows in every run), its validation `curve` as [tokens, loss] pairs, `steps`, `tokens`, `lr`, `min_lr` and
`schedule`. `dense_start` is the pretrained model scored on the same windows.

Statistics: a run's value is reported per seed and as mean +- std over seeds (sample std). A difference
A - B is formed per seed (same data order, same windows), then averaged; its spread is the std of those
per-seed differences, and its measurement error is the window-paired standard error (std over windows of
the per-window difference / sqrt(windows); the largest over seeds). A difference "exceeds the spread" when
every seed has the same sign and |mean| > 2 x std / sqrt(seeds) (t > 2); with one seed there is no spread
and the verdict says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

from experiments import SIZES, paper_comparisons


# ---- statistics ------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of the mean per-window difference of two runs scored on the same windows."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"runs scored on different windows ({len(a)} vs {len(b)})")
    return statistics.stdev(x - y for x, y in zip(a, b, strict=True)) / math.sqrt(len(a))


def compare(runs_a: list[dict], runs_b: list[dict]) -> dict:
    """A - B over the seeds both have: per seed, mean, std, window-paired SE, and the verdict."""
    b_by_seed = {r["seed"]: r for r in runs_b}
    pairs = [(a, b_by_seed[a["seed"]]) for a in runs_a if a["seed"] in b_by_seed]
    diffs = [a["val_loss"] - b["val_loss"] for a, b in pairs]
    mean, std = mean_std(diffs)
    se = max(paired_se(a["window_losses"], b["window_losses"]) for a, b in pairs)
    return {"diffs": diffs, "mean": mean, "std": std, "window_se": se, "verdict": verdict(diffs)}


def verdict(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "one seed: no spread"
    mean, std = mean_std(diffs)
    same_sign = all(d < 0 for d in diffs) or all(d > 0 for d in diffs)
    t = abs(mean) / (std / math.sqrt(len(diffs))) if std > 0 else math.inf
    return f"yes (t={t:.1f})" if same_sign and t > 2 else f"no (t={t:.1f})"


def by_variant(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["variant"], []).append(rec)
    return groups


def fmt_pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:+.{digits}f}" if math.isnan(std) else f"{mean:+.{digits}f} +- {std:.{digits}f}"


# ---- quickstart ------------------------------------------------------------------------------------------
def write_quickstart(out: Path, settings: dict, start: dict, records: list[dict], wall: float) -> None:
    """results.json|md and val_curves.png; prints the table, both margins of every MoE and the verdict."""
    groups = by_variant(records)
    dense = groups["dense_continued"]
    moes = {name: runs for name, runs in groups.items() if runs[0]["moe"]}
    margins = {name: quickstart_margins(runs, dense, start) for name, runs in moes.items()}
    result = {
        "dense_start": {k: start[k] for k in ("val_loss", "tokens", "steps")},
        "dense_continued": summary(dense),
        "moe": [
            {"name": name, **summary(runs), "config": describe(runs[0]), **margins[name]}
            for name, runs in moes.items()
        ],
        "settings": settings,
        "seeds": [r["seed"] for r in dense],
        "wall_seconds": round(wall, 1),
        "machine": machine(),
        "runs": {r["name"]: without_windows(r) for r in [start, *records]},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = results_table(start, records) + "\n\n" + margins_table(margins)
    (out / "results.md").write_text(text + "\n")
    plot(out / "val_curves.png", start, records, "continued training at equal tokens")
    print()
    print(text)
    print()
    for name, m in margins.items():
        ok = m["beats_dense_every_seed"] and m["beats_start_every_seed"]
        print(
            f"{name}: {'beats' if ok else 'does NOT beat'} both continued dense "
            f"({fmt_pm(m['vs_dense']['mean'], m['vs_dense']['std'])}) and the starting model "
            f"({fmt_pm(m['vs_start']['mean'], m['vs_start']['std'])}) on every seed "
            f"({len(m['vs_dense']['diffs'])} seeds, {result['dense_continued']['tokens']:,} tokens each)"
        )
    print(f"results: {out / 'results.json'}   plot: {out / 'val_curves.png'}   wall time {wall / 60:.1f} min")
    print(f"view the runs:  tensorboard --logdir {out / 'runs'}")


def quickstart_margins(runs: list[dict], dense: list[dict], start: dict) -> dict:
    vs_dense = compare(runs, dense)
    vs_start = compare(runs, [{**start, "seed": r["seed"]} for r in runs])
    return {
        "vs_dense": vs_dense,
        "vs_start": vs_start,
        "beats_dense_every_seed": all(d < 0 for d in vs_dense["diffs"]),
        "beats_start_every_seed": all(d < 0 for d in vs_start["diffs"]),
    }


def margins_table(margins: dict) -> str:
    lines = [
        "| MoE | vs continued dense, per seed | mean +- std | vs starting model, per seed | mean +- std "
        "| window SE | beats both on every seed |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for name, m in margins.items():
        d, s = m["vs_dense"], m["vs_start"]
        both = "yes" if m["beats_dense_every_seed"] and m["beats_start_every_seed"] else "no"
        lines.append(
            f"| {name} | {seeds_text(d['diffs'])} | {fmt_pm(d['mean'], d['std'])} | {seeds_text(s['diffs'])} "
            f"| {fmt_pm(s['mean'], s['std'])} | {max(d['window_se'], s['window_se']):.4f} | {both} |"
        )
    return "\n".join(lines)


def summary(runs: list[dict]) -> dict:
    mean, std = mean_std([r["val_loss"] for r in runs])
    return {
        "val_loss": mean,
        "val_loss_std": std,
        "per_seed": [r["val_loss"] for r in runs],
        "tokens": runs[0]["tokens"],
    }


def without_windows(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "window_losses"}


def seeds_text(values: list[float]) -> str:
    return " / ".join(f"{v:+.4f}" for v in values)


# ---- paper comparisons -----------------------------------------------------------------------------------
def write_paper(out: Path, settings: dict, start: dict, records: list[dict], wall: float) -> None:
    """reproduce.json|md|png: every run and each comparison of `paper_comparisons` with both runs done."""
    groups = by_variant(records)
    s = SIZES[settings["size"]]
    continued_tokens = s.continue_steps * s.global_batch * s.seq_len
    seeds = list(dict.fromkeys(r["seed"] for r in records))  # in run order, as the per-seed columns
    lines = [
        f"Size `{settings['size']}`: dense Llama H={s.hidden}, F={s.intermediate}, {s.layers} layers, "
        f"vocab {s.vocab}, {start['params_total'] / 1e6:.2f}M parameters; pretrained {start['steps']} "
        f"steps = {start['tokens']:,} tokens; every continued run {s.continue_steps} steps = "
        f"{continued_tokens:,} tokens (batch {s.global_batch} x {s.seq_len}); data seeds "
        f"{', '.join(map(str, seeds))}; {len(start['window_losses'])} validation windows, the same in every "
        f"run; {settings['nproc']} ranks; {machine()}.",
        "",
        results_table(start, records),
        "",
        "| comparison | A | B | A - B per seed | mean +- std | window SE | exceeds spread | paper "
        "| same direction |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    verdicts = []
    for title, a, b, paper in paper_comparisons(s):
        if a not in groups or b not in groups:
            continue
        c = compare(groups[a], groups[b])
        same = "yes" if c["mean"] < 0 else "no"
        verdicts.append({"comparison": title, "a": a, "b": b, **c, "a_better": c["mean"] < 0})
        lines.append(
            f"| {title} | {a} | {b} | {seeds_text(c['diffs'])} | {fmt_pm(c['mean'], c['std'])} "
            f"| {c['window_se']:.4f} | {c['verdict']} | {paper} | {same} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "reproduce.md").write_text(text)
    payload = {
        "settings": settings,
        "dense_start": without_windows(start),
        "runs": [without_windows(r) for r in records],
        "comparisons": verdicts,
        "wall_seconds": round(wall, 1),
    }
    (out / "reproduce.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(out / "reproduce.png", start, records, "paper comparisons: continued training at equal tokens")
    print()
    print(text)
    print(f"table: {out / 'reproduce.md'}   plot: {out / 'reproduce.png'}")
    print(f"view the runs:  tensorboard --logdir {out / 'runs'}")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def plot(path: Path, start: dict, records: list[dict], title: str) -> None:
    """Left: dense pretraining. Right: each variant's validation curve, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs, ys = zip(*start["curve"], strict=True)
    left.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, color="black")
    left.set(title="dense pretraining (from scratch)", xlabel="tokens (M)", ylabel="validation loss")
    left.grid(alpha=0.3)
    right.axhline(start["val_loss"], color="gray", ls=":", label=f"dense start {start['val_loss']:.3f}")
    for name, runs in by_variant(records).items():
        xs = [x for x, _ in runs[0]["curve"]]
        ys = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(xs))]
        style = "--" if name.startswith("dense") else "-"
        label = f"{name} {ys[-1]:.3f}" + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
        right.plot([x / 1e6 for x in xs], ys, style, marker="o", ms=3, label=label)
    right.set(title=title, xlabel="continued-training tokens (M)", ylabel="validation loss")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(rec: dict) -> str:
    moe = rec.get("moe")
    if not moe:
        return "dense"
    text = (
        f"N={moe['num_experts']} K={moe['top_k']} G={moe['granularity']} {moe['routing']}, "
        f"scale {moe['expert_scale']:g}"
    )
    return text + (f", drop {moe['drop_ratio']:g}" if moe.get("drop_ratio") else "")


def schedule_text(rec: dict) -> str:
    if rec["schedule"] == "cosine":
        return f"cosine {rec['lr']:g} -> {rec['min_lr']:g}"
    return f"constant {rec['lr']:g}"


def results_table(start: dict, records: list[dict]) -> str:
    groups = by_variant(records)
    dense = groups.get("dense_continued")
    lines = [
        "| run | model | params | lr schedule | tokens | val loss per seed | mean +- std "
        "| vs dense continued | vs start |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
        f"| dense_start (end of pretraining) | dense | {start['params_total'] / 1e6:.2f}M | "
        f"warmup + {schedule_text(start)} | {start['tokens']:,} | | {start['val_loss']:.4f} | | |",
    ]
    for name, runs in groups.items():
        mean, std = mean_std([r["val_loss"] for r in runs])
        vs_dense = compare(runs, dense) if dense else None
        vs_start = compare(runs, [{**start, "seed": r["seed"]} for r in runs])
        per_seed = " / ".join(f"{r['val_loss']:.4f}" for r in runs)
        lines.append(
            f"| {name} | {describe(runs[0])} | {runs[0]['params_total'] / 1e6:.2f}M "
            f"| {schedule_text(runs[0])} | {runs[0]['tokens']:,} | {per_seed} "
            f"| {mean:.4f}{'' if math.isnan(std) else f' +- {std:.4f}'} "
            f"| {fmt_pm(vs_dense['mean'], vs_dense['std']) if vs_dense else ''} "
            f"| {fmt_pm(vs_start['mean'], vs_start['std'])} |"
        )
    return "\n".join(lines)
