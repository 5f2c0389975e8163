"""prep tokenize's fast encoder (data_prep.encoders): exact against `tokenizers`, same shards, fallbacks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from corpora import make_documents, word_level_tokenizer, write_jsonl
from tokenizers import Tokenizer, normalizers

from data_prep import cli, encoders
from data_prep.corpus import stdlib_documents
from data_prep.encoders import (
    FASTOKENS,
    HF,
    LLAMA3_PATTERN,
    compatible_encoder,
    first_mismatch,
    make_encoder,
    select_encoder,
)
from data_prep.errors import UserError
from data_prep.tokenize_stage import encode_chunk
from data_prep.tokenizer import train_bpe

TRICKY = [
    "日本語のテキストと中文，한국어 문장。",
    "emoji 👍🏽 👨‍👩‍👧 🏳️‍🌈 and combining marks: e\u0301 a\u0308 n\u0303\u0323 Z\u0351\u0352\u0353",
    "spaces    runs\t\ttabs \t \n\n\nnewlines   \n  x  ",
    "windows\r\nline\r\n\r\nendings \r\n",
    "numbers 1234567 3.14159 1e-10 0x1F 2024-01-01 12,345,678",
    "contractions: don't I'm we'll they've she's I'd you're DON'T WE'LL",
    "special <|endoftext|> inside<|endoftext|>text <|endoftext|><|endoftext|>",
    "<|endoftext|>",
    "",
    " ",
    "\u00a0non-breaking\u2003em space\u200bzero width\ufeffbom",
    "control \x00\x01\x1f chars and rtl \u202e text",
    "x" * 5000 + " " + "ab" * 3000,
]


@pytest.fixture(scope="module")
def stdlib_texts():
    return [d["text"] for d in stdlib_documents(max_bytes=400_000)]


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory, stdlib_texts):
    """A byte-level BPE trained with our train_bpe on the stdlib corpus (what `prep tokenizer` makes)."""
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(stdlib_texts + TRICKY, 1500, str(out), show_progress=False)
    with open(out / "tokenizer.json", encoding="utf-8") as f:
        return f.read()


def llama3_style(tokenizer_json: str) -> str:
    """The same vocabulary with Llama-3's pre-tokenizer layout (Split + ByteLevel) and ignore_merges."""
    spec = json.loads(tokenizer_json)
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    spec["model"]["ignore_merges"] = True
    return json.dumps(spec)


@pytest.mark.parametrize("variant", ["gpt2", "llama3"])
def test_fast_encoder_matches_tokenizers_token_for_token(bpe_json, stdlib_texts, variant):
    tokenizer_json = bpe_json if variant == "gpt2" else llama3_style(bpe_json)
    assert compatible_encoder(tokenizer_json) == (FASTOKENS, "")
    texts = stdlib_texts + TRICKY
    fast = make_encoder(FASTOKENS, tokenizer_json)
    ids, counts = fast.encode_flat(texts)
    reference = Tokenizer.from_str(tokenizer_json).encode_batch(texts, add_special_tokens=False)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i, expected in enumerate(reference):
        assert ids[starts[i] : starts[i + 1]].tolist() == expected.ids, f"document {i}: {texts[i][:60]!r}"
    # the added token is split out of the text even with add_special_tokens=False, as tokenizers does
    eod = Tokenizer.from_str(tokenizer_json).token_to_id("<|endoftext|>")
    assert eod in ids[starts[-7] : starts[-6]].tolist()


def test_encode_chunk_same_bytes_and_same_rejections(bpe_json, stdlib_texts):
    """Packing with EODs, and a text both encoders reject (a lone surrogate, which JSON allows)."""
    head = stdlib_texts[:10]
    texts = head + [json.loads('"bad \\ud800 surrogate"')] + TRICKY
    out_hf = encode_chunk(make_encoder(HF, bpe_json), texts, 0, "uint16")
    out_fast = encode_chunk(make_encoder(FASTOKENS, bpe_json), texts, 0, "uint16")
    assert out_hf[2] == out_fast[2] == [len(head)]
    assert out_hf[0].dtype == out_fast[0].dtype == np.uint16
    assert out_hf[0].tobytes() == out_fast[0].tobytes()
    assert np.array_equal(out_hf[1], out_fast[1])
    assert int((out_hf[0] == 0).sum()) >= len(texts) - 1  # one EOD per document kept


class WrongEncoder:
    """fastokens with one token of document 2 changed: what a subtly wrong fast encoder would do."""

    name = FASTOKENS

    def __init__(self, tokenizer_json: str):
        self.inner = encoders.FastokensEncoder(tokenizer_json)

    def encode_flat(self, texts):
        ids, counts = self.inner.encode_flat(texts)
        ids = ids.copy()
        if len(texts) > 2:
            ids[int(counts[:2].sum()) + 3] += 1
        return ids, counts


