"""`prep tokenize` across processes and nodes: `mpirun -n N` or `srun --mpi=pmix -n N` (docs/design.md §5).

The output is byte-identical to the single-process run's (data_prep.tokenize_stage), whatever N. The catch
is that step boundaries depend on the token counts of all earlier documents, so the work has two phases:

1. Tokenize. Rank 0 validates everything (the same `_prepare` as one process) and broadcasts the verdict;
   the records still to do, `[start, total)`, are counted (files shared out round-robin) and cut into N
   contiguous ranges. Each rank tokenizes its range with its own `--workers` processes into a *spill* in
   the output directory: `.spill-KEY-rR.tokens` (the token arrays back to back), `.docs.npy` (record index
   and length per document) and `.meta.json` (written last, atomically: the spill is complete). KEY
   hashes the settings and the range, so a rerun reuses exactly the complete spills that still apply.
2. Write. Every rank gets every document's (record, length) by allgather and computes the same global
   steps as one process would; the rank holding a step's first document writes it (train_NNNNN /
   valid_NNNNN, through the same `_Run` code), reading the spills of its neighbours for documents that
   cross into their range. Rank 0 gathers the shard records and counters, records the steps in
   `.prep_state.json` (the single-process format), writes the manifest, then removes the spills.

So the output directory must be on a filesystem shared by all ranks (checked before any work). The state
only ever records a prefix of steps with their `end_record`, as one process does, so a run resumes
with any N, or with one process, and an interrupted single-process run resumes under MPI.

Errors: a UserError before the work starts is raised on every rank (rank 0 prints it, the others exit
quietly with the same status); any error after that prints its message on its rank and aborts the whole
MPI job (`MPI_Abort`), as does mpirun when a rank is killed, so no rank waits forever for a dead peer.

Fault injection (data_prep.faults) on one rank only: set `UPCYCLE_FAULT_RANK=R` with UPCYCLE_FAULT (both
passed with `mpirun -x`); the other ranks ignore UPCYCLE_FAULT. The step fault points fire on the rank
that writes the step (`prep.before_rename`, `prep.after_rename`) and on rank 0 (`prep.after_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import traceback

import numpy as np

import data_prep.tokenize_stage as stage
from data_prep.errors import UserError
from data_prep.faults import FAULT_ENV, fault_point
from data_prep.fileio import fsync_dir, write_atomically
from data_prep.manifest import Manifest, read_manifest
from data_prep.sources import RecordReader, _open_binary, _parquet_rows
from data_prep.tokenize_stage import (
    MANIFEST_FILE,
    STATE_FILE,
    Chunk,
    TokenizeConfig,
    _echo,
    _finish,
    _prepare,
    _Run,
    _tokenize_records,
    split_is_valid,
)

# Set by mpirun (Open MPI), MPICH/Intel MPI (PMI), PMIx launchers and srun (one job step's tasks).
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")
FAULT_RANK_ENV = "UPCYCLE_FAULT_RANK"
SPILL_PREFIX = ".spill-"
PROGRESS_TAG = 17


def launched_world_size() -> int:
    """The number of processes the launcher started, from its environment (1 when not launched by one)."""
    for var in WORLD_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def mpi_world():
    """MPI's COMM_WORLD when launched with more than one rank, else None; mpi4py is imported (and MPI
    initialised) only then, so a plain run never touches MPI."""
    launched = launched_world_size()
    if launched <= 1:
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        # Every task would run the whole stage into the same directory.
        raise UserError(
            f"started as {launched} tasks, but MPI sees a world of 1: the launcher gave MPI no process "
            "manager (with SLURM use `srun --mpi=pmix`, see docs/multinode.md), or run one process"
        )
    return comm


def run_tokenize_mpi(cfg: TokenizeConfig, comm) -> Manifest:
    """`run_tokenize` on every rank of `comm`; returns the manifest on every rank."""
    rank = comm.Get_rank()
    if os.environ.get(FAULT_RANK_ENV, str(rank)) != str(rank):
        os.environ.pop(FAULT_ENV, None)  # the fault is meant for another rank
    try:
        return _run(cfg, comm)
    except UserError as exc:
        if getattr(exc, "agreed", False):
            raise  # every rank raises it: a normal exit with rank 0's message
        _abort(comm, f"upcycle prep tokenize (rank {rank}): error: {exc}", 2)
    except BaseException:
        traceback.print_exc()
        _abort(comm, f"upcycle prep tokenize (rank {rank}): failed; stopping every rank", 1)


def _abort(comm, message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    comm.Abort(code)


def _agreed_error(comm, message: str) -> UserError:
    """The UserError every rank raises for one verdict; only rank 0's is printed (data_prep.cli)."""
    exc = UserError(message)
    exc.agreed = True
    exc.quiet = comm.Get_rank() != 0
    return exc


