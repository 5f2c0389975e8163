"""Training entry point: DeepSpeed ZeRO plus AutoEP expert parallelism, one CPU box to many GPU nodes.

    deepspeed [--hostfile launch/hostfile] pipeline/train.py --config FILE [--section.key value ...]
    torchrun --nproc_per_node 2 pipeline/train.py --config FILE ...
    mpirun -n 2 python pipeline/train.py --config FILE ...          (ranks found through mpi4py)

The run config is validated before any process group starts. Running the same command again with the
same `output.dir` resumes from the latest complete checkpoint. SIGTERM makes every rank finish its step,
save and exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import checkpointing, metrics
from pipeline.config import ModelConfig, read_hf_config
from pipeline.errors import UserError
from pipeline.moe import load_balancing_loss, route, router_z_loss
from pipeline.run_config import (
    RunConfig,
    launch_world_size,
    load_run_config,
    validate,
    validate_against_model,
)

DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
MOE_LAYER_PATTERN = r"model\.layers\.\d+\.mlp"
ROUTER_SUFFIX = "mlp.router.gate"  # AutoEP moves our `mlp.gate` Linear to `mlp.router.gate`


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """--config FILE plus `--section.key value` overrides; the launcher's --local_rank is dropped."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="run config YAML (see launch/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def build_ds_config(cfg: RunConfig, model_config: ModelConfig, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config, from the ZeRO and precision templates plus values from the run config."""
    t, p = cfg.train, cfg.parallel
    ds = {}
    for name in (f"zero{p.zero_stage}.json", f"{t.precision}.json"):
        with open(os.path.join(DS_CONFIG_DIR, name)) as fh:
            ds.update(json.load(fh))
    ds.update(
        {
            "train_batch_size": t.global_batch,
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (t.micro_batch * world_size),
            "gradient_clipping": t.grad_clip,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": t.lr,
                    "betas": [t.beta1, t.beta2],
                    "eps": 1e-8,
                    "weight_decay": t.weight_decay,
                    "torch_adam": True,
                },
            },
        }
    )
    if model_config.moe is not None:
        moe = model_config.moe
        ds["expert_parallel"] = autoep_section(moe.top_k, moe.routing, p.ep_size, cuda)
    return ds


def autoep_section(top_k: int, routing: str, ep_size: int, cuda: bool, layer_pattern=MOE_LAYER_PATTERN):
    """DeepSpeed's `expert_parallel` (AutoEP) config for our MoE blocks (see DESIGN section 3)."""
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": layer_pattern,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj",
        "expert_w3": None,
        "top_k": top_k,
        "score_func": "softmax",
        # softmax over the K selected logits == softmax over all, then top-K, then renormalise.
        "route_norm": routing == "topk-softmax",
        "routed_scaling_factor": 1.0,  # the scale lives in the expert weights
        "use_grouped_mm": cuda,
    }


