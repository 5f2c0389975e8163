"""Exports in the Hub layout (`upcycle export`, the default): for every target class, the files hold exactly
the tensors transformers' own `save_pretrained` writes for that class and config (names, shapes and values,
key for key), and transformers 4.57.1 as well as 5.x load them with nothing missing, unexpected or
mismatched and compute our logits. The name maps themselves (ours <-> AutoEP <-> each class's Hub
layout) round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers4
from hf_models import LLAMA3_ROPE_TIED, perturb, rel, save_hf_model
from safetensors import safe_open

from pipeline import load_model
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.export import load_stock
from pipeline.state_dict_adapters import HUB_LAYOUTS, autoep_to_ours, hub_to_ours, ours_to_autoep, ours_to_hub

TOLERANCE = 1e-4  # relative L2 error of the fp32 logits
WINDOW = {"sliding_window": 16}  # shorter than the 48 tokens compared: the window changes the logits

CASES = {
    # id: (family, dense overrides, convert args, class)
    "mixtral": ("llama", {}, ["--routing", "topk-softmax"], "MixtralForCausalLM"),
    "mixtral-window-G2": (
        "mistral", WINDOW, ["--routing", "topk-softmax", "--granularity", "2"], "MixtralForCausalLM",
    ),
    "qwen2moe-softmax-topk-partial": ("llama", {}, ["--moe-layers", "0,2"], "Qwen2MoeForCausalLM"),
    "qwen2moe-biases-window-partial": (
        "qwen2", {**WINDOW, "use_sliding_window": True, "max_window_layers": 0},
        ["--routing", "topk-softmax", "--moe-layers", "1,2"], "Qwen2MoeForCausalLM",
    ),
    "qwen2moe-llama3-rope-tied": (
        "llama",
        LLAMA3_ROPE_TIED,
        [], "Qwen2MoeForCausalLM",
    ),
    "qwen2moe-shared-G4S2": (
        "llama", {}, ["--granularity", "4", "--shared-shards", "2"], "Qwen2MoeForCausalLM",
    ),
    "qwen2moe-shared-topk-softmax-window-partial": (
        "mistral", WINDOW, ["--routing", "topk-softmax", "--granularity", "2", "--shared-shards", "1",
                            "--moe-layers", "0,1"], "Qwen2MoeForCausalLM",
    ),
    "qwen3moe-partial": ("qwen3", {}, ["--moe-layers", "0,1"], "Qwen3MoeForCausalLM"),
    "qwen3moe-topk-softmax-window": (
        "qwen3", {**WINDOW, "use_sliding_window": True, "max_window_layers": 0},
        ["--routing", "topk-softmax"], "Qwen3MoeForCausalLM",
    ),
}  # fmt: skip


def exported(tmp_path, case: str, layout: str = "hub"):
    """(our model, export directory) of a perturbed E4 top-2 upcycling of the case's tiny dense model."""
    family, overrides, convert_args, _ = CASES[case]
    save_hf_model(family, tmp_path / "dense", **overrides)
    moe_dir, out = tmp_path / "moe", tmp_path / f"export_{layout}"
    args = ["--experts", "4", "--top-k", "2", *convert_args]
    assert main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(moe_dir), *args]) == 0
    perturb(moe_dir)
    shard = ["--max-shard-size", "0.0002"]  # several shards and an index
    assert main(["export", "--checkpoint", str(moe_dir), "--out", str(out), "--layout", layout, *shard]) == 0
    return load_model(moe_dir), out


def tensors(directory) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


IDS = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_the_files_are_what_transformers_saves_for_the_class(tmp_path, case, capsys):
    ours, out = exported(tmp_path, case)
    model = load_stock(out)  # raises on anything missing, unexpected or mismatched
    assert type(model).__name__ == CASES[case][3]
    model.save_pretrained(tmp_path / "resaved")
    theirs, written = tensors(tmp_path / "resaved"), tensors(out)
    assert sorted(written) == sorted(theirs)
    for name, tensor in theirs.items():
        assert written[name].shape == tensor.shape and torch.equal(written[name], tensor), name
    assert (out / "model.safetensors.index.json").is_file()
    assert not any(t.numel() == 0 for t in written.values())  # no zero-width tensor for an engine to refuse
    with torch.no_grad():
        assert rel(model(IDS).logits, ours(IDS)) < TOLERANCE


def test_qwen2moe_gets_a_real_width_shared_expert_that_adds_exactly_zero(tmp_path, capsys):
    ours, out = exported(tmp_path, "qwen2moe-softmax-topk-partial")
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["moe_intermediate_size"] > 0
    model = load_stock(out)
    hidden = torch.randn(2, 5, config["hidden_size"], generator=torch.Generator().manual_seed(0))
    for layer in (0, 2):
        mlp = model.model.layers[layer].mlp
        shared = torch.sigmoid(mlp.shared_expert_gate(hidden)) * mlp.shared_expert(hidden)
        assert torch.count_nonzero(shared) == 0


