"""Function-preservation check: dense vs upcycled logits on the same tokens, one layer in memory at a time."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.backbone import decoder_layers, skeleton
from pipeline.config import read_hf_config
from pipeline.hf_io import CheckpointReader, check_against_config, expected_shapes
from pipeline.moe import MoEBlock, route

# A fixed English passage, so that with a real tokenizer the check runs on natural text.
SAMPLE_TEXT = (
    "Mixture-of-Experts models route each token to a few experts, so their capacity can grow without a "
    "matching growth in the compute spent per token. Upcycling starts such a model from a dense checkpoint: "
    "the feed-forward network is copied into every expert, the router is initialised so that the copies "
    "are chosen as whole groups, and the expert weights are scaled so that the new model computes the same "
    "function as the old one. Training then continues from there, and the experts slowly specialise. "
)


@dataclass
class VerifyReport:
    tokens: int
    relative_logit_error: float  # ||moe - dense|| / ||dense|| over all logits
    max_abs_logit_error: float
    top1_changed: float  # share of positions whose argmax token differs
    whole_group_routings: int  # (token, MoE layer) routings that picked whole virtual groups
    routings: int  # (token, MoE layer) routings in all
    # With Drop-Upcycling the step-0 model differs from the dense one by design; these measure how much.
    mean_abs_logit_error: float = 0.0
    dense_loss: float = 0.0  # next-token cross-entropy of the dense model on the verify tokens
    moe_loss: float = 0.0  # the same for the upcycled model
    drop_ratio: float = 0.0  # moe.drop_ratio of the checked checkpoint

    @property
    def whole_group_share(self) -> float:
        return self.whole_group_routings / max(self.routings, 1)


@torch.no_grad()
def streamed_forward(model_dir: str | Path, input_ids_BT: torch.Tensor, on_moe=None) -> torch.Tensor:
    """fp32 logits [B, T, V] of the model's own forward (`pipeline.backbone`), with one decoder layer in
    memory at a time: each layer's weights are read from the safetensors files just before it runs and
    dropped after it (the embeddings, final norm and head stay).

    `on_moe(layer_idx, block)` is called after each MoE block ran (its router logits are then set).
    """
    _, config = read_hf_config(model_dir)
    reader = CheckpointReader(model_dir)
    shapes = expected_shapes(config)
    check_against_config(reader, config, model_dir, shapes)
    model = skeleton(config)
    layers = decoder_layers(model)
    prefix = {id(module): f"{name}." for name, module in model.named_modules()}
    in_layers = tuple(prefix[id(layer)] for layer in layers)
    outside = [name for name in shapes if not name.startswith(in_layers)]
    model.load_state_dict({name: reader.get(name).float() for name in outside}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(_materialise, reader, prefix[id(layer)]))
        layer.register_forward_hook(_release)
        if on_moe is not None and isinstance(layer.mlp, MoEBlock):
            layer.mlp.register_forward_hook(functools.partial(lambda i, block, *_: on_moe(i, block), i))
    return model(input_ids_BT).float()


def _materialise(reader, prefix: str, layer: nn.Module, _inputs) -> None:
    names = layer.state_dict().keys()
    layer.load_state_dict({name: reader.get(prefix + name).float() for name in names}, assign=True)


def _release(layer: nn.Module, _inputs, _output) -> None:
    for module in layer.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)


def sample_tokens(model_dir: str | Path, vocab_size: int, n_tokens: int, seed: int) -> torch.Tensor:
    """[1, n_tokens] ids: the model's own tokenizer on SAMPLE_TEXT if it has one, else seeded random ids."""
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tokenizer_file)).encode(SAMPLE_TEXT * (1 + n_tokens // 50)).ids
        ids = [i for i in ids if i < vocab_size][:n_tokens]
        if len(ids) == n_tokens:
            return torch.tensor([ids])
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n_tokens), generator=generator)