def lr_multiplier(step: int, cfg: RunConfig) -> float:
    """Linear warmup to train.lr, then cosine to train.min_lr (or constant); a factor on train.lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class RouterCapture:
    """Collects router logits [T, N] from forward hooks on every MoE layer's gate Linear."""

    top_k: int
    routing: str
    logits: list = field(default_factory=list)

    def attach(self, module: torch.nn.Module) -> int:
        gates = [m for name, m in module.named_modules() if name.endswith(ROUTER_SUFFIX)]
        for gate in gates:
            gate.register_forward_hook(lambda _m, _i, out: self.logits.append(out))
        return len(gates)

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss), each averaged over the MoE layers of this forward."""
        if not self.logits:
            zero = torch.zeros(())
            return zero, zero
        aux = [
            load_balancing_loss(lg, route(lg, self.top_k, self.routing)[1], lg.shape[-1])
            for lg in self.logits
        ]
        z = [router_z_loss(lg) for lg in self.logits]
        return torch.stack(aux).mean(), torch.stack(z).mean()


class Trainer:
    """Owns the engine, the data, the metrics and the checkpoints of one run."""

    def __init__(self, cfg: RunConfig, model_config: ModelConfig, device: torch.device):
        import deepspeed

        from data_prep.reader import DistributedBatches, PackedTokenDataset
        from pipeline.hf_io import load_model

        self.cfg, self.model_config, self.device = cfg, model_config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        t = cfg.train
        torch.manual_seed(t.seed)
        model = load_model(cfg.model.path, dtype=torch.float32, device=str(device))
        ds_config = build_ds_config(cfg, model_config, self.world, device.type == "cuda")
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model.train(),
            model_parameters=model.parameters(),
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg)),
        )
        moe = model_config.moe
        self.capture = RouterCapture(moe.top_k, moe.routing) if moe else None
        if moe is not None:
            attached = self.capture.attach(self.engine.module)
            if attached != len(moe.layers):
                raise RuntimeError(f"AutoEP replaced {attached} MoE layers, the model has {len(moe.layers)}")
            if cfg.moe.fast_path:
                self.install_fast_path()
        self.grad_accum = t.global_batch // (t.micro_batch * self.world)
        self.train_data = PackedTokenDataset(cfg.data.path, "train", t.seq_len, t.seed, cfg.data.weights)
        self.valid_data = PackedTokenDataset(cfg.data.path, "valid", t.seq_len, t.seed, cfg.data.weights)
        self.batches = DistributedBatches(self.train_data, t.global_batch, self.rank, self.world)
        self.step = 0
        self.stop_requested = False
        self.writer = None
        self.load_history: list[tuple[int, list[list[float]]]] = []
        self.flops_per_token = metrics.flops_per_token(model_config, t.seq_len)
        self.peak_tflops = metrics.peak_tflops(device)

    def install_fast_path(self) -> None:
        from pipeline.fast_ep import install_fast_path

        switched, skipped = install_fast_path(self.engine.module)
        self.log(f"MoE fast path on {switched} of {switched + len(skipped)} AutoEP layers (moe.fast_path)")
        for line in skipped:
            self.log(f"  stock DeepSpeed forward kept for {line}")

    # ---- state ---------------------------------------------------------------------------------
    def run_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.batches.consumed_samples,
            "data_seed": self.cfg.train.seed,
            "config": self.cfg.to_dict(),
            "topology": topology(self.cfg, self.world),
        }

    def maybe_resume(self) -> None:
        tag = checkpointing.latest_tag(self.cfg.output.dir)
        if self.rank == 0:
            for removed in checkpointing.remove_incomplete(self.cfg.output.dir, tag):
                self.log(f"removed incomplete checkpoint {removed} (a save that did not finish)")
        dist.barrier()
        if tag is None:
            return
        state = checkpointing.load(self.engine, self.cfg.output.dir, tag)
        self.step = state["step"]
        self.batches.consumed_samples = state["consumed_samples"]
        self.log(f"resumed from {tag}: step {self.step}, {self.batches.consumed_samples} samples consumed")

    def save(self) -> None:
        tag = checkpointing.save(
            self.engine, self.cfg.output.dir, self.step, self.run_state(), self.cfg.output.keep_checkpoints
        )
        self.log(f"saved checkpoint {tag}")

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        self.maybe_resume()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.output.dir, "tensorboard"))
        while self.step < cfg.train.steps:
            started = time.perf_counter()
            stats = self.train_step()
            self.step += 1
            stats["step_time"] = time.perf_counter() - started
            if self.step % cfg.output.log_interval == 0 or self.step == cfg.train.steps:
                self.report(stats)
            if cfg.output.eval_interval and self.step % cfg.output.eval_interval == 0:
                self.evaluate()
            if self._agree_to_stop():
                self.log(f"SIGTERM received: saving at step {self.step} and exiting")
                self.save()
                return
            if cfg.output.checkpoint_interval and self.step % cfg.output.checkpoint_interval == 0:
                self.save()
        if not (cfg.output.eval_interval and self.step % cfg.output.eval_interval == 0):
            self.evaluate()
        if checkpointing.latest_tag(cfg.output.dir) != f"step_{self.step:08d}":
            self.save()
        self.finish()

    def train_step(self) -> dict:
        """One optimizer step: grad_accum micro-batches through the engine; returns rank-averaged stats."""
        batch = next(self.batches).to(self.device)  # [global_batch / world, seq_len + 1]
        micro_batches = batch.split(self.cfg.train.micro_batch)
        lr = self.scheduler.get_last_lr()[0]  # the learning rate this step uses
        totals = torch.zeros(4, dtype=torch.float64)  # loss, lm, aux, z
        moe_counts, entropy = None, None
        for tokens in micro_batches:
            loss, parts, layer_loads = self.forward_loss(tokens)
            self.engine.backward(loss)
            self.engine.step()
            totals += torch.tensor(parts, dtype=torch.float64) / len(micro_batches)
            if layer_loads is not None:
                counts, ent = layer_loads
                moe_counts = counts if moe_counts is None else moe_counts + counts
                entropy = ent if entropy is None else entropy + ent
        dist.all_reduce(totals)  # a NaN or inf on any rank reaches every rank: all of them stop together
        totals /= self.world
        stats = dict(zip(("loss", "lm_loss", "aux_loss", "z_loss"), totals.tolist(), strict=True))
        if moe_counts is not None:
            dist.all_reduce(moe_counts)
            dist.all_reduce(entropy)
            tokens_seen = self.cfg.train.global_batch * self.cfg.train.seq_len
            stats["expert_counts"] = moe_counts  # [layers, N]
            stats["router_entropy"] = (entropy / tokens_seen).tolist()
        grad_norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        stats["lr"] = lr
        self._stop_if_not_finite(stats)
        return stats

    def _stop_if_not_finite(self, stats: dict) -> None:
        """A non-finite loss or gradient norm has already reached the weights through engine.step(): stop
        before anything is saved, so `latest` keeps naming the last finite checkpoint."""
        keys = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")
        bad = {k: stats[k] for k in keys if not math.isfinite(stats[k])}
        if self.engine.get_global_grad_norm() is None:
            bad.pop("grad_norm", None)  # no norm reported (not an accumulation boundary): not a fault
        if not bad:
            return
        last = checkpointing.latest_tag(self.cfg.output.dir)
        raise UserError(
            f"non-finite training values at step {self.step + 1}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" (lr {stats['lr']:.3g}). Stopped without saving; latest still names "
            f"{last or 'no checkpoint'}. Lower train.lr, raise train.warmup_steps or check the data, "
            "then run the same command again to resume from it."
        )

    def forward_loss(self, tokens_BT1: torch.Tensor):
        inputs, targets = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        if self.capture:
            self.capture.logits.clear()
        logits = self.engine(inputs)
        lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = lm_loss
        parts = [0.0, lm_loss.item(), 0.0, 0.0]
        layer_loads = None
        if self.capture:
            aux, z = self.capture.losses()
            loss = lm_loss + self.cfg.moe.aux_loss_coef * aux + self.cfg.moe.z_loss_coef * z
            parts[2], parts[3] = aux.item(), z.item()
            loads = [
                metrics.expert_load(lg, self.capture.top_k, self.capture.routing)
                for lg in self.capture.logits
            ]
            layer_loads = (torch.stack([c for c, _ in loads]), torch.stack([e for _, e in loads]))
        parts[0] = loss.item()
        return loss, parts, layer_loads

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over data.eval_batches global batches, the same windows every time."""
        from data_prep.reader import DistributedBatches

        t = self.cfg.train
        if len(self.valid_data) == 0:
            self.log("no validation windows: skipping evaluation")
            return float("nan")
        self.engine.eval()
        batches = DistributedBatches(self.valid_data, t.global_batch, self.rank, self.world)
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(self.cfg.data.eval_batches):
            for tokens in next(batches).to(self.device).split(t.micro_batch):
                logits = self.engine(tokens[:, :-1])
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"
                )
                total += torch.tensor([loss.item(), tokens[:, 1:].numel()], dtype=torch.float64)
        dist.all_reduce(total)
        self.engine.train()
        val_loss = float(total[0] / total[1])
        self.log(f"step {self.step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
        if self.writer:
            self.writer.add_scalar("val/loss", val_loss, self.step)
            self.writer.add_scalar("val/perplexity", math.exp(min(val_loss, 50)), self.step)
        if self.rank == 0:
            with open(os.path.join(self.cfg.output.dir, "val_loss.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": self.step, "val_loss": val_loss}) + "\n")
        return val_loss

    # ---- reporting -----------------------------------------------------------------------------
    def report(self, stats: dict) -> None:
        t = self.cfg.train
        tokens_per_s = t.global_batch * t.seq_len / stats["step_time"]
        tflops = self.flops_per_token * tokens_per_s / self.world / 1e12  # per device
        mfu = f"{100 * tflops / self.peak_tflops:.1f}%" if self.peak_tflops else "n/a"
        memory = (
            torch.cuda.max_memory_allocated() / 2**30
            if self.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        self.log(
            f"step {self.step:>6}/{t.steps} | loss {stats['loss']:.4f} | lm {stats['lm_loss']:.4f} | "
            f"aux {stats['aux_loss']:.4f} | lr {stats['lr']:.2e} | grad norm {stats['grad_norm']:.3f} | "
            f"{tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s | MFU {mfu} | mem {memory:.1f} GiB"
        )
        if self.rank == 0:
            with open(os.path.join(self.cfg.output.dir, "train_log.jsonl"), "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "step": self.step,
                            **{
                                k: stats[k]
                                for k in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm")
                            },
                        }
                    )
                    + "\n"
                )
        if not self.writer:
            return
        w, s = self.writer, self.step
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm"):
            w.add_scalar(f"train/{key}", stats[key], s)
        w.add_scalar("perf/tokens_per_s", tokens_per_s, s)
        w.add_scalar("perf/tflops_per_device", tflops, s)
        if "expert_counts" in stats:
            self._report_moe(stats["expert_counts"], stats["router_entropy"])

    def _report_moe(self, counts_LN: torch.Tensor, entropy_L: list[float]) -> None:
        w, s = self.writer, self.step
        shares = []
        for row, layer in enumerate(self.model_config.moe.layers):
            summary = metrics.load_summary(counts_LN[row])
            for key, value in summary.items():
                w.add_scalar(f"moe/layer{layer:02d}/{key}", value, s)
            w.add_scalar(f"moe/layer{layer:02d}/router_entropy", entropy_L[row], s)
            share = counts_LN[row] / counts_LN[row].sum().clamp_min(1)
            w.add_histogram(f"moe/layer{layer:02d}/expert_share", share, s)
            shares.append(share.tolist())
        self.load_history.append((s, shares))

    def finish(self) -> None:
        if self.rank == 0 and self.load_history:
            png = os.path.join(self.cfg.output.dir, "expert_load.png")
            metrics.save_load_heatmap(self.load_history, list(self.model_config.moe.layers), png)
            self.log(f"expert load picture: {png}")
        if self.writer:
            self.writer.close()
        self.log(f"done: {self.step} steps; tensorboard --logdir {self.cfg.output.dir}/tensorboard")

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # ---- preemption ----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def topology(cfg: RunConfig, world_size: int) -> dict:
    """The settings DeepSpeed shards checkpoints by: a resume must keep them."""
    return {
        "parallel.ep_size": cfg.parallel.ep_size,
        "parallel.zero_stage": cfg.parallel.zero_stage,
        "world_size": world_size,
    }


