"""Input corpora: expanding paths/globs, fingerprinting files, and reading documents in a fixed order.

Supported: JSON Lines (`.jsonl`, `.json`, `.ndjson`, also `.gz`), Parquet (`.parquet`) and plain text
(`.txt`, `.md`, also `.gz`: one document per file). A directory stands for every supported file under it.

JSON Lines are parsed here line by line rather than through `datasets`' JSON builder because that
builder rejects a whole file for one bad line and cannot say which line it was; Parquet is streamed
through `datasets`.

Every non-blank line (JSONL), row (Parquet) or file (text) is one *record* with a global index in
input order; bad records keep their index, so skipping one never shifts the train/valid split of the
others, and a resumed run can restart at any record index.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.errors import UserError
from data_prep.indexed import sha256_file

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}
SKIP_REASONS = (
    "malformed_json",
    "missing_key",
    "not_string",
    "empty",
    "invalid_utf8",
    "too_long",
    "unreadable",
)
BLOCK_BYTES = 1 << 20  # JSON Lines are shipped to the workers unparsed, in blocks of about this many bytes


@dataclass
class InputFile:
    """One input file and its fingerprint (`error` is set when it cannot be read)."""

    path: str
    format: str
    size: int | None = None
    sha256: str | None = None
    error: str | None = None

    def record(self) -> dict:
        """The manifest entry."""
        out = {"path": self.path, "format": self.format, "size": self.size, "sha256": self.sha256}
        if self.error:
            out["error"] = self.error
        return out


def file_format(path: str) -> str | None:
    """'jsonl', 'parquet' or 'text' from the file name (a trailing .gz is looked through), else None."""
    name = path[:-3] if path.endswith(".gz") else path
    return FORMATS.get(os.path.splitext(name)[1].lower())


def expand_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files, directories and globs in the given order (sorted within each); no duplicates.

    Raises UserError for a pattern that matches nothing or a file of unknown type.
    """
    seen: set[str] = set()
    files: list[InputFile] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(
                p
                for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                if os.path.isfile(p) and file_format(p)
            )
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p))
        else:
            matches = [pattern] if os.path.lexists(pattern) else []
        if not matches:
            raise UserError(f"--input {pattern}: matches no file (check the path or quote the glob)")
        for path in matches:
            path = os.path.abspath(path)
            if path in seen:
                continue
            seen.add(path)
            fmt = file_format(path)
            if fmt is None:
                raise UserError(
                    f"--input {path}: unknown file type; expected one of "
                    f"{', '.join(sorted(FORMATS))} (optionally .gz)"
                )
            files.append(InputFile(path, fmt))
    return files


def fingerprint(files: list[InputFile]) -> None:
    """Fill in size and sha256; an unreadable file gets `error` instead (it is skipped and counted)."""
    for f in files:
        try:
            f.size = os.path.getsize(f.path)
            f.sha256 = sha256_file(f.path)
        except OSError as exc:
            f.error = f"{type(exc).__name__}: {exc.strerror or exc}"


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def check_text(text, max_doc_chars: int) -> str | None:
    """Why a decoded value cannot be a document (one of SKIP_REASONS), or None if it can."""
    if not isinstance(text, str):
        return "not_string"
    if not text or text.isspace():
        return "empty"
    if len(text) > max_doc_chars:
        return "too_long"
    try:
        text.encode("utf-8")  # lone surrogates (from \\ud800 escapes) cannot be tokenized
    except UnicodeEncodeError:
        return "invalid_utf8"
    return None


