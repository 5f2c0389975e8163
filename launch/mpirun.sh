#!/usr/bin/env bash
# Training under Open MPI's mpirun, on one node or several; mpirun starts every rank (over SSH on the other
# nodes, or whatever plm_ssh_agent names).
#   NP=16 HOSTFILE=launch/hostfile NETWORK=10.0.0.0/24 launch/mpirun.sh CONFIG.yaml [--section.key value ...]
# Environment:
#   NP           total number of ranks (default 2)
#   HOSTFILE     Open MPI hostfile, "host slots=N" per node (the DeepSpeed hostfile's syntax; default: this
#                node only). Every node needs the repository and the Python environment at the same paths,
#                and its own hostname (Open MPI 5 crashes when two nodes report the same one).
#   MASTER_ADDR  the rendezvous: node 0's address on the interface the ranks talk over (default: the first
#                host of HOSTFILE, or 127.0.0.1 without one); MASTER_PORT (default 29500)
#   IFACE        the interface the ranks talk over, when it has the same name on every node (eth0), or
#   NETWORK      its subnet in CIDR notation (10.0.0.0/24), when the names differ between nodes.
#                Either pins all of it: Open MPI's daemons (oob_tcp_if_include), MPI messages
#                (btl_tcp_if_include), gloo (GLOO_SOCKET_IFNAME) and NCCL (NCCL_SOCKET_IFNAME), the last two
#                resolved on each node unless set.
#   MPIRUN_ARGS  more mpirun arguments, split on spaces (e.g. "--mca plm_ssh_agent /path/to/agent")
#   PYTHON       the interpreter (default python)
# The ranks get RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_SIZE from Open MPI's OMPI_COMM_WORLD_* variables, so
# DeepSpeed uses MASTER_ADDR:MASTER_PORT as given (its own MPI discovery through mpi4py, which a bare
# `mpirun python pipeline/train.py` uses, would take rank 0's first `hostname -I` address and port 29500).
set -euo pipefail
repo=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "${1:-}" = "--as-rank" ]; then  # internal: each rank, as started by mpirun below
    shift
    : "${OMPI_COMM_WORLD_RANK:?launch/mpirun.sh --as-rank must be started by Open MPI mpirun}"
    export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE
    export LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK LOCAL_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE
    iface=${IFACE:-}
    if [ -z "$iface" ] && [ -n "${NETWORK:-}" ]; then
        # This node's interface with an address in NETWORK.
        iface=$(ip -o addr show | "${PYTHON:-python}" -c '
import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1], strict=False)
for line in sys.stdin:
    f = line.split()
    if f[2] in ("inet", "inet6") and ipaddress.ip_interface(f[3]).ip in net:
        print(f[1].split("@")[0]); break
' "$NETWORK")
        [ -n "$iface" ] || { echo "mpirun.sh: $(hostname) has no address in NETWORK=$NETWORK" >&2; exit 2; }
    fi
    if [ -n "$iface" ]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
    fi
    if [ "$LOCAL_RANK" = 0 ]; then
        echo "mpirun.sh: node $(hostname) runs $LOCAL_SIZE of the $WORLD_SIZE ranks (its local rank 0 is" \
            "rank $RANK), interface ${NCCL_SOCKET_IFNAME:-${GLOO_SOCKET_IFNAME:-(not pinned)}}" >&2
    fi
    exec "${PYTHON:-python}" "$repo/pipeline/train.py" "$@"
fi

config=${1:?usage: launch/mpirun.sh CONFIG.yaml [--section.key value ...]}
shift
np=${NP:-2}
args=(-n "$np" --oversubscribe --bind-to none)
master=127.0.0.1
if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || { echo "mpirun.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
    args+=(--hostfile "$HOSTFILE")
    master=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
fi
export MASTER_ADDR=${MASTER_ADDR:-$master} MASTER_PORT=${MASTER_PORT:-29500}
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
if [ -n "${IFACE:-}" ] && [ -n "${NETWORK:-}" ]; then
    echo "mpirun.sh: set IFACE or NETWORK, not both" >&2
    exit 2
fi
pin=${IFACE:-${NETWORK:-}}
[ -n "$pin" ] && args+=(--mca oob_tcp_if_include "$pin" --mca btl_tcp_if_include "$pin")
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The ranks' environment: these variables, where set here, with the values they have here.
for var in $(compgen -e); do
    case $var in
    PATH | PYTHONPATH | LD_LIBRARY_PATH | PYTHON | MASTER_ADDR | MASTER_PORT | IFACE | NETWORK) ;;
    GLOO_* | NCCL_* | OMP_* | TORCH_* | DEEPSPEED_* | HF_* | UPCYCLE_*) ;;
    *) continue ;;
    esac
    args+=(-x "$var")
done
echo "mpirun.sh: $np ranks on ${HOSTFILE:-this node}, master $MASTER_ADDR:$MASTER_PORT," \
    "interface ${pin:-${NCCL_SOCKET_IFNAME:-${GLOO_SOCKET_IFNAME:-(not pinned)}}}" >&2
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} bash "$repo/launch/mpirun.sh" --as-rank --config "$config" "$@"
