"""The result files of `launch/reproduce.py`: the results table, the paper-comparison table, the plots.

    quickstart: results.json, results.md, val_curves.png
    paper:      reproduce.json, reproduce.md, reproduce.png

A run record (what reproduce.py keeps in runs/NAME/done.json, plus `params_total` and `moe`) has the run's
final `val_loss`, its validation `curve` as [tokens, loss] pairs, `steps`, `tokens`, `lr`, `min_lr` and
`schedule`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from experiments import SIZES, paper_comparisons


def write_quickstart(out: Path, settings: dict, start: dict, records: list[dict], wall: float) -> None:
    """results.json|md and val_curves.png; prints the table and the verdict."""
    result = {
        "dense_start": {"val_loss": start["val_loss"], "tokens": start["tokens"], "steps": start["steps"]},
        "dense_continued": next(
            {"val_loss": r["val_loss"], "tokens": r["tokens"]}
            for r in records
            if r["name"] == "dense_continued"
        ),
        "moe": [
            {"name": r["name"], "val_loss": r["val_loss"], "tokens": r["tokens"], "config": describe(r)}
            for r in records
            if r["moe"]
        ],
        "settings": settings,
        "wall_seconds": round(wall, 1),
        "machine": machine(),
        "runs": {r["name"]: r for r in [start, *records]},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = results_table(start, records)
    (out / "results.md").write_text(table + "\n")
    plot(out / "val_curves.png", start, records, "continued training at equal tokens")
    best = min(result["moe"], key=lambda m: m["val_loss"])
    dense_c = result["dense_continued"]["val_loss"]
    print()
    print(table)
    print()
    verdict = "lower" if best["val_loss"] < dense_c else "NOT lower"
    print(
        f"best MoE {best['name']}: {best['val_loss']:.4f}, {verdict} than continued dense {dense_c:.4f} "
        f"at {result['dense_continued']['tokens']:,} tokens"
    )
    print(f"results: {out / 'results.json'}   plot: {out / 'val_curves.png'}   wall time {wall / 60:.1f} min")
    print(f"view the runs:  tensorboard --logdir {out / 'runs'}")


def write_paper(out: Path, settings: dict, start: dict, records: list[dict], wall: float) -> None:
    """reproduce.json|md|png: every run and each comparison of `paper_comparisons` with both runs done."""
    by_name = {r["name"]: r for r in records}
    s = SIZES[settings["size"]]
    continued_tokens = s.continue_steps * s.global_batch * s.seq_len
    lines = [
        f"Size `{settings['size']}`: dense Llama H={s.hidden}, F={s.intermediate}, {s.layers} layers, "
        f"vocab {s.vocab}, "
        f"{start['params_total'] / 1e6:.2f}M parameters; pretrained {start['steps']} steps = "
        f"{start['tokens']:,} tokens; every continued run {s.continue_steps} steps = "
        f"{continued_tokens:,} tokens (batch {s.global_batch} x {s.seq_len}); seed 1234 (data), "
        f"0 (init, router); {settings['nproc']} ranks; {machine()}.",
        "",
        results_table(start, records),
        "",
        "| comparison | A | B | val A | val B | A - B | paper | same direction here |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    verdicts = []
    for title, a, b, paper in paper_comparisons(s):
        if a not in by_name or b not in by_name:
            continue
        va, vb = by_name[a]["val_loss"], by_name[b]["val_loss"]
        same = "yes" if va < vb else "no"
        verdicts.append({"comparison": title, "a": a, "b": b, "val_a": va, "val_b": vb, "a_better": va < vb})
        lines.append(f"| {title} | {a} | {b} | {va:.4f} | {vb:.4f} | {va - vb:+.4f} | {paper} | {same} |")
    text = "\n".join(lines) + "\n"
    (out / "reproduce.md").write_text(text)
    (out / "reproduce.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "dense_start": start,
                "runs": records,
                "comparisons": verdicts,
                "wall_seconds": round(wall, 1),
            },
            indent=2,
        )
        + "\n"
    )
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs, ys = zip(*start["curve"], strict=True)
    left.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, color="black")
    left.set(title="dense pretraining (from scratch)", xlabel="tokens (M)", ylabel="validation loss")
    left.grid(alpha=0.3)
    right.axhline(start["val_loss"], color="gray", ls=":", label=f"dense start {start['val_loss']:.3f}")
    for rec in records:
        xs, ys = zip(*rec["curve"], strict=True)
        style = "--" if rec["name"].startswith("dense") else "-"
        right.plot(
            [x / 1e6 for x in xs], ys, style, marker="o", ms=3, label=f"{rec['name']} {rec['val_loss']:.3f}"
        )
    right.set(title=title, xlabel="continued-training tokens (M)", ylabel="validation loss")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(rec: dict) -> str:
    moe = rec.get("moe")
    if not moe:
        return "dense"
    return (
        f"N={moe['num_experts']} K={moe['top_k']} G={moe['granularity']} {moe['routing']}, "
        f"scale {moe['expert_scale']:g}"
    )


def results_table(start: dict, records: list[dict]) -> str:
    lines = [
        "| run | model | params | lr schedule | tokens | val loss | vs dense continued |",
        "|---|---|---:|---|---:|---:|---:|",
        f"| dense_start (end of pretraining) | dense | {start.get('params_total', 0) / 1e6:.2f}M | "
        f"warmup + cosine {start['lr']:g} -> {start['min_lr']:g} | {start['tokens']:,} | "
        f"{start['val_loss']:.4f} | |",
    ]
    base = next((r["val_loss"] for r in records if r["name"] == "dense_continued"), None)
    for rec in records:
        sched = (
            f"reset: cosine {rec['lr']:g} -> {rec['min_lr']:g}"
            if rec["schedule"] == "cosine"
            else f"constant {rec['lr']:g}"
        )
        delta = f"{rec['val_loss'] - base:+.4f}" if base is not None else ""
        lines.append(
            f"| {rec['name']} | {describe(rec)} | {rec['params_total'] / 1e6:.2f}M | {sched} | "
            f"{rec['tokens']:,} | {rec['val_loss']:.4f} | {delta} |"
        )
    return "\n".join(lines)
