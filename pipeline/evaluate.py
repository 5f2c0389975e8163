"""`upcycle eval`: perplexity on a prepared split and per-layer expert-load statistics.

`--model` is any of: an upcycled (or dense) model directory, a training checkpoint (output.dir,
checkpoints/ or step_*), or a Hugging Face export (`upcycle export`; loaded with stock transformers, no
trust_remote_code). The windows are the trainer's: `--seed`, `--batch-size` and `--batches` equal to
`data.eval_seed` (default 0 in both), `train.global_batch` and `data.eval_batches` score exactly the windows
of the run's validation, whatever the run's train.seed. The per-window losses come back too (`--json`), so
two models can be compared window for window.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity and expert-load statistics on a prepared data split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory, training checkpoint or HF export")
    p.add_argument("--data", required=True, nargs="+", help="prepared data directory (upcycle prep tokenize)")
    p.add_argument("--split", default="valid")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--batches", type=int, default=0, help="batches to score (0: the whole split, once)")
    p.add_argument("--seed", type=int, default=0, help="window order (data.eval_seed reproduces the run's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run_cli)


# An export of ours (a stock MoE class), evaluated by transformers itself; everything else is our format.
STOCK_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


class _Model:
    """A uniform `forward(ids) -> (logits, [router logits per MoE layer])` over our models and HF exports."""

    def __init__(self, path: str):
        path_ = Path(path)
        raw = json.loads((path_ / "config.json").read_text()) if (path_ / "config.json").is_file() else None
        self.hf = None
        if raw is not None and raw.get("model_type") in STOCK_MOE_TYPES and "moe" not in raw:
            import transformers

            self.hf = transformers.AutoModelForCausalLM.from_pretrained(path_, dtype=torch.float32).eval()
            cfg = self.hf.config
            self.vocab_size = cfg.vocab_size
            self.top_k = getattr(cfg, "num_experts_per_tok", 0)
            skip = set(getattr(cfg, "mlp_only_layers", []) or [])
            n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0)
            self.moe_layers = [i for i in range(cfg.num_hidden_layers) if i not in skip] if n_experts else []
            return
        from pipeline.export import open_source, our_model

        source = open_source(path_)
        self.model = our_model(source)
        self.vocab_size = source.config.vocab_size
        moe = source.config.moe
        self.top_k = moe.top_k if moe else 0
        self.moe_layers = list(moe.layers) if moe else []

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.hf is not None:
            out = self.hf(ids, output_router_logits=bool(self.moe_layers))
            return out.logits, list(getattr(out, "router_logits", None) or [])
        logits = self.model(ids)
        return logits, [block.last_router_logits_TN for _, block in self.model.moe_blocks()]

    def expert_biases(self) -> list[torch.Tensor | None]:
        """Each MoE layer's selection bias (moe.balance: bias), so the loads counted are the forward's."""
        if self.hf is not None:
            return [None] * len(self.moe_layers)
        return [block.expert_bias for _, block in self.model.moe_blocks()]


def evaluate(
    model_path: str,
    data: list[str],
    split: str = "valid",
    seq_len: int = 64,
    batch_size: int = 8,
    batches: int = 0,
    seed: int = 0,
) -> dict:
    """{'loss', 'perplexity', 'tokens', 'layers': {layer: load statistics}} over the chosen windows."""
    from data_prep.reader import PackedTokenDataset
    from pipeline.metrics import expert_load, load_summary, standard_error, window_losses

    model = _Model(model_path)
    dataset = PackedTokenDataset(data, split, seq_len, seed)
    if dataset.vocab_size > model.vocab_size:
        raise UserError(
            f"--data was tokenized with a vocabulary of {dataset.vocab_size} tokens, the model has "
            f"{model.vocab_size}: evaluate with data tokenized by the model's own tokenizer"
        )
    n = len(dataset) if batches <= 0 else batches * batch_size
    if n == 0:
        raise UserError(f"{data}: the {split!r} split has no windows of {seq_len + 1} tokens")
    per_window: list[float] = []
    counts = [None] * len(model.moe_layers)
    biases = model.expert_biases()
    entropy = [0.0] * len(model.moe_layers)
    for start in range(0, n, batch_size):
        rows = [dataset.sample(i) for i in range(start, min(n, start + batch_size))]
        batch = torch.from_numpy(np.stack(rows)).long()
        logits, router = model(batch[:, :-1])
        per_window += window_losses(logits, batch[:, 1:]).tolist()
        if len(router) != len(model.moe_layers):
            raise RuntimeError(
                f"got router logits for {len(router)} layers, expected {len(model.moe_layers)}"
            )
        for j, lg in enumerate(router):
            c, ent = expert_load(lg.reshape(-1, lg.shape[-1]), model.top_k, "softmax-topk", biases[j])
            counts[j] = c if counts[j] is None else counts[j] + c
            entropy[j] += float(ent)
    losses_W = torch.tensor(per_window, dtype=torch.float64)
    loss, tokens = float(losses_W.mean()), n * seq_len
    layers = {}
    for j, layer in enumerate(model.moe_layers):
        share = counts[j] / counts[j].sum()
        layers[str(layer)] = {
            **load_summary(counts[j]),
            "router_entropy": entropy[j] / tokens,
            "share": [round(float(s), 6) for s in share],
        }
    return {
        "loss": loss,
        "standard_error": standard_error(losses_W),
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "windows": n,
        "top_k": model.top_k,
        "layers": layers,
        "window_losses": per_window,
    }


def format_report(result: dict) -> str:
    rows = [
        f"{result['windows']} windows, {result['tokens']} tokens: loss {result['loss']:.4f} "
        f"+- {result['standard_error']:.4f} (standard error over windows), "
        f"perplexity {result['perplexity']:.3f}"
    ]
    if result["layers"]:
        rows.append(
            f"{'layer':>5} {'max/mean':>9} {'dead':>5} {'min share':>10} {'max share':>10} {'entropy':>8}"
        )
        for layer, s in result["layers"].items():
            rows.append(
                f"{layer:>5} {s['max_over_mean']:>9.3f} {int(s['dead_experts']):>5} {s['min_share']:>10.4f} "
                f"{s['max_share']:>10.4f} {s['router_entropy']:>8.4f}"
            )
    return "\n".join(rows)


def run_cli(args: argparse.Namespace) -> int:
    result = evaluate(
        args.model, args.data, args.split, args.seq_len, args.batch_size, args.batches, args.seed
    )
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
