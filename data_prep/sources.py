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
        index = 0
        for fi, f in enumerate(self.files):
            base_bytes = self.bytes_done
            if f.error:
                self.warn("unreadable", f"{f.path}: cannot read ({f.error}); file skipped")
                continue
            reader = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}[f.format]
            try:
                for text, reason, where in reader(f, skip=max(0, start - index)):
                    if index >= start:
                        if reason:
                            self.warn(reason, f"{f.path}{where}: {_REASON_TEXT[reason]}")
                        yield index, fi, text, reason
                    index += 1
            except (OSError, EOFError, ValueError) as exc:
                # A truncated .gz or corrupt Parquet: report it, keep what was read, go on.
                self.warn(
                    "unreadable", f"{f.path}: read error after record {index} ({exc}); rest of file skipped"
                )
                yield index, fi, None, "unreadable"
                index += 1
            self.bytes_done = base_bytes + (f.size or 0)

    def _check(self, text) -> str | None:
        """Why a decoded value cannot be a document, or None if it can."""
        if not isinstance(text, str):
            return "not_string"
        if not text or text.isspace():
            return "empty"
        if len(text) > self.max_doc_chars:
            return "too_long"
        try:
            text.encode("utf-8")  # lone surrogates (from \\ud800 escapes) cannot be tokenized
        except UnicodeEncodeError:
            return "invalid_utf8"
        return None

    def _jsonl(self, f: InputFile, skip: int):
        key = self.text_key
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
                where = f":{lineno}"
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield None, "invalid_utf8", where
                    continue
                try:
                    obj = json.loads(s)
                except ValueError as exc:
                    yield None, "malformed_json", f"{where} ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(obj, dict):
                    yield None, "malformed_json", f"{where} (a JSON {type(obj).__name__}, not an object)"
                    continue
                if key not in obj:
                    yield None, "missing_key", f"{where} (keys: {', '.join(list(obj)[:8])})"
                    continue
                text = obj[key]
                yield (None, reason, where) if (reason := self._check(text)) else (text, None, where)

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
