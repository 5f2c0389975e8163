"""`pipeline.train.Trainer.train_step` on the ranks of `distributed.run_on_ranks`, without DeepSpeed.

The trainer's collectives (the loss parts, the expert loads, the global-scope aux loss, the expert bias) run
as in training; only the engine is a stand-in: a tiny model whose MoE layers look to the trainer as DeepSpeed
AutoEP's do (`mlp.router.gate`, `num_experts`, an `expert_bias` the top-K choice adds), fed the rows of a
fixed token table by the real `DistributedBatches`. Its `step` leaves the weights alone, so every
micro-batch of every split of a global batch meets the same weights, and a step's logged numbers can be
compared with those of the whole batch at once (`whole_batch_steps`, one process, no trainer code).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data_prep.reader import DistributedBatches
from pipeline import ds_adapter
from pipeline.moe import load_balancing_loss, route
from pipeline.run_config import RunConfig, load_run_config
from pipeline.train import Trainer

VOCAB, HIDDEN, EXPERTS, TOP_K, MOE_LAYERS = 64, 16, 8, 2, (0, 1)
SEQ_LEN, GLOBAL_BATCH = 16, 8
ROWS = 64  # token windows in the table: 8 global batches
BASE = ("--model.path", "unused", "--data.path", "unused", "--train.seq_len", str(SEQ_LEN),
        "--train.global_batch", str(GLOBAL_BATCH))  # fmt: skip


class AutoEPLayerStandIn(nn.Module):
    """What the trainer touches of an AutoEP layer; each expert is one scale, so routing reaches the loss."""

    def __init__(self, routing: str):
        super().__init__()
        self.router = nn.Module()
        self.router.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.expert_scale_N = nn.Parameter(torch.linspace(0.5, 1.5, EXPERTS))
        self.num_experts, self.routing = EXPERTS, routing
        self.expert_bias = None  # AutoEP's plain attribute; install_expert_bias replaces it with a buffer

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        x_TH = x_BTH.flatten(0, 1)
        weights_TK, experts_TK = route(self.router.gate(x_TH), TOP_K, self.routing, self.expert_bias)
        scale_T1 = (weights_TK * self.expert_scale_N[experts_TK]).sum(dim=-1, keepdim=True)
        return x_BTH + (scale_T1 * x_TH).view_as(x_BTH)


class ModelStandIn(nn.Module):
    """Embedding, the MoE layers at `model.layers.{i}.mlp` (AutoEP's names), a head; the same weights in
    every process (a fixed seed)."""

    def __init__(self, routing: str = "softmax-topk"):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList()
        for _ in MOE_LAYERS:
            self.model.layers.append(nn.Module())
            self.model.layers[-1].mlp = AutoEPLayerStandIn(routing)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        x_BTH = self.model.embed(ids_BT)
        for layer in self.model.layers:
            x_BTH = layer.mlp(x_BTH)
        return self.lm_head(x_BTH)


class EngineStandIn:
    """The engine calls Trainer.train_step makes. No optimizer: see the module docstring."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.module(ids_BT)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return None  # as DeepSpeed off a gradient-accumulation boundary: no norm to check


class TokenTable:
    """What DistributedBatches reads: window i of a fixed random table of token ids [ROWS, SEQ_LEN + 1]."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (ROWS, SEQ_LEN + 1), generator=generator).numpy()

    def sample(self, i: int):
        return self.ids[i]


def run_config(overrides: list[str]) -> RunConfig:
    return load_run_config("tiny_cpu", [*BASE, *overrides])


def stand_in_trainer(overrides: list[str], routing: str = "softmax-topk") -> tuple[Trainer, list[str]]:
    """A Trainer on this rank with the stand-in engine, wired as Trainer.__init__ wires the real one (the
    capture and the expert bias from pipeline.ds_adapter); its __init__ would load a model and start
    DeepSpeed. Returns (trainer, the lines install_expert_bias logs)."""
    cfg = run_config(overrides)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.device = cfg, torch.device("cpu")
    trainer.rank, trainer.world = dist.get_rank(), dist.get_world_size()
    trainer.engine = EngineStandIn(ModelStandIn(routing))
    model_config = types.SimpleNamespace(
        moe=types.SimpleNamespace(top_k=TOP_K, routing=routing, layers=MOE_LAYERS)
    )
    trainer.capture = ds_adapter.attach_router_capture(trainer.engine, model_config, cfg.moe.aux_loss_scope)
    lines = ds_adapter.install_expert_bias(trainer.engine, trainer.capture, cfg)
    trainer.scheduler = types.SimpleNamespace(get_last_lr=lambda: [cfg.train.lr])
    trainer.batches = DistributedBatches(TokenTable(), cfg.train.global_batch, trainer.rank, trainer.world)
    trainer.step = 0
    return trainer, lines


def train_steps(overrides: list[str], steps: int, routing: str = "softmax-topk") -> dict:
    """On each rank: `steps` Trainer.train_step calls; their stats, the bias lines and the final biases."""
    trainer, lines = stand_in_trainer(overrides, routing)
    stats = []
    for _ in range(steps):
        stats.append(trainer.train_step())
        trainer.step += 1
    bias = [getattr(layer, ds_adapter.EXPERT_BIAS) for layer in trainer.capture.layers]
    return {"stats": stats, "lines": lines, "bias_LN": None if bias[0] is None else torch.stack(bias)}


def whole_batch_steps(overrides: list[str], steps: int, routing: str = "softmax-topk") -> list[dict]:
    """Per step, the numbers of its whole global batch at once, in this process: lm_loss, aux_loss (mean
    over layers of the Switch loss of the experts chosen with the bias), expert counts [L, N], router
    entropy per token [L], and with moe.balance bias|aux+bias the bias after the step's update."""
    cfg = run_config(overrides)
    model = ModelStandIn(routing).eval()
    layers = [layer.mlp for layer in model.model.layers]
    with_bias = cfg.moe.balance != "aux"
    bias_LN = torch.zeros(len(layers), EXPERTS)
    logits = []
    for layer in layers:
        layer.router.gate.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    table, rows = TokenTable(), []
    for step in range(steps):
        logits.clear()
        ids_BT1 = torch.from_numpy(table.ids[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH])
        for layer, bias_N in zip(layers, bias_LN, strict=True):
            layer.expert_bias = bias_N.clone() if with_bias else None
        with torch.no_grad():
            lm = F.cross_entropy(model(ids_BT1[:, :-1]).flatten(0, 1), ids_BT1[:, 1:].flatten())
        row = {"lm_loss": float(lm), **selections(logits, bias_LN if with_bias else None, routing)}
        if with_bias:  # sign update, DeepSeek-V3: overloaded experts down, underloaded up
            counts_LN = row["expert_counts"]
            bias_LN = bias_LN + cfg.moe.bias_update_rate * torch.sign(counts_LN.mean(-1, True) - counts_LN)
            row["expert_bias"] = bias_LN
        rows.append(row)
    return rows


def selections(logits: list[torch.Tensor], bias_LN, routing: str) -> dict:
    """Per layer: the Switch loss, the expert counts and the mean router entropy of the selections."""
    aux, counts, entropy = [], [], []
    for i, logits_TN in enumerate(logits):
        experts_TK = route(logits_TN, TOP_K, routing, None if bias_LN is None else bias_LN[i])[1]
        aux.append(load_balancing_loss(logits_TN, experts_TK, EXPERTS))
        counts.append(torch.bincount(experts_TK.flatten(), minlength=EXPERTS).float())
        probs_TN = logits_TN.softmax(dim=-1)
        entropy.append(-(probs_TN * probs_TN.log()).sum() / logits_TN.shape[0])
    return {"aux_loss": float(torch.stack(aux).mean()), "expert_counts": torch.stack(counts),
            "router_entropy": torch.stack(entropy).tolist()}  # fmt: skip
