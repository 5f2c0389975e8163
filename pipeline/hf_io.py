"""Reading and writing Hugging Face style checkpoint directories (config.json + safetensors).

Weights are only ever read through safetensors (memory-mapped, tensor by tensor), so loading never
executes code from a checkpoint directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.config import ModelConfig, read_hf_config
from pipeline.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
# The one dtype map: config.json spellings and our flag spellings (`--dtype`, DTYPE_CHOICES).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # `--dtype` of convert and export; auto: the model's own


class CheckpointReader:
    """Name -> tensor access over `model.safetensors` or sharded files with an index, one tensor at a time."""

    def __init__(self, model_dir: str | Path):
        """Read the index (if any) and every file's header: a missing, truncated or corrupt file, or an
        index that names a tensor its file does not hold, is a UserError here, before any work."""
        self.dir = Path(model_dir)
        index_path, single_path = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index_path.is_file():
            self.file_of = {name: self.dir / fname for name, fname in _weight_map(index_path).items()}
        elif single_path.is_file():
            self.file_of = {name: single_path for name in _tensor_names(single_path)}
        else:
            raise UserError(
                f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are "
                "read (convert .bin/.pt weights to safetensors first)"
            )
        if index_path.is_file():
            for path in sorted(set(self.file_of.values())):
                if not path.is_file():
                    raise UserError(f"{path}: listed in {index_path} but missing")
                absent = sorted(
                    n for n, p in self.file_of.items() if p == path and n not in _tensor_names(path)
                )
                if absent:
                    raise UserError(
                        f"{index_path} places {absent[:3]} in {path.name}, which holds no such tensor "
                        f"({len(absent)} in all): the index and the weight files are from different saves"
                    )

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        # Open per read: a handle kept open keeps every page it touched mapped, and the resident set
        # of a streaming conversion would grow to the size of the whole checkpoint.
        with safe_open(self.file_of[name], "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        with safe_open(self.file_of[name], "pt") as f:
            return list(f.get_slice(name).get_shape())


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{index_path}: not a valid safetensors index ({exc})") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: missing the 'weight_map' field")
    return weight_map


def _tensor_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header; UserError naming the file when it is unreadable."""
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt "
            f"({path.stat().st_size:,} bytes on disk): download or copy it again"
        ) from None


def check_against_config(reader, config: ModelConfig, where: str | Path | None = None, shapes=None) -> None:
    """Before any tensor is read (from safetensors headers): every tensor config.json implies is in the
    checkpoint with its shape, and the checkpoint holds no other (a tied `lm_head.weight` may be present).

    `reader` has the `CheckpointReader` interface (`names()`, `in`, `shape(name)`); `where` names the
    source in the messages (default: the reader's directory); `shapes`: `expected_shapes(config)` when the
    caller has them already.
    """
    where = reader.dir if where is None else where
    shapes = expected_shapes(config) if shapes is None else shapes
    missing = [name for name in shapes if name not in reader]
    if missing:
        raise UserError(
            f"{where}: tensors {missing[:3]} are missing ({len(missing)} in all; config.json implies them)"
        )
    for name, shape in shapes.items():
        found = reader.shape(name)
        if found != list(shape):
            raise UserError(f"{where}: tensor {name!r} has shape {found}, config.json implies {list(shape)}")
    unexpected = sorted(set(reader.names()) - set(shapes) - {"lm_head.weight"})
    if unexpected:
        raise UserError(f"{where}: the checkpoint has tensors the model does not: {unexpected[:5]}")


class ShardWriter:
    """Accumulates tensors and writes `model-0000i-of-0000n.safetensors` shards plus the index.

    A shard is flushed as soon as it exceeds `max_shard_bytes`, so memory holds at most one shard.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 2**30):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tmp_name = f"shard-{len(self.written):05d}.tmp.safetensors"
        save_file(self.pending, self.dir / tmp_name, metadata={"format": "pt"})
        self.written.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index; return the file names."""
        self.flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.dir / self.written[0][0], self.dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for i, (tmp_name, tensors) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in `src`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    """`auto`/None -> the checkpoint's own dtype; else fp32/bf16/fp16 by name."""
    key = config.torch_dtype if name in (None, "auto") else name
    if key not in DTYPES:
        raise UserError(f"dtype {key!r} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[key]


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """name -> shape of every tensor a checkpoint of `config` holds (no `lm_head.weight` when tied)."""
    from pipeline.backbone import expected_state

    shapes = expected_state(config)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def build_model(
    config: ModelConfig,
    reader,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    where: str | Path = "checkpoint",
):
    """The model (`pipeline.backbone`: transformers' class of the family, our MoE blocks in it), built on the
    meta device and filled tensor by tensor from `reader`.

    `reader` is anything with the `CheckpointReader` interface (`names()`, `in`, `shape(name)`,
    `get(name)`): a safetensors directory, or the in-memory state of a training checkpoint
    (`pipeline.export.DictReader`). `check_against_config` runs first, so a mismatched checkpoint never
    loads silently. `where` names the source in error messages.
    """
    from pipeline.backbone import build

    shapes = expected_shapes(config)
    check_against_config(reader, config, where, shapes)
    return build(config, reader, dtype, device, shapes)


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json spelling of a dtype: torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def load_model(path: str | Path, dtype: str | torch.dtype | None = "float32", device: str = "cpu"):
    """Load a dense Hugging Face or upcycled checkpoint directory as a module whose `forward(input_ids)`
    returns logits (see `build_model`)."""
    _, config = read_hf_config(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, config)
    return build_model(config, CheckpointReader(path), torch_dtype, device, where=path)
