"""prep tokenize: round trip, the .idx spec read independently, dtype choice, split determinism, manifest."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
from corpora import make_documents, tiny_tokenizer, word_level_tokenizer, write_jsonl
from tokenizers import Tokenizer

from data_prep import cli
from data_prep.indexed import choose_dtype
from data_prep.tokenize_stage import TokenizeConfig, run_tokenize, split_is_valid


def parse_idx_by_spec(path: str) -> dict:
    """An independent reader of Megatron's .idx, written from docs/design.md §5 byte by byte."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", data[9:17])
    code = data[17]
    s, d = struct.unpack("<QQ", data[18:34])
    pos = 34
    lengths = list(struct.unpack(f"<{s}i", data[pos : pos + 4 * s]))
    pos += 4 * s
    pointers = list(struct.unpack(f"<{s}q", data[pos : pos + 8 * s]))
    pos += 8 * s
    doc_idx = list(struct.unpack(f"<{d}q", data[pos : pos + 8 * d]))
    pos += 8 * d
    assert pos == len(data), "trailing bytes after the document index"
    return {"version": version, "code": code, "lengths": lengths, "pointers": pointers, "doc_idx": doc_idx}


def read_documents_by_spec(prefix: str) -> list[list[int]]:
    """Documents of a shard using only the spec: dtype code, lengths and byte pointers."""
    idx = parse_idx_by_spec(prefix + ".idx")
    fmt, size = {8: ("H", 2), 4: ("i", 4)}[idx["code"]]
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    docs = []
    for n, p in zip(idx["lengths"], idx["pointers"], strict=True):
        docs.append(list(struct.unpack(f"<{n}{fmt}", data[p : p + n * size])))
    assert idx["doc_idx"] == list(range(len(docs) + 1))
    return docs


def split_documents(out: str, manifest: dict, split: str) -> list[list[int]]:
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        docs.extend(read_documents_by_spec(os.path.join(out, shard["prefix"])))
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tok_dir = tiny_tokenizer(str(root / "tok"))
    texts = make_documents(400, seed=1)
    # two input files, so document order across files is exercised too
    write_jsonl(str(root / "in" / "a.jsonl"), texts[:250])
    write_jsonl(str(root / "in" / "b.jsonl"), texts[250:])
    return root, tok_dir, texts


def _run(root, tok_dir, out, **kw):
    cfg = TokenizeConfig(
        inputs=[str(root / "in" / "*.jsonl")], tokenizer=tok_dir, out=str(root / out), progress=False, **kw
    )
    return run_tokenize(cfg)


def test_round_trip_every_document_is_encoding_plus_eod(setup):
    root, tok_dir, texts = setup
    m = _run(root, tok_dir, "rt", shard_tokens=3000, valid_fraction=0.2, workers=2)
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    assert m["eod_id"] == eod and m["dtype"] == "uint16"
    expected = [tok.encode(t, add_special_tokens=False).ids + [eod] for t in texts]
    train = split_documents(str(root / "rt"), m, "train")
    valid = split_documents(str(root / "rt"), m, "valid")
    assert len(m["splits"]["train"]["shards"]) > 3  # several shards were cut
    # every document exactly once, each split in input order, split by the seeded record hash
    is_valid = split_is_valid(m["seed"], np.arange(len(texts)), 0.2)
    assert train == [e for e, v in zip(expected, is_valid, strict=True) if not v]
    assert valid == [e for e, v in zip(expected, is_valid, strict=True) if v]
    assert 0.1 < len(valid) / len(texts) < 0.3
    assert m["totals"]["documents"] == len(texts) == m["inputs"][0]["documents"] + m["inputs"][1]["documents"]
    assert m["totals"]["tokens"] == sum(map(len, expected))