def verify_upcycled(
    dense_dir: str | Path, moe_dir: str | Path, n_tokens: int = 256, seed: int = 0
) -> VerifyReport:
    """Run both checkpoints on the same tokens; measure how far the upcycled model is from the dense one."""
    _, moe_config = read_hf_config(moe_dir)
    ids = sample_tokens(dense_dir, moe_config.vocab_size, n_tokens, seed)
    return measure_upcycled(moe_dir, ids, streamed_forward(dense_dir, ids))


def measure_upcycled(moe_dir: str | Path, ids_BT: torch.Tensor, dense_logits: torch.Tensor) -> VerifyReport:
    """The upcycled model (one layer in memory at a time) on `ids_BT` against the dense model's logits."""
    moe = read_hf_config(moe_dir)[1].moe
    whole, total = [0], [0]

    def count_whole_groups(_, block: MoEBlock):
        _, experts_TK = route(block.last_router_logits_TN, moe.top_k, moe.routing)
        whole[0] += int(whole_group_mask(experts_TK, moe.group_size).sum())
        total[0] += experts_TK.shape[0]

    moe_logits = streamed_forward(moe_dir, ids_BT, on_moe=count_whole_groups)
    diff = moe_logits - dense_logits
    return VerifyReport(
        tokens=ids_BT.numel(),
        relative_logit_error=float(diff.norm() / dense_logits.norm()),
        max_abs_logit_error=float(diff.abs().max()),
        top1_changed=float((moe_logits.argmax(-1) != dense_logits.argmax(-1)).float().mean()),
        whole_group_routings=whole[0],
        routings=total[0],
        mean_abs_logit_error=float(diff.abs().mean()),
        dense_loss=next_token_loss(dense_logits, ids_BT),
        moe_loss=next_token_loss(moe_logits, ids_BT),
        drop_ratio=moe.drop_ratio,
    )


def next_token_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return float(F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten()))


def whole_group_mask(experts_TK: torch.Tensor, group_size: int) -> torch.Tensor:
    """[T] bool: the K experts of a token are K/g complete virtual groups (every routed shard of each
    copy; g = G - S, `MoEConfig.group_size`).

    top-K indices are distinct, so a copy is complete exactly when its group id appears g times.
    """
    T, K = experts_TK.shape
    groups_sorted = (experts_TK // group_size).sort(dim=-1).values.view(T, K // group_size, group_size)
    return (groups_sorted == groups_sorted[..., :1]).all(-1).all(-1)


def format_report(report: VerifyReport) -> str:
    if report.drop_ratio > 0:
        return format_drop_report(report)
    return (
        f"verify on {report.tokens} tokens: relative logit error {report.relative_logit_error:.3e}, "
        f"max abs {report.max_abs_logit_error:.3e}, top-1 changed {100 * report.top1_changed:.2f}% of "
        f"tokens, whole virtual groups in {report.whole_group_routings}/{report.routings} routings"
    )


def format_drop_report(report: VerifyReport) -> str:
    """Drop-Upcycling re-initialised neurons, so the step-0 model is not the dense one: report the gap as a
    measurement, plainly marked as expected, instead of as a function-preservation error."""
    return (
        f"verify on {report.tokens} tokens, --drop-ratio {report.drop_ratio:g}: step-0 deviation from the "
        f"dense model: max |logit diff| {report.max_abs_logit_error:.3e}, mean |logit diff| "
        f"{report.mean_abs_logit_error:.3e}, relative logit error {report.relative_logit_error:.3e}, "
        f"LM loss {report.dense_loss:.4f} (dense) -> {report.moe_loss:.4f} (upcycled), difference "
        f"{report.moe_loss - report.dense_loss:+.4f}, top-1 changed {100 * report.top1_changed:.2f}% of "
        f"tokens, whole virtual groups in {report.whole_group_routings}/{report.routings} routings.\n"
        f"This deviation is expected: --drop-ratio {report.drop_ratio:g} re-initialised that share of every "
        "expert's neurons, so the upcycled model does not equal the dense one at step 0 (not an error)."
    )
