"""`prep tokenize`: documents -> parallel tokenization -> Megatron `.bin/.idx` shards, resumable.

Flow: the main process reads records in input order and cuts them into chunks; worker processes
tokenize whole chunks with the chosen encoder (data_prep.encoders) and return one flat numpy array per
chunk; the main process consumes results in submission order, so the output never depends on the number
of workers. JSON Lines go to the workers unparsed: the main process only reads whole lines in blocks of
about 1 MB and counts the records (non-blank lines); each worker decodes, parses and checks its block's
lines (sources.parse_jsonl_block, the same rules as RecordReader) and returns the documents' tokens with
the skipped records, which the main process then warns about and counts in record order, as before.

Shards are written in *steps*: a step ends at the first document boundary where its tokens (train +
valid) reach `--shard-tokens`, and produces `train_NNNNN` and `valid_NNNNN` (a split with no document
in that step gets no file). Because both splits end at the same record, one record index says exactly
where a resumed run restarts. A step is published by: write `*.tmp`, fsync, rename, then record it in
`.prep_state.json` (temp file + os.replace). A rerun verifies the recorded shards (size, sha256) and
continues from the step's end record, so no document is lost or written twice. `manifest.json`
(data_prep.manifest) is written last, when every step is recorded.

Fault points (data_prep.faults, docs/design.md §7), once per step: `prep.before_rename` (the step's
`.bin.tmp`/`.idx.tmp` are written and fsynced, none renamed), `prep.after_rename` (the shards are in
place, the state does not record the step yet), `prep.after_state` (the state records the step).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from data_prep.encoders import SAMPLE_CHARS, make_encoder, select_encoder
from data_prep.errors import UserError
from data_prep.faults import fault_point
from data_prep.fileio import write_atomically
from data_prep.indexed import ShardFile, choose_dtype, sha256_file
from data_prep.manifest import (
    MANIFEST_FILE,
    SPLITS,
    Manifest,
    build_manifest,
    manifest_path,
    read_manifest,
    tokenizer_record,
    write_manifest,
)
from data_prep.sources import (
    SKIP_REASONS,
    InputFile,
    JsonlBlock,
    RecordReader,
    expand_inputs,
    fingerprint,
    parse_jsonl_block,
)
from data_prep.tokenizer import TokenizerInfo, load_tokenizer

STATE_FILE = ".prep_state.json"
CHUNK_CHARS = 1 << 20  # text per worker task: big enough to amortise IPC, small enough to stream
CHUNK_DOCS = 4096
WARN_LIMIT = 20  # printed warnings per reason per run; all are counted


@dataclass
class TokenizeConfig:
    """Arguments of `prep tokenize` (see data_prep/cli.py for their help)."""

    inputs: list[str]
    tokenizer: str
    out: str
    text_key: str = "text"
    workers: int = 1
    valid_fraction: float = 0.01
    seed: int = 1234
    shard_tokens: int = 50_000_000
    max_doc_chars: int = 10_000_000
    eod_token: str | None = None
    strict: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (bars on a terminal only)
    encoder: str = "auto"  # data_prep.encoders.CHOICES; not a resume setting (the shards never differ)


# ---------------------------------------------------------------------------------------------- workers
_WORKER_ENCODER_NAME = "hf"  # set in the main process by _choose_encoder; forked workers inherit it
_WORKER_ENCODER = None


def _choose_encoder(cfg: TokenizeConfig, files: list[InputFile], tok: TokenizerInfo) -> None:
    """Pick the workers' encoder (data_prep.encoders: compatibility, then a sample of the run's first
    documents encoded both ways) before anything is written; UserError for a bad --encoder."""
    global _WORKER_ENCODER_NAME, _WORKER_ENCODER
    texts, labels = _sample_documents(cfg, files) if cfg.encoder != "hf" else ([], [])
    # no thread pool in the main process: the workers fork from it (see _mp_context)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        chosen = select_encoder(tok.json_text, cfg.encoder, texts, labels)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    if chosen.note:
        _echo(chosen.note)
    _WORKER_ENCODER_NAME = chosen.name
    _WORKER_ENCODER = chosen.encoder  # loading a 32k tokenizer takes ~0.5 s; forked workers share this one


def _sample_documents(cfg: TokenizeConfig, files: list[InputFile]) -> tuple[list[str], list[str]]:
    """The first documents of the inputs, about SAMPLE_CHARS of text (the last one cut), and their
    names; cutting is harmless since both encoders see the same text."""
    reader = RecordReader(files, cfg.text_key, cfg.max_doc_chars, lambda reason, message: None)
    texts, labels, left = [], [], SAMPLE_CHARS
    for rec, fi, text, _ in reader.records(0):
        if text is None:
            continue
        texts.append(text[:left])
        labels.append(f"{files[fi].path} record {rec}")
        left -= len(texts[-1])
        if left <= 0:
            break
    return texts, labels


def _init_worker(tokenizer_json: str, encoder: str | None = None) -> None:
    """Load the encoder once per worker; one thread each, since the workers are the parallelism."""
    global _WORKER_ENCODER
    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    name = encoder or _WORKER_ENCODER_NAME
    inherited = _WORKER_ENCODER
    if inherited is None or inherited.name != name or inherited.source != tokenizer_json:  # e.g. spawned
        _WORKER_ENCODER = make_encoder(name, tokenizer_json)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the main process dies (e.g. is killed), so a killed run
    leaves no orphan workers holding its files and pipes."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass


def encode_chunk(encoder, texts: list[str], eod_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Tokenize texts; returns (all ids with EOD after each document, lengths incl. EOD, failed positions).

    `encoder` is a data_prep.encoders encoder. A text it rejects is dropped and its position returned,
    so one bad document cannot fail the whole chunk.
    """
    failed: list[int] = []
    try:
        ids, counts = encoder.encode_flat(texts)
    except Exception:  # rare: retry one by one to isolate the culprit
        parts, part_counts = [np.empty(0, np.uint32)], [np.empty(0, np.int64)]
        for i, t in enumerate(texts):
            try:
                x, c = encoder.encode_flat([t])
            except Exception:
                failed.append(i)
                continue
            parts.append(x)
            part_counts.append(c)
        ids, counts = np.concatenate(parts), np.concatenate(part_counts)
    lengths = counts + 1
    out = np.empty(len(ids) + len(counts), dtype=dtype)
    eod_at = np.cumsum(lengths) - 1
    out[eod_at] = eod_id
    is_token = np.ones(len(out), bool)
    is_token[eod_at] = False
    out[is_token] = ids
    return out, lengths, failed