def _on_root(comm, fn):
    """fn() on rank 0, its result on every rank; a UserError there is raised on every rank."""
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    error, result = comm.bcast((error, result), root=0)
    if error is not None:
        raise _agreed_error(comm, error)
    return result


# ---------------------------------------------------------------------------------------------- the run
def _run(cfg: TokenizeConfig, comm) -> Manifest:
    rank, size = comm.Get_rank(), comm.Get_size()
    prepared = _on_root(comm, lambda: _prepare_root(cfg))
    if isinstance(prepared, Manifest):
        return prepared
    files, tok, dtype, state, t0, encoder = prepared  # t0: rank 0's clock, used there only
    stage._WORKER_ENCODER_NAME = encoder  # rank 0's choice (_choose_encoder), inherited by forked workers
    _check_shared_dir(comm, cfg.out)
    if rank == 0 and not os.path.isfile(os.path.join(cfg.out, STATE_FILE)):
        # Shards may be written before the state records them: without a state a rerun would refuse them.
        write_atomically(os.path.join(cfg.out, STATE_FILE), json.dumps(state, indent=1))
    start = state["steps"][-1]["end_record"] if state["steps"] else 0
    lo, hi = record_ranges(_count_all(comm, files), start, size)[rank]
    key = _spill_key(state["settings"], start, lo, hi)
    keys = comm.allgather(key)
    if rank == 0:
        _remove_spills(cfg.out, keep=keys)  # of other settings or rank counts: they never apply again
    comm.Barrier()
    spill = _tokenize_range(comm, _Run(cfg, files, tok, dtype, _blank_state()), key, lo, hi)
    everyone = comm.allgather(spill)
    steps = plan_steps(everyone, cfg.shard_tokens, start, len(state["steps"]))
    mine = [(k, step) for k, step in enumerate(steps) if step["owner"] == rank]
    if rank == 0:
        _echo(f"{len(steps)} steps to write ({sum(s['tokens'] for s in everyone):,} tokens) by {size} ranks")
    written = _write_steps(cfg, files, tok, dtype, everyone, mine, len(state["steps"]))
    if written:
        _echo(f"rank {rank}: wrote {len(written)} steps ({_span(written, len(state['steps']))})")
    gathered = comm.gather(written, root=0)
    manifest = None
    if rank == 0:
        records = {k: shards for part in gathered for k, shards in part}
        manifest = _record_and_finish(cfg, files, tok, dtype, state, steps, records, everyone, t0)
    return comm.bcast(manifest, root=0)


def _span(written: list, recorded: int) -> str:
    first, last = recorded + written[0][0], recorded + written[-1][0]
    return f"step {first}" if first == last else f"steps {first}..{last}"


def _prepare_root(cfg: TokenizeConfig):
    """Rank 0: the single-process checks and state; the manifest when the directory is already complete."""
    if cfg.overwrite and os.path.isdir(cfg.out):
        _remove_spills(cfg.out)
    files, tok, dtype, state, t0 = _prepare(cfg)
    if state is None:
        _echo(f"{cfg.out}: already complete ({MANIFEST_FILE}); nothing to do")
        _remove_spills(cfg.out)  # a run killed between its manifest and this cleanup
        return read_manifest(cfg.out)
    if state["steps"]:
        _echo(
            f"resuming {cfg.out} at record {state['steps'][-1]['end_record']} ({len(state['steps'])} steps)"
        )
    return files, tok, dtype, state, t0, stage._WORKER_ENCODER_NAME


def _blank_state() -> dict:
    return {"settings": None, "steps": [], "counters": None, "seconds": 0.0, "complete": False}


