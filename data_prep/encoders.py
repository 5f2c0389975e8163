"""Which encoder tokenizes `prep tokenize`'s documents: `tokenizers` ("hf") or an exact fast one.

`fastokens` re-implements `tokenizer.json` in Rust and, for the byte-level BPE tokenizers below, returns
the same ids as `tokenizers` 80-110x faster per core (docs/performance.md, "Fast exact encoder"). It is
used only when both checks pass (docs/design.md §5, "Encoder choice"):

1. up front, from tokenizer.json (`compatible_encoder`): a BPE model without dropout, byte fallback,
   subword prefix/suffix or unknown token; no normalizer; a byte-level pre-tokenizer whose split
   pattern is the GPT-2 one (ByteLevel use_regex) or the Llama-3 / Qwen2 one (Split + ByteLevel), the
   patterns we know both implementations agree on; plain added tokens (no lstrip/rstrip/single_word),
   which both split out of the text before pre-tokenization, also with add_special_tokens=False.
2. at every run (`first_mismatch`): a sample of the run's documents is encoded both ways and compared
   token for token; any difference falls back to `tokenizers` with a message naming it.

The shards never depend on the choice, so it is not a resume setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_prep.errors import UserError

HF = "hf"
FASTOKENS = "fastokens"
CHOICES = ("auto", HF, FASTOKENS)
SAMPLE_CHARS = 1 << 18  # text encoded twice per run: ~0.1 s with `tokenizers`, enough to catch a drift

# Pre-tokenizer split patterns both implementations are known to agree on.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
KNOWN_PATTERNS = {GPT2_PATTERN: "GPT-2", LLAMA3_PATTERN: "Llama-3", QWEN2_PATTERN: "Qwen2"}


# ---------------------------------------------------------------------------------------------- encoders
class HFEncoder:
    """`tokenizers.Tokenizer.encode_batch_fast`, the reference."""

    name = HF

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.source = tokenizer_json
        self.tok = Tokenizer.from_str(tokenizer_json)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (uint32) and each text's token count (int64)."""
        ids = [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        counts_D = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((i for x in ids for i in x), dtype=np.uint32, count=int(counts_D.sum()))
        return flat, counts_D


class FastokensEncoder:
    """`fastokens.Tokenizer.encode_batch_flat`: one flat uint32 buffer per batch, no Python objects."""

    name = FASTOKENS

    def __init__(self, tokenizer_json: str):
        # one thread: prep's worker processes are the parallelism (read when the first batch runs)
        os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")
        import fastokens

        self.source = tokenizer_json
        self.tok = fastokens.Tokenizer.from_json_str(tokenizer_json)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, offsets = self.tok.encode_batch_flat(list(texts), add_special_tokens=False)
        return np.frombuffer(ids, np.uint32), np.diff(np.frombuffer(offsets, np.uint64)).astype(np.int64)


ENCODERS = {HF: HFEncoder, FASTOKENS: FastokensEncoder}


def make_encoder(name: str, tokenizer_json: str):
    """An encoder object (`encode_flat(texts) -> (ids, counts)`) by name."""
    return ENCODERS[name](tokenizer_json)


# ---------------------------------------------------------------------------------------------- check 1
def compatible_encoder(tokenizer_json: str) -> tuple[str | None, str]:
    """(FASTOKENS, "") when tokenizer.json is one the fast encoder reproduces exactly, else (None, reason)."""
    try:
        import fastokens  # noqa: F401
    except ImportError:
        return None, "the fastokens package is not installed (pip install 'fastokens>=0.3.5,<0.4')"
    spec = json.loads(tokenizer_json)
    reason = _model_problem(spec.get("model") or {}) or _pipeline_problem(spec) or _added_problem(spec)
    return (None, reason) if reason else (FASTOKENS, "")


def _model_problem(model: dict) -> str:
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "unk_token"):
        if model.get(key) not in (None, ""):
            return f"BPE {key}={model[key]!r} is not supported"
    for key in ("byte_fallback", "fuse_unk"):
        if model.get(key):
            return f"BPE {key}=true is not supported"
    return ""