def _encode_task(texts: list[str], eod_id: int, dtype: str):
    return encode_chunk(_WORKER_ENCODER, texts, eod_id, dtype)


def _parse_encode_task(data: bytes, lineno: int, key: str, max_doc_chars: int, eod_id: int, dtype: str):
    """A JsonlBlock's lines: parse and check them (sources.parse_jsonl_block), tokenize the documents.
    Returns encode_chunk's results and (document offsets, skipped records, number of records)."""
    texts, positions, bad, n = parse_jsonl_block(data, key, max_doc_chars, lineno)
    return (*encode_chunk(_WORKER_ENCODER, texts, eod_id, dtype), (positions, bad, n))


# ---------------------------------------------------------------------------------------------- pieces
@dataclass
class Chunk:
    """Records [rec_lo, rec_hi) as read: the good documents' texts and the skipped records; or, for
    JSON Lines, a JsonlBlock the worker parses (doc_rec, doc_file and bad are filled in from its
    results when they come back)."""

    rec_lo: int
    rec_hi: int = 0
    texts: list = field(default_factory=list)
    doc_rec: list = field(default_factory=list)
    doc_file: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # (record, file index, reason)
    chars: int = 0
    block: JsonlBlock | None = None
    warnings: list = field(default_factory=list)  # the reader's (reason, message), given when consumed


def split_is_valid(seed: int, records: np.ndarray, valid_fraction: float) -> np.ndarray:
    """Per record index, whether it belongs to the valid split: a seeded splitmix64 hash, so the
    split depends only on (seed, record index), never on workers or chunking."""
    with np.errstate(over="ignore"):
        z = records.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < valid_fraction


