"""Megatron's memory-mapped indexed format (`.bin` + `.idx`), as specified in docs/design.md §5.

`.bin` holds the token arrays of all documents back to back. `.idx` (little-endian):

    magic  b"MMIDIDX\\x00\\x00"   9 bytes
    u64    version = 1
    u8     dtype code (4 = int32, 8 = uint16)
    u64    S, number of sequences (one sequence per document here)
    u64    D, number of document-index entries (= S + 1)
    int32[S]  sequence lengths in tokens
    int64[S]  byte offset of each sequence in `.bin`
    int64[D]  document indices: 0, then the cumulative number of sequences after each document

These files are read unchanged by Megatron-LM's and NeMo's `IndexedDataset`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from data_prep.fileio import fsync_dir

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {4: np.dtype(np.int32), 8: np.dtype(np.uint16)}
CODE_OF_DTYPE = {np.dtype(np.int32): 4, np.dtype(np.uint16): 8}
UINT16_MAX_VOCAB = 65536  # ids 0..65535 fit in uint16


def choose_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits in it, else int32 (the only two codes we write)."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= UINT16_MAX_VOCAB else np.dtype(np.int32)


def encode_index(lengths: np.ndarray, dtype: np.dtype) -> bytes:
    """The `.idx` bytes for documents of the given token lengths (one sequence per document)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence lengths must fit in int32")
    n = lengths.size
    pointers = np.zeros(n, dtype="<i8")
    if n > 1:
        np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype="<i8")
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)])
    header += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return header + lengths.astype("<i4").tobytes() + pointers.tobytes() + doc_idx.tobytes()


@dataclass
class IndexInfo:
    """A parsed `.idx` file."""

    dtype: np.dtype
    lengths: np.ndarray  # int32 [S]
    pointers: np.ndarray  # int64 [S], bytes
    doc_idx: np.ndarray  # int64 [D]


def read_index(path: str) -> IndexInfo:
    """Parse an `.idx` file; raises ValueError naming the file when it is not a valid index."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:9] != MAGIC:
        raise ValueError(f"{path}: not a Megatron .idx file (bad magic)")
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    s, d = struct.unpack_from("<QQ", data, 18)
    if version != VERSION or code not in DTYPE_CODES:
        raise ValueError(f"{path}: unsupported .idx version {version} or dtype code {code}")
    off = 34
    expected = off + 4 * s + 8 * s + 8 * d
    if len(data) != expected:
        raise ValueError(f"{path}: truncated or oversized .idx ({len(data)} bytes, expected {expected})")
    lengths = np.frombuffer(data, "<i4", s, off)
    pointers = np.frombuffer(data, "<i8", s, off + 4 * s)
    doc_idx = np.frombuffer(data, "<i8", d, off + 12 * s)
    return IndexInfo(DTYPE_CODES[code], lengths, pointers, doc_idx)


class ShardFile:
    """One `.bin`/`.idx` pair being written: append documents, `seal()`, then `publish()`.

    Data goes to `<prefix>.bin.tmp` / `<prefix>.idx.tmp`; `seal()` fsyncs both, `publish()` renames them
    to their final names, so a crash never leaves a half-written shard under its final name. The two
    are separate so that the caller can act (record, inject a fault) between them.
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation (already in the shard dtype)."""
        if not lengths.size:
            return
        buf = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        self._bin.write(memoryview(buf).cast("B"))
        self._sha.update(memoryview(buf).cast("B"))
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.documents += int(lengths.size)
        self.tokens += int(buf.size)

    def seal(self) -> dict:
        """fsync the `.bin.tmp`, write and fsync the `.idx.tmp`; returns the shard's manifest record."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx = encode_index(lengths, self.dtype)
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(idx)
            f.flush()
            os.fsync(f.fileno())
        name = os.path.basename(self.prefix)
        return {
            "prefix": name,
            "bin": name + ".bin",
            "idx": name + ".idx",
            "documents": self.documents,
            "tokens": self.tokens,
            "bin_bytes": self.tokens * self.dtype.itemsize,
            "sha256": self._sha.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
        }

    def publish(self) -> None:
        """Rename the sealed temporary files to `<prefix>.bin` / `<prefix>.idx` and fsync the directory."""
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        fsync_dir(os.path.dirname(self.prefix) or ".")

    def abort(self) -> None:
        """Close and remove the temporary files."""
        self._bin.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + ext):
                os.remove(self.prefix + ext)


def sha256_file(path: str, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class MMapShard:
    """A read-only, memory-mapped view of one shard: `tokens` is the whole `.bin` as a flat array."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = read_index(prefix + ".idx")
        size = os.path.getsize(prefix + ".bin")
        if size == 0:
            self.tokens = np.zeros(0, self.index.dtype)
        else:
            self.tokens = np.memmap(prefix + ".bin", dtype=self.index.dtype.newbyteorder("<"), mode="r")
        if int(self.index.lengths.sum()) != self.tokens.size:
            raise ValueError(
                f"{prefix}.bin holds {self.tokens.size} tokens but its .idx says "
                f"{int(self.index.lengths.sum())}"
            )

    def __len__(self) -> int:
        return int(self.index.lengths.size)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i."""
        start = int(self.index.pointers[i]) // self.index.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.index.lengths[i])])
