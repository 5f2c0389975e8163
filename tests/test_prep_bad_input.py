"""prep tokenize on bad input: each case has a clear message and a count in the manifest."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import tiny_tokenizer, word_level_tokenizer

from data_prep.errors import UserError
from data_prep.tokenize_stage import TokenizeConfig, run_tokenize


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _run(tok, inputs, out, **kw):
    return run_tokenize(
        TokenizeConfig(
            inputs=[str(i) for i in inputs],
            tokenizer=tok,
            out=str(out),
            valid_fraction=0.0,
            progress=False,
            **kw,
        )
    )


def _write_lines(path, lines: list[bytes]):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"text": "a good document"}).encode()


@pytest.fixture
def bad_jsonl(tmp_path):
    return _write_lines(
        tmp_path / "bad.jsonl",
        [
            GOOD,  # line 1
            b'{"text": "unterminated',  # 2 malformed
            json.dumps({"body": "no text key"}).encode(),  # 3 missing key
            json.dumps({"text": 42}).encode(),  # 4 not a string
            json.dumps({"text": "   \n"}).encode(),  # 5 empty
            b'{"text": "bad \xff\xfe bytes"}',  # 6 invalid UTF-8
            b'{"text": "lone \\ud800 surrogate"}',  # 7 invalid UTF-8 via an escape
            json.dumps({"text": "x " * 5000}).encode(),  # 8 too long for max_doc_chars=1000
            b"",  # blank lines are not records
            b"[1, 2]",  # 10 JSON but not an object
            GOOD,  # 11
        ],
    )


def test_each_bad_record_is_reported_skipped_and_counted(tok, bad_jsonl, tmp_path, capsys):
    m = _run(tok, [bad_jsonl], tmp_path / "out", max_doc_chars=1000)
    err = capsys.readouterr().err
    assert f"{bad_jsonl}:2" in err and "malformed JSON" in err
    assert f"{bad_jsonl}:3" in err and "--text-key" in err
    assert f"{bad_jsonl}:6" in err and f"{bad_jsonl}:7" in err and "invalid UTF-8" in err
    assert f"{bad_jsonl}:8" in err and "--max-doc-chars" in err
    assert f"{bad_jsonl}:10" in err
    skipped = m["totals"]["skipped"]
    assert skipped == {
        "malformed_json": 2,
        "missing_key": 1,
        "not_string": 1,
        "empty": 1,
        "invalid_utf8": 2,
        "too_long": 1,
        "unreadable": 0,
    }
    assert m["totals"]["documents"] == 2 == m["splits"]["train"]["documents"]
    assert m["inputs"][0]["skipped"]["malformed_json"] == 2


def test_strict_fails_on_the_first_malformed_line(tok, bad_jsonl, tmp_path):
    with pytest.raises(UserError, match=r"bad\.jsonl:2.*malformed JSON"):
        _run(tok, [bad_jsonl], tmp_path / "out", strict=True)


def test_empty_glob_and_unknown_type_are_user_errors(tok, tmp_path):
    with pytest.raises(UserError, match=r"--input .*nothing_\*\.jsonl: matches no file"):
        _run(tok, [tmp_path / "nothing_*.jsonl"], tmp_path / "out")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"data\.csv: unknown file type"):
        _run(tok, [tmp_path / "data.csv"], tmp_path / "out")


def test_unreadable_file_is_skipped_and_counted(tok, tmp_path, capsys):
    good = _write_lines(tmp_path / "good.jsonl", [GOOD])
    broken = tmp_path / "broken.jsonl"
    os.symlink(tmp_path / "does_not_exist", broken)  # exists as a name, cannot be read
    m = _run(tok, [good, broken], tmp_path / "out")
    assert "broken.jsonl: cannot read" in capsys.readouterr().err
    assert m["totals"]["unreadable_files"] == 1 and m["totals"]["documents"] == 1
    assert "error" in m["inputs"][1]
    with pytest.raises(UserError, match="no input file can be read"):
        _run(tok, [broken], tmp_path / "out2")


def test_truncated_gzip_keeps_what_was_read(tok, tmp_path, capsys):
    data = gzip.compress(b"\n".join([GOOD] * 2000) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    m = _run(tok, [path], tmp_path / "out")
    assert "read error" in capsys.readouterr().err
    assert m["totals"]["skipped"]["unreadable"] == 1 and 0 < m["totals"]["documents"] < 2000


def test_huge_single_document_kept_when_limit_allows(tok, tmp_path):
    huge = "word " * 200_000  # one 1 MB document
    path = _write_lines(tmp_path / "huge.jsonl", [json.dumps({"text": huge}).encode(), GOOD])
    m = _run(tok, [path], tmp_path / "out", shard_tokens=1000)
    assert m["totals"]["documents"] == 2 and m["totals"]["skipped"]["too_long"] == 0
    assert m["splits"]["train"]["shards"][0]["documents"] == 1  # the step closed after the huge document
    m2 = _run(tok, [path], tmp_path / "out2", max_doc_chars=100_000)
    assert m2["totals"]["skipped"]["too_long"] == 1 and m2["totals"]["documents"] == 1


def test_parquet_text_and_gz_inputs(tok, tmp_path):
    pq.write_table(pa.table({"text": ["from parquet", None, ""], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nokey.parquet")
    (tmp_path / "b.txt").write_text("a whole text file is one document\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(GOOD + b"\n")
    m = _run(
        tok,
        [tmp_path / "a.parquet", tmp_path / "nokey.parquet", tmp_path / "b.txt", tmp_path / "c.jsonl.gz"],
        tmp_path / "out",
    )
    assert [i["documents"] for i in m["inputs"]] == [1, 0, 1, 1]
    assert m["inputs"][0]["skipped"] == {"not_string": 1, "empty": 1}
    assert m["inputs"][1]["skipped"] == {"missing_key": 1}


def test_tokenizer_without_eod_needs_flag(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.save(str(tmp_path / "tokenizer.json"))
    path = _write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "a b"}).encode()])
    with pytest.raises(UserError, match="no end-of-document token.*--eod-token"):
        _run(str(tmp_path), [path], tmp_path / "out")
    with pytest.raises(UserError, match="'<eos>' is not in the vocabulary"):
        _run(str(tmp_path), [path], tmp_path / "out", eod_token="<eos>")
    m = _run(str(tmp_path), [path], tmp_path / "out", eod_token="b")
    assert m["eod_id"] == 2


def test_missing_tokenizer_names_the_path(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(UserError, match=r"--tokenizer .*nowhere"):
        _run(str(tmp_path / "nowhere"), [path], tmp_path / "out")
    tokdir = tmp_path / "emptydir"
    tokdir.mkdir()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        _run(str(tokdir), [path], tmp_path / "out")


def test_eod_from_tokenizer_config(tmp_path):
    from data_prep.tokenizer import load_tokenizer

    word_level_tokenizer(str(tmp_path / "tokenizer.json"), 10)
    assert load_tokenizer(str(tmp_path)).eod_token == "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "w5"}}))
    info = load_tokenizer(str(tmp_path))
    assert (info.eod_token, info.eod_id) == ("w5", 5)