class Counters:
    """Per-input-file counts of documents and skipped records (by reason), in record order."""

    COLUMNS = ("documents",) + SKIP_REASONS

    def __init__(self, n_files: int, table: list | None = None):
        self.table = (
            np.array(table, dtype=np.int64)
            if table is not None
            else np.zeros((n_files, len(self.COLUMNS)), np.int64)
        )

    def add_docs(self, files: np.ndarray) -> None:
        np.add.at(self.table[:, 0], files, 1)

    def add_bad(self, events: list) -> None:
        for _, fi, reason in events:
            self.table[fi, 1 + SKIP_REASONS.index(reason)] += 1

    def totals(self) -> dict:
        sums = self.table.sum(axis=0)
        skipped = {r: int(sums[1 + i]) for i, r in enumerate(SKIP_REASONS)}
        return {"documents": int(sums[0]), "skipped": skipped}

    def per_file(self, i: int) -> dict:
        row = self.table[i]
        skipped = {r: int(row[1 + j]) for j, r in enumerate(SKIP_REASONS) if row[1 + j]}
        return {"documents": int(row[0]), "skipped": skipped}


# ---------------------------------------------------------------------------------------------- state
def _settings(cfg: TokenizeConfig, files: list[InputFile], tok: TokenizerInfo, dtype: np.dtype) -> dict:
    """Everything the output depends on; a resumed run must match it exactly."""
    return {
        "inputs": [f.record() for f in files],
        "tokenizer": tokenizer_record(tok),
        "dtype": dtype.name,
        "text_key": cfg.text_key,
        "valid_fraction": cfg.valid_fraction,
        "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens,
        "max_doc_chars": cfg.max_doc_chars,
    }


def _first_difference(old: dict, new: dict) -> str:
    for key in new:
        if old.get(key) != new[key]:
            return key
    return "?"


def _verify_steps(out: str, steps: list[dict]) -> None:
    """Check every recorded shard is on disk unchanged; UserError naming the first that is not."""
    for step in steps:
        for shard in step["shards"].values():
            path = os.path.join(out, shard["bin"])
            ok = (
                os.path.isfile(path)
                and os.path.getsize(path) == shard["bin_bytes"]
                and os.path.isfile(os.path.join(out, shard["idx"]))
                and sha256_file(path) == shard["sha256"]
            )
            if not ok:
                raise UserError(
                    f"{path}: shard recorded as complete is missing or changed; "
                    "rerun with --overwrite to start again"
                )


def _clean_out_dir(out: str) -> None:
    """Remove our own files (shards, temp files, state, manifest) from a previous run."""
    for name in os.listdir(out):
        if (
            name in (STATE_FILE, MANIFEST_FILE)
            or name.endswith(".tmp")
            or (name.startswith(SPLITS) and name.endswith((".bin", ".idx")))
        ):
            os.remove(os.path.join(out, name))


