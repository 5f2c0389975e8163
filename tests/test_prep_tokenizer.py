"""prep tokenizer and prep corpus: the trained BPE loads everywhere; the stdlib corpus needs no download."""

from __future__ import annotations

import json
import os

from corpora import make_documents, write_jsonl
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from data_prep import cli


def test_trained_bpe_loads_in_tokenizers_and_transformers(tmp_path, capsys):
    write_jsonl(str(tmp_path / "in.jsonl"), make_documents(200))
    rc = cli.main(
        [
            "prep",
            "tokenizer",
            "--input",
            str(tmp_path / "*.jsonl"),
            "--vocab-size",
            "500",
            "--out",
            str(tmp_path / "tok"),
        ]
    )
    assert rc == 0
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.get_vocab_size() == 500 and tok.token_to_id("<|endoftext|>") == 0
    text = "the expert router 東京 🙂 café\n  indented"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: lossless on any text
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0
    assert hf(text)["input_ids"] == ids


def test_corpus_stage_writes_stdlib_documents(tmp_path, capsys):
    assert cli.main(["prep", "corpus", "--out", str(tmp_path), "--max-mb", "0.3"]) == 0
    assert "documents" in capsys.readouterr().out
    lines = open(tmp_path / "stdlib.jsonl", encoding="utf-8").read().splitlines()
    docs = [json.loads(line) for line in lines]
    assert len(docs) > 3 and all(d["text"].strip() for d in docs)
    sizes = [len(d["text"].encode()) for d in docs]
    assert 0.3e6 <= sum(sizes) < 0.3e6 + max(sizes)
    assert all(d["source"].endswith(".py") and "site-packages" not in d["source"] for d in docs)
    # deterministic: the same run gives the same file
    cli.main(["prep", "corpus", "--out", str(tmp_path / "again.jsonl"), "--max-mb", "0.3"])
    assert open(tmp_path / "again.jsonl", "rb").read() == open(tmp_path / "stdlib.jsonl", "rb").read()


def test_quickstart_corpus_to_shards(tmp_path, capsys):
    """The README quickstart on a small slice: corpus -> tokenizer -> tokenize -> stats."""
    c = str(tmp_path / "c.jsonl")
    assert cli.main(["prep", "corpus", "--out", c, "--max-mb", "0.5"]) == 0
    assert (
        cli.main(["prep", "tokenizer", "--input", c, "--vocab-size", "600", "--out", str(tmp_path / "t")])
        == 0
    )
    assert (
        cli.main(
            [
                "prep",
                "tokenize",
                "--input",
                c,
                "--tokenizer",
                str(tmp_path / "t"),
                "--out",
                str(tmp_path / "d"),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert cli.main(["prep", "stats", str(tmp_path / "d")]) == 0
    assert os.path.isfile(tmp_path / "d" / "train_00000.idx")
    assert cli.main(["prep", "stats", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
