"""The DeepSpeed side of training, in one place: our model and run config in, DeepSpeed's engine out.

- the DeepSpeed config, generated from the run config (ZeRO and precision templates + batch sizes,
  optimizer and the AutoEP `expert_parallel` section), so the two cannot disagree;
- AutoEP's config for our MoE blocks (the name map itself: `pipeline.state_dict_adapters`);
- router-logit capture (AutoEP's router does not hand logits back) and the fast-path install;
- process-group start-up, DeepSpeed's leaked CPU shared-memory segment, and peer-failure reporting.

Model code (`pipeline.backbone`, `pipeline.moe`) never imports this module or deepspeed: parallelism is
applied from here. deepspeed itself is imported inside the functions that need it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import resources
from pipeline.config import ModelConfig
from pipeline.moe import load_balancing_loss, route, router_z_loss
from pipeline.run_config import RunConfig
from pipeline.state_dict_adapters import (
    AUTOEP_ROUTER,
    EXPERT_BIAS,
    MOE_LAYER_PATTERN,
    OUR_DOWN,
    OUR_EXPERTS,
    OUR_GATE_UP,
    OUR_ROUTER,
    OUR_SHARED,
    OUR_SHARED_GATE,
    ROUTER_SUFFIX,
)

# The dense MLP's activation (transformers' `hidden_act`) -> DeepSpeed's name of the gated expert form that
# applies it (deepspeed.moe.ep_experts.EXPERT_ACTIVATIONS). AutoEP probes our experts' act_fn against it.
EXPERT_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh"}


def autoep_section(
    top_k: int,
    routing: str,
    ep_size: int,
    cuda: bool,
    layer_pattern=MOE_LAYER_PATTERN,
    shared: bool = False,
    hidden_act: str = "silu",
):
    """DeepSpeed's `expert_parallel` (AutoEP) config for our MoE blocks; `shared`: they have a shared
    expert with a sigmoid gate (moe.shared_shards), which AutoEP keeps as modules and adds to its output;
    `hidden_act`: the experts' activation (a key of EXPERT_ACTIVATIONS, checked in preflight)."""
    shared_keys = {
        "has_shared_experts": True,
        "shared_experts_pattern": OUR_SHARED,
        "shared_experts_gate_pattern": OUR_SHARED_GATE,
    }
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": layer_pattern,
        "router_pattern": OUR_ROUTER,
        "expert_pattern": OUR_EXPERTS,
        "expert_w1": OUR_GATE_UP,  # fused: AutoEP splits it into w1 (gate) and w3 (up)
        "expert_w2": OUR_DOWN,
        "expert_w3": None,
        "top_k": top_k,
        "score_func": "softmax",
        # softmax over the K selected logits == softmax over all, then top-K, then renormalise.
        "route_norm": routing == "topk-softmax",
        "routed_scaling_factor": 1.0,  # the scale lives in the expert weights
        "use_grouped_mm": cuda,
        "expert_activation": EXPERT_ACTIVATIONS[hidden_act],
        **(shared_keys if shared else {}),
    }


# ---- the DeepSpeed config ----------------------------------------------------------------------------


def build_ds_config(
    cfg: RunConfig, model_config: ModelConfig, world_size: int, cuda: bool, load_universal: bool = False
) -> dict:
    """The DeepSpeed config, from the ZeRO and precision templates plus values from the run config.

    `load_universal`: this engine resumes from a universal checkpoint (another topology, §6).
    """
    t, p = cfg.train, cfg.parallel
    ds = {}
    for name in (f"zero{p.zero_stage}", t.precision):
        ds.update(resources.ds_config_template(name))
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
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if model_config.moe is not None:
        moe = model_config.moe
        ds["expert_parallel"] = autoep_section(
            moe.top_k,
            moe.routing,
            p.ep_size,
            cuda,
            shared=moe.shared_shards > 0,
            hidden_act=model_config.hidden_act,
        )
    return ds


def initialize_engine(
    model: torch.nn.Module, cfg: RunConfig, model_config: ModelConfig, lr_lambda, load_universal: bool = False
):
    """`deepspeed.initialize` on our model; returns (engine, lr scheduler)."""
    import deepspeed

    world = dist.get_world_size()
    ds_config = build_ds_config(cfg, model_config, world, torch.cuda.is_available(), load_universal)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model.train(),
        model_parameters=model.parameters(),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    return engine, scheduler


