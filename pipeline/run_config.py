"""The typed run configuration: one YAML file, every key overridable as `--section.key value`.

It is the single source of truth for a training run: the DeepSpeed config (batch sizes, precision, ZeRO
stage, the AutoEP section) is generated from it, so the two can never disagree. `validate` runs before
any process group starts and names the key to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError
from pipeline.resources import run_config_text


@dataclass
class ModelSection:
    path: str = ""  # an upcycled or dense Hugging Face directory


@dataclass
class DataSection:
    path: list[str] = field(default_factory=list)  # prepared directories (`upcycle prep tokenize`)
    weights: list[float] | None = None  # blend weights, one per path
    eval_batches: int = 4  # validation batches (of global_batch windows) per evaluation; 0: every full batch
    # Order of the validation windows. Separate from train.seed on purpose: runs that differ in their training
    # seed are then scored on the same text, so their losses can be compared window for window.
    eval_seed: int = 0


@dataclass
class TrainSection:
    steps: int = 100
    seq_len: int = 256
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    micro_batch: int = 4  # sequences per rank per forward
    lr: float = 3e-4  # peak; the paper resets to the dense model's pretraining peak
    min_lr: float = 3e-5  # end of the cosine; the paper uses the pretraining minimum
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 1234


# Over which tokens the load-balancing loss counts expert frequencies f_i (docs/design.md §3): each
# micro-batch of each rank, or the whole global batch of the step. Issue 15 wants "global" as the default
# once the experiments prove it: flip it here.
AUX_LOSS_SCOPES = ("micro", "global")
DEFAULT_AUX_LOSS_SCOPE = "micro"


@dataclass
class MoESection:
    aux_loss_coef: float = 1e-2  # Switch load-balancing loss; 0 lets experts die
    aux_loss_scope: str = DEFAULT_AUX_LOSS_SCOPE  # micro | global: the batch f_i is counted over
    z_loss_coef: float = 0.0  # router z-loss
    fast_path: bool = True  # pipeline/fast_ep.py forward for AutoEP layers; false keeps DeepSpeed's stock one
    # Load balancing (docs/design.md §3): aux = the load-balancing loss; bias = an expert bias on the top-K
    # choice, updated after every step, and no aux loss in the loss (still logged); aux+bias = both.
    balance: str = "aux"
    bias_update_rate: float = 1e-3  # b += rate * sign(mean load - load) per optimizer step

    @property
    def aux_weight(self) -> float:
        """The load-balancing loss's weight in the loss: aux_loss_coef, 0 with balance bias."""
        return 0.0 if self.balance == "bias" else self.aux_loss_coef

    def total_loss(self, lm_loss, aux_loss, z_loss):
        """The training loss from its parts (tensors or floats): the one place the weights are applied."""
        return lm_loss + self.aux_weight * aux_loss + self.z_loss_coef * z_loss


@dataclass
class ParallelSection:
    ep_size: int = 1  # expert-parallel ranks; experts are split N / ep_size per rank
    zero_stage: int = 2  # 1, 2 or 3
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # collective timeout: a dead peer stops the survivors after this long


