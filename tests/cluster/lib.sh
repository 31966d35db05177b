# Shared by tests/cluster/{up,down,kubectl,e2e}. Sourced, not run.
# shellcheck shell=bash

cluster_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(git -C "$cluster_here" rev-parse --show-toplevel 2>/dev/null || (cd "$cluster_here/../.." && pwd))"
run_dir="${KILN_CLUSTER_DIR:-$repo/.cache/cluster}"

# Ports, all on 127.0.0.1.
etcd_port="${KILN_ETCD_PORT:-23790}"
etcd_peer_port="${KILN_ETCD_PEER_PORT:-23800}"
apiserver_port="${KILN_APISERVER_PORT:-16443}"
kcm_port="${KILN_KCM_PORT:-17257}"
scheduler_port="${KILN_SCHEDULER_PORT:-17259}"

# Components in start order; down stops them in reverse.
components=(etcd apiserver controller-manager scheduler node-agent)

log() { echo "cluster: $*" >&2; }

# pid_alive NAME: the pid in NAME's pid file, if that process still runs
# the command it was started with.
pid_alive() {
    local file="$run_dir/pids/$1.pid" pid
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    grep -qa -- "$(cat "$run_dir/pids/$1.cmd" 2>/dev/null || echo "$1")" "/proc/$pid/cmdline" || return 1
    echo "$pid"
}
