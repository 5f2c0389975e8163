"""The quickstart and a small-scale reproduction of the upcycling paper's comparisons, on the real pipeline.

    python launch/reproduce.py quickstart [--size tiny|cpu|gpu] [--out DIR] [--seeds N]   (quickstart.sh)
    python launch/reproduce.py paper      [--size tiny|cpu|gpu] [--out DIR] [--seeds N]   (the ablation table)

Both share one working directory (default `runs/quickstart` for `--size cpu`, `runs/quickstart-SIZE`
otherwise) and skip every stage that is already complete there, so `paper` after `quickstart` reuses the
data, the pretrained dense model and the three quickstart runs, and only trains the ablations.

Stages, through the `upcycle` command line (the export runs in process):
  1. `upcycle prep corpus|tokenizer|tokenize`: the embedded default corpus (Python's standard library);
  2. `upcycle init` + `upcycle train` (dense, ep_size 1): pretrain a small Llama from scratch, warmup and
     cosine to the minimum learning rate; `dense_start` is the pretrained model scored on the validation
     windows every continued run is scored on;
  3. export the trained dense weights to a Hugging Face directory (`pipeline.export`, in process);
  4. `upcycle convert` for each MoE variant;
  5. `upcycle train` for each variant and for the dense model itself, for each seed: the same number of
     steps and tokens, the same data order within a seed, the same validation windows in every run
     (data.eval_seed); MoE runs use expert parallelism over all ranks;
  6. `results.json`, `results.md`, `val_curves.png` (and for `paper`: `reproduce.json|md|png`): per run and
     seed, mean +- std over seeds, and the window-paired standard error of each difference.

`--seeds N` repeats every continued run with the first N of experiments.SEEDS (data order, conversion
seed); more seeds later add runs and keep the finished ones. What runs (sizes, variants, comparisons) is
defined in launch/experiments.py, the result files are written by launch/report.py; this script runs the
stages.
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
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# launch/ is not a package: this script imports experiments.py and report.py next to it, and the pipeline.
sys.path[:0] = [str(HERE), str(REPO)]

import report  # noqa: E402
from experiments import (  # noqa: E402
    BASE_CONFIG,
    EVAL_SEED,
    SEEDS,
    SIZES,
    Variant,
    paper_variants,
    quickstart_variants,
)

# ---- running the stages --------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.size_name = args.size
        self.size = SIZES[args.size]
        self.out = Path(
            args.out or ("runs/quickstart" if args.size == "cpu" else f"runs/quickstart-{args.size}")
        )
        self.nproc = args.nproc or default_nproc()
        self.seeds = SEEDS[: args.seeds]
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
        seed: int = SEEDS[0][0],
        extra: dict | None = None,
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
            "data.eval_seed": EVAL_SEED,
            "train.seed": seed,
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
            **(extra or {}),
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
        windows = json.loads((run_dir / "val_window_losses.json").read_text())
        record = {
            "name": name,
            "seed": seed,
            "val_loss": curve[-1]["val_loss"],
            "window_losses": windows["losses"],
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
            self.export_dense(self.out / "runs" / "pretrain_dense", init, dense)
            self.say(f"exported the pretrained dense model to {dense}")
        return record

    def export_dense(self, run_dir: Path, init_dir: Path, out: Path) -> None:
        """The final weights of the dense run, as a Hugging Face directory (fp32, one model.safetensors):
        `upcycle export`'s own functions; config.json and the tokenizer come from `init_dir`."""
        import torch

        from pipeline.errors import UserError
        from pipeline.export import export, open_source

        try:
            export(open_source(run_dir, init_dir), out, torch.float32, max_shard_bytes=2**40)
        except UserError as exc:
            sys.exit(f"reproduce: exporting {run_dir} failed: {exc}")

    def dense_start(self, pretrain: dict) -> dict:
        """The pretrained dense model scored in process (`upcycle eval`'s function) on the windows every
        continued run is scored on: data.eval_seed, global_batch windows per batch, eval_batches batches."""
        from pipeline.evaluate import evaluate

        path = self.out / "runs" / "dense_start.json"
        if path.is_file():
            return json.loads(path.read_text())
        s = self.size
        data = self.out / "data"
        batches = s.eval_batches or count_windows(data, s.seq_len) // s.global_batch
        result = evaluate(
            str(self.out / "dense"), [str(data)], "valid", s.seq_len, s.global_batch, batches, EVAL_SEED
        )
        record = {
            **pretrain,
            "name": "dense_start",
            "val_loss": result["loss"],
            "window_losses": result["window_losses"],
            "params_total": count_params(self.out / "dense"),
        }
        path.write_text(json.dumps(record) + "\n")
        self.say(f"dense_start: val loss {record['val_loss']:.4f} on {len(record['window_losses'])} windows")
        return record

    def model_for(self, variant: Variant, model_seed: int) -> Path:
        dense = self.out / "dense"
        if not variant.is_moe:
            return dense
        path = self.out / "models" / f"{variant.model_key()}-s{model_seed}"
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
            str(model_seed),
            "--force",
        ]
        if not variant.weight_scaling:
            argv.append("--no-weight-scaling")
        if variant.drop_ratio:
            argv += ["--drop-ratio", str(variant.drop_ratio)]
        self.upcycle(*argv, log=f"convert_{path.name}")
        if not variant.virtual_groups:
            independent_router_rows(path, seed=model_seed)
        (path / ".done").write_text("")
        return path

    def lr_schedule(self, variant: Variant) -> tuple[float, float, int, str]:
        """(peak, minimum, warmup steps, schedule) of a continued run (experiments.LR_SCHEDULES)."""
        s = self.size
        lr = s.continue_lr if variant.lr == "recipe" else variant.lr
        if lr == "reset":
            return s.lr, s.min_lr, s.continue_warmup, "cosine"
        if lr == "reset_mid":
            return math.sqrt(s.lr * s.min_lr), s.min_lr, s.continue_warmup, "cosine"
        return s.min_lr, s.min_lr, 0, "constant"

    def continued(self, variant: Variant, data_seed: int, model_seed: int) -> dict:
        s = self.size
        model = self.model_for(variant, model_seed)
        lr, min_lr, warmup, schedule = self.lr_schedule(variant)
        record = self.train(
            f"{variant.name}-s{data_seed}",
            model,
            s.continue_steps,
            warmup,
            lr,
            min_lr,
            schedule,
            variant.is_moe,
            seed=data_seed,
            extra=variant.overrides,
        )
        cfg = json.loads((model / "config.json").read_text())
        return {**record, "variant": variant.name, "params_total": count_params(model), "moe": cfg.get("moe")}

    def run(self, variants: list[Variant]) -> tuple[dict, list[dict]]:
        self.prepare_data()
        start = self.dense_start(self.pretrain())
        records = [self.continued(v, data, model) for data, model in self.seeds for v in variants]
        return start, records


# ---- helpers ---------------------------------------------------------------------------------------------


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


def count_windows(data: Path, seq_len: int) -> int:
    from data_prep.reader import PackedTokenDataset

    return len(PackedTokenDataset([str(data)], "valid", seq_len, EVAL_SEED))


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


# ---- commands --------------------------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    p = Pipeline(args)
    p.say(f"quickstart, size {args.size}: working directory {p.out}")
    start, records = p.run(quickstart_variants(p.size))
    report.write_quickstart(p.out, p.settings(), start, records, time.time() - p.started)
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    p = Pipeline(args)
    p.say(f"paper comparisons, size {args.size}: working directory {p.out}")
    variants = paper_variants(p.size)
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in variants if v.name in wanted]
    start, records = p.run(variants)
    report.write_paper(p.out, p.settings(), start, records, time.time() - p.started)
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
        p.add_argument(
            "--seeds",
            type=int,
            default=1,
            choices=range(1, len(SEEDS) + 1),
            help="repeats of every continued run",
        )
        if name == "paper":
            p.add_argument("--only", help="comma-separated run names")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
