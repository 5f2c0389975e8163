"""Benchmark: `prep tokenize` end to end versus the bare encoders (not a test).

Builds a corpus of at least --mb MB by repeating the stdlib corpus (each repeat is a distinct set of
documents), trains a 32k byte-level BPE on a sample of it, then measures, each in a fresh process:

  bare (one thread, texts already in memory; docs/performance.md "Fast exact encoder"):
    tokenizers    Tokenizer.encode_batch_fast, RAYON_NUM_THREADS=1 (the reference)
    fastokens     Tokenizer.encode_batch_flat from the same tokenizer.json (data_prep.encoders)
    tiktoken      Encoding built from the tokenizer's byte-level vocab as mergeable ranks + GPT-2 pattern
    bpe-openai, rs-bpe   only their built-in OpenAI vocabularies load: timed with cl100k_base
    quicktok      has no pre-tokenizer and its own model format: cannot load a tokenizer.json (listed)
  prep: `upcycle prep tokenize --workers N --encoder auto|hf` on the JSONL file, everything included
        (reading, JSON, hashing the inputs, the sample check, tokenizing, writing shards, manifest)

and prints MB/s of text per core, with the range over --repeat rounds, "exact" (ids equal to
tokenizers' on the whole corpus) and prep's share of the bare encoder it runs.

    python bench/prep_tokenize.py [--mb 20] [--vocab 32000] [--work /tmp/prep_bench] [--repeat 3]
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

BARE = r"""
import hashlib, json, os, sys, time
tok_file, corpus, name = sys.argv[1:4]
texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
tj = open(tok_file, encoding="utf-8").read()
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def byte_decoder():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


as_lists = lambda out: out
if name == "tokenizers":
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tj)
    run = lambda batch: [e.ids for e in tok.encode_batch_fast(batch, add_special_tokens=False)]
elif name == "fastokens":
    import fastokens, numpy as np
    tok = fastokens.Tokenizer.from_json_str(tj)
    run = lambda batch: tok.encode_batch_flat(batch, add_special_tokens=False)  # what prep calls

    def as_lists(out):
        ids, offs = np.frombuffer(out[0], np.uint32), np.frombuffer(out[1], np.uint64)
        return [ids[offs[i]:offs[i + 1]].tolist() for i in range(len(offs) - 1)]
elif name == "tiktoken":
    import tiktoken
    u2b = byte_decoder()
    vocab = json.loads(tj)["model"]["vocab"]
    ranks = {bytes(u2b[c] for c in t): i for t, i in vocab.items()}
    enc = tiktoken.Encoding("ours", pat_str=GPT2, mergeable_ranks=ranks, special_tokens={})
    run = lambda batch: enc.encode_ordinary_batch(batch, num_threads=1)
elif name == "bpe-openai":
    import bpe_openai
    enc = bpe_openai.get_encoding("cl100k_base")
    run = lambda batch: [enc.encode_ordinary(t) for t in batch]
elif name == "rs-bpe":
    from rs_bpe.bpe import openai
    enc = openai.cl100k_base()
    run = lambda batch: [enc.encode(t) for t in batch]
seconds, h, n = 0.0, hashlib.sha256(), 0
for i in range(0, len(texts), 1024):
    t = time.perf_counter()
    out = run(texts[i:i + 1024])
    seconds += time.perf_counter() - t  # the encoder alone; hashing the ids for "exact" is not timed
    for ids in as_lists(out):
        n += len(ids)
        h.update(json.dumps(list(ids)).encode())
print(json.dumps({"seconds": seconds, "tokens": n, "ids_sha256": h.hexdigest()}))
"""
CANDIDATES = ("tokenizers", "fastokens", "tiktoken", "bpe-openai", "rs-bpe")
OWN_VOCAB = ("tokenizers", "fastokens", "tiktoken")  # load our tokenizer.json; the others use cl100k


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


def bare(tok_file: str, corpus: str, name: str) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", FASTOKENS_BPE_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", BARE, tok_file, corpus, name], env=env, capture_output=True, text=True
    )
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def prep(tok_file: str, corpus: str, workers: int, encoder: str, out: str) -> dict:
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
            "--encoder",
            encoder,
            "--overwrite",
            "--no-progress",
            "--shard-tokens",
            "20000000",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    # the stage's own clock (arguments to manifest; the interpreter start and imports excluded)
    return {"seconds": m["timing"]["seconds"], "tokens": m["totals"]["tokens"] - m["totals"]["documents"]}


def shards_equal(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith((".bin", ".idx")))
    if names != sorted(n for n in os.listdir(b) if n.endswith((".bin", ".idx"))):
        return False
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", default="/tmp/prep_bench")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; ranges are over these")
    ap.add_argument("--skip-hf-prep", action="store_true", help="skip the slow `--encoder hf` prep runs")
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
    text_mb = sum(len(json.loads(line)["text"].encode()) for line in open(corpus, encoding="utf-8")) / 1e6
    print(
        f"corpus {os.path.getsize(corpus) / 1e6:.1f} MB JSONL ({text_mb:.1f} MB of text), "
        f"{os.cpu_count()} CPUs"
    )
    runs = {f"bare {c}": (1, c) for c in CANDIDATES}
    encoders = ["auto"] if args.skip_hf_prep else ["auto", "hf"]
    runs.update({f"prep x{n} --encoder {e}": (n, e) for n in args.workers for e in encoders})
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(args.repeat):  # interleaved, so a burst of load from elsewhere hits every run alike
        for key, (n, what) in runs.items():
            if key.startswith("bare"):
                results[key].append(bare(tok_file, corpus, what))
            else:
                results[key].append(
                    prep(tok_file, corpus, n, what, os.path.join(args.work, f"out{n}_{what}"))
                )
    report(results, runs, text_mb)
    if not args.skip_hf_prep:
        same = shards_equal(os.path.join(args.work, "out1_auto"), os.path.join(args.work, "out1_hf"))
        print(f"shards of --encoder auto and --encoder hf byte-identical: {same}")


def report(results: dict, runs: dict, text_mb: float) -> None:
    ref = results["bare tokenizers"][0].get("ids_sha256")
    best = {k: max(text_mb / r["seconds"] for r in v) for k, v in results.items() if "error" not in v[0]}
    print(
        f"{'run':<28}{'MB/s/core (range)':>22}{'Mtok/s':>8}{'exact':>7}"
        f"{'vs bare tokenizers':>20}{'vs bare':>9}"
    )
    for key, rs in results.items():
        n, what = runs[key]
        if "error" in rs[0]:
            print(f"{key:<28}  cannot run: {rs[0]['error'][:80]}")
            continue
        per_core = sorted(text_mb / r["seconds"] / n for r in rs)
        span = f"{per_core[-1]:.2f} ({per_core[0]:.2f}-{per_core[-1]:.2f})"
        mtok = max(r["tokens"] / r["seconds"] for r in rs) / 1e6
        if key.startswith("bare"):
            exact = ("yes" if rs[0]["ids_sha256"] == ref else "NO") if what in OWN_VOCAB else "n/a"
            own = ""
        else:
            exact = ""
            base = "bare tokenizers" if what == "hf" else "bare fastokens"
            own = f"{best[key] / n / best[base]:.0%}"
        vs_hf = f"{best[key] / n / best['bare tokenizers']:.2f}x"
        print(f"{key:<28}{span:>22}{mtok:>8.2f}{exact:>7}{vs_hf:>20}{own:>9}")
    print("quicktok: cannot load a tokenizer.json (no pre-tokenizer, own model format); not timed")


if __name__ == "__main__":
    main()
