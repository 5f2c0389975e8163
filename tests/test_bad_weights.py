"""Weight files as users find them broken: truncated, corrupt, an index out of step with its shards, shapes
that disagree with config.json. Each is a UserError naming the file and what is wrong, raised before any
work: `upcycle convert` writes nothing to --out."""

from __future__ import annotations

import json
import shutil

import pytest
from hf_models import save_hf_model

from pipeline.cli import main as upcycle
from pipeline.errors import UserError
from pipeline.hf_io import INDEX_FILE, CheckpointReader


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    save_hf_model("llama", path, max_shard_size="60KB")
    assert (path / INDEX_FILE).is_file()
    return path


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def convert_refuses(dense, out, capsys) -> str:
    assert (
        upcycle(["convert", "--dense", str(dense), "--out", str(out), "--experts", "4", "--top-k", "2"]) == 2
    )
    assert not out.exists()
    return capsys.readouterr().err


def test_truncated_file_names_the_file(dense_llama, tmp_path, capsys):
    dense = copy_of(dense_llama[0], tmp_path / "dense")
    weights = dense / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # a download cut at 100 kB
    err = convert_refuses(dense, tmp_path / "out", capsys)
    assert f"{weights}: not a readable safetensors file" in err and "truncated or corrupt" in err
    assert "Traceback" not in err


def test_corrupt_header_names_the_file(dense_llama, tmp_path):
    dense = copy_of(dense_llama[0], tmp_path / "dense")
    (dense / "model.safetensors").write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        CheckpointReader(dense)


def test_index_naming_a_missing_shard(sharded_llama, tmp_path, capsys):
    dense = copy_of(sharded_llama, tmp_path / "dense")
    shard = sorted(dense.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = convert_refuses(dense, tmp_path / "out", capsys)
    assert f"{shard}: listed in {dense / INDEX_FILE} but missing" in err


def test_index_out_of_step_with_its_shards(sharded_llama, tmp_path):
    dense = copy_of(sharded_llama, tmp_path / "dense")
    index = json.loads((dense / INDEX_FILE).read_text())
    first, last = sorted(set(index["weight_map"].values()))[0], sorted(set(index["weight_map"].values()))[-1]
    moved = next(name for name, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = last  # the index says `moved` is in the last shard; it is not
    (dense / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"places \['{moved}'\] in {last}, which holds no such tensor"):
        CheckpointReader(dense)


def test_invalid_index_json(sharded_llama, tmp_path):
    dense = copy_of(sharded_llama, tmp_path / "dense")
    (dense / INDEX_FILE).write_text('{"weight_map": ')
    with pytest.raises(UserError, match=r"not a valid safetensors index"):
        CheckpointReader(dense)


def test_shapes_that_disagree_with_config_stop_convert(dense_llama, tmp_path, capsys):
    dense = copy_of(dense_llama[0], tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the weights were saved with 2
    (dense / "config.json").write_text(json.dumps(config))
    err = convert_refuses(dense, tmp_path / "out", capsys)
    assert "k_proj.weight' has shape [32, 64], config.json implies [64, 64]" in err


def test_tensors_config_does_not_imply_stop_convert(dense_llama, tmp_path, capsys):
    dense = copy_of(dense_llama[0], tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    config["num_hidden_layers"] = 2  # the weights hold 3 layers
    (dense / "config.json").write_text(json.dumps(config))
    err = convert_refuses(dense, tmp_path / "out", capsys)
    assert "the checkpoint has tensors the model does not: ['model.layers.2." in err
