"""Gradient clipping under expert parallelism: EP=2 clips with the same global norm as EP=1.

DeepSpeed issue 8475: its fp32 clipping path (`engine.clip_fp32_gradients` -> `clip_grad_norm_`) averages
rank-local norms over the data-parallel group, which is wrong once ranks own different experts. That path
runs only without ZeRO, fp16 and bf16; training here always uses ZeRO 1-3, whose optimizers compute the
norm themselves (ZeRO-1/2: squared partition norms summed over all data-parallel ranks; ZeRO-3: summed
over the partition group, then over the expert-parallel group for expert sub-groups). These tests check
the result end to end, on 2 CPU ranks with the real launcher, for every ZeRO stage:

- the logged gradient norm (the pre-clip norm DeepSpeed clips with) and the loss of every step are the
  same at EP=2 (4 of the 8 experts per rank, all-to-all) as at EP=1 (all 8 experts on both ranks), and
  both equal a plain PyTorch run of the same objective (`torch.nn.utils.clip_grad_norm_` + AdamW);
- `train.grad_clip` is 1e-6 against norms of ~0.8, so every step clips. It is also below Adam's eps
  (1e-8) times sqrt(number of parameters), so the clipped gradients sit under eps and the update is
  proportional to the clip coefficient: a wrong norm reaches the weights instead of being divided back
  out by Adam's second moment. The validation loss after the last step checks the last update.

How much a wrong norm moves these numbers (measured by replacing ZeRO-2's norm with issue 8475's average
of rank-local expert norms at EP=2): the step-1 gradient norm moves by 1.0e-3 relative (the experts hold
6% of this tiny model's gradient norm; embeddings and lm_head the rest) and the loss by up to 1.7e-5 at
step 5; the tolerance is 1e-5 for both. Measured with DeepSpeed's norm: EP=2 vs EP=1 <= 7e-8 (norm and
loss), either vs the plain PyTorch run <= 2e-6 (norm) and 1e-7 (loss).

bf16 (DeepSpeed's bf16 runs on CPU): the weights are the same at step 1, so the step-1 norm must match to
1e-5 as in fp32 (measured: <= 8e-8). Afterwards EP=1 and EP=2 round differently: EP=2 computes each
expert's weight gradient over both ranks' tokens in one bf16 matmul, EP=1 computes one bf16 partial
gradient per rank and adds them in the fp32 reduction, so a master weight near a bf16 rounding boundary
can land on a different bf16 value. The runs then drift apart by up to 1.8e-4 in the norm and 1.2e-5 in
the loss by step 5, as much as ZeRO-1 and ZeRO-2 differ at the same EP size (1.3e-4, 2.5e-5), where no
expert placement differs. Steps 2+ are compared with bf16 tolerances (1e-3 norm, 1e-4 loss).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from launching import TINY_CONFIG
from workspace import CLIP, CLIPPED, run_args

STEPS = CLIPPED["train.steps"]
RUN = run_args(CLIPPED)  # the runs: workspace.clipped_run_in (tests/test_train.py uses the fp32 ones too)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run_pair(clipped_runs, zero_stage: int, precision: str) -> dict[int, tuple[list[dict], float]]:
    """ep_size -> (train_log.jsonl rows, final validation loss) of two runs differing only in ep_size."""
    runs = {}
    for ep in (1, 2):
        out = clipped_runs(precision, zero_stage, ep)
        rows = read_jsonl(out / "train_log.jsonl")
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), out
        # Clipping is active at every step (DeepSpeed clips when norm > grad_clip).
        assert all(r["grad_norm"] > 1e4 * CLIP for r in rows), out
        (val,) = read_jsonl(out / "val_loss.jsonl")
        assert val["step"] == STEPS
        runs[ep] = (rows, val["val_loss"])
    return runs


@pytest.fixture(scope="module")
def reference(train_inputs):
    """(per-step (loss, pre-clip grad norm), final validation loss) of the same run in one process without
    DeepSpeed: our model, the trainer's objective over the same per-rank micro-batches, clip_grad_norm_."""
    from data_prep.reader import DistributedBatches, PackedTokenDataset
    from pipeline.ds_adapter import RouterCapture
    from pipeline.hf_io import load_model
    from pipeline.run_config import load_run_config
    from pipeline.train import lr_multiplier

    paths = ["--model.path", str(train_inputs / "moe"), "--data.path", str(train_inputs / "data")]
    cfg = load_run_config(TINY_CONFIG, [*paths, *RUN])
    t, world = cfg.train, 2
    model = load_model(cfg.model.path, dtype=torch.float32).train()
    blocks = [block for _, block in model.moe_blocks()]
    capture = RouterCapture(blocks[0].top_k, blocks[0].routing)
    # DeepSpeed's AdamW with torch_adam is torch.optim.AdamW (ds_adapter.build_ds_config).
    betas = (t.beta1, t.beta2)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=betas, eps=1e-8, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))

    def split(batches):  # every rank's micro-batches of the next global batch
        return [mb for b in batches for mb in next(b).split(t.micro_batch)]

    train = PackedTokenDataset(cfg.data.path, "train", t.seq_len, t.seed, cfg.data.weights)
    batches = [DistributedBatches(train, t.global_batch, rank, world) for rank in range(world)]
    steps = []
    for _ in range(t.steps):
        micro = split(batches)
        opt.zero_grad()
        step_loss = 0.0
        for tokens in micro:
            logits = model(tokens[:, :-1])
            lm_loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
            capture.logits[:] = [block.last_router_logits_TN for block in blocks]
            aux, z = capture.losses()
            loss = lm_loss + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z
            (loss / len(micro)).backward()  # the mean over ranks of each rank's micro-batch mean
            step_loss += loss.item() / len(micro)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)  # max_norm / (norm + 1e-6)
        opt.step()
        schedule.step()
        steps.append((step_loss, float(norm)))

    valid = PackedTokenDataset(cfg.data.path, "valid", t.seq_len, cfg.data.eval_seed, cfg.data.weights)
    batches = [DistributedBatches(valid, t.global_batch, rank, world) for rank in range(world)]
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(cfg.data.eval_batches):
            for tokens in split(batches):
                targets = tokens[:, 1:].reshape(-1)
                total += F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets, reduction="sum").item()
                count += targets.numel()
    return steps, total / count


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_clipped_fp32_training_is_the_same_at_ep1_and_ep2(clipped_runs, reference, zero_stage):
    runs = run_pair(clipped_runs, zero_stage, "fp32")
    (ep1, val1), (ep2, val2) = runs[1], runs[2]
    ref_steps, ref_val = reference
    for r1, r2, (ref_loss, ref_norm) in zip(ep1, ep2, ref_steps, strict=True):
        step = r1["step"]
        assert rel(r2["grad_norm"], r1["grad_norm"]) <= 1e-5, (step, r1["grad_norm"], r2["grad_norm"])
        assert rel(r2["loss"], r1["loss"]) <= 1e-5, (step, r1["loss"], r2["loss"])
        for row in (r1, r2):
            assert rel(row["grad_norm"], ref_norm) <= 1e-5, (step, row["grad_norm"], ref_norm)
            assert rel(row["loss"], ref_loss) <= 1e-5, (step, row["loss"], ref_loss)
    assert rel(val2, val1) <= 1e-5 and rel(val1, ref_val) <= 1e-5, (val1, val2, ref_val)


