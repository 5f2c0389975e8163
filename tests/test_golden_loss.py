"""Golden losses of launch/configs/tiny_cpu.yaml (like torchtitan's tests/assets/losses).

The first STEPS training losses of a fixed run are checked in (tests/assets/losses/tiny_cpu.json) and every
CI run must reproduce them within a tolerance, so that a change which alters the math (loss, routing, aux
loss, optimizer, schedule, data order, upcycling) is seen even where no other test looks.

The run depends on nothing of the machine's environment: the corpus is seeded synthetic text (not the
Python stdlib that `upcycle prep corpus` embeds, which changes with the Python patch version), the
tokenizer is a fixed word-level vocabulary (no BPE training), and `upcycle init` / `upcycle convert` get
explicit seeds. The training itself is the shipped config launched by the deepspeed launcher on 2 CPU ranks.

If the change was intended, regenerate the file and commit it with the change:

    python tests/test_golden_loss.py --update
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))  # `launching`, also as a script
from launching import launch, losses  # noqa: E402

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parent / "assets" / "losses" / "tiny_cpu.json"
REGENERATE = "python tests/test_golden_loss.py --update"
CONFIG = "tiny_cpu.yaml"
STEPS = 5
KEYS = ("loss", "lm_loss", "aux_loss")
# Evaluation and checkpoints are not what is checked: once at the end (the loop always does), on 1 batch.
OVERRIDES = (
    "--train.steps", str(STEPS),
    "--output.eval_interval", "0",
    "--output.checkpoint_interval", "0",
    "--data.eval_batches", "1",
)  # fmt: skip

# The synthetic workspace. Changing any of these changes the golden values: regenerate.
VOCAB = 256
DOCS = 400
DATA_SEED = 7
INIT_SEED = 0
CONVERT_SEED = 0
# |got - expected| <= atol + rtol * |expected| for each of KEYS at each step; `--update` keeps the file's.
TOLERANCE = {
    "rtol": 1e-5,
    "atol": 1e-6,
    "why": "measured: 3 runs and --moe.fast_path false give identical bits; other summation orders "
    "(--parallel.ep_size 1, --parallel.zero_stage 3) differ by <= 1.2e-7 (2e-8 relative). A math change: "
    "--moe.aux_loss_coef 0.02 moves loss by 1.0e-2 at every step, --train.lr 2e-3 by 1.1e-2 from step 2. "
    "rtol 1e-5 (5.5e-5 on a loss of 5.5) is ~450x the noise, room for other CPUs' kernels and library "
    "versions, and ~200x below those changes.",
}
MODEL = ("--hidden-size", "64", "--intermediate-size", "128", "--layers", "2",
         "--heads", "4", "--kv-heads", "2")  # fmt: skip
EXPERTS = ("--experts", "8", "--top-k", "2")


def synthetic_documents(n: int, seed: int) -> list[str]:
    """n documents over the word-level vocabulary 'w2'..'w{VOCAB-1}', from a seeded Markov chain (each word
    has a few likely successors), so that there is something to learn in the first steps."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2, VOCAB)]
    successors = {w: rng.sample(words, 4) for w in words}
    docs = []
    for _ in range(n):
        word = rng.choice(words)
        body = [word]
        for _ in range(rng.randint(20, 200)):
            word = rng.choice(successors[word]) if rng.random() < 0.8 else rng.choice(words)
            body.append(word)
        docs.append(" ".join(body))
    return docs


def build_workspace(root: Path) -> Path:
    """`data` (token shards), `tok/tokenizer.json`, `dense` and its E8 top-2 upcycled `moe`."""
    from corpora import word_level_tokenizer, write_jsonl

    from pipeline.cli import main as upcycle

    corpus = write_jsonl(str(root / "corpus.jsonl"), synthetic_documents(DOCS, DATA_SEED))
    (root / "tok").mkdir()
    tok = word_level_tokenizer(str(root / "tok" / "tokenizer.json"), VOCAB)
    steps = [
        ["prep", "tokenize", "--input", corpus, "--tokenizer", tok, "--out", str(root / "data"),
         "--valid-fraction", "0.05", "--seed", "1234", "--no-progress"],
        ["init", "--out", str(root / "dense"), "--tokenizer", tok, *MODEL, "--seed", str(INIT_SEED)],
        ["convert", "--dense", str(root / "dense"), "--out", str(root / "moe"), *EXPERTS,
         "--seed", str(CONVERT_SEED)],
    ]  # fmt: skip
    for argv in steps:
        assert upcycle(argv) == 0, argv
    return root