def _check_shared_dir(comm, out: str) -> None:
    """Every rank must see the files rank 0 writes in --out (the spills are read across ranks)."""
    nonce = comm.bcast(os.urandom(8).hex() if comm.Get_rank() == 0 else None, root=0)
    probe = os.path.join(out, f"{SPILL_PREFIX}probe-{nonce}")
    if comm.Get_rank() == 0:
        write_atomically(probe, nonce)
    comm.Barrier()
    try:
        with open(probe, encoding="utf-8") as f:
            seen = f.read() == nonce
    except OSError:
        seen = False
    views = comm.allgather((seen, socket.gethostname()))
    comm.Barrier()
    if comm.Get_rank() == 0:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise _agreed_error(
            comm,
            f"--out {out}: {', '.join(blind)} cannot see the files rank 0 writes there; under MPI the "
            "output directory must be on a filesystem shared by every node (docs/multinode.md)",
        )


# ---------------------------------------------------------------------------------------------- ranges
def count_records(f) -> int:
    """The number of records RecordReader yields for one input file, without parsing them (a file whose
    reading fails part way counts the one 'unreadable' record the reader yields for it)."""
    if f.error:
        return 0
    if f.format == "text":
        return 1
    try:
        if f.format == "parquet":
            return _parquet_rows(f.path)
        n = 0
        with _open_binary(f.path) as fh:
            for line in fh:
                n += bool(line.strip())
        return n
    except (OSError, EOFError, ValueError):
        return n + 1 if f.format == "jsonl" else 1


def _count_all(comm, files) -> list[int]:
    """Record counts of all files, each counted by one rank (round-robin)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = {i: count_records(f) for i, f in enumerate(files) if i % size == rank}
    counts: dict[int, int] = {}
    for part in comm.allgather(mine):
        counts.update(part)
    return [counts[i] for i in range(len(files))]


def record_ranges(counts: list[int], start: int, size: int) -> list[tuple[int, int | None]]:
    """Contiguous record ranges [lo, hi) from `start`, one per rank; the last is open-ended, so records a
    count missed are still read (the counts only balance the work, correctness does not rest on them)."""
    todo = max(sum(counts) - start, 0)
    bounds = [start + todo * r // size for r in range(size + 1)]
    return [(bounds[r], bounds[r + 1] if r < size - 1 else None) for r in range(size)]


class _RangeReader:
    """A RecordReader limited to records [lo, hi); `bytes_done` counts from the range's first record."""

    def __init__(self, reader: RecordReader, lo: int, hi: int | None):
        self.reader, self.lo, self.hi = reader, lo, hi
        self.base: int | None = None

    @property
    def bytes_done(self) -> int:
        return 0 if self.base is None else self.reader.bytes_done - self.base

    def items(self, start: int):
        for item in self.reader.items(start, stop=self.hi):
            if isinstance(item, tuple) and item[0] < self.lo:
                continue  # the reader reports a read error of an earlier file at its own index
            if self.base is None:
                self.base = self.reader.bytes_done
            yield item

    def unpack_block(self, *args):
        return self.reader.unpack_block(*args)