def parse_jsonl_line(line: bytes, key: str, max_doc_chars: int) -> tuple[str | None, str | None, str]:
    """One non-blank JSON Lines line: (text, None, "") for a document, else (None, reason, detail), the
    detail to append to the line's location in the warning. The error column of malformed JSON counts
    the line's newline, so pass the line with it."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8", ""
    try:
        obj = json.loads(s)
    except ValueError as exc:
        return None, "malformed_json", f" ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, "malformed_json", f" (a JSON {type(obj).__name__}, not an object)"
    if key not in obj:
        return None, "missing_key", f" (keys: {', '.join(list(obj)[:8])})"
    text = obj[key]
    reason = check_text(text, max_doc_chars)
    return (None, reason, "") if reason else (text, None, "")


def parse_jsonl_block(
    data: bytes, key: str, max_doc_chars: int, first_lineno: int = 1
) -> tuple[list[str], list[int], list[tuple[int, str, str]], int]:
    """The records of whole JSON Lines lines `data` (a JsonlBlock's), checked line by line exactly as
    RecordReader.records() checks them (parse_jsonl_line): (texts, record offset of each text in the
    block, skipped records as (offset, reason, location for the warning), number of records). The
    lines are decoded straight from the block (a memoryview), not copied out of it."""
    view = memoryview(data)
    texts: list[str] = []
    positions: list[int] = []
    bad: list[tuple[int, str, str]] = []
    rec = lo = 0
    lineno = first_lineno
    size = len(data)
    while lo < size:
        nl = data.find(b"\n", lo)
        hi = size if nl < 0 else nl + 1  # the line with its newline, as records() reads it
        if view[lo : lo + 1] == b"{":
            try:  # the common case, as parse_jsonl_line would decode and parse it
                obj = json.loads(str(view[lo:hi], "utf-8"))
                text = obj[key] if isinstance(obj, dict) and key in obj else None
            except ValueError:
                text = None
            if isinstance(text, str) and check_text(text, max_doc_chars) is None:
                texts.append(text)
                positions.append(rec)
                rec, lo, lineno = rec + 1, hi, lineno + 1
                continue
        line = data[lo:hi]
        if line.strip():  # blank lines are not records
            text, reason, detail = parse_jsonl_line(line, key, max_doc_chars)
            if reason is None:
                texts.append(text)
                positions.append(rec)
            else:
                bad.append((rec, reason, f":{lineno}{detail}"))
            rec += 1
        lo, lineno = hi, lineno + 1
    return texts, positions, bad, rec


@dataclass
class JsonlBlock:
    """Records [rec_lo, rec_lo + n) of input file `fi`: whole lines, unparsed, the first numbered lineno."""

    fi: int
    rec_lo: int
    n: int
    data: bytes
    lineno: int

    def head(self, n: int) -> JsonlBlock:
        """The block's first n records."""
        return JsonlBlock(self.fi, self.rec_lo, n, self.data[: _after_records(self.data, n)[0]], self.lineno)


def _count_records(lines: bytes) -> int:
    """The number of non-blank lines in whole lines (the last may lack its newline)."""
    n = lines.count(b"\n") + (not lines.endswith(b"\n"))
    if lines.count(b"\n{") + lines.startswith(b"{") == n:
        return n  # every line starts a JSON object, so none is blank
    parts = lines.split(b"\n")
    if lines.endswith(b"\n"):
        parts.pop()
    return sum(1 for line in parts if line.strip())


def _after_records(lines: bytes, k: int) -> tuple[int, int]:
    """(offset just past the line of the k-th non-blank line, or len(lines) if there are fewer, and the
    number of non-blank lines before that offset)."""
    pos = seen = 0
    while seen < k and pos < len(lines):
        nl = lines.find(b"\n", pos)
        end = len(lines) if nl < 0 else nl + 1
        seen += bool(lines[pos:end].strip())
        pos = end
    return pos, seen


class RecordReader:
    """Yields `(record_index, file_index, text, reason)` for every record from `start` on.

    `text` is None when the record is skipped, and `reason` (one of SKIP_REASONS) says why; `warn` is
    called with a message naming the file and line. `bytes_done` follows progress through the inputs.
    """

    def __init__(
        self, files: list[InputFile], text_key: str, max_doc_chars: int, warn: Callable[[str, str], None]
    ):
        self.files = files
        self.text_key = text_key
        self.max_doc_chars = max_doc_chars
        self.warn = warn
        self.bytes_done = 0

    def records(self, start: int = 0) -> Iterator[tuple[int, int, str | None, str | None]]:
        """All records with index >= start, in order."""
        return self._read(start, blocks=False)

    def items(self, start: int = 0, stop: int | None = None) -> Iterator:
        """The records of records(start) before `stop` (None: all), for `prep tokenize`: those of a JSON
        Lines file come as JsonlBlocks, whole lines unparsed (about BLOCK_BYTES each), which the worker
        processes parse with parse_jsonl_block and the main process hands back to unpack_block; the
        others as records() yields them."""
        for item in self._read(start, blocks=True):
            if isinstance(item, JsonlBlock):
                if stop is not None and item.rec_lo + item.n >= stop:
                    if item.rec_lo < stop:
                        yield item.head(stop - item.rec_lo)
                    return
            elif stop is not None and item[0] >= stop:
                return
            yield item

    def unpack_block(self, block: JsonlBlock, positions: np.ndarray, bad: list, n: int) -> tuple:
        """A parsed block (parse_jsonl_block's results): (record and file index of each document,
        skipped records as [(record, file, reason)], the warnings records() gives for them, in order,
        as [(reason, message)])."""
        if n != block.n:
            raise RuntimeError(f"{self.files[block.fi].path}: block of {block.n} records parsed as {n}")
        path = self.files[block.fi].path
        skipped = [(block.rec_lo + offset, block.fi, reason) for offset, reason, _ in bad]
        warnings = [(reason, f"{path}{where}: {_REASON_TEXT[reason]}") for _, reason, where in bad]
        doc_rec = block.rec_lo + np.asarray(positions, np.int64)
        return doc_rec, np.full(len(doc_rec), block.fi, np.int64), skipped, warnings

    def _read(self, start: int, blocks: bool) -> Iterator:
        at = [0]  # the index of the next record; _jsonl_blocks advances it
        for fi, f in enumerate(self.files):
            base_bytes = self.bytes_done
            if f.error:
                self.warn("unreadable", f"{f.path}: cannot read ({f.error}); file skipped")
                continue
            try:
                if blocks and f.format == "jsonl":
                    yield from self._jsonl_blocks(f, fi, at, skip=max(0, start - at[0]))
                else:
                    reader = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}[f.format]
                    for text, reason, where in reader(f, skip=max(0, start - at[0])):
                        if at[0] >= start:
                            if reason:
                                self.warn(reason, f"{f.path}{where}: {_REASON_TEXT[reason]}")
                            yield at[0], fi, text, reason
                        at[0] += 1
            except (OSError, EOFError, ValueError) as exc:
                # A truncated .gz or corrupt Parquet: report it, keep what was read, go on.
                index = at[0]
                self.warn(
                    "unreadable", f"{f.path}: read error after record {index} ({exc}); rest of file skipped"
                )
                yield index, fi, None, "unreadable"
                at[0] += 1
            self.bytes_done = base_bytes + (f.size or 0)

    def _jsonl_blocks(self, f: InputFile, fi: int, at: list, skip: int) -> Iterator[JsonlBlock]:
        """_jsonl's records in blocks of whole lines, read in big pieces; the lines a read error cuts off
        are dropped as _jsonl drops them (a partial last line is lost, the complete ones are kept)."""
        lineno, tail = 1, b""
        with _open_binary(f.path) as fh:
            while True:
                parts, size, eof, error = [tail], len(tail), False, None
                try:
                    while True:
                        data = fh.read1(BLOCK_BYTES)
                        if not data:
                            eof = True
                            break
                        self.bytes_done += len(data)
                        parts.append(data)
                        size += len(data)
                        if size >= BLOCK_BYTES:
                            break
                except (OSError, EOFError, ValueError) as exc:
                    error = exc
                buf = b"".join(parts)
                cut = len(buf) if eof else buf.rfind(b"\n") + 1
                lines, tail = buf[:cut], buf[cut:]
                if skip and lines:
                    cut, passed = _after_records(lines, skip)
                    skip -= passed
                    at[0] += passed
                    lineno += lines.count(b"\n", 0, cut)
                    lines = lines[cut:]
                if lines:
                    n = _count_records(lines)
                    if n:
                        block = JsonlBlock(fi, at[0], n, lines, lineno)
                        at[0] += n
                        yield block
                    lineno += lines.count(b"\n")
                if error is not None:
                    raise error
                if eof:
                    return

    def _check(self, text) -> str | None:
        return check_text(text, self.max_doc_chars)

    def _jsonl(self, f: InputFile, skip: int):
        seen = 0
        with _open_binary(f.path) as fh:
            for lineno, line in enumerate(fh, 1):
                self.bytes_done += len(line)
                if not line.strip():
                    continue  # blank lines are not records
                seen += 1
                if seen <= skip:
                    yield None, None, ""
                    continue
                text, reason, detail = parse_jsonl_line(line, self.text_key, self.max_doc_chars)
                yield text, reason, f":{lineno}{detail}"

    def _parquet(self, f: InputFile, skip: int):
        # Through `datasets` (streaming, local file: no cache copy, no network); `skip` resumes at a row.
        from datasets import load_dataset

        rows = load_dataset("parquet", data_files=f.path, split="train", streaming=True)
        if self.text_key not in (rows.column_names or []):
            columns = ", ".join((rows.column_names or [])[:8])
            for row in range(_parquet_rows(f.path)):
                yield None, "missing_key", f" row {row} (columns: {columns})"
            return
        skip = min(skip, _parquet_rows(f.path))
        yield from ((None, None, "") for _ in range(skip))  # every record counts, also the skipped ones
        for row, record in enumerate(rows.select_columns([self.text_key]).skip(skip), start=skip):
            value, where = record[self.text_key], f" row {row}"
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    yield None, "invalid_utf8", where
                    continue
            yield (None, reason, where) if (reason := self._check(value)) else (value, None, where)

    def _text(self, f: InputFile, skip: int):
        if skip:
            yield None, None, ""
            return
        with _open_binary(f.path) as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield None, "invalid_utf8", f" (byte {exc.start})"
            return
        yield (None, reason, "") if (reason := self._check(text)) else (text, None, "")


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


_REASON_TEXT = {
    "malformed_json": "malformed JSON line skipped (use --strict to fail instead)",
    "missing_key": "record has no text field (set --text-key); skipped",
    "not_string": "text field is not a string; skipped",
    "empty": "empty document skipped",
    "invalid_utf8": "invalid UTF-8; skipped",
    "too_long": "document longer than --max-doc-chars; skipped (raise the limit to keep it)",
    "unreadable": "unreadable",
}
