#!/usr/bin/env bash
# Every GPU check of this repository in one run, for a short session on a lent GPU machine.
#
#   bash bench/gpu_checks.sh --build-wheelhouse   # here, with network: wheels the GPU machine lacks
#   bash bench/gpu_checks.sh                      # there: install them, GPU tests, both benchmarks
#
# The lent GPU machine (docs/performance.md, "GPU checks") has torch, CUDA, Triton, tokenizers and tensorboard but no
# DeepSpeed and no network, so DeepSpeed and its small pure-Python dependencies travel as wheels in
# wheelhouse/ (carry it). Tables go to stdout and, with the raw rows, to $OUT (default gpu_out/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--build-wheelhouse" ]]; then
    rm -rf wheelhouse
    ds_version=$(python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
    # Binary wheels are for this machine's Python; the GPU machine needs the same minor version.
    pip wheel --quiet --no-deps -w wheelhouse "deepspeed==${ds_version}" hjson py-cpuinfo msgpack einops \
        ninja nvidia-ml-py pydantic pydantic-core annotated-types typing-inspection typing-extensions packaging \
        psutil tqdm 2>&1 | grep -v "^WARNING"
    ls -l wheelhouse
    exit 0
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
# Only what is missing is taken from the wheelhouse; packages already there are kept.
python -c "import deepspeed" 2>/dev/null || pip install --quiet --no-index --find-links wheelhouse deepspeed
pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || true  # console script `upcycle`
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

echo "== GPU tests"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_moe_block.py 2>&1 | tail -8 \
    | tee "$OUT/tests.txt"
echo "== MoE layer, forward+backward (GPU sizes: H=2048, F=8192, 8192 tokens, bf16)"
python bench/moe_layer.py --gpu --json "$OUT/moe_layer.json" 2>&1 | grep -v "WARNING\|INFO" \
    | tee "$OUT/moe_layer.txt"
echo "== training steps, ~1B active parameters, bf16"
python bench/train_step.py --gpu 2>&1 | grep -v "WARNING\|INFO" | tee "$OUT/train_step.txt"
