"""The quickstart and a small-scale reproduction of the upcycling paper's comparisons, on the real pipeline.

    python launch/reproduce.py quickstart [--size tiny|cpu|gpu] [--out DIR]   (what launch/quickstart.sh runs)
    python launch/reproduce.py paper      [--size tiny|cpu|gpu] [--out DIR]   (the ablation table)

Both share one working directory (default `runs/quickstart` for `--size cpu`, `runs/quickstart-SIZE`
otherwise) and skip every stage that is already complete there, so `paper` after `quickstart` reuses the
data, the pretrained dense model and the three quickstart runs, and only trains the ablations.

Stages, all through the `upcycle` command line:
  1. `upcycle prep corpus|tokenizer|tokenize`: the embedded default corpus (Python's standard library);
  2. `upcycle init` + `upcycle train` (dense, ep_size 1): pretrain a small Llama from scratch, warmup and
     cosine to the minimum learning rate, so it ends on its plateau; its final validation loss is
     `dense_start`;
  3. export the trained dense weights to a Hugging Face directory (see `export_dense`);
  4. `upcycle convert` for each MoE variant;
  5. `upcycle train` for each variant and for the dense model itself, the same number of steps and tokens,
     the same data order and validation windows; MoE runs use expert parallelism over all ranks. The
     paper's learning-rate reset: warmup to the pretraining peak, cosine to the pretraining minimum;
  6. `results.json`, `results.md`, `val_curves.png` (and for `paper`: `reproduce.json|md|png`).

Every run is seeded (data order, model init, router init); the numbers are for one seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "launch" / "configs" / "quickstart.yaml"


@dataclass
class Size:
    corpus_mb: float | None  # None: the whole standard library
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seq_len: int
    global_batch: int
    micro_batch: int
    pretrain_steps: int
    pretrain_warmup: int
    continue_steps: int
    continue_warmup: int
    lr: float  # pretraining peak = continued-training peak (the paper's reset)
    min_lr: float
    eval_batches: int
    eval_every: int  # evaluations during each continued run (plus one at the end)
    valid_fraction: float
    precision: str = "fp32"
    fine: tuple[int, int, int] = (16, 4, 2)  # (N, K, G) of the fine-grained variant: K/G = 2 like E8T2
    log_interval: int = 10


SIZES = {
    # seconds of training per run: for tests only, the numbers mean nothing
    "tiny": Size(
        corpus_mb=0.5,
        vocab=384,
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        kv_heads=2,
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        pretrain_steps=4,
        pretrain_warmup=1,
        continue_steps=2,
        continue_warmup=1,
        lr=3e-3,
        min_lr=3e-4,
        eval_batches=1,
        eval_every=1,
        valid_fraction=0.05,
        log_interval=1,
    ),
    # 2 CPU cores: the whole quickstart in 8.4 minutes (measured, machine otherwise idle)
    "cpu": Size(
        corpus_mb=12,
        vocab=2048,
        hidden=64,
        intermediate=256,
        layers=4,
        heads=4,
        kv_heads=2,
        seq_len=128,
        global_batch=16,
        micro_batch=8,
        pretrain_steps=1500,
        pretrain_warmup=20,
        continue_steps=250,
        continue_warmup=5,
        lr=2e-3,
        min_lr=2e-4,
        eval_batches=8,
        eval_every=4,
        valid_fraction=0.03,
    ),
    # one or more GPUs (untested here): ~100M-parameter dense Llama, bf16, 131M + 4 x 33M tokens
    "gpu": Size(
        corpus_mb=None,
        vocab=8192,
        hidden=768,
        intermediate=2048,
        layers=12,
        heads=12,
        kv_heads=4,
        seq_len=1024,
        global_batch=128,
        micro_batch=16,
        pretrain_steps=1000,  # 131M tokens: the stdlib is ~10M tokens, pass --corpus for more
        pretrain_warmup=50,
        continue_steps=250,
        continue_warmup=10,
        lr=1e-3,
        min_lr=1e-4,
        eval_batches=8,
        eval_every=6,
        valid_fraction=0.01,
        precision="bf16",
        fine=(32, 8, 4),
        log_interval=20,
    ),
}


@dataclass
class Variant:
    """One continued-training run: the dense model itself, or an upcycled MoE."""

    name: str
    experts: int = 0  # 0: dense
    top_k: int = 0
    granularity: int = 1
    routing: str = "softmax-topk"
    weight_scaling: bool = True
    virtual_groups: bool = True
    lr_reset: bool = True  # False: constant learning rate at the pretraining minimum
    convert_args: list[str] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def model_key(self) -> str:
        """Runs that differ only in training settings share one converted model."""
        if not self.is_moe:
            return "dense"
        key = f"E{self.experts}T{self.top_k}G{self.granularity}-{self.routing}"
        key += "" if self.weight_scaling else "-noscale"
        return key + ("" if self.virtual_groups else "-novg")


def quickstart_variants(size: Size) -> list[Variant]:
    n, k, g = size.fine
    return [
        Variant("dense_continued"),
        Variant("moe_E8T2", experts=8, top_k=2),
        Variant(f"moe_E{n}T{k}G{g}", experts=n, top_k=k, granularity=g),
    ]


def paper_variants(size: Size) -> list[Variant]:
    n, k, g = size.fine
    return [
        *quickstart_variants(size),
        Variant("moe_E8T2_topk_softmax", experts=8, top_k=2, routing="topk-softmax"),
        Variant("moe_E8T2_no_scaling", experts=8, top_k=2, weight_scaling=False),
        Variant(
            f"moe_E{n}T{k}G{g}_no_virtual_groups", experts=n, top_k=k, granularity=g, virtual_groups=False
        ),
        Variant("moe_E8T2_constant_min_lr", experts=8, top_k=2, lr_reset=False),
        Variant("dense_continued_constant_min_lr", lr_reset=False),
    ]


# (title, A, B, what the paper reports): "A better than B" is the paper's direction.
def paper_comparisons(size: Size) -> list[tuple[str, str, str, str]]:
    n, k, g = size.fine
    fine = f"moe_E{n}T{k}G{g}"
    return [
        (
            "upcycled vs continued dense, equal tokens",
            "moe_E8T2",
            "dense_continued",
            "upcycled better (15B, 1T tokens: 1.306 vs 1.377 val loss)",
        ),
        (
            "softmax-then-topK vs topK-then-softmax",
            "moe_E8T2",
            "moe_E8T2_topk_softmax",
            "softmax-then-topK consistently better",
        ),
        ("weight scaling on vs off", "moe_E8T2", "moe_E8T2_no_scaling", "scaling better"),
        (
            f"granularity G={g} vs G=1, equal active compute",
            fine,
            "moe_E8T2",
            "mixed: fine-grained better in the 2B ablations, E8G1T2 (1.306) ahead of E8G8T8 (1.320) at 15B",
        ),
        (f"virtual groups on vs off (G={g})", fine, f"{fine}_no_virtual_groups", "virtual groups better"),
        (
            "LR reset to pretraining peak vs constant minimum (MoE)",
            "moe_E8T2",
            "moe_E8T2_constant_min_lr",
            "reset better",
        ),
        (
            "LR reset to pretraining peak vs constant minimum (dense)",
            "dense_continued",
            "dense_continued_constant_min_lr",
            "(control: the reset is not an MoE-only effect)",
        ),
    ]


# ---- running the stages --------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.size_name = args.size
        self.size = SIZES[args.size]
        self.out = Path(
            args.out or ("runs/quickstart" if args.size == "cpu" else f"runs/quickstart-{args.size}")
        )
        self.nproc = args.nproc or default_nproc()
        self.corpus = args.corpus
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if not cuda_available():
            self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // self.nproc)))
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.started = time.time()
        self._check_settings(args.force)

    # settings.json pins what the working directory holds: a different size there is refused.
    def settings(self) -> dict:
        return {"size": self.size_name, **asdict(self.size), "nproc": self.nproc, "corpus": self.corpus}

    def _check_settings(self, force: bool) -> None:
        path = self.out / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(self.settings())):
                if not force:
                    sys.exit(
                        f"reproduce: {self.out} holds runs with other settings ({path}); "
                        "use another --out, or --force to delete it"
                    )
                shutil.rmtree(self.out)
                self.out.mkdir(parents=True)
                (self.out / "logs").mkdir()
        path.write_text(json.dumps(self.settings(), indent=2) + "\n")

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.started:6.0f}s] {message}", flush=True)

    def upcycle(self, *argv: str, log: str, stream: bool = False) -> None:
        cmd = [sys.executable, "-m", "pipeline.cli", *argv]
        log_path = self.out / "logs" / f"{log}.log"
        with open(log_path, "a") as fh:
            fh.write("$ upcycle " + " ".join(argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=REPO
            )
            for line in proc.stdout:
                fh.write(line)
                if stream and (line.startswith("step ") or "error" in line.lower()):
                    print(f"    {log}: {line.rstrip()}", flush=True)
            proc.wait()
        if proc.returncode != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
            sys.exit(f"reproduce: `upcycle {argv[0]}` failed (exit {proc.returncode}); {log_path}:\n{tail}")

    # -- 1. data --
    def prepare_data(self) -> None:
        s = self.size
        data = self.out / "data"
        if (self.out / "tokenizer" / "tokenizer.json").is_file() and (data / ".done").is_file():
            return
        self.say("preparing data: the embedded default corpus (Python standard library)")
        if self.corpus:
            inputs = [self.corpus]
        else:
            corpus = self.out / "corpus.jsonl"
            self.upcycle(
                "prep",
                "corpus",
                "--out",
                str(corpus),
                *(["--max-mb", str(s.corpus_mb)] if s.corpus_mb else []),
                log="prep",
            )
            inputs = [str(corpus)]
        self.upcycle(
            "prep",
            "tokenizer",
            "--input",
            *inputs,
            "--vocab-size",
            str(s.vocab),
            "--out",
            str(self.out / "tokenizer"),
            log="prep",
        )
        self.upcycle(
            "prep",
            "tokenize",
            "--input",
            *inputs,
            "--tokenizer",
            str(self.out / "tokenizer"),
            "--out",
            str(data),
            "--valid-fraction",
            str(s.valid_fraction),
            "--workers",
            str(min(4, os.cpu_count() or 1)),
            "--no-progress",
            "--overwrite",
            log="prep",
        )
        (data / ".done").write_text("")
        stats = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "prep", "stats", str(data)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
        )
        (self.out / "logs" / "data_stats.txt").write_text(stats.stdout)

    # -- 2./5. training --
    def train(
        self,
        name: str,
        model: Path,
        steps: int,
        warmup: int,
        lr: float,
        min_lr: float,
        schedule: str,
        moe: bool,
    ) -> dict:
        """One `upcycle train` run into runs/NAME; returns its record (skipped when done.json exists)."""
        run_dir = self.out / "runs" / name
        done = run_dir / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again from scratch
        s = self.size
        eval_interval = max(1, steps // s.eval_every)
        overrides = {
            "model.path": model,
            "data.path": self.out / "data",
            "output.dir": run_dir,
            "data.eval_batches": s.eval_batches,
            "train.steps": steps,
            "train.seq_len": s.seq_len,
            "train.global_batch": s.global_batch,
            "train.micro_batch": s.micro_batch,
            "train.lr": lr,
            "train.min_lr": min_lr,
            "train.warmup_steps": warmup,
            "train.schedule": schedule,
            "train.precision": s.precision,
            "parallel.ep_size": self.nproc if moe else 1,
            "output.eval_interval": eval_interval,
            "output.log_interval": s.log_interval,
            "output.checkpoint_interval": 0,
        }
        argv = [
            "train",
            "--config",
            str(BASE_CONFIG),
            "--nproc",
            str(self.nproc),
            "--master-port",
            str(free_port()),
        ]
        for key, value in overrides.items():
            argv += [f"--{key}", str(value)]
        tokens = steps * s.global_batch * s.seq_len
        self.say(
            f"training {name}: {steps} steps, {tokens:,} tokens, {self.nproc} ranks"
            + (f", expert parallelism over {self.nproc}" if moe else "")
        )
        started = time.time()
        self.upcycle(*argv, log=name, stream=True)
        curve = [json.loads(line) for line in (run_dir / "val_loss.jsonl").read_text().splitlines()]
        record = {
            "name": name,
            "val_loss": curve[-1]["val_loss"],
            "curve": [[row["step"] * s.global_batch * s.seq_len, row["val_loss"]] for row in curve],
            "steps": steps,
            "tokens": tokens,
            "lr": lr,
            "min_lr": min_lr,
            "schedule": schedule,
            "seconds": round(time.time() - started, 1),
        }
        done.write_text(json.dumps(record, indent=2) + "\n")
        self.say(f"  {name}: val loss {record['val_loss']:.4f} ({record['seconds']:.0f} s)")
        return record

    def pretrain(self) -> dict:
        s = self.size
        init = self.out / "dense_init"
        if not (init / "model.safetensors").is_file():
            self.upcycle(
                "init",
                "--out",
                str(init),
                "--tokenizer",
                str(self.out / "tokenizer"),
                "--hidden-size",
                str(s.hidden),
                "--intermediate-size",
                str(s.intermediate),
                "--layers",
                str(s.layers),
                "--heads",
                str(s.heads),
                "--kv-heads",
                str(s.kv_heads),
                "--max-position-embeddings",
                str(max(2048, s.seq_len)),
                "--seed",
                "0",
                log="init",
            )
        record = self.train(
            "pretrain_dense", init, s.pretrain_steps, s.pretrain_warmup, s.lr, s.min_lr, "cosine", moe=False
        )
        dense = self.out / "dense"
        if not (dense / "model.safetensors").is_file():
            export_dense(self.out / "runs" / "pretrain_dense", init, dense)
            self.say(f"exported the pretrained dense model to {dense}")
        return record

    def model_for(self, variant: Variant) -> Path:
        dense = self.out / "dense"
        if not variant.is_moe:
            return dense
        path = self.out / "models" / variant.model_key()
        if (path / "config.json").is_file() and (path / ".done").is_file():
            return path
        argv = [
            "convert",
            "--dense",
            str(dense),
            "--out",
            str(path),
            "--experts",
            str(variant.experts),
            "--top-k",
            str(variant.top_k),
            "--granularity",
            str(variant.granularity),
            "--routing",
            variant.routing,
            "--seed",
            "0",
            "--force",
        ]
        if not variant.weight_scaling:
            argv.append("--no-weight-scaling")
        self.upcycle(*argv, log=f"convert_{variant.model_key()}")
        if not variant.virtual_groups:
            independent_router_rows(path, seed=0)
        (path / ".done").write_text("")
        return path

    def continued(self, variant: Variant) -> dict:
        s = self.size
        model = self.model_for(variant)
        if variant.lr_reset:
            lr, min_lr, warmup, schedule = s.lr, s.min_lr, s.continue_warmup, "cosine"
        else:
            lr, min_lr, warmup, schedule = s.min_lr, s.min_lr, 0, "constant"
        record = self.train(
            variant.name, model, s.continue_steps, warmup, lr, min_lr, schedule, variant.is_moe
        )
        cfg = json.loads((model / "config.json").read_text())
        record["params_total"] = count_params(model)
        record["moe"] = cfg.get("moe")
        return record

    def run(self, variants: list[Variant]) -> tuple[dict, list[dict]]:
        self.prepare_data()
        start = self.pretrain()
        records = [self.continued(v) for v in variants]
        return start, records

    def tokens(self, steps: int) -> int:
        return steps * self.size.global_batch * self.size.seq_len


# ---- helpers ---------------------------------------------------------------------------------------------


def export_dense(run_dir: Path, init_dir: Path, out: Path) -> None:
    """Write the final weights of a dense ZeRO-1/2 training run as a Hugging Face directory.

    For a dense model DeepSpeed's `mp_rank_00_model_states.pt` holds the whole (unsharded) module state
    dict under 'module', in the training dtype (fp32 here; bf16 runs keep fp32 masters in the optimizer
    shards, so their export is the bf16 copy). config.json and the tokenizer come from `init_dir`.
    Local stand-in: switch to `upcycle export` once it handles dense checkpoints.
    """
    import torch
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    states = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    module = {k.removeprefix("module."): v for k, v in states["module"].items()}
    from safetensors import safe_open

    with safe_open(str(init_dir / "model.safetensors"), "pt") as f:
        expected = set(f.keys())
    missing, extra = expected - set(module), set(module) - expected
    if missing or extra:
        raise SystemExit(
            f"export: checkpoint and model disagree: missing {sorted(missing)}, extra {sorted(extra)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: module[k].float().contiguous() for k in sorted(expected)},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for item in init_dir.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy2(item, out / item.name)


def independent_router_rows(model_dir: Path, seed: int) -> None:
    """Ablation: replace the virtual-group router (G rows per copy shared) by N independent rows, same std."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    std = cfg["moe"]["router_init_std"]
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        changed = False
        for name, tensor in tensors.items():
            if name.endswith("mlp.gate.weight"):
                tensors[name] = (torch.randn(tensor.shape, generator=generator) * std).to(tensor.dtype)
                changed = True
        if changed:
            save_file(tensors, str(path), metadata={"format": "pt"})


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def default_nproc() -> int:
    if cuda_available():
        import torch

        return torch.cuda.device_count()
    return 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    import platform

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


