"""What `launch/reproduce.py` runs: the model and training sizes, the runs of the quickstart and of the
paper's ablations, and the comparisons the paper reports. Data only; the runner is `launch/reproduce.py`.

A `Size` fixes the dense model, the corpus, the batch and both training phases (dense pretraining from
scratch, then every continued run at equal tokens). A `Variant` is one continued-training run: the dense
model itself or an upcycled MoE (N experts, top-K, granularity G, routing; docs/design.md §2, §3), trained
with the size's continued-training recipe or one of the two learning-rate schedules compared in
docs/results.md (the paper's reset to the pretraining peak, or a constant minimum).

Every continued run is repeated for each of `SEEDS` (`reproduce.py --seeds N` takes the first N): the seed
sets the data order (train.seed) and the conversion's randomness (router init, drop-upcycling subsets).
Validation always uses the same windows (data.eval_seed = EVAL_SEED), so runs and seeds compare window for
window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The run config every run starts from; the runner overrides sizes, schedule and paths.
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
# (data order = train.seed, conversion seed) of each repeat; the first is the single-seed runs' seed.
SEEDS = ((1234, 0), (7, 1), (99, 2))
EVAL_SEED = 0  # data.eval_seed of every run: the validation windows do not depend on the training seed
# Continued-training learning rates: `reset` is the paper's (warmup to the pretraining peak, cosine to the
# pretraining minimum), `constant_min` stays at the pretraining minimum (no warmup, no decay), `reset_mid`
# warms up to the geometric mean of the two and decays to the minimum.
LR_SCHEDULES = ("reset", "constant_min", "reset_mid")


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
    continue_lr: str = "reset"  # the recipe's schedule, one of LR_SCHEDULES
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
        continue_lr="constant_min",
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
        eval_batches=0,  # every validation window (56 batches of 16), so that seeds compare on enough text
        eval_every=2,
        valid_fraction=0.03,
        continue_lr="constant_min",  # chosen from the 3-seed runs in docs/results.md
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
    lr: str = "recipe"  # the size's continue_lr, or one of LR_SCHEDULES
    drop_ratio: float = 0.0  # `upcycle convert --drop-ratio` (Drop-Upcycling)
    overrides: dict[str, str] = field(default_factory=dict)  # run config keys, e.g. {"moe.balance": "bias"}

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def model_key(self) -> str:
        """Runs that differ only in training settings share one converted model."""
        if not self.is_moe:
            return "dense"
        key = f"E{self.experts}T{self.top_k}G{self.granularity}-{self.routing}"
        key += "" if self.weight_scaling else "-noscale"
        key += f"-drop{self.drop_ratio:g}" if self.drop_ratio else ""
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
    other_lrs = [lr for lr in LR_SCHEDULES if lr != size.continue_lr]
    return [
        *quickstart_variants(size),
        Variant("moe_E8T2_topk_softmax", experts=8, top_k=2, routing="topk-softmax"),
        Variant("moe_E8T2_no_scaling", experts=8, top_k=2, weight_scaling=False),
        Variant(
            f"moe_E{n}T{k}G{g}_no_virtual_groups", experts=n, top_k=k, granularity=g, virtual_groups=False
        ),
        *(Variant(f"moe_E8T2_{lr}", experts=8, top_k=2, lr=lr) for lr in other_lrs),
        *(Variant(f"dense_continued_{lr}", lr=lr) for lr in other_lrs),
        *(Variant(f"moe_E{n}T{k}G{g}_{lr}", experts=n, top_k=k, granularity=g, lr=lr) for lr in other_lrs),
        # Beyond the paper (docs/design.md §2, §3): each against moe_E8T2, the paper's recipe.
        Variant("moe_E8T2_drop0.25", experts=8, top_k=2, drop_ratio=0.25),
        Variant("moe_E8T2_drop0.5", experts=8, top_k=2, drop_ratio=0.5),
        Variant("moe_E8T2_bias", experts=8, top_k=2, overrides={"moe.balance": "bias"}),
        Variant("moe_E8T2_aux+bias", experts=8, top_k=2, overrides={"moe.balance": "aux+bias"}),
        Variant("moe_E8T2_global_aux", experts=8, top_k=2, overrides={"moe.aux_loss_scope": "global"}),
    ]


# (title, A, B, what the paper reports): "A better than B" is the paper's direction.
def paper_comparisons(size: Size) -> list[tuple[str, str, str, str]]:
    n, k, g = size.fine
    fine = f"moe_E{n}T{k}G{g}"
    lr_rows = [
        (f"LR: {lr} vs {size.continue_lr} (the recipe), {what}", f"{a}_{lr}", a, paper)
        for lr in LR_SCHEDULES
        if lr != size.continue_lr
        for what, a, paper in (
            ("MoE", "moe_E8T2", "the reset better (up to 1T tokens)" if lr == "reset" else ""),
            ("fine-grained MoE", fine, ""),
            ("dense", "dense_continued", "(control: not an MoE-only effect)"),
        )
    ]
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
        *lr_rows,
        (
            "drop-upcycling r=0.25 vs plain copies",
            "moe_E8T2_drop0.25",
            "moe_E8T2",
            "Drop-Upcycling: r>0 better",
        ),
        (
            "drop-upcycling r=0.5 vs plain copies",
            "moe_E8T2_drop0.5",
            "moe_E8T2",
            "Drop-Upcycling: r=0.5 best",
        ),
        ("bias balancing (no aux loss) vs aux loss", "moe_E8T2_bias", "moe_E8T2", "aux-loss-free better"),
        (
            "aux loss + bias vs aux loss",
            "moe_E8T2_aux+bias",
            "moe_E8T2",
            "(DeepSeek-V3 keeps a tiny aux loss)",
        ),
        ("global-batch vs micro-batch aux loss", "moe_E8T2_global_aux", "moe_E8T2", "global better (Qwen3)"),
    ]