# ---- router logits -----------------------------------------------------------------------------------


def sum_over_routers(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) in place over every rank: under AutoEP each rank routes its own tokens over all N
    experts (the expert-parallel group only splits where the experts live), so the routers' data-parallel
    group is the whole world. Without a process group (one process: tests, reference runs) a no-op."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


@dataclass
class GlobalBalance:
    """One optimizer step's sums for the global-batch load-balancing loss (moe.aux_loss_scope=global,
    docs/design.md §3). Counts are float64, so they stay exact integers however large the batch."""

    top_k: int
    slots_LN: torch.Tensor | None = None  # slots per expert: the step's micro-batches so far, all ranks
    probs_LN: torch.Tensor | None = None  # this rank's router probabilities, summed over its tokens so far

    def add(self, logits: list, experts: list) -> torch.Tensor:
        """One micro-batch in; its loss to backpropagate out: the mean over layers of N * sum_e f_e * P_e,
        f_e the share of the step's slots so far that went to e (all ranks; no gradient) and P_e the mean
        probability of e over this micro-batch's tokens (the micro scope's P, so equal gradient scale)."""
        num_experts = logits[0].shape[-1]
        slots_LN = torch.stack([torch.bincount(e.flatten(), minlength=num_experts) for e in experts])
        # Summed over the ranks now, not at the end of the step: the gradient of this micro-batch needs f.
        slots_LN = sum_over_routers(slots_LN.double())
        self.slots_LN = slots_LN if self.slots_LN is None else self.slots_LN + slots_LN
        probs_L = [torch.softmax(lg.float(), dim=-1) for lg in logits]  # [T, N] each
        probs_sum_LN = torch.stack([p.detach().sum(dim=0) for p in probs_L]).double()
        self.probs_LN = probs_sum_LN if self.probs_LN is None else self.probs_LN + probs_sum_LN
        f_LN = (self.slots_LN / self.slots_LN.sum(dim=-1, keepdim=True)).float()
        mean_probs_LN = torch.stack([p.mean(dim=0) for p in probs_L])
        return (num_experts * (f_LN * mean_probs_LN).sum(dim=-1)).mean()

    def step_loss(self) -> float:
        """The loss of the whole step, to log: mean over layers of N * sum_e f_e * P_e, f_e and P_e over
        every token of every micro-batch on every rank (independent of how the batch was split)."""
        tokens = self.slots_LN[0].sum() / self.top_k  # the step's tokens, all ranks (every layer sees all)
        probs_LN = sum_over_routers(self.probs_LN.clone())
        f_LN = self.slots_LN / (tokens * self.top_k)
        return float((self.slots_LN.shape[-1] * (f_LN * probs_LN / tokens).sum(dim=-1)).mean())


