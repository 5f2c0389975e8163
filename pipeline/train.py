"""The training loop: DeepSpeed ZeRO plus AutoEP expert parallelism, one CPU box to many GPU nodes.

    deepspeed [--hostfile launch/hostfile] pipeline/train.py --config FILE|NAME [--section.key value ...]
    torchrun --nproc_per_node 2 pipeline/train.py --config FILE ...
    mpirun -n 2 python pipeline/train.py --config FILE ...          (ranks found through mpi4py)

Three parts (docs/design.md §7): `pipeline.preflight` checks everything before a process group starts;
`pipeline.ds_adapter` turns our model and run config into DeepSpeed's engine; this file is the loop.
Running the same command again with the same `output.dir` resumes from the latest complete checkpoint
(docs/design.md §6). SIGTERM makes every rank finish its step, save and exit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep.faults import fault_point
from data_prep.fileio import write_atomically
from pipeline import checkpointing, ds_adapter, metrics, universal_checkpoint
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.preflight import prepare
from pipeline.run_config import RunConfig

LOSS_PARTS = ("loss", "lm_loss", "aux_loss", "z_loss")
# The fault point (data_prep/faults.py) of a rank's end: its final checkpoint saved, its groups shut down.
TEARDOWN_FAULT = "train.teardown"
VAL_WINDOWS_FILE = "val_window_losses.json"  # the last evaluation, window by window (launch/report.py)


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


class Trainer:
    """Owns the engine, the data, the run log and the checkpoints of one run."""

    def __init__(self, cfg: RunConfig, model_config: ModelConfig, device: torch.device):
        from data_prep.reader import DistributedBatches, PackedTokenDataset
        from pipeline.hf_io import load_model

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        t = cfg.train
        self.log = metrics.RunLog(
            cfg.output.dir, model_config, t.seq_len, t.global_batch, t.steps, self.rank, self.world, device
        )
        # Which checkpoint, and whether through the universal route, decides how the engine is built.
        self.resume_from, self.universal = self._plan_resume()
        torch.manual_seed(t.seed)
        model = load_model(cfg.model.path, dtype=torch.float32, device=str(device))
        self.engine, self.scheduler = ds_adapter.initialize_engine(
            model, cfg, model_config, lambda s: lr_multiplier(s, cfg), load_universal=self.universal
        )
        self.capture = ds_adapter.attach_router_capture(self.engine, model_config, cfg.moe.aux_loss_scope)
        if self.capture and cfg.moe.fast_path:
            for line in ds_adapter.install_fast_path(self.engine):
                self.log.log(line)
        for line in ds_adapter.install_expert_bias(self.engine, self.capture, cfg):  # moe.balance bias
            self.log.log(line)
        self.train_data = PackedTokenDataset(cfg.data.path, "train", t.seq_len, t.seed, cfg.data.weights)
        self.valid_data = PackedTokenDataset(
            cfg.data.path, "valid", t.seq_len, cfg.data.eval_seed, cfg.data.weights
        )
        self.batches = DistributedBatches(self.train_data, t.global_batch, self.rank, self.world)
        self.step = 0
        self.stop_requested = False
        self.finished: str | None = None  # the final checkpoint's tag, once every step is saved
        if self.rank == 0:
            checkpointing.clear_finished(cfg.output.dir)

    def train(self) -> None:
        self.maybe_resume()
        # The handler is a bound method: while installed it keeps this trainer, its engine and through
        # them every process group alive until interpreter exit (see `ds_adapter.shutdown_distributed`).
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._train_loop()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _train_loop(self) -> None:
        cfg, out = self.cfg, self.cfg.output
        self.log.open()
        while self.step < cfg.train.steps:
            started = time.perf_counter()
            stats = self.train_step()
            self.step += 1
            stats["step_time"] = time.perf_counter() - started
            if self.step % out.log_interval == 0 or self.step == cfg.train.steps:
                self.log.train_step(self.step, stats)
            if out.eval_interval and self.step % out.eval_interval == 0:
                self.evaluate()
            if self._agree_to_stop():
                self.log.log(f"SIGTERM received: saving at step {self.step} and exiting")
                self.save()
                return
            if out.checkpoint_interval and self.step % out.checkpoint_interval == 0:
                self.save()
        if not (out.eval_interval and self.step % out.eval_interval == 0):
            self.evaluate()
        final = checkpointing.step_tag(self.step)
        if checkpointing.latest_tag(out.dir) != final:
            self.save()
        self.log.close(self.step)
        self.finished = final
        checkpointing.record_finished(out.dir, self.rank, final)

    def train_step(self) -> dict:
        """One optimizer step: the micro-batches through the engine; returns rank-averaged stats."""
        batch = next(self.batches).to(self.device)  # [global_batch / world, seq_len + 1]
        micro_batches = batch.split(self.cfg.train.micro_batch)
        lr = self.scheduler.get_last_lr()[0]  # the learning rate this step uses
        if self.capture:
            self.capture.begin_step()
        totals = torch.zeros(len(LOSS_PARTS), dtype=torch.float64)
        counts_LN, entropy_L = None, None
        for tokens in micro_batches:
            loss, parts, layer_loads = self.forward_loss(tokens)
            self.engine.backward(loss)
            self.engine.step()
            totals += torch.tensor(parts, dtype=torch.float64) / len(micro_batches)
            if layer_loads is not None:
                counts, entropy = layer_loads
                counts_LN = counts if counts_LN is None else counts_LN + counts
                entropy_L = entropy if entropy_L is None else entropy_L + entropy
        dist.all_reduce(totals)  # a NaN or inf on any rank reaches every rank: all of them stop together
        stats = dict(zip(LOSS_PARTS, (totals / self.world).tolist(), strict=True))
        self._log_step_aux(stats)
        if counts_LN is not None:
            dist.all_reduce(counts_LN)
            dist.all_reduce(entropy_L)
            stats["expert_counts"] = counts_LN
            stats.update(self.capture.update_expert_bias(counts_LN))  # moe.balance bias: once per step
            tokens_seen = self.cfg.train.global_batch * self.cfg.train.seq_len
            stats["router_entropy"] = (entropy_L / tokens_seen).tolist()
        grad_norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        stats["lr"] = lr
        self._stop_if_not_finite(stats, grad_norm_reported=grad_norm is not None)
        return stats

    def _log_step_aux(self, stats: dict) -> None:
        """moe.aux_loss_scope=global: log the step's aux loss over its whole global batch, and the loss
        with it, not the mean of the micro-batches' (docs/design.md §3). Collective: every rank calls it."""
        step_aux = self.capture.step_aux() if self.capture else None
        if step_aux is None:
            return
        stats["aux_loss"] = step_aux
        stats["loss"] = self.cfg.moe.total_loss(stats["lm_loss"], step_aux, stats["z_loss"])

    def forward_loss(self, tokens_BT1: torch.Tensor):
        """(loss to backpropagate, its parts as floats, per-layer (expert counts, router entropy) or None)."""
        inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        if self.capture:
            self.capture.logits.clear()
        logits_BTV = self.engine(inputs_BT)
        lm_loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.reshape(-1))
        if not self.capture:
            return lm_loss, [lm_loss.item(), lm_loss.item(), 0.0, 0.0], None
        aux, z = self.capture.losses()
        loss = self.cfg.moe.total_loss(lm_loss, aux, z)
        top_k, routing = self.capture.top_k, self.capture.routing
        captured = zip(self.capture.logits, self.capture.biases, strict=True)  # biases: moe.balance bias
        loads = [metrics.expert_load(lg, top_k, routing, b) for lg, b in captured]
        layer_loads = (torch.stack([c for c, _ in loads]), torch.stack([e for _, e in loads]))
        return loss, [loss.item(), lm_loss.item(), aux.item(), z.item()], layer_loads

    def _stop_if_not_finite(self, stats: dict, grad_norm_reported: bool) -> None:
        """A non-finite loss or gradient norm has already reached the weights through engine.step(): stop
        before anything is saved, so `latest` keeps naming the last finite checkpoint."""
        keys = [*LOSS_PARTS, "grad_norm"] if grad_norm_reported else LOSS_PARTS  # no norm off a boundary
        bad = {k: stats[k] for k in keys if not math.isfinite(stats[k])}
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

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over data.eval_batches global batches (0: every full batch), the same windows
        every time and in every run whatever its train.seed (data.eval_seed orders them). Also logs the
        standard error over windows and leaves the per-window losses in VAL_WINDOWS_FILE, so that two
        runs can be compared window for window (a paired difference has a far smaller error)."""
        from data_prep.reader import DistributedBatches

        t = self.cfg.train
        n_batches = self.cfg.data.eval_batches or len(self.valid_data) // t.global_batch
        if n_batches == 0:
            self.log.log("no full batch of validation windows: skipping evaluation")
            return float("nan")
        self.engine.eval()
        batches = DistributedBatches(self.valid_data, t.global_batch, self.rank, self.world)
        local_W = torch.cat([self._window_losses(next(batches)) for _ in range(n_batches)])
        self.engine.train()
        window_losses = self._in_sample_order(local_W, n_batches)
        val_loss = float(window_losses.mean())
        if self.rank == 0:
            record = {"step": self.step, "eval_seed": self.cfg.data.eval_seed}
            record["losses"] = window_losses.tolist()
            write_atomically(os.path.join(self.cfg.output.dir, VAL_WINDOWS_FILE), json.dumps(record) + "\n")
        self.log.validation(self.step, val_loss, metrics.standard_error(window_losses))
        return val_loss

    def _window_losses(self, batch_BT1: torch.Tensor) -> torch.Tensor:
        """Mean token loss of each window of this rank's share of one global batch, float64."""
        losses = []
        for tokens_BT1 in batch_BT1.to(self.device).split(self.cfg.train.micro_batch):
            losses.append(metrics.window_losses(self.engine(tokens_BT1[:, :-1]), tokens_BT1[:, 1:]))
        return torch.cat(losses)

    def _in_sample_order(self, local_W: torch.Tensor, n_batches: int) -> torch.Tensor:
        """Every rank's window losses, ordered as the global samples (batch, then rank, then row)."""
        gathered = [torch.empty_like(local_W) for _ in range(self.world)]
        dist.all_gather(gathered, local_W)
        per_rank = local_W.numel() // n_batches
        return torch.stack([g.view(n_batches, per_rank) for g in gathered], dim=1).flatten()

    # ---- checkpoints (docs/design.md §6) -------------------------------------------------------
    def _plan_resume(self) -> tuple[str | None, bool]:
        """(the checkpoint to resume from, whether it goes through DeepSpeed's universal checkpoint).

        A checkpoint saved under another topology (EP size, ZeRO stage, world size) is converted once to
        the universal format and cached beside it (docs/design.md §6).
        """
        out = self.cfg.output.dir
        # Verified (sizes and sha256, all ranks together) before DeepSpeed unpickles anything.
        tag, warnings = checkpointing.resume_tag(out, self.cfg.output.on_damaged_checkpoint)
        for line in warnings:
            self.log.log(line)
        if self.rank == 0:
            for removed in checkpointing.remove_incomplete(out, tag):
                self.log.log(f"removed incomplete checkpoint {removed} (a save that did not finish)")
        dist.barrier()
        if tag is None:
            return None, False
        step_dir = checkpointing.checkpoint_root(out) / tag
        now, state = checkpointing.topology(self.cfg, self.world), checkpointing.read_run_state(step_dir)
        changed = checkpointing.topology_changes(state, now)
        if not changed:
            return tag, False
        if self.rank == 0:
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            self.log.log(f"{tag} was saved under another topology ({details})")
        timeout_s = self.cfg.parallel.timeout_s  # how long the other ranks wait for a silent rank 0
        universal_checkpoint.ensure_universal(step_dir, self.rank, self.log.log, state["step"], timeout_s)
        dist.barrier()
        return tag, True

    def maybe_resume(self) -> None:
        tag = self.resume_from
        if tag is None:
            return
        state = checkpointing.load(self.engine, self.cfg.output.dir, tag, universal=self.universal)
        self.step = state["step"]
        self.batches.consumed_samples = state["consumed_samples"]
        consumed = self.batches.consumed_samples
        route = " through its universal checkpoint" if self.universal else ""
        self.log.log(f"resumed from {tag}{route}: step {self.step}, {consumed} samples consumed")

    def save(self) -> None:
        run_state = {
            "step": self.step,
            "consumed_samples": self.batches.consumed_samples,
            "data_seed": self.cfg.train.seed,
            "config": self.cfg.to_dict(),
            "topology": checkpointing.topology(self.cfg, self.world),
        }
        out = self.cfg.output
        tag = checkpointing.save(self.engine, out.dir, self.step, run_state, out.keep_checkpoints)
        self.log.log(f"saved checkpoint {tag}")

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (`engine.destroy`) and our references to the engine."""
        self.engine.destroy()
        self.engine = self.capture = self.scheduler = None

    # ---- preemption ----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, model_config = prepare(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(cfg.output.dir, exist_ok=True)
    device = ds_adapter.init_distributed(cfg)
    trainer, code = None, 0
    try:
        trainer = Trainer(cfg, model_config, device)
        trainer.train()
    except UserError as exc:
        print(f"train (rank {dist.get_rank()}): error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        if not ds_adapter.is_peer_failure(exc):
            raise
        try:
            latest = checkpointing.latest_tag(cfg.output.dir) or "none yet"
        except UserError:
            latest = "unreadable"
        ds_adapter.leave_after_peer_failure(ds_adapter.peer_failure_message(cfg, exc, latest))
    # Outside the except blocks: a caught exception's traceback would keep the trainer alive.
    rank, finished = dist.get_rank(), trainer.finished if trainer else None
    if trainer:
        trainer.close()
    trainer = None  # its engine holds the process groups: they must go before the interpreter does
    left = ds_adapter.shutdown_distributed(collective=code == 0)  # after an error, other ranks may be gone
    if left:
        print(
            f"train (rank {rank}): {len(left)} communication threads outlived shutdown: {left}",
            file=sys.stderr,
        )
    if finished:
        fault_point(TEARDOWN_FAULT, rank)
        checkpointing.record_exit(cfg.output.dir, rank, finished)
    return code


if __name__ == "__main__":
    sys.exit(main())