# ---------------------------------------------------------------------------------------------- the run
class _Run:
    """One invocation of the stage: holds the state, the open step and the counters."""

    def __init__(
        self, cfg: TokenizeConfig, files: list[InputFile], tok: TokenizerInfo, dtype: np.dtype, state: dict
    ):
        self.cfg, self.files, self.tok, self.dtype, self.state = cfg, files, tok, dtype, state
        self.counters = Counters(len(files), state.get("counters"))
        self.open: dict[str, ShardFile] = {}
        self.step_tokens = 0
        self.warned: dict[str, int] = {}
        self.t_mark = time.perf_counter()
        self.new_tokens = 0

    # -- messages
    def warn(self, reason: str, message: str) -> None:
        if self.cfg.strict and reason != "empty":
            raise UserError(message + " [--strict]")
        n = self.warned.get(reason, 0) + 1
        self.warned[reason] = n
        if n <= WARN_LIMIT:
            _echo(f"warning: {message}")
        elif n == WARN_LIMIT + 1:
            _echo(f"warning: further '{reason}' warnings are not shown (all are counted in the manifest)")

    # -- steps
    def step_number(self) -> int:
        """The number of the open step (its shards' NNNNN); data_prep.mpi_prep's writer overrides it."""
        return len(self.state["steps"])

    def _shard(self, split: str) -> ShardFile:
        if split not in self.open:
            prefix = os.path.join(self.cfg.out, f"{split}_{self.step_number():05d}")
            self.open[split] = ShardFile(prefix, self.dtype)
        return self.open[split]

    def close_step(self, end_record: int) -> None:
        """Publish the open shards and record the step (with counters up to end_record) in the state."""
        step = len(self.state["steps"])
        shards = self.publish_step(step)
        self.state["steps"].append({"end_record": end_record, "shards": shards})
        self.state["counters"] = self.counters.table.tolist()
        self._save_state()
        fault_point("prep.after_state", step)

    def publish_step(self, step: int) -> dict:
        """Seal and rename the open shards (fault points around the rename); returns their records."""
        open_shards = [(split, self.open[split]) for split in SPLITS if split in self.open]
        shards = {split: shard.seal() for split, shard in open_shards}
        fault_point("prep.before_rename", step)
        for _, shard in open_shards:
            shard.publish()
        fault_point("prep.after_rename", step)
        self.open = {}
        self.step_tokens = 0
        return shards

    def _save_state(self) -> None:
        now = time.perf_counter()
        self.state["seconds"] = self.state.get("seconds", 0.0) + (now - self.t_mark)
        self.t_mark = now
        write_atomically(os.path.join(self.cfg.out, STATE_FILE), json.dumps(self.state, indent=1))

    # -- consuming tokenized chunks
    def consume(self, chunk: Chunk, tokens: np.ndarray, lengths: np.ndarray, failed: list[int]) -> None:
        """Route a tokenized chunk's documents to the splits, closing steps at document boundaries."""
        doc_rec, doc_file, bad = self.documents(chunk, failed)
        is_valid = split_is_valid(self.cfg.seed, doc_rec, self.cfg.valid_fraction)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        lo = 0
        while lo < len(doc_rec):
            # the first document at which this step reaches shard_tokens
            need = self.cfg.shard_tokens - self.step_tokens
            hi = int(np.searchsorted(starts[lo + 1 :] - starts[lo], need)) + lo + 1
            hi = min(hi, len(doc_rec))
            self._write_docs(tokens, starts, lo, hi, is_valid)
            self.counters.add_docs(doc_file[lo:hi])
            self.new_tokens += int(starts[hi] - starts[lo])
            if self.step_tokens >= self.cfg.shard_tokens:
                end = int(doc_rec[hi - 1]) + 1
                self.counters.add_bad([b for b in bad if b[0] < end])
                bad = [b for b in bad if b[0] >= end]
                self.close_step(end)
            lo = hi
        self.counters.add_bad(bad)

    def documents(self, chunk: Chunk, failed: list[int]) -> tuple[np.ndarray, np.ndarray, list]:
        """The chunk's tokenized documents (record, file index) and its skipped records, sorted, with the
        texts the tokenizer rejected (`failed` positions) moved from the first to the second."""
        doc_rec = np.asarray(chunk.doc_rec, dtype=np.int64)
        doc_file = np.asarray(chunk.doc_file, dtype=np.int64)
        bad = list(chunk.bad)
        if failed:
            keep = np.ones(len(doc_rec), bool)
            keep[failed] = False
            for i in failed:
                self.warn(
                    "invalid_utf8",
                    f"{self.files[doc_file[i]].path}: record {doc_rec[i]}: "
                    "the tokenizer rejected the text; skipped",
                )
                bad.append((int(doc_rec[i]), int(doc_file[i]), "invalid_utf8"))
            doc_rec, doc_file = doc_rec[keep], doc_file[keep]
        bad.sort()
        return doc_rec, doc_file, bad

    def _write_docs(self, tokens, starts, lo: int, hi: int, is_valid: np.ndarray) -> None:
        seg_lengths = starts[lo + 1 : hi + 1] - starts[lo:hi]
        seg_tokens = tokens[starts[lo] : starts[hi]]
        seg_valid = is_valid[lo:hi]
        for split, mask in (("train", ~seg_valid), ("valid", seg_valid)):
            if not mask.any():
                continue
            shard = self._shard(split)
            if mask.all():
                shard.append(seg_tokens, seg_lengths)
            else:
                shard.append(seg_tokens[np.repeat(mask, seg_lengths)], seg_lengths[mask])
        self.step_tokens += int(starts[hi] - starts[lo])


