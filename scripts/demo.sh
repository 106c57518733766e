#!/usr/bin/env bash
# What meshagent does today, in one run: two agents (cluster1 id 101, cluster2 id 102) on the
# in-memory kvstore, the third-party audit plugin loaded by name, status/plugins/config shown,
# then a clean SIGTERM shutdown. The two-cluster ClusterMesh demo of the seed replaces this
# once the etcd, endpoint, policy and eBPF pieces exist.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/.venv/bin
work=$(mktemp -d /tmp/meshagent-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_agent() {  # name id
  local dir=$work/$1
  mkdir -p "$dir/config"
  # ConfigMap style, as the seed runs cilium-agent --config-dir=...
  echo "$1" > "$dir/config/cluster-name"
  echo "$2" > "$dir/config/cluster-id"
  "$bin/meshagent" --plugins memory,audit --config-dir "$dir/config" \
    --socket-path "$dir/agent.sock" --state-dir "$dir/state" --node-name node1 \
    > "$dir/agent.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$dir/agent.sock" ] && return; sleep 0.05; done
  cat "$dir/agent.log"; echo "agent $1 did not start" >&2; exit 1
}

step "installed plugins (built-in and third-party, one entry-point group)"
"$bin/meshagent" plugins

step "an unknown plugin is refused before anything starts"
"$bin/meshagent" --plugins memory,nosuch || echo "(exit code $?)"

step "start cluster1 (id 101) and cluster2 (id 102)"
start_agent cluster1 101
start_agent cluster2 102

step "meshagent status (cluster1)"
"$bin/meshagent" status --socket-path "$work/cluster1/agent.sock"

step "meshagent status --verbose (cluster2)"
"$bin/meshagent" status --verbose --socket-path "$work/cluster2/agent.sock"

step "where each option came from (cluster1)"
"$bin/meshagent" config --socket-path "$work/cluster1/agent.sock" | grep -E "OPTION|cluster-|plugins|node-name"

step "SIGTERM: both agents stop cleanly"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" && echo "agent $pid exited 0"; done
pids=()