# ---------------------------------------------------------------------------------------------- spills
def _spill_key(settings: dict, start: int, lo: int, hi: int | None) -> str:
    text = json.dumps({"settings": settings, "start": start, "lo": lo, "hi": hi}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _spill_paths(out: str, key: str, rank: int) -> dict:
    stem = os.path.join(out, f"{SPILL_PREFIX}{key}-r{rank}")
    return {"tokens": stem + ".tokens", "docs": stem + ".docs.npy", "meta": stem + ".meta.json"}


def _remove_spills(out: str, keep: list[str] = ()) -> None:
    """Remove the spill files in `out`, but those of the keys in `keep`."""
    for name in os.listdir(out):
        if name.startswith(SPILL_PREFIX) and not any(name.startswith(SPILL_PREFIX + k) for k in keep):
            os.remove(os.path.join(out, name))


class _SpillRun(_Run):
    """Consumes tokenized chunks into this rank's spill instead of shards."""

    def __init__(self, run: _Run, paths: dict):
        super().__init__(run.cfg, run.files, run.tok, run.dtype, _blank_state())
        self.paths = paths
        self.tokens_file = open(paths["tokens"], "wb")
        self.recs: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.end = -1  # the last record seen, + 1

    def consume(self, chunk: Chunk, tokens: np.ndarray, lengths: np.ndarray, failed: list[int]) -> None:
        doc_rec, doc_file, bad = self.documents(chunk, failed)
        self.tokens_file.write(memoryview(np.ascontiguousarray(tokens, self.dtype.newbyteorder("<"))))
        self.recs.append(doc_rec)
        self.lengths.append(np.asarray(lengths, np.int64))
        self.counters.add_docs(doc_file)
        self.counters.add_bad(bad)
        self.new_tokens += int(tokens.size)
        seen = [int(doc_rec[-1])] if doc_rec.size else []
        self.end = max([self.end, *seen, *(b[0] for b in bad)]) if (seen or bad) else self.end

    def seal(self, rank: int) -> dict:
        """fsync the tokens and documents, then write the meta file that marks the spill complete."""
        self.tokens_file.flush()
        os.fsync(self.tokens_file.fileno())
        self.tokens_file.close()
        docs = np.stack([_cat(self.recs), _cat(self.lengths)])
        with open(self.paths["docs"], "wb") as f:
            np.save(f, docs)
            f.flush()
            os.fsync(f.fileno())
        meta = {"rank": rank, "end": self.end + 1, "counters": self.counters.table.tolist()}
        meta["tokens"] = int(docs[1].sum())
        write_atomically(self.paths["meta"], json.dumps(meta))
        fsync_dir(os.path.dirname(self.paths["meta"]))
        return meta


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _load_spill(paths: dict, dtype: np.dtype) -> dict | None:
    """A complete spill's meta, or None when it is missing, unfinished or does not match its sizes."""
    try:
        with open(paths["meta"], encoding="utf-8") as f:
            meta = json.load(f)
        size = os.path.getsize(paths["tokens"])
    except (OSError, ValueError):
        return None
    return meta if size == meta["tokens"] * dtype.itemsize else None


def _tokenize_range(comm, run: _Run, key: str, lo: int, hi: int | None) -> dict:
    """This rank's spill of records [lo, hi): reused when complete, else tokenized now. Returns what the
    other ranks need of it: paths, records and lengths of its documents, counters, end record."""
    rank, out = comm.Get_rank(), run.cfg.out
    paths = _spill_paths(out, key, rank)
    meta = _load_spill(paths, run.dtype)
    bar = _Progress(comm, run.cfg, sum(f.size or 0 for f in run.files))
    if meta is not None:
        _echo(f"rank {rank}: records {lo}..{hi if hi is not None else 'end'} already tokenized; reused")
        bar.update(0)
    else:
        spill = _SpillRun(run, paths)
        reader = _RangeReader(
            RecordReader(run.files, run.cfg.text_key, run.cfg.max_doc_chars, spill.warn), lo, hi
        )
        bar.spill = spill
        _tokenize_records(spill, lo, reader=reader, bar=bar)
        meta = spill.seal(rank)
    bar.finish()
    docs = np.load(paths["docs"])
    return dict(meta, paths=paths, recs=docs[0], lengths=docs[1])


class _Progress:
    """A tqdm-like bar for `_tokenize_records`: the ranks send their bytes and tokens to rank 0 after
    every chunk, and rank 0 shows the sums over all ranks."""

    def __init__(self, comm, cfg: TokenizeConfig, total_bytes: int):
        self.comm, self.n, self.spill, self.done = comm, 0, None, 0
        self.sent: list = []
        self.latest = {r: (0, 0) for r in range(comm.Get_size())}
        self.bar = None
        if comm.Get_rank() == 0:
            from tqdm import tqdm

            disable = None if cfg.progress is None else not cfg.progress
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
                            disable=disable)  # fmt: skip

    def update(self, n: int) -> None:
        self.n += n
        report = (self.n, self.spill.new_tokens if self.spill else 0)
        if self.bar is None:
            self.sent.append(self.comm.isend((False, report), dest=0, tag=PROGRESS_TAG))
        else:
            self.latest[0] = report
            self._receive(block=False)

    def set_postfix(self, **_) -> None:
        pass  # rank 0 shows the tokens of all ranks (_show)

    def close(self) -> None:
        pass  # `finish` ends the phase: rank 0 waits for every rank's last report there

    def finish(self) -> None:
        if self.bar is None:
            self.sent.append(self.comm.isend((True, None), dest=0, tag=PROGRESS_TAG))
            for req in self.sent:
                req.wait()
            return
        while self.done < self.comm.Get_size() - 1:
            self._receive(block=True)
        self.bar.close()

    def _receive(self, block: bool) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while block or self.comm.iprobe(source=MPI.ANY_SOURCE, tag=PROGRESS_TAG, status=status):
            finished, report = self.comm.recv(source=MPI.ANY_SOURCE, tag=PROGRESS_TAG, status=status)
            if finished:
                self.done += 1
            else:
                self.latest[status.Get_source()] = report
            block = False
        done_bytes = sum(b for b, _ in self.latest.values())
        self.bar.update(done_bytes - self.bar.n)
        self.bar.set_postfix(tokens=f"{sum(t for _, t in self.latest.values()):,}", refresh=False)