def run_losses(workspace: Path, out: str, *extra: str) -> dict[int, dict[str, float]]:
    """step -> {loss, lm_loss, aux_loss} of a tiny_cpu.yaml run of STEPS steps on the workspace."""
    launch(workspace, out, *OVERRIDES, *extra)
    assert sorted(losses(workspace, out)) == list(range(1, STEPS + 1))
    rows = [json.loads(line) for line in (workspace / out / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: {k: row[k] for k in KEYS} for row in rows}


def mismatches(golden: dict, got: dict[int, dict[str, float]]) -> list[str]:
    """One line per step (expected vs got, all keys) for each step where a key is outside the tolerance."""
    rtol, atol = golden["tolerance"]["rtol"], golden["tolerance"]["atol"]
    lines = []
    for row in golden["steps"]:
        step = row["step"]
        have = got.get(step)
        if have is None:
            lines.append(f"step {step}: missing from the run")
            continue
        bad = [k for k in KEYS if not math.isclose(have[k], row[k], rel_tol=rtol, abs_tol=atol)]
        if bad:
            parts = [
                f"{k} expected {row[k]:.7f} got {have[k]:.7f} (diff {have[k] - row[k]:+.2e})" for k in KEYS
            ]
            lines.append(f"step {step}: " + "; ".join(parts) + f"  <- {', '.join(bad)}")
    return lines


@pytest.fixture(scope="module")
def golden_workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("golden"))


def read_golden() -> dict:
    golden = json.loads(GOLDEN.read_text())
    assert golden["steps_run"] == STEPS and [r["step"] for r in golden["steps"]] == list(range(1, STEPS + 1))
    return golden


def failure_message(golden: dict, bad: list[str]) -> str:
    tol = golden["tolerance"]
    return (
        f"the first {STEPS} losses of {CONFIG} left the golden file {GOLDEN.relative_to(GOLDEN.parents[3])} "
        f"(rtol {tol['rtol']:g}, atol {tol['atol']:g}):\n"
        + "\n".join(bad)
        + f"\nIf the change of the math was intended, regenerate the file with `{REGENERATE}` and commit it."
    )


def test_tiny_cpu_losses_match_the_golden_file(golden_workspace):
    golden = read_golden()
    bad = mismatches(golden, run_losses(golden_workspace, "golden"))
    assert not bad, failure_message(golden, bad)


def test_the_tolerance_sees_a_small_math_change(golden_workspace):
    """The tolerance is far above float noise but far below a real change: doubling the aux-loss weight
    (0.01 -> 0.02) moves every step's loss by ~1e-2, and must leave the tolerance at every step."""
    golden = read_golden()
    mutated = run_losses(golden_workspace, "aux_x2", "--moe.aux_loss_coef", "0.02")
    assert len(mismatches(golden, mutated)) == STEPS, mutated


def update() -> None:
    import deepspeed
    import torch

    previous = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        got = run_losses(build_workspace(Path(tmp)), "golden")
    golden = {
        "config": f"launch/configs/{CONFIG}",
        "steps_run": STEPS,
        "overrides": list(OVERRIDES),
        "generated_by": REGENERATE,
        "workspace": (
            f"tests/test_golden_loss.py build_workspace: {DOCS} synthetic documents (Markov chain, seed "
            f"{DATA_SEED}) over a {VOCAB}-word WordLevel tokenizer; upcycle init {' '.join(MODEL)} --seed "
            f"{INIT_SEED}; upcycle convert {' '.join(EXPERTS)} --seed {CONVERT_SEED}; deepspeed launcher, "
            "2 CPU ranks (gloo), OMP_NUM_THREADS=1"
        ),
        "versions (information only)": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
        },
        "tolerance": previous.get("tolerance", TOLERANCE),
        "steps": [{"step": step, **{k: got[step][k] for k in KEYS}} for step in sorted(got)],
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {GOLDEN}")
    for row in golden["steps"]:
        print(row)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {REGENERATE}  (rewrites {GOLDEN.name} from a fresh run; keeps its tolerance)")
    update()
