#!/usr/bin/env bash
# One command: prepare the embedded default corpus, pretrain a small dense Llama from scratch, upcycle it
# (E8 top-2 and a fine-grained setting), continue training the MoE variants and the dense model on the same
# tokens with 2 ranks and expert parallelism, for 3 seeds, then print the table (mean +- std over seeds, the
# margins over continued dense and over the starting model), the plot and the tensorboard line.
#
#   bash launch/quickstart.sh                 # 2 CPU cores: pretraining + 9 continued runs (README: timings)
#   bash launch/quickstart.sh --seeds 1       # one seed: 3 continued runs
#   bash launch/quickstart.sh --size gpu      # the same experiment at ~100M parameters, all GPUs
#   bash launch/quickstart.sh --size tiny     # a seconds-long smoke run (numbers mean nothing)
#
# Everything lands in runs/quickstart (runs/quickstart-SIZE for other sizes): results.json, results.md,
# val_curves.png, logs/ and one TensorBoard directory per run under runs/. Run it again to resume:
# finished stages are skipped. Any other option goes to `python launch/reproduce.py quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import pipeline.cli, deepspeed" >/dev/null 2>&1 || ! command -v upcycle >/dev/null; then
  echo "quickstart: installing the package (pip install -e .)"
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "quickstart: install PyTorch first (the CPU build on a CPU-only machine), as README.md says" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -e .
fi

exec "$PYTHON" launch/reproduce.py quickstart --seeds 3 "$@"