# ---------------------------------------------------------------------------------------------- steps
def plan_steps(spills: list[dict], shard_tokens: int, start: int, recorded: int) -> list[dict]:
    """The steps one process would write from record `start` on: per step its documents [a, b) (global
    positions over the ranks' spills in rank order), end_record and the rank that writes it."""
    lengths = np.concatenate([s["lengths"] for s in spills])
    recs = np.concatenate([s["recs"] for s in spills])
    first_doc = np.cumsum([0] + [s["lengths"].size for s in spills])
    total = max([start] + [s["end"] for s in spills])
    cum = np.concatenate([[0], np.cumsum(lengths)])
    n, a, bounds = lengths.size, 0, []
    while a < n:
        b = int(np.searchsorted(cum, cum[a] + shard_tokens, side="left"))  # first doc reaching it
        if b > n:
            break
        bounds.append((a, b, int(recs[b - 1]) + 1))
        a = b
    if a < n or total > start or not recorded:  # the last, partial step, as run_tokenize closes it
        bounds.append((a, n, total))
    return [
        {"docs": (a, b), "end_record": end, "owner": _owner(first_doc, a) if a < b else 0}
        for a, b, end in bounds
    ]


def _owner(first_doc: np.ndarray, doc: int) -> int:
    """The rank whose spill holds global document `doc` (its step's writer: mostly local reads)."""
    return int(np.searchsorted(first_doc, doc, side="right")) - 1


class _StepWriter(_Run):
    """Writes given steps (not necessarily consecutive) through _Run's shard code; records no state."""

    def step_number(self) -> int:
        return self.step


def _write_steps(cfg, files, tok, dtype, spills: list[dict], mine: list, recorded: int) -> list:
    """Write this rank's steps from the spills; returns [(step index in the plan, shard records)]."""
    writer = _StepWriter(cfg, files, tok, dtype, _blank_state())
    first_doc = np.cumsum([0] + [s["lengths"].size for s in spills])
    tokens = {}
    token_starts = [np.concatenate([[0], np.cumsum(s["lengths"])]) for s in spills]
    written = []
    for k, step in mine:
        writer.step = recorded + k
        a, b = step["docs"]
        for r, spill in enumerate(spills):
            lo, hi = max(a, first_doc[r]) - first_doc[r], min(b, first_doc[r + 1]) - first_doc[r]
            if lo >= hi:
                continue
            if r not in tokens:
                tokens[r] = _map_tokens(spill["paths"]["tokens"], dtype)
            starts = token_starts[r][lo : hi + 1] - token_starts[r][lo]
            seg = tokens[r][token_starts[r][lo] : token_starts[r][hi]]
            is_valid = split_is_valid(cfg.seed, spill["recs"][lo:hi], cfg.valid_fraction)
            writer._write_docs(seg, starts, 0, hi - lo, is_valid)
        written.append((k, writer.publish_step(recorded + k)))
    return written


def _map_tokens(path: str, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r")


def _record_and_finish(cfg, files, tok, dtype, state, steps, records, spills, t0) -> Manifest:
    """Rank 0: append the steps to the state with the counters of all ranks, write the manifest."""
    run = _Run(cfg, files, tok, dtype, state)
    for spill in spills:
        run.counters.table += np.array(spill["counters"], dtype=np.int64)
    recorded = len(state["steps"])
    for k, step in enumerate(steps):
        state["steps"].append({"end_record": step["end_record"], "shards": records[k]})
    state["counters"] = run.counters.table.tolist()
    run.t_mark = t0
    run._save_state()
    for k in range(len(steps)):
        fault_point("prep.after_state", recorded + k)
    manifest = _finish(run)
    _remove_spills(cfg.out)
    return manifest