def _echo(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _read_chunks(reader: RecordReader, start: int):
    """Group records from `start` into Chunks of about CHUNK_CHARS characters; a JsonlBlock (from
    RecordReader.items) is a Chunk of its own. The reader's warnings go with the chunk of the record they
    are about (or the next chunk), so they are given in record order when the chunk is consumed, also
    for the blocks whose warnings come from the workers; with --strict the first bad record stops the
    run whatever the reader has read ahead."""
    base = getattr(reader, "reader", reader)  # mpi_prep's _RangeReader wraps a RecordReader
    warn, pending = base.warn, []
    base.warn = lambda reason, message: pending.append((reason, message))
    try:
        yield from _chunks(reader, start, pending)
    finally:
        base.warn = warn


def _chunks(reader: RecordReader, start: int, pending: list):
    chunk = Chunk(rec_lo=start)
    rec = start
    for item in reader.items(start):
        if isinstance(item, JsonlBlock):
            if chunk.texts or chunk.bad:
                chunk.rec_hi = max(rec + 1, chunk.rec_lo)
                yield chunk
                chunk = Chunk(rec_lo=rec + 1)
            rec = item.rec_lo + item.n - 1
            chunk.block, chunk.rec_lo, chunk.rec_hi = item, item.rec_lo, rec + 1
            chunk.warnings, pending[:] = chunk.warnings + pending, []
            yield chunk
            chunk = Chunk(rec_lo=rec + 1)
            continue
        rec, fi, text, reason = item
        chunk.warnings, pending[:] = chunk.warnings + pending, []
        if text is None:
            chunk.bad.append((rec, fi, reason))
        else:
            chunk.texts.append(text)
            chunk.doc_rec.append(rec)
            chunk.doc_file.append(fi)
            chunk.chars += len(text)
        if chunk.chars >= CHUNK_CHARS or len(chunk.texts) + len(chunk.bad) >= CHUNK_DOCS:
            chunk.rec_hi = rec + 1
            yield chunk
            chunk = Chunk(rec_lo=rec + 1)
    chunk.rec_hi = max(rec + 1, chunk.rec_lo) if (chunk.texts or chunk.bad) else chunk.rec_lo
    chunk.warnings, pending[:] = chunk.warnings + pending, []
    yield chunk


def _load_or_start_state(cfg: TokenizeConfig, settings: dict) -> dict | None:
    """The state to continue from (verified), a fresh one, or None when the output is already complete."""
    state_path = os.path.join(cfg.out, STATE_FILE)
    if cfg.overwrite:
        _clean_out_dir(cfg.out)
    has_manifest = os.path.isfile(manifest_path(cfg.out))
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state["settings"] != settings:
            key = _first_difference(state["settings"], settings)
            raise UserError(
                f"{cfg.out} holds a run with different settings ('{key}' differs); rerun "
                "with the same inputs and flags to resume, or pass --overwrite to start again"
            )
        _verify_steps(cfg.out, state["steps"])
        if state.get("complete") and has_manifest:
            return None
        return state
    if has_manifest or any(n.startswith(SPLITS) for n in os.listdir(cfg.out)):
        raise UserError(
            f"--out {cfg.out}: holds shards but no {STATE_FILE}; pass --overwrite or use an empty directory"
        )
    return {"settings": settings, "steps": [], "counters": None, "seconds": 0.0, "complete": False}


def run_tokenize(cfg: TokenizeConfig) -> Manifest:
    """Run (or resume) the stage; returns the manifest, which is also written to OUT/manifest.json.

    Under `mpirun`/`srun` with more than one rank the ranks share the work (data_prep.mpi_prep)."""
    from data_prep.mpi_prep import mpi_world, run_tokenize_mpi

    comm = mpi_world()
    if comm is not None:
        return run_tokenize_mpi(cfg, comm)
    files, tok, dtype, state, t0 = _prepare(cfg)
    if state is None:
        _echo(f"{cfg.out}: already complete ({MANIFEST_FILE}); nothing to do")
        return read_manifest(cfg.out)
    run = _Run(cfg, files, tok, dtype, state)
    run.t_mark = t0
    start = state["steps"][-1]["end_record"] if state["steps"] else 0
    if start:
        _echo(f"resuming {cfg.out} at record {start} ({len(state['steps'])} steps already written)")
    total_records = _tokenize_records(run, start)
    if run.open or total_records > start or not state["steps"]:
        run.close_step(total_records)  # the last, partial step (also saves the final counters)
    return _finish(run)


def _prepare(cfg: TokenizeConfig) -> tuple:
    """Check the arguments, read the inputs' fingerprints and the tokenizer, load or start the state:
    (files, tokenizer, dtype, state or None when already complete, start time). Writes nothing but the
    output directory before every check has passed."""
    if not 0.0 <= cfg.valid_fraction <= 1.0:
        raise UserError(f"--valid-fraction {cfg.valid_fraction}: must be between 0 and 1")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.shard_tokens < 1:
        raise UserError(f"--shard-tokens {cfg.shard_tokens}: must be at least 1")
    files = expand_inputs(cfg.inputs)
    tok = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    dtype = choose_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    fingerprint(files)
    if all(f.error for f in files):
        raise UserError("no input file can be read: " + "; ".join(f"{f.path}: {f.error}" for f in files))
    _choose_encoder(cfg, files, tok)
    os.makedirs(cfg.out, exist_ok=True)
    state = _load_or_start_state(cfg, _settings(cfg, files, tok, dtype))
    if state is not None:
        for name in os.listdir(cfg.out):
            if name.endswith(".tmp"):  # leftovers of a killed run
                os.remove(os.path.join(cfg.out, name))
    return files, tok, dtype, state, t0


def _tokenize_records(run: _Run, start: int, reader=None, bar=None) -> int:
    """Feed chunks to the workers with a bounded queue and consume the results in order.

    data_prep.mpi_prep passes a reader of one rank's record range and a progress bar over all ranks."""
    from tqdm import tqdm

    cfg = run.cfg
    reader = reader or RecordReader(run.files, cfg.text_key, cfg.max_doc_chars, run.warn)
    total_bytes = sum(f.size or 0 for f in run.files)
    bar = bar or tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        file=sys.stderr,
        disable=None if cfg.progress is None else not cfg.progress,
    )
    pending: deque = deque()
    end = start
    dtype, eod = run.dtype.name, run.tok.eod_id
    with ProcessPoolExecutor(
        cfg.workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(run.tok.json_text,)
    ) as pool:

        def drain_one():
            chunk, fut = pending.popleft()
            tokens, lengths, failed, *parsed = fut.result()
            if chunk.block is not None:  # the records of the skipped lines and their warnings
                chunk.doc_rec, chunk.doc_file, chunk.bad, warnings = reader.unpack_block(
                    chunk.block, *parsed[0]
                )
                chunk.warnings += warnings
            for reason, message in chunk.warnings:  # in record order, as they were read
                run.warn(reason, message)
            run.consume(chunk, tokens, lengths, failed)
            bar.update(reader.bytes_done - bar.n)
            bar.set_postfix(tokens=f"{run.new_tokens:,}", refresh=False)

        for chunk in _read_chunks(reader, start):
            end = chunk.rec_hi
            if chunk.block is not None:
                b = chunk.block
                args = (b.data, b.lineno, cfg.text_key, cfg.max_doc_chars, eod, dtype)
                pending.append((chunk, pool.submit(_parse_encode_task, *args)))
            else:
                pending.append((chunk, pool.submit(_encode_task, chunk.texts, eod, dtype)))
            while len(pending) > 2 * cfg.workers:
                drain_one()
        while pending:
            drain_one()
    bar.close()
    return end


def _mp_context():
    import multiprocessing

    # fork is fastest to start; the parent has not used the tokenizer's thread pool, so it is safe.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _finish(run: _Run) -> Manifest:
    """Write the manifest, mark the state complete, print the stats table."""
    from data_prep.stats import format_stats

    state, files = run.state, run.files
    manifest = build_manifest(
        run.cfg.out,
        state["settings"],
        state["steps"],
        inputs=[dict(f.record(), **run.counters.per_file(i)) for i, f in enumerate(files)],
        counts=run.counters.totals(),
        input_bytes=sum(f.size or 0 for f in files),
        unreadable_files=sum(1 for f in files if f.error),
        seconds=state.get("seconds", 0.0),
        workers=run.cfg.workers,
    )
    write_manifest(run.cfg.out, manifest)
    state["complete"] = True
    run._save_state()
    print(format_stats(manifest))
    return manifest