@dataclass
class RouterCapture:
    """Collects router logits [T, N] from forward hooks on every MoE layer's gate Linear."""

    top_k: int
    routing: str
    logits: list = field(default_factory=list)
    scope: str = "micro"  # moe.aux_loss_scope: micro | global (docs/design.md §3)
    balance: GlobalBalance | None = None  # the global scope's sums for the current optimizer step
    layers: list = field(default_factory=list)  # the AutoEP layers, in forward order (their expert_bias)
    bias_update_rate: float = 0.0  # moe.bias_update_rate, when the layers carry an expert bias

    def attach(self, module: torch.nn.Module) -> int:
        names = [name for name, _ in module.named_modules() if name.endswith(ROUTER_SUFFIX)]
        for name in names:
            module.get_submodule(name).register_forward_hook(lambda _m, _i, out: self.logits.append(out))
        self.layers = [module.get_submodule(name.removesuffix(f".{AUTOEP_ROUTER}")) for name in names]
        return len(names)

    @property
    def biases(self) -> list[torch.Tensor | None]:
        """The expert bias the forward selected with, one per captured logits (layers run in order)."""
        if not self.layers:  # logits filled by hand (reference computations in tests): no bias
            return [None] * len(self.logits)
        return [
            getattr(self.layers[i % len(self.layers)], EXPERT_BIAS, None) for i in range(len(self.logits))
        ]

    def selections(self) -> list[torch.Tensor]:
        """experts_TK per captured logits, chosen as the engine's forward chose them (same bias, same rule):
        the aux loss and the logged loads must count the experts the tokens really went to."""
        return [
            route(lg, self.top_k, self.routing, b)[1] for lg, b in zip(self.logits, self.biases, strict=True)
        ]

    def update_expert_bias(self, counts_LN: torch.Tensor) -> dict:
        """After an optimizer step: every layer's bias moves toward balance by the step's expert loads,
        counted over the whole global batch (all micro-batches, all ranks: every rank has the same counts, so
        the same bias). Returns {"expert_bias": bias_LN} for the run log, {} without a bias."""
        if not self.layers or getattr(self.layers[0], EXPERT_BIAS, None) is None:
            return {}
        with torch.no_grad():
            for layer, counts_N in zip(self.layers, counts_LN, strict=True):
                update_expert_bias(layer.expert_bias, counts_N, self.bias_update_rate)
        return {"expert_bias": torch.stack([layer.expert_bias.detach().cpu() for layer in self.layers])}

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss), each averaged over the MoE layers of this forward."""
        if not self.logits:
            zero = torch.zeros(())
            return zero, zero
        z = torch.stack([router_z_loss(lg) for lg in self.logits]).mean()
        if self.scope == "global":
            return self.balance.add(self.logits, self.selections()), z
        selected = zip(self.logits, self.selections(), strict=True)
        aux = [load_balancing_loss(lg, experts_TK, lg.shape[-1]) for lg, experts_TK in selected]
        return torch.stack(aux).mean(), z

    def begin_step(self) -> None:
        """A new optimizer step: the global scope counts expert frequencies from zero again."""
        if self.scope == "global":
            self.balance = GlobalBalance(self.top_k)

    def step_aux(self) -> float | None:
        """The step's load-balancing loss over its whole global batch (global scope; collective: every
        rank calls it once per step); None in the micro scope."""
        return self.balance.step_loss() if self.scope == "global" else None


def attach_router_capture(engine, model_config: ModelConfig, scope: str = "micro") -> RouterCapture | None:
    """Hook every AutoEP router of the engine; None for a dense model."""
    moe = model_config.moe
    if moe is None:
        return None
    capture = RouterCapture(moe.top_k, moe.routing, scope=scope)
    attached = capture.attach(engine.module)
    if attached != len(moe.layers):
        raise RuntimeError(f"AutoEP replaced {attached} MoE layers, the model has {len(moe.layers)}")
    return capture


def install_fast_path(engine) -> list[str]:
    """Switch the engine's AutoEP layers to `pipeline.fast_ep`'s forward; returns the log lines."""
    from pipeline.fast_ep import install_fast_path as install

    switched, skipped = install(engine.module)
    lines = [f"MoE fast path on {switched} of {switched + len(skipped)} AutoEP layers (moe.fast_path)"]
    return lines + [f"  stock DeepSpeed forward kept for {line}" for line in skipped]


# ---- aux-loss-free balancing: the expert bias (docs/design.md §3) -----------------------------------


def update_expert_bias(bias_N: torch.Tensor, counts_N: torch.Tensor, rate: float) -> None:
    """b += rate * sign(mean load - load), in place (Wang et al. 2024; DeepSeek-V3): an overloaded expert's
    bias goes down, an underloaded one's up, by the same step whatever the size of the imbalance."""
    counts_N = counts_N.to(bias_N.device, torch.float32)
    bias_N.add_(torch.sign(counts_N.mean() - counts_N), alpha=rate)


def install_expert_bias(engine, capture: RouterCapture | None, cfg: RunConfig) -> list[str]:
    """`moe.balance: bias | aux+bias`: give every AutoEP layer a persistent fp32 `expert_bias` [N] of zeros.

    DeepSpeed's config refuses `load_balance_coeff` (which would create this buffer), but both its stock
    forward and `pipeline.fast_ep` pass the layer's `expert_bias` to the router, which adds it to the
    probabilities for the top-K choice only. Registered after `deepspeed.initialize`, so the engine's
    bf16 cast leaves it fp32, and before any checkpoint load, so a resume restores it. Not a parameter: no
    gradient, no optimizer state, not sharded by ZeRO or expert parallelism (every rank holds all N, saved
    with the non-expert weights). Returns the log lines.
    """
    moe = cfg.moe
    if capture is None or moe.balance == "aux":
        return []
    for layer in capture.layers:
        # The layer's count, not the gate weight's rows: under ZeRO-3 that weight is an empty placeholder.
        num_experts, device = layer.num_experts, layer.router.gate.weight.device
        if hasattr(layer, EXPERT_BIAS):
            delattr(layer, EXPERT_BIAS)  # AutoEP's plain `expert_bias = None` attribute
        layer.register_buffer(EXPERT_BIAS, torch.zeros(num_experts, dtype=torch.float32, device=device))
    capture.bias_update_rate = rate = moe.bias_update_rate
    lines = [f"moe.balance {moe.balance}: expert bias on {len(capture.layers)} MoE layers, rate {rate}"]
    if moe.balance == "bias":
        lines.append(
            "moe.balance bias: the load-balancing loss is logged but not added (aux_loss_coef treated as 0)"
        )
    return lines


