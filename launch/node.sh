#!/usr/bin/env bash
# One node of a multi-node run, without SSH between nodes: start the same command on every node, each
# with its own NODE_RANK (its 0-based line in the hostfile). What launch/slurm.sbatch runs on each node.
#   HOSTFILE=launch/hostfile NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/node.sh CONFIG.yaml [--section.key value ...]
# Environment: HOSTFILE (default launch/hostfile), NODE_RANK (required), MASTER_ADDR (default: the first
# host in the hostfile; must be node 0's address on the interface the ranks talk over), MASTER_PORT
# (default 29500), GLOO_SOCKET_IFNAME (CPU) / NCCL_SOCKET_IFNAME (GPU) to pin that interface, STOP_TIMEOUT
# (seconds to wait after SIGTERM for the ranks to save and exit, default 600), PYTHON (default python).
set -euo pipefail
config=${1:?usage: NODE_RANK=i launch/node.sh CONFIG.yaml [--section.key value ...]}
shift
repo=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # -P: the real repository, also through a symlink
hostfile=${HOSTFILE:-$repo/launch/hostfile}
[ -f "$hostfile" ] || { echo "hostfile $hostfile not found: copy launch/hostfile.example" >&2; exit 2; }
node_rank=${NODE_RANK:?set NODE_RANK to the 0-based line of this node in $hostfile}
master=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
echo "node.sh: node $node_rank of $(grep -cv '^\s*\(#\|$\)' "$hostfile") ($hostfile), master $master:${MASTER_PORT:-29500}," \
    "interface ${NCCL_SOCKET_IFNAME:-${GLOO_SOCKET_IFNAME:-(not pinned)}}" >&2
# The supervisor (pipeline/launcher.py) stays this step's main process until every rank of this node has
# exited: on SIGTERM (SLURM's pre-emption signal) the ranks finish their step and save, and SLURM, which
# ends the step when its main process exits, must not kill them mid-save. STOP_TIMEOUT (default 600 s)
# bounds that wait.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m pipeline.launcher --name "node.sh (node $node_rank)" \
    --stop-timeout "${STOP_TIMEOUT:-600}" -- \
    deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master" \
    --master_port "${MASTER_PORT:-29500}" "$repo/pipeline/train.py" --config "$config" "$@"
