"""The training reader: packing, per-epoch shuffle, rank slices, exact resume, blending."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from corpora import make_documents, tiny_tokenizer, write_jsonl

from data_prep.errors import UserError
from data_prep.indexed import MMapShard
from data_prep.reader import DistributedBatches, PackedTokenDataset
from data_prep.tokenize_stage import TokenizeConfig, run_tokenize

SEQ = 16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    tok = tiny_tokenizer(str(root / "tok"))
    out = []
    for name, seed, n in (("a", 5, 120), ("b", 6, 60)):
        write_jsonl(str(root / f"{name}.jsonl"), make_documents(n, seed=seed, max_words=60))
        run_tokenize(
            TokenizeConfig(
                inputs=[str(root / f"{name}.jsonl")],
                tokenizer=tok,
                out=str(root / name),
                shard_tokens=700,
                valid_fraction=0.2,
                progress=False,
            )
        )
        out.append(str(root / name))
    return out


def stream(path: str, split: str) -> np.ndarray:
    """All tokens of a split in shard order, read without the reader under test."""
    names = sorted(n[:-4] for n in os.listdir(path) if n.startswith(split) and n.endswith(".bin"))
    return np.concatenate([np.asarray(MMapShard(os.path.join(path, n)).tokens, np.int64) for n in names])


def test_windows_cover_the_stream_once_per_epoch_and_reshuffle(dirs):
    ds = PackedTokenDataset([dirs[0]], "train", SEQ, seed=1)
    tokens = stream(dirs[0], "train")
    n = len(ds)
    assert n == (tokens.size - 1) // SEQ and ds.eod_id == 0 and ds.vocab_size == 400
    starts = []
    for i in range(n):
        s = ds.sample(i)
        assert s.dtype == np.int64 and s.shape == (SEQ + 1,)
        w = next(k for k in range(n) if np.array_equal(tokens[k * SEQ : k * SEQ + SEQ + 1], s))
        starts.append(w)
    assert sorted(starts) == list(range(n))  # every window exactly once, across shard boundaries
    assert starts != list(range(n))  # shuffled
    epoch2 = [ds.sample(n + i) for i in range(n)]
    assert any(not np.array_equal(ds.sample(i), epoch2[i]) for i in range(n))  # a new order
    again = PackedTokenDataset([dirs[0]], "train", SEQ, seed=1)
    assert all(np.array_equal(again.sample(i), ds.sample(i)) for i in (0, 5, n + 3))
    other = PackedTokenDataset([dirs[0]], "train", SEQ, seed=2)
    assert any(not np.array_equal(other.sample(i), ds.sample(i)) for i in range(10))


def test_ranks_get_disjoint_slices_of_the_global_batch(dirs):
    ds = PackedTokenDataset([dirs[0]], "train", SEQ, seed=3)
    whole = DistributedBatches(ds, global_batch=8, dp_rank=0, dp_size=1)
    ranks = [DistributedBatches(ds, global_batch=8, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(3):
        full = next(whole)
        parts = [next(it) for it in ranks]
        assert all(p.shape == (2, SEQ + 1) and p.dtype == torch.int64 for p in parts)
        assert torch.equal(torch.cat(parts), full)
    assert whole.consumed_samples == 24 == ranks[2].consumed_samples


def test_resume_from_consumed_samples_is_exact(dirs):
    ds = PackedTokenDataset([dirs[0]], "train", SEQ, seed=4)
    it = DistributedBatches(ds, global_batch=6, dp_rank=1, dp_size=2)
    for _ in range(len(ds) // 6 + 2):  # run past an epoch boundary
        next(it)
    saved = it.consumed_samples
    expected = [next(it) for _ in range(4)]
    resumed = DistributedBatches(
        PackedTokenDataset([dirs[0]], "train", SEQ, seed=4), 6, 1, 2, consumed_samples=saved
    )
    assert all(torch.equal(next(resumed), e) for e in expected)


def test_blending_follows_the_weights(dirs):
    ds = PackedTokenDataset(dirs, "train", SEQ, seed=5, weights=[3, 1])
    assert len(ds) == sum(len(PackedTokenDataset([d], "train", SEQ, seed=5)) for d in dirs)
    streams = [stream(d, "train") for d in dirs]
    n = 2 * len(ds) + 7  # past the blend period too
    counts = [0, 0]
    for i in range(n):
        d, _ = ds.dataset_of(i)
        counts[d] += 1
        if i % 7 == 0:  # the sample really comes from that dataset's stream
            s = ds.sample(i)
            t = streams[d]
            assert any(np.array_equal(t[k : k + SEQ + 1], s) for k in range(0, t.size - SEQ, SEQ))
        assert abs(counts[0] - 0.75 * (i + 1)) <= 1.0
    assert abs(counts[0] / n - 0.75) < 0.01


def test_valid_split_and_errors(dirs, tmp_path):
    valid = PackedTokenDataset(dirs, "valid", SEQ, seed=0)
    assert len(valid) > 0 and valid.sample(0).shape == (SEQ + 1,)
    with pytest.raises(UserError, match=r"not a prepared data directory.*upcycle prep tokenize"):
        PackedTokenDataset([str(tmp_path)], "train", SEQ, seed=0)
    with pytest.raises(UserError, match="not a multiple"):
        DistributedBatches(valid, global_batch=5, dp_rank=0, dp_size=2)
    with pytest.raises(UserError, match="too few"):
        PackedTokenDataset([dirs[0]], "valid", 10**7, seed=0)
