#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher and a hostfile (pdsh/SSH fan-out from this node).
#   launch/train.sh launch/configs/multi_gpu.yaml [--section.key value ...]
# Environment: HOSTFILE (default launch/hostfile), MASTER_ADDR (default: first host), MASTER_PORT,
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to pin the network interface.
set -euo pipefail
config=${1:?usage: launch/train.sh CONFIG.yaml [--section.key value ...]}
shift
hostfile=${HOSTFILE:-launch/hostfile}
[ -f "$hostfile" ] || { echo "hostfile $hostfile not found: copy launch/hostfile.example" >&2; exit 2; }
master=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    pipeline/train.py --config "$config" "$@"
