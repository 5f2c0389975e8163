"""Tokenizer loading (with end-of-document detection) and the `prep tokenizer` stage (byte-level BPE)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from data_prep.errors import UserError

EOD_TOKEN = "<|endoftext|>"
# Spellings of an end-of-document/eos token in common tokenizers, most specific first.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")


@dataclass
class TokenizerInfo:
    """A tokenizer.json on disk plus what the data stages need to know about it."""

    path: str
    json_text: str
    sha256: str
    vocab_size: int  # 1 + the largest id, added tokens included
    eod_id: int
    eod_token: str


def resolve_tokenizer_file(path: str) -> str:
    """`path` itself if it is a file, else `path/tokenizer.json`; UserError when neither exists."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise UserError(
                f"--tokenizer {path}: directory has no tokenizer.json "
                "(pass the file itself, or run `upcycle prep tokenizer` to train one)"
            )
        return candidate
    if not os.path.isfile(path):
        raise UserError(f"--tokenizer {path}: no such file or directory")
    return path


def _config_eos(tokenizer_file: str) -> str | None:
    """The eos_token from a tokenizer_config.json next to the tokenizer file, if there is one."""
    cfg = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer(path: str, eod_token: str | None = None) -> TokenizerInfo:
    """Load a tokenizer (dir with tokenizer.json, or the file) and find its end-of-document token.

    Order: the explicit `eod_token`; tokenizer_config.json's eos_token; the first of EOD_CANDIDATES
    that the vocabulary holds. Raises UserError when none applies.
    """
    from tokenizers import Tokenizer

    file = resolve_tokenizer_file(path)
    with open(file, "rb") as f:
        raw = f.read()
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"--tokenizer {file}: cannot be loaded by `tokenizers` ({exc})") from exc
    vocab = tok.get_vocab(with_added_tokens=True)
    source = "--eod-token"
    if eod_token is None:
        eod_token, source = _config_eos(file), "tokenizer_config.json eos_token"
        if eod_token is None or eod_token not in vocab:
            eod_token = next((c for c in EOD_CANDIDATES if c in vocab), None)
            source = "vocabulary"
    if eod_token is None:
        raise UserError(
            f"--tokenizer {file}: no end-of-document token found (looked for "
            f"{', '.join(EOD_CANDIDATES)} and tokenizer_config.json's eos_token); "
            "pass --eod-token TOKEN naming one of its tokens"
        )
    if eod_token not in vocab:
        raise UserError(f"{source}: {eod_token!r} is not in the vocabulary of {file}")
    return TokenizerInfo(
        path=os.path.abspath(file),
        json_text=raw.decode("utf-8"),
        sha256=hashlib.sha256(raw).hexdigest(),
        vocab_size=max(vocab.values()) + 1,
        eod_id=vocab[eod_token],
        eod_token=eod_token,
    )


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str, show_progress: bool = True) -> str:
    """Train a byte-level BPE with an `<|endoftext|>` special token (id 0); returns DIR/tokenizer.json.

    Also writes tokenizer_config.json so `transformers.PreTrainedTokenizerFast.from_pretrained(DIR)`
    and AutoTokenizer know the eos token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257 + 1:
        raise UserError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least 258 "
            "(256 bytes + the end-of-document token + merges)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    file = os.path.join(out_dir, "tokenizer.json")
    tok.save(file)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "bos_token": EOD_TOKEN,
        "unk_token": None,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN}, f, indent=2)
    return file


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Lists of texts, which `train_from_iterator` consumes faster than single strings."""
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
