"""Benchmark: `prep tokenize` end to end versus bare `Tokenizer.encode_batch` (not a test).

Builds a corpus of at least --mb MB by repeating the stdlib corpus (each repeat is a distinct set of
documents), trains a 32k byte-level BPE on a sample of it, then for 1 and 2 workers/threads measures

  bare: Tokenizer.encode_batch over all texts, already in memory, with RAYON_NUM_THREADS = N
        (run in a fresh process so the thread count takes effect)
  prep: `upcycle prep tokenize --workers N` on the JSONL file, everything included (reading, JSON,
        hashing the inputs, tokenizing, writing and fsyncing shards, manifest)

and prints MB/s, tokens/s and prep's share of the bare throughput.

    python bench/prep_tokenize.py [--mb 50] [--vocab 32000] [--work /tmp/prep_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BARE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
t = time.perf_counter()
n = 0
for i in range(0, len(texts), 1024):
    n += sum(len(e.ids) for e in getattr(tok, sys.argv[3])(texts[i:i + 1024], add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": n}))
"""


def build_corpus(path: str, mb: float) -> int:
    from data_prep.corpus import stdlib_documents

    docs = list(stdlib_documents())
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        rep = 0
        while size < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": f"# copy {rep}\n" + d["text"]}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
            rep += 1
    return os.path.getsize(path)


def train_tokenizer(corpus: str, vocab: int, out: str) -> str:
    from data_prep.tokenizer import train_bpe

    def sample():
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 2500:  # about 30 MB of distinct text is plenty for 32k merges
                    return
                yield json.loads(line)["text"]

    return train_bpe(sample(), vocab, out, show_progress=False)


def bare(tok_file: str, corpus: str, threads: int, method: str) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run(
        [sys.executable, "-c", BARE, tok_file, corpus, method],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def prep(tok_file: str, corpus: str, workers: int, out: str) -> dict:
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.cli",
            "prep",
            "tokenize",
            "--input",
            corpus,
            "--tokenizer",
            tok_file,
            "--out",
            out,
            "--workers",
            str(workers),
            "--overwrite",
            "--no-progress",
            "--shard-tokens",
            "20000000",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    tokens = m["totals"]["tokens"] - m["totals"]["documents"]  # without EODs, as bare counts them
    # "run" is the stage's own clock (from reading the arguments to the manifest), "wall" adds the
    # interpreter start and imports
    return {"seconds": wall, "tokens": tokens}, {"seconds": m["timing"]["seconds"], "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", default="/tmp/prep_bench")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="interleave this many rounds and keep each run's fastest (for shared machines)",
    )
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    corpus = os.path.join(args.work, "corpus.jsonl")
    if not os.path.exists(corpus) or os.path.getsize(corpus) < args.mb * 1e6:
        build_corpus(corpus, args.mb)
    tok_dir = os.path.join(args.work, f"bpe{args.vocab}")
    tok_file = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(tok_file):
        t = time.perf_counter()
        train_tokenizer(corpus, args.vocab, tok_dir)
        print(f"trained {args.vocab} BPE in {time.perf_counter() - t:.0f} s")
    size = os.path.getsize(corpus)
    # text bytes only (what the bare tokenizer sees) for both, so the ratio compares like with like
    text_mb = sum(len(json.loads(line)["text"].encode()) for line in open(corpus, encoding="utf-8")) / 1e6
    print(f"corpus {size / 1e6:.1f} MB JSONL ({text_mb:.1f} MB of text), {os.cpu_count()} CPUs")
    print(f"{'run':<27}{'seconds':>9}{'MB/s':>8}{'MB/s/core':>11}{'Mtok/s':>8}{'vs bare':>9}{'vs fast':>9}")
    for n in args.workers:
        rounds = []
        for _ in range(args.repeat):
            rounds.append(
                (
                    bare(tok_file, corpus, n, "encode_batch"),
                    bare(tok_file, corpus, n, "encode_batch_fast"),
                    *prep(tok_file, corpus, n, os.path.join(args.work, f"out{n}")),
                )
            )
        b, f, p, p_run = (min((r[i] for r in rounds), key=lambda x: x["seconds"]) for i in range(4))
        for name, r in (
            (f"bare encode_batch x{n}", b),
            (f"bare encode_batch_fast x{n}", f),
            (f"prep tokenize x{n} (wall)", p),
            (f"prep tokenize x{n} (run)", p_run),
        ):
            mbs = text_mb / r["seconds"]
            print(
                f"{name:<27}{r['seconds']:>9.1f}{mbs:>8.2f}{mbs / n:>11.2f}"
                f"{r['tokens'] / r['seconds'] / 1e6:>8.2f}{b['seconds'] / r['seconds']:>9.0%}"
                f"{f['seconds'] / r['seconds']:>9.0%}"
            )


if __name__ == "__main__":
    main()