def test_a_window_on_some_qwen2moe_layers_is_refused_in_the_hub_layout_only(tmp_path, capsys):
    """transformers 4.x Qwen2MoE windows every layer or those from max_window_layers on, by attention
    implementation; transformers 5 reads `layer_types`."""
    save_hf_model("qwen2", tmp_path / "dense", **WINDOW, use_sliding_window=True, max_window_layers=1)
    convert = ["--experts", "4", "--top-k", "2", "--moe-layers", "1,2"]
    assert (
        main(["convert", "--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *convert]) == 0
    )
    capsys.readouterr()
    export = ["export", "--checkpoint", str(tmp_path / "moe")]
    assert main([*export, "--out", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert "used by layers [1, 2] only" in err and "--layout fused" in err
    assert not (tmp_path / "hub").exists()
    assert main([*export, "--out", str(tmp_path / "fused"), "--layout", "fused", "--verify"]) == 0
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]


def test_the_output_matrix_is_written_from_a_state_in_memory(tmp_path, capsys):
    """A training checkpoint's weights are a state dict in memory; at the export's dtype, `.to(dtype)` hands
    back the embedding itself, which the written-out output matrix must not share (safetensors refuses)."""
    from pipeline.export import DictReader, export, open_source

    ours, out = exported(tmp_path, "qwen2moe-llama3-rope-tied")
    source = open_source(tmp_path / "moe")
    source.reader = DictReader({name: source.reader.get(name) for name in source.reader.names()})
    arch, _ = export(source, tmp_path / "from_memory", torch.float32, 2**30)
    assert arch == "Qwen2MoeForCausalLM"
    assert torch.equal(tensors(tmp_path / "from_memory")["lm_head.weight"], tensors(out)["lm_head.weight"])


def test_fused_layout_is_transformers_5_in_memory_layout(tmp_path, capsys):
    ours, out = exported(tmp_path, "mixtral", layout="fused")
    written = tensors(out)
    assert written["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 256, 64)
    assert not any(".block_sparse_moe." in name for name in written)
    with torch.no_grad():
        assert rel(load_stock(out)(IDS).logits, ours(IDS)) < TOLERANCE


def drop_tensor(out, name: str) -> None:
    from safetensors.torch import save_file

    (index_file,) = out.glob("*.index.json")
    index = json.loads(index_file.read_text())
    shard = out / index["weight_map"].pop(name)
    kept = {n: t for n, t in tensors(out).items() if n != name and index["weight_map"].get(n) == shard.name}
    save_file(kept, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name,reported",
    [
        ("model.layers.1.post_attention_layernorm.weight", r"missing keys: \['model.layers.1.post_attention"),
        # transformers 5 fuses the experts it finds: three of four make a tensor of another shape
        ("model.layers.1.block_sparse_moe.experts.3.w2.weight", "cannot load the export.*ignore_mismatched"),
    ],
)
def test_a_tensor_missing_from_the_files_is_an_error_not_a_warning(tmp_path, name, reported, capsys):
    _, out = exported(tmp_path, "mixtral")
    drop_tensor(out, name)
    with pytest.raises(UserError, match=reported):
        load_stock(out)


def test_name_maps_round_trip():
    g = torch.Generator().manual_seed(0)
    N, H, I = 4, 8, 6  # noqa: E741 (the legend's I)
    state = {
        "model.embed_tokens.weight": torch.randn(16, H, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(N, H, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(N, 2 * I, H, generator=g),
        "model.layers.0.mlp.experts.down_proj": torch.randn(N, H, I, generator=g),
        "model.layers.0.mlp.shared_expert.down_proj.weight": torch.randn(H, 2 * I, generator=g),
        "model.layers.0.mlp.shared_expert_gate.weight": torch.randn(1, H, generator=g),
        "model.layers.1.mlp.gate_proj.weight": torch.randn(I, H, generator=g),  # a layer that stayed dense
    }
    autoep = ours_to_autoep(state)
    assert autoep["model.layers.0.mlp.router.gate.weight"] is state["model.layers.0.mlp.gate.weight"]
    shared = [
        "model.layers.0.mlp.shared_experts.down_proj.weight",
        "model.layers.0.mlp.shared_experts_gate.weight",
    ]
    assert all(name in autoep for name in shared)
    assert torch.equal(
        autoep["model.layers.0.mlp.experts.w3"], state["model.layers.0.mlp.experts.gate_up_proj"][:, I:]
    )
    back = autoep_to_ours(autoep, "test")
    assert sorted(back) == sorted(state) and all(torch.equal(back[n], state[n]) for n in state)
    for arch, layout in HUB_LAYOUTS.items():
        hub = dict(kv for name, tensor in state.items() for kv in ours_to_hub(name, tensor, arch))
        assert len(hub) == 5 + 3 * N  # embeddings, router, 2 shared, dense MLP; N experts x (gate, up, down)
        assert torch.equal(hub[f"model.layers.0.{layout.block}.experts.2.{layout.up}.weight"],
                           state["model.layers.0.mlp.experts.gate_up_proj"][2, I:])  # fmt: skip
        back = hub_to_ours(hub, arch, "test")
        assert sorted(back) == sorted(state) and all(torch.equal(back[n], state[n]) for n in state), arch
    incomplete = {n: t for n, t in hub.items() if ".experts.1." not in n}
    with pytest.raises(UserError, match="incomplete"):
        hub_to_ours(incomplete, arch, "test")


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_4_loads_the_export_and_computes_our_logits(tmp_path, case, capsys):
    ours, out = exported(tmp_path, case)
    loaded = transformers4.load_and_run(out, IDS, tmp_path / "t4")
    assert (loaded.version, loaded.cls) == (transformers4.VERSION, CASES[case][3])
    assert loaded.missing == loaded.unexpected == loaded.mismatched == []
    with torch.no_grad():
        error = rel(loaded.logits, ours(IDS))
    print(f"transformers {loaded.version} {case}: relative logit error {error:.2e}")
    assert error < TOLERANCE