def _pipeline_problem(spec: dict) -> str:
    if spec.get("normalizer") is not None:
        return f"normalizer {spec['normalizer'].get('type')!r} is not supported (only none)"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern, byte_level = GPT2_PATTERN, steps[0]
    elif types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            return "pre-tokenizer Split must be behavior=Isolated, invert=false"
    else:
        return f"pre-tokenizer {'+'.join(map(str, types)) or 'none'} is not byte-level BPE"
    if byte_level.get("add_prefix_space"):
        return "pre-tokenizer ByteLevel add_prefix_space=true is not supported"
    if pattern not in KNOWN_PATTERNS:
        return f"pre-tokenizer split pattern {pattern!r} is not a known GPT-2/Llama-3/Qwen2 pattern"
    if (spec.get("decoder") or {}).get("type") not in ("ByteLevel", None):
        return f"decoder {spec['decoder'].get('type')!r} is not ByteLevel"
    return ""


def _added_problem(spec: dict) -> str:
    for t in spec.get("added_tokens") or []:
        for key in ("lstrip", "rstrip", "single_word"):
            if t.get(key):
                return f"added token {t.get('content')!r} has {key}=true, which is not supported"
    return ""


# ---------------------------------------------------------------------------------------------- check 2
def first_mismatch(reference, candidate, texts: Sequence[str]) -> tuple[int, int] | None:
    """(document, token position) of the first difference between two encoders on `texts`, or None."""
    ref_ids, ref_counts = _encode_tolerant(reference, texts)
    got_ids, got_counts = _encode_tolerant(candidate, texts)
    if np.array_equal(ref_ids, got_ids) and np.array_equal(ref_counts, got_counts):
        return None
    ref_starts = np.concatenate([[0], np.cumsum(np.maximum(ref_counts, 0))])
    got_starts = np.concatenate([[0], np.cumsum(np.maximum(got_counts, 0))])
    for d in range(len(texts)):
        a = ref_ids[ref_starts[d] : ref_starts[d + 1]]
        b = got_ids[got_starts[d] : got_starts[d + 1]]
        if ref_counts[d] != got_counts[d] or not np.array_equal(a, b):
            n = min(len(a), len(b))
            diff = np.flatnonzero(a[:n] != b[:n])
            return d, int(diff[0]) if len(diff) else n
    return len(texts), 0  # unreachable unless the encoders disagree on the number of documents


def _encode_tolerant(encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """encode_flat, or when the batch fails (a text the encoder rejects, e.g. a lone surrogate) one
    text at a time with -1 as the count of each rejected text, so rejections are compared too."""
    try:
        return encoder.encode_flat(texts)
    except Exception:
        parts, counts = [], []
        for t in texts:
            try:
                ids, count = encoder.encode_flat([t])
            except Exception:
                ids, count = np.empty(0, np.uint32), np.array([-1])
            parts.append(ids)
            counts.append(count)
        return np.concatenate(parts), np.concatenate(counts)


# ---------------------------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class Selection:
    """The encoder a run uses, a one-line note saying why (empty when nothing needs saying), and the
    encoder object when the check built one (forked workers reuse it instead of loading their own)."""

    name: str
    note: str = ""
    encoder: object = None


def select_encoder(
    tokenizer_json: str, choice: str, sample_texts: Sequence[str], labels: Sequence[str] | None = None
) -> Selection:
    """Decide the run's encoder: `choice` is --encoder (auto, hf or an encoder name).

    `labels` name the sample documents in messages (e.g. "data.jsonl record 7"); default "sample
    document N".
    Raises UserError for an unknown choice, or when a named encoder is incompatible or differs from
    `tokenizers` on the sample; auto falls back to hf with a note instead.
    """
    if choice not in CHOICES:
        raise UserError(f"--encoder {choice!r}: must be one of {', '.join(CHOICES)}")
    if choice == HF:
        return Selection(HF)
    name, reason = compatible_encoder(tokenizer_json)
    if name is None:
        return _refuse(choice, f"the tokenizer is not supported by {FASTOKENS}: {reason}")
    reference, candidate = make_encoder(HF, tokenizer_json), make_encoder(name, tokenizer_json)
    where = first_mismatch(reference, candidate, sample_texts)
    if where is not None:
        doc, pos = where
        label = labels[doc] if labels is not None else f"sample document {doc}"
        return _refuse(choice, f"{name} differs from tokenizers on {label} at token {pos}", reference)
    note = f"encoder: {name} (matches tokenizers on {len(sample_texts)} sample documents)"
    return Selection(name, note, candidate)


def _refuse(choice: str, reason: str, reference=None) -> Selection:
    if choice != "auto":
        raise UserError(f"--encoder {choice}: {reason}; use --encoder auto or hf")
    return Selection(HF, f"encoder: tokenizers, since {reason}", reference)