# ---- commands --------------------------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    p = Pipeline(args)
    p.say(f"quickstart, size {args.size}: working directory {p.out}")
    start, records = p.run(quickstart_variants(p.size))
    start["params_total"] = count_params(p.out / "dense")
    wall = time.time() - p.started
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
        "settings": p.settings(),
        "wall_seconds": round(wall, 1),
        "machine": machine(),
        "runs": {r["name"]: r for r in [start, *records]},
    }
    (p.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = results_table(start, records)
    (p.out / "results.md").write_text(table + "\n")
    plot(p.out / "val_curves.png", start, records, "continued training at equal tokens")
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
    print(
        f"results: {p.out / 'results.json'}   plot: {p.out / 'val_curves.png'}   "
        f"wall time {wall / 60:.1f} min"
    )
    print(f"view the runs:  tensorboard --logdir {p.out / 'runs'}")
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    p = Pipeline(args)
    p.say(f"paper comparisons, size {args.size}: working directory {p.out}")
    variants = paper_variants(p.size)
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in variants if v.name in wanted]
    start, records = p.run(variants)
    start["params_total"] = count_params(p.out / "dense")
    by_name = {r["name"]: r for r in records}
    s = p.size
    lines = [
        f"Size `{args.size}`: dense Llama H={s.hidden}, F={s.intermediate}, {s.layers} layers, "
        f"vocab {s.vocab}, "
        f"{start['params_total'] / 1e6:.2f}M parameters; pretrained {start['steps']} steps = "
        f"{start['tokens']:,} tokens; every continued run {s.continue_steps} steps = "
        f"{p.tokens(s.continue_steps):,} tokens (batch {s.global_batch} x {s.seq_len}); seed 1234 (data), "
        f"0 (init, router); {p.nproc} ranks; {machine()}.",
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
    (p.out / "reproduce.md").write_text(text)
    (p.out / "reproduce.json").write_text(
        json.dumps(
            {
                "settings": p.settings(),
                "dense_start": start,
                "runs": records,
                "comparisons": verdicts,
                "wall_seconds": round(time.time() - p.started, 1),
            },
            indent=2,
        )
        + "\n"
    )
    plot(p.out / "reproduce.png", start, records, "paper comparisons: continued training at equal tokens")
    print()
    print(text)
    print(f"table: {p.out / 'reproduce.md'}   plot: {p.out / 'reproduce.png'}")
    print(f"view the runs:  tensorboard --logdir {p.out / 'runs'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("quickstart", cmd_quickstart, "prep, pretrain dense, upcycle, continue dense and MoE, compare"),
        ("paper", cmd_paper, "the paper's comparisons (reuses the quickstart's work directory)"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--size", choices=tuple(SIZES), default="cpu")
        p.add_argument("--out", help="working directory (default runs/quickstart, or runs/quickstart-SIZE)")
        p.add_argument("--nproc", type=int, help="ranks (default: all GPUs, or 2 on CPU)")
        p.add_argument("--corpus", help="JSONL corpus to use instead of the embedded standard library one")
        p.add_argument("--force", action="store_true", help="discard a working directory with other settings")
        if name == "paper":
            p.add_argument("--only", help="comma-separated run names")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