def init_distributed(cfg: RunConfig) -> torch.device:
    import deepspeed

    cuda = torch.cuda.is_available()
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, timeout=timeout)
    # Groups made later without a timeout (DeepSpeed's expert/data-parallel groups, the all-to-all's)
    # take torch's module default (30 min), not the world's: a silent peer would hang them that long.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout
    atexit.register(remove_shm_buffer, shm_buffer_path())
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shm_buffer_path() -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce op makes for this rank (csrc/cpu/comm/shm.cpp).

    DeepSpeed never unlinks it: each CPU run on one host would leave ~67 MB per rank in /dev/shm (RAM),
    and a later run on the same port could map a stale segment.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / shm_buffer_name(addr, port, dist.get_rank())


def shm_buffer_name(addr: str, port: int | str, rank: int | str) -> str:
    """The segment's file name as shm.cpp builds it; "*" in any field makes it a glob pattern."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def remove_shm_buffer(path: Path) -> None:
    """Unlink this rank's segment at exit; other ranks keep their mappings until they exit too."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def prepare(argv: list[str], world_size: int | None = None) -> tuple[RunConfig, ModelConfig]:
    """Everything that can fail before a process group exists: config, model config, data directories.

    `world_size` defaults to what the launcher's environment says.
    """
    from data_prep.reader import PackedTokenDataset

    config_path, overrides = parse_args(argv)
    cfg = load_run_config(config_path, overrides)
    world_size = world_size or launch_world_size()
    validate(cfg, world_size, torch.cuda.is_available())
    _, model_config = read_hf_config(cfg.model.path)
    validate_against_model(cfg, model_config.moe.num_experts if model_config.moe else None)
    if model_config.moe and model_config.mlp_bias:
        raise UserError(
            f"model.path {cfg.model.path}: MoE experts with biases (mlp_bias) are not supported by "
            "DeepSpeed AutoEP training"
        )
    for split in ("train", "valid"):
        data = PackedTokenDataset(cfg.data.path, split, cfg.train.seq_len, cfg.train.seed, cfg.data.weights)
    check_tokenizer(cfg, model_config, data)
    checkpointing.check_topology(cfg.output.dir, topology(cfg, world_size))
    if cfg.train.precision == "bf16" and not torch.cuda.is_available():
        print("warning: train.precision=bf16 on CPU is slow; fp32 is the CPU default", file=sys.stderr)
    return cfg, model_config