def test_manifest_records_inputs_tokenizer_and_shard_hashes(setup):
    root, tok_dir, _ = setup
    m = _run(root, tok_dir, "man", shard_tokens=5000)
    out = root / "man"
    with open(out / "manifest.json") as f:
        assert json.load(f) == m
    for inp in m["inputs"]:
        raw = open(inp["path"], "rb").read()
        assert inp["size"] == len(raw) and inp["sha256"] == hashlib.sha256(raw).hexdigest()
    raw_tok = open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()
    assert m["tokenizer"]["sha256"] == hashlib.sha256(raw_tok).hexdigest()
    assert m["vocab_size"] == 400
    for split in ("train", "valid"):
        for s in m["splits"][split]["shards"]:
            data = open(out / s["bin"], "rb").read()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == 2 * s["tokens"]
            assert len(parse_idx_by_spec(str(out / s["idx"]))["lengths"]) == s["documents"]
    assert m["timing"]["seconds"] > 0 and m["timing"]["tokens_per_s"] > 0


def _shard_bytes(out) -> dict:
    return {
        n: open(os.path.join(out, n), "rb").read()
        for n in sorted(os.listdir(out))
        if n.endswith((".bin", ".idx"))
    }


def test_output_independent_of_workers_and_split_deterministic_for_seed(setup):
    root, tok_dir, _ = setup
    a = _run(root, tok_dir, "w1", shard_tokens=4000, workers=1, seed=7, valid_fraction=0.3)
    b = _run(root, tok_dir, "w2", shard_tokens=4000, workers=2, seed=7, valid_fraction=0.3)
    c = _run(root, tok_dir, "s8", shard_tokens=4000, workers=1, seed=8, valid_fraction=0.3)
    assert _shard_bytes(root / "w1") == _shard_bytes(root / "w2")
    assert a["splits"] == b["splits"]
    assert a["splits"]["valid"]["documents"] != 0
    valid_a = split_documents(str(root / "w1"), a, "valid")
    valid_c = split_documents(str(root / "s8"), c, "valid")
    assert valid_a != valid_c  # another seed, another split


@pytest.mark.parametrize("vocab,dtype", [(65535, np.uint16), (65536, np.uint16), (65537, np.int32)])
def test_dtype_choice_at_uint16_boundary(vocab, dtype):
    assert choose_dtype(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("vocab,code", [(65535, 8), (65536, 8), (65537, 4)])
def test_largest_id_round_trips_at_dtype_boundary(tmp_path, vocab, code):
    tok = word_level_tokenizer(str(tmp_path / "tokenizer.json"), vocab)
    top = vocab - 1
    write_jsonl(str(tmp_path / "in.jsonl"), [f"w{top} w2 w{top - 1}"] * 3)
    m = run_tokenize(
        TokenizeConfig(
            inputs=[str(tmp_path / "in.jsonl")],
            tokenizer=tok,
            out=str(tmp_path / "out"),
            valid_fraction=0.0,
            progress=False,
        )
    )
    shard = m["splits"]["train"]["shards"][0]
    assert parse_idx_by_spec(str(tmp_path / "out" / shard["idx"]))["code"] == code
    assert read_documents_by_spec(str(tmp_path / "out" / shard["prefix"])) == [[top, 2, top - 1, 0]] * 3
    assert m["dtype"] == ("uint16" if code == 8 else "int32")


def test_cli_tokenize_and_stats(setup, capsys):
    root, tok_dir, texts = setup
    out = str(root / "cli")
    inputs = [str(root / "in" / "a.jsonl"), str(root / "in" / "b.jsonl")]

    def tokenize(tokenizer: str) -> int:
        return cli.main(
            ["prep", "tokenize", "--input", *inputs, "--tokenizer", tokenizer, "--out", out, "--no-progress"]
        )

    rc = tokenize(os.path.join(tok_dir, "tokenizer.json"))  # the file here, its directory below
    assert rc == 0
    table = capsys.readouterr().out
    assert "documents" in table and "tokens/s" in table and f"{len(texts):,}" in table
    assert cli.main(["prep", "stats", out]) == 0
    report = capsys.readouterr().out
    assert "document length" in report and "#" in report
    # a finished run is not redone
    mtime = os.path.getmtime(os.path.join(out, "train_00000.bin"))
    assert tokenize(tok_dir) == 0
    assert os.path.getmtime(os.path.join(out, "train_00000.bin")) == mtime