def test_sample_check_catches_a_mismatch(bpe_json, stdlib_texts, monkeypatch):
    sample = stdlib_texts[:5]
    assert first_mismatch(make_encoder(HF, bpe_json), WrongEncoder(bpe_json), sample) == (2, 3)
    assert first_mismatch(make_encoder(HF, bpe_json), make_encoder(FASTOKENS, bpe_json), sample) is None
    monkeypatch.setitem(encoders.ENCODERS, FASTOKENS, WrongEncoder)
    labels = [f"doc.jsonl record {i}" for i in range(5)]
    chosen = select_encoder(bpe_json, "auto", sample, labels)
    assert chosen.name == HF
    assert "differs from tokenizers on doc.jsonl record 2 at token 3" in chosen.note
    with pytest.raises(UserError, match=r"--encoder fastokens: .*record 2 at token 3"):
        select_encoder(bpe_json, FASTOKENS, sample, labels)


def run_prep(inputs: list[str], tokenizer: str, out, *extra: str) -> int:
    args = ["prep", "tokenize", "--input", *inputs, "--tokenizer", tokenizer, "--out", str(out)]
    return cli.main([*args, "--no-progress", "--shard-tokens", "20000", "--valid-fraction", "0.2", *extra])


def test_shards_identical_between_auto_and_hf(tmp_path, bpe_json, stdlib_texts, capsys):
    tok = tmp_path / "tok.json"
    tok.write_text(bpe_json, encoding="utf-8")
    data = write_jsonl(str(tmp_path / "docs.jsonl"), stdlib_texts + TRICKY)
    with open(data, "a", encoding="utf-8") as f:
        f.write('{"text": "lone \\ud800 surrogate"}\n')  # valid JSON, rejected by both encoders
    assert run_prep([data], str(tok), tmp_path / "auto", "--workers", "2") == 0
    assert "encoder: fastokens (matches tokenizers" in capsys.readouterr().err
    assert run_prep([data], str(tok), tmp_path / "hf", "--encoder", "hf") == 0
    names = sorted(os.listdir(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "auto")) == names and "train_00001.bin" in names
    for name in names:
        a, b = (tmp_path / d / name for d in ("auto", "hf"))
        if name.endswith((".bin", ".idx")):
            assert a.read_bytes() == b.read_bytes(), name
        else:  # manifest and state: equal but for timing and the output directory
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            for j in (ja, jb):
                j.pop("timing", None), j.pop("seconds", None)
            assert ja == jb, name
    # the encoder is not a resume setting: the hf output is complete for a fastokens run too
    capsys.readouterr()
    assert run_prep([data], str(tok), tmp_path / "hf", "--encoder", FASTOKENS) == 0
    assert "already complete" in capsys.readouterr().err


def normalized_tokenizer(tokenizer_json: str, path) -> str:
    tok = Tokenizer.from_str(tokenizer_json)
    tok.normalizer = normalizers.NFC()
    tok.save(str(path))
    return str(path)


def test_incompatible_tokenizer_falls_back_under_auto_and_fails_when_named(tmp_path, bpe_json, capsys):
    data = write_jsonl(str(tmp_path / "docs.jsonl"), make_documents(30))
    tok = normalized_tokenizer(bpe_json, tmp_path / "nfc.json")
    assert compatible_encoder(open(tok).read()) == (None, "normalizer 'NFC' is not supported (only none)")
    assert run_prep([data], tok, tmp_path / "auto") == 0
    err = capsys.readouterr().err
    assert "encoder: tokenizers, since the tokenizer is not supported by fastokens: normalizer 'NFC'" in err
    assert run_prep([data], tok, tmp_path / "named", "--encoder", FASTOKENS) == 2
    err = capsys.readouterr().err
    assert "--encoder fastokens: the tokenizer is not supported by fastokens: normalizer 'NFC'" in err
    assert not (tmp_path / "named").exists()  # refused before any output was written


def test_compatibility_reasons(tmp_path, bpe_json):
    word = word_level_tokenizer(str(tmp_path / "word.json"), 50)
    assert compatible_encoder(open(word).read()) == (None, "model type 'WordLevel' is not BPE")
    spec = json.loads(bpe_json)
    spec["model"]["byte_fallback"] = True
    assert compatible_encoder(json.dumps(spec))[1] == "BPE byte_fallback=true is not supported"
    spec = json.loads(llama3_style(bpe_json))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    assert "not a known GPT-2/Llama-3/Qwen2 pattern" in compatible_encoder(json.dumps(spec))[1]
    spec = json.loads(bpe_json)
    spec["added_tokens"][0]["lstrip"] = True
    assert "lstrip=true" in compatible_encoder(json.dumps(spec))[1]
