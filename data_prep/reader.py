"""The training reader: memory-mapped shards -> packed `seq_len + 1` windows, shuffled, per rank, resumable.

Packing: the documents of a split (each ending in EOD) form one token stream in shard order; window k
is tokens [k * seq_len, k * seq_len + seq_len + 1), so consecutive windows share one token and every
token is a target exactly once per epoch (Megatron's convention). Windows are shuffled with a
permutation seeded by (seed, dataset, epoch); global sample i is window perm_e[i mod N] of epoch
e = i // N, so any sample is computed directly from its index: resuming needs only the consumed count.

Blending: with weights, a fixed interleaving of datasets (dataset d takes its k-th sample at ideal
time (k + 0.5) / w_d, which keeps each within one sample of its share, like Megatron's blend) assigns
every global sample to a dataset and to that dataset's own running sample index, which wraps into
further epochs of that dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from data_prep.errors import UserError
from data_prep.indexed import MMapShard
from data_prep.manifest import read_manifest


class _SplitStream:
    """The token stream of one split of one prepared directory, across its shards."""

    def __init__(self, path: str, split: str, seq_len: int):
        self.manifest = read_manifest(path)
        self.shards = [MMapShard(prefix) for prefix in self.manifest.shard_prefixes(split)]
        sizes = np.array([s.tokens.size for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # start of each shard in the stream
        self.total = int(self.offsets[-1])
        self.windows = max(0, (self.total - 1) // seq_len)
        if self.windows == 0:
            raise UserError(
                f"{path}: the {split} split has {self.total} tokens, too few for one window of "
                f"seq_len {seq_len} + 1; prepare more data or lower seq_len"
            )

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from `start`, as int64, crossing shard boundaries if needed."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            shard = self.shards[s].tokens
            local = pos - int(self.offsets[s])
            take = min(length - filled, shard.size - local)
            out[filled : filled + take] = shard[local : local + take]
            filled += take
            pos += take
            s += 1
        return out


class PackedTokenDataset:
    """Packed, shuffled windows of `seq_len + 1` tokens from one or more prepared directories.

    `len()` is the number of windows in one epoch (with several datasets: the sum of theirs);
    `sample(i)` accepts any i >= 0 and wraps into new, differently shuffled epochs.
    """

    def __init__(
        self, paths: list[str], split: str, seq_len: int, seed: int, weights: list[float] | None = None
    ):
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise UserError("no data directory given")
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len}: must be at least 1")
        self.paths, self.split, self.seq_len, self.seed = list(paths), split, seq_len, seed
        self.streams = [_SplitStream(p, split, seq_len) for p in paths]
        first = self.streams[0].manifest
        for p, st in zip(paths[1:], self.streams[1:], strict=True):
            if st.manifest.tokenizer["sha256"] != first.tokenizer["sha256"]:
                raise UserError(
                    f"{p}: prepared with a different tokenizer than {paths[0]}; "
                    "blended datasets must share one tokenizer"
                )
        self.tokenizer = first.tokenizer  # the manifest's tokenizer record, shared by every dataset
        self.vocab_size = first.vocab_size
        self.eod_id = first.eod_id
        self.weights = self._normalise(weights, len(paths))
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._blend = self._build_blend() if len(paths) > 1 else None

    @staticmethod
    def _normalise(weights, n: int) -> np.ndarray:
        if weights is None:
            return np.full(n, 1.0 / n)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"weights {list(weights)}: need {n} non-negative numbers with a positive sum")
        return w / w.sum()

    def __len__(self) -> int:
        return int(sum(s.windows for s in self.streams))

    # -- shuffling
    def _window_of(self, d: int, k: int) -> int:
        """Window index in dataset d for its k-th sample (k may run past one epoch)."""
        n = self.streams[d].windows
        epoch, j = divmod(k, n)
        key = (d, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 2 * len(self.streams):
                self._perm_cache.clear()  # keep the current and next epoch's permutations only
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(n)
            self._perm_cache[key] = perm
        return int(perm[j])

    # -- blending
    def _build_blend(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For one blend period of len(self) samples: dataset of each, its index within that dataset,
        and how many samples each dataset gets per period."""
        # Dataset d ideally takes its k-th sample at time (k + 0.5) / w_d; merging those times in order
        # keeps every dataset within one sample of its share at every prefix (vectorised, O(n log n)).
        n = len(self)
        times, which, local = [], [], []
        for d, w in enumerate(self.weights):
            if w <= 0:
                continue
            k = np.arange(int(np.ceil(w * n)) + 1, dtype=np.int64)
            times.append((k + 0.5) / w)
            which.append(np.full(k.size, d, dtype=np.int32))
            local.append(k)
        order = np.argsort(np.concatenate(times), kind="stable")[:n]
        which_a, local_a = np.concatenate(which)[order], np.concatenate(local)[order]
        counts = np.bincount(which_a, minlength=len(self.streams)).astype(np.int64)
        return which_a, local_a, counts

    def dataset_of(self, i: int) -> tuple[int, int]:
        """(dataset index, that dataset's own sample index) of global sample i."""
        if self._blend is None:
            return 0, i
        which, local, counts = self._blend
        period, j = divmod(i, len(which))
        d = int(which[j])
        return d, int(period * counts[d] + local[j])

    def sample(self, i: int) -> np.ndarray:
        """Global sample i: int64 tokens [seq_len + 1]."""
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        d, k = self.dataset_of(i)
        w = self._window_of(d, k)
        return self.streams[d].tokens(w * self.seq_len, self.seq_len + 1)


class DistributedBatches:
    """Endless iterator of this rank's share of each global batch.

    Global batch b covers samples [consumed, consumed + global_batch); rank r takes the slice
    [consumed + r * per_rank, consumed + (r + 1) * per_rank). Store `consumed_samples` in the
    checkpoint; a new iterator built with it yields exactly the batches that would have followed.
    """

    def __init__(
        self,
        dataset: PackedTokenDataset,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} / dp_size {dp_size}: need 0 <= rank < size")
        if global_batch < dp_size or global_batch % dp_size:
            raise UserError(
                f"global batch {global_batch} is not a multiple of the data-parallel size {dp_size}"
            )
        self.dataset = dataset
        self.global_batch = global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.consumed_samples = int(consumed_samples)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        first = self.consumed_samples + self.dp_rank * self.per_rank
        rows = [self.dataset.sample(first + j) for j in range(self.per_rank)]
        self.consumed_samples += self.global_batch
        return torch.from_numpy(np.stack(rows))
