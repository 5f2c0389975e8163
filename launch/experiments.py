"""What `launch/reproduce.py` runs: the model and training sizes, the runs of the quickstart and of the
paper's ablations, and the comparisons the paper reports. Data only; the runner is `launch/reproduce.py`.

A `Size` fixes the dense model, the corpus, the batch and both training phases (dense pretraining from
scratch, then every continued run at equal tokens). A `Variant` is one continued-training run: the dense
model itself or an upcycled MoE (N experts, top-K, granularity G, routing; docs/design.md §2, §3), with the
paper's learning-rate reset or a constant minimum learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The run config every run starts from; the runner overrides sizes, schedule and paths.
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


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