@pytest.mark.slow
# ZeRO-1 and -2 share one norm implementation (stage_1_and_2.py), covered in fp32 for both: bf16 runs the
# two distinct ones, to keep the suite short.
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_clipped_bf16_training_is_the_same_at_ep1_and_ep2(clipped_runs, zero_stage):
    runs = run_pair(clipped_runs, zero_stage, "bf16")
    (ep1, val1), (ep2, val2) = runs[1], runs[2]
    first1, first2 = ep1[0], ep2[0]
    assert rel(first2["grad_norm"], first1["grad_norm"]) <= 1e-5, (first1, first2)
    assert rel(first2["loss"], first1["loss"]) <= 1e-5, (first1, first2)
    for r1, r2 in zip(ep1, ep2, strict=True):
        assert rel(r2["grad_norm"], r1["grad_norm"]) <= 1e-3, (r1, r2)
        assert rel(r2["loss"], r1["loss"]) <= 1e-4, (r1, r2)
    assert rel(val2, val1) <= 1e-4, (val1, val2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_run_config_reaches_deepspeeds_other_clipping_paths(train_inputs, precision):
    """The launches above cover every clipping path a run config can reach: the ZeRO-1/2 and ZeRO-3
    optimizers. DeepSpeed's other norms are never selected: `clip_fp32_gradients` (issue 8475) runs only
    without ZeRO, BF16_Optimizer only for bf16 ZeRO-1 with fp32 gradient accumulation (`data_types`), and
    the ZeRO norm of CPU-offloaded optimizer states is a separate function."""
    from pipeline.config import read_hf_config
    from pipeline.ds_adapter import build_ds_config
    from pipeline.errors import UserError
    from pipeline.run_config import load_run_config, validate

    _, model_config = read_hf_config(train_inputs / "moe")
    for stage in (1, 2, 3):
        cfg = load_run_config(
            TINY_CONFIG, ["--parallel.zero_stage", str(stage), "--train.precision", precision]
        )
        ds = build_ds_config(cfg, model_config, world_size=2, cuda=False)
        zero = ds["zero_optimization"]
        assert zero["stage"] == stage and ds["gradient_clipping"] == cfg.train.grad_clip
        assert "data_types" not in ds and not any("offload" in key for key in zero)
        assert ds["expert_parallel"]["enabled"]
    cfg = load_run_config(TINY_CONFIG, ["--parallel.zero_stage", "0"])
    with pytest.raises(UserError, match="parallel.zero_stage=0"):
        validate(cfg, 2, cuda=False)