def check_tokenizer(cfg: RunConfig, model_config: ModelConfig, data) -> None:
    """Refuse, before any process group starts, data tokenized with a vocabulary the model does not have."""
    import hashlib

    if data.vocab_size > model_config.vocab_size:
        raise UserError(
            f"data.path was tokenized with a vocabulary of {data.vocab_size} tokens, but the model at "
            f"model.path has vocab_size {model_config.vocab_size}: re-tokenize with the model's own tokenizer"
        )
    model_tok = os.path.join(cfg.model.path, "tokenizer.json")
    data_tok = data.streams[0].manifest.get("tokenizer", {})
    if not os.path.isfile(model_tok) or not data_tok.get("sha256"):
        return
    with open(model_tok, "rb") as fh:
        raw = fh.read()
    if hashlib.sha256(raw).hexdigest() == data_tok["sha256"]:
        return
    # Different bytes can still be the same vocabulary (a re-saved file): compare token -> id maps.
    from tokenizers import Tokenizer

    model_vocab = Tokenizer.from_str(raw.decode()).get_vocab(with_added_tokens=True)
    path = data_tok.get("path")
    if path and os.path.isfile(path):
        data_vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
        # Every id the data can hold must mean the same token to the model (a larger model vocabulary
        # that extends the data's is fine).
        differ = sorted(t for t, i in data_vocab.items() if model_vocab.get(t) != i)
        if differ:
            raise UserError(
                f"data.path was tokenized with {path}, whose vocabulary differs from the model's "
                f"{model_tok} ({len(differ)} tokens map to other ids, e.g. {differ[:3]}): re-tokenize the "
                "data with the model's tokenizer"
            )
        return
    print(
        f"warning: data.path was tokenized with a tokenizer ({path}) that is gone and whose sha256 differs "
        f"from {model_tok}; cannot check that the vocabularies agree",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, model_config = prepare(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(cfg.output.dir, exist_ok=True)
    device = init_distributed(cfg)
    try:
        Trainer(cfg, model_config, device).train()
    except UserError as exc:
        print(f"train (rank {dist.get_rank()}): error: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        print(peer_failure_message(cfg, exc), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Leave at once: destroying a process group with a dead member can block, and a normal
        # interpreter exit runs the gloo group's destructor while its threads are still waiting on the
        # dead peer, which aborts the process (SIGABRT) after the message. os._exit skips atexit.
        remove_shm_buffer(shm_buffer_path())
        os._exit(PEER_FAILURE_EXIT)
    dist.destroy_process_group()
    return 0


PEER_FAILURE_EXIT = 3
# What gloo/NCCL/c10d errors say when a peer process dies or the network between nodes fails.
PEER_FAILURE_MARKERS = (
    "Connection reset",
    "Connection closed",
    "Connection refused",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Timeout",
    "gloo",
    "NCCL",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception from the training loop is a failed collective (peer gone, network down)."""
    return isinstance(exc, dist.DistError) or any(m in str(exc) for m in PEER_FAILURE_MARKERS)


def peer_failure_message(cfg: RunConfig, exc: BaseException) -> str:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    try:
        latest = checkpointing.latest_tag(cfg.output.dir) or "none yet"
    except UserError:
        latest = "unreadable"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return (
        f"train (rank {rank}): error: lost contact with the other ranks: a collective failed ({first}).\n"
        "  Most likely a peer process died (killed, out of memory, node failure: see the first error in the "
        "other nodes' logs) or the network between the nodes failed. A silent peer is waited for at most "
        f"parallel.timeout_s={cfg.parallel.timeout_s} s.\n"
        f"  Latest complete checkpoint: {latest}. Run the same command again on every node to resume from it."
    )


if __name__ == "__main__":
    sys.exit(main())
