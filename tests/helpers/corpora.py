"""Small deterministic corpora and tokenizers for the tests (no download, under a second to build), and the
output of `prep tokenize` as comparable data."""

from __future__ import annotations

import json
import os
import random

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "expert router token layer weight gradient upcycle dense sparse mixture model data shard "
    "café naïve 東京 データ 🙂 résumé"
).split()


def make_documents(n: int, seed: int = 0, max_words: int = 200) -> list[str]:
    """n documents of random words (with some non-ASCII), lengths spread over 1..max_words words."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(1, max_words)
        body = " ".join(rng.choice(WORDS) for _ in range(k))
        docs.append(f"Document {i}.\n{body}\n")
    return docs


def write_jsonl(path: str, texts: list[str], key: str = "text") -> str:
    """One JSON object per line with the text under `key`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": len(t)}, ensure_ascii=False) + "\n")
    return path


def tiny_tokenizer(out_dir: str, vocab_size: int = 400, seed: int = 0) -> str:
    """Train a byte-level BPE on generated text; returns the directory holding tokenizer.json."""
    from data_prep.tokenizer import train_bpe

    train_bpe(make_documents(300, seed=seed), vocab_size, out_dir, show_progress=False)
    return out_dir


def word_level_tokenizer(path: str, vocab_size: int) -> str:
    """A WordLevel tokenizer with ids 0..vocab_size-1: '<|endoftext|>' = 0, 'w1' .. 'w{V-1}'.

    Lets a test produce exactly the largest id of a vocabulary (dtype boundaries).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    vocab.update({f"w{i}": i for i in range(2, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(path)
    return path


def prep_outputs(out) -> tuple[dict[str, bytes], dict]:
    """A `prep tokenize` output directory as (shard file name -> bytes, manifest without its timing), for
    byte-identity checks between runs."""
    files = {
        n: open(os.path.join(out, n), "rb").read()
        for n in sorted(os.listdir(out))
        if n.endswith((".bin", ".idx"))
    }
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    manifest.pop("timing")
    return files, manifest