# ---- process group ------------------------------------------------------------------------------------


def init_distributed(cfg: RunConfig) -> torch.device:
    """Start the process group (any launcher, or mpirun through mpi4py); returns this rank's device."""
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


def shutdown_distributed(collective: bool = True) -> list[str]:
    """End this rank's part of the run so that the interpreter exits with no communication thread left.

    Each gloo process group owns C++ threads (a TCP event loop and two workers), joined only when the
    group object itself is destroyed; rank 0 also runs the TCPStore's server thread. `destroy_process_group`
    only drops torch's own references: any group still referenced (DeepSpeed's group registry, an engine
    whose hooks were never removed, a signal handler holding the trainer) keeps its threads running into
    interpreter finalization, and a worker thread that then takes the GIL (to free a tensor a collective
    held) is ended by the interpreter mid-C++ frame: "terminate called without an active exception",
    SIGABRT, after the run completed. So, once the caller has released the engine (`engine.destroy()`
    and its last reference): a barrier (no collective of this run is in flight on any rank), this rank's
    CPU all-reduce segment unlinked, DeepSpeed's destroy (torch's groups and DeepSpeed's references to
    them), and a collection so that each group's destructor joins its threads here, on this thread, while
    the interpreter is whole. `collective=False` skips the barrier (after an error other ranks may be
    gone). Returns the names of communication threads still alive afterwards (none expected).
    """
    import gc

    import deepspeed.comm

    if not dist.is_initialized():
        return communication_threads()
    # The engine's reference cycles first: a group destroyed while still referenced keeps its threads.
    gc.collect()
    if collective:
        dist.barrier()
    remove_shm_buffer(shm_buffer_path())
    deepspeed.comm.destroy_process_group()
    gc.collect()
    return communication_threads()


# Names torch gives the threads of gloo process groups and of the TCPStore server (c10::setThreadName).
COMMUNICATION_THREAD_NAMES = ("gloo", "pt_tcpstore")


def communication_threads() -> list[str]:
    """Names of this process's threads that belong to process groups or the rendezvous store (Linux)."""
    names = []
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            if any(marker in name for marker in COMMUNICATION_THREAD_NAMES):
                names.append(name)
    return sorted(names)


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


def remove_leftover_shm(port: int) -> None:
    """Unlink DeepSpeed's CPU all-reduce segments of a run's port that killed ranks left behind.

    Ranks that exit normally unlink their own (`remove_shm_buffer`); call this once the launcher has
    returned, when no rank of that run on this host is alive and no other run can hold the port.
    """
    for path in Path("/dev/shm").glob(shm_buffer_name("*", port, "*")):
        path.unlink(missing_ok=True)


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


def peer_failure_message(cfg: RunConfig, exc: BaseException, latest: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return (
        f"train (rank {rank}): error: lost contact with the other ranks: a collective failed ({first}).\n"
        "  Most likely a peer process died (killed, out of memory, node failure: see the first error in the "
        "other nodes' logs) or the network between the nodes failed. A silent peer is waited for at most "
        f"parallel.timeout_s={cfg.parallel.timeout_s} s.\n"
        f"  Latest complete checkpoint: {latest}. Run the same command again on every node to resume from it."
    )


def leave_after_peer_failure(message: str) -> None:
    """Print the message and exit at once, without destructors.

    Destroying a process group with a dead member can block, and a normal interpreter exit runs the gloo
    group's destructor while its threads still wait on the dead peer, which aborts the process (SIGABRT)
    after the message. os._exit skips atexit, so the shm segment is removed here.
    """
    import sys

    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    remove_shm_buffer(shm_buffer_path())
    os._exit(PEER_FAILURE_EXIT)