@dataclass
class OutputSection:
    dir: str = "runs/train"
    checkpoint_interval: int = 50  # steps; 0 saves only at the end
    eval_interval: int = 50
    log_interval: int = 1
    keep_checkpoints: int = 2  # >= 2 keeps a previous checkpoint to fall back to when the latest is damaged
    # A checkpoint whose files no longer match the sizes/sha256 recorded at save (docs/design.md §6):
    # fallback = resume from the previous intact one (the damaged one is kept aside), refuse = stop.
    on_damaged_checkpoint: str = "fallback"


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    moe: MoESection = field(default_factory=MoESection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_run_config(config: str | None, overrides: list[str]) -> RunConfig:
    """Read `--config` (a YAML path or a shipped config's name, e.g. tiny_cpu), apply `--section.key value`
    overrides, then type-check."""
    raw: dict = {}
    if config:
        text, where = run_config_text(config)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {config}: invalid YAML in {where} ({exc})") from exc
        if not isinstance(raw, dict):
            raise UserError(f"--config {config}: {where} must be a mapping of sections, got {raw!r}")
    for key, value in parse_overrides(overrides):
        section, _, name = key.partition(".")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise UserError(f"--{key}: config section {section!r} is {raw[section]!r}, not a mapping")
        raw[section][name] = yaml.safe_load(value)
    return build(RunConfig, raw, "")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--train.steps 10 --data.path=a` -> [("train.steps", "10"), ("data.path", "a")]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise UserError(f"{arg}: missing a value")
        pairs.append((key, value))
    return pairs


def build(cls, raw: Any, where: str):
    """Recursively turn a dict into the dataclass `cls`, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise UserError(f"config {where or 'root'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise UserError(
            f"config: unknown key(s) {sorted(f'{where}{k}' for k in unknown)}; "
            f"known in {where or 'root'}: {sorted(names)}"
        )
    values = {}
    for name, value in raw.items():
        key, hint = f"{where}{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, key + ".")
        else:
            values[name] = coerce(value, hint, key)
    return cls(**values)


def coerce(value: Any, hint: Any, key: str):
    """Check (and gently convert) one value against its annotation: int/float/str/bool/list/optional."""
    origin, args = get_origin(hint), get_args(hint)
    if value is None and type(None) in args:
        return None
    if args and type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(items)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"config key {key}: expected {hint.__name__}, got {value!r}")


def launch_world_size() -> int:
    """World size from the launcher's environment (torchrun/deepspeed, Open MPI, MPICH/PMI, SLURM)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def validate(cfg: RunConfig, world_size: int, cuda: bool) -> None:
    """Checks of the run config on its own (no model read yet); each message names the key to change."""
    t, p = cfg.train, cfg.parallel
    problems = []
    if not cfg.model.path:
        problems.append("model.path is empty: give an upcycled or dense model directory")
    if not cfg.data.path:
        problems.append("data.path is empty: give one or more directories from `upcycle prep tokenize`")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.path):
        problems.append(
            f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.path)} data.path"
        )
    for key, value in (
        ("train.steps", t.steps),
        ("train.seq_len", t.seq_len),
        ("train.micro_batch", t.micro_batch),
        ("train.global_batch", t.global_batch),
        ("parallel.ep_size", p.ep_size),
    ):
        if value < 1:
            problems.append(f"{key}={value}: must be >= 1")
    if t.micro_batch >= 1 and t.global_batch % (t.micro_batch * world_size):
        problems.append(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch "
            f"({t.micro_batch}) x world size ({world_size})"
        )
    if cfg.data.eval_batches < 0:
        problems.append(f"data.eval_batches={cfg.data.eval_batches}: must be >= 0 (0: every full batch)")
    if p.ep_size >= 1 and world_size % p.ep_size:
        problems.append(f"parallel.ep_size={p.ep_size} does not divide the world size {world_size}")
    if p.zero_stage not in (1, 2, 3):
        problems.append(f"parallel.zero_stage={p.zero_stage}: must be 1, 2 or 3")
    if t.precision not in ("fp32", "bf16"):
        problems.append(f"train.precision={t.precision!r}: must be fp32 or bf16")
    if t.schedule not in ("cosine", "constant"):
        problems.append(f"train.schedule={t.schedule!r}: must be cosine or constant")
    if p.backend not in ("auto", "nccl", "gloo"):
        problems.append(f"parallel.backend={p.backend!r}: must be auto, nccl or gloo")
    if p.backend == "nccl" and not cuda:
        problems.append("parallel.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    if cfg.output.on_damaged_checkpoint not in ("fallback", "refuse"):
        problems.append(
            f"output.on_damaged_checkpoint={cfg.output.on_damaged_checkpoint!r}: must be fallback or refuse"
        )
    if t.min_lr > t.lr:
        problems.append(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}")
    if cfg.moe.aux_loss_scope not in AUX_LOSS_SCOPES:
        problems.append(
            f"moe.aux_loss_scope={cfg.moe.aux_loss_scope!r}: must be {' or '.join(AUX_LOSS_SCOPES)}"
        )
    problems += balance_problems(cfg.moe)
    if problems:
        raise UserError("invalid run config:\n  - " + "\n  - ".join(problems))


BALANCE_MODES = ("aux", "bias", "aux+bias")


def balance_problems(moe: MoESection) -> list[str]:
    """moe.balance and moe.bias_update_rate, each message naming its key."""
    problems = []
    if moe.balance not in BALANCE_MODES:
        problems.append(f"moe.balance={moe.balance!r}: must be one of {', '.join(BALANCE_MODES)}")
    rate = moe.bias_update_rate
    if not (math.isfinite(rate) and 0 < rate < 1):
        problems.append(
            f"moe.bias_update_rate={rate}: must be a number in (0, 1) (the bias step per optimizer step on "
            "the router probabilities; 1e-3 is the usual choice)"
        )
    return problems


def validate_against_model(cfg: RunConfig, num_experts: int | None) -> None:
    """Checks that need the model's config: expert parallelism must split the experts evenly."""
    ep = cfg.parallel.ep_size
    if num_experts is None and ep > 1:
        raise UserError(f"parallel.ep_size={ep} but the model at model.path is dense (no experts): use 1")
    if num_experts is not None and num_experts % ep:
        raise UserError(f"parallel.ep_size={ep} does not divide the model's {num_experts} experts")
