#!/usr/bin/env bash
# Fresh-machine setup for meshagent: system packages, bcc's kernel headers, bpffs, the venv.
# Idempotent: every step checks before it acts, so running it again is cheap.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MESHAGENT_VENV:-$here/.venv}

apt_packages=(
  etcd-server etcd-client          # kvstore for tests and the lab
  python3-bpfcc linux-headers-amd64  # bcc compiles the tc programs against these headers
  nftables python3-nftables        # the nftables datapath (libnftables and its bindings)
  python3-venv python3-pip
  iproute2 iputils-ping iptables redis-server redis-tools iperf3 openssl make
  dnsmasq-base bind9-dnsutils      # the lab's DNS server (lab up --dns) and dig in its pods
)

log() { printf '[setup] %s\n' "$*"; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's etcd-server and redis-server packages may start system services; tests start their own.
for svc in etcd redis-server; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

# bcc looks for the running kernel's headers under /lib/modules/$(uname -r)/{build,source}.
# The kernel here ships none; Debian splits its headers into an -amd64 and a -common tree.
kdir=/lib/modules/$(uname -r)
arch_hdrs=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$arch_hdrs" ]; then
  common_hdrs=${arch_hdrs%-amd64}-common
  mkdir -p "$kdir"
  [ -e "$kdir/build" ] || ln -sfn "$arch_hdrs" "$kdir/build"
  [ -e "$kdir/source" ] || ln -sfn "$common_hdrs" "$kdir/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# The venv sees system site-packages because bcc only comes as Debian's python3-bpfcc.
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi

# Reinstall the project only when its packaging changed.
stamp=$venv/.meshagent-installed
shopt -s nullglob
want=$(cat "$here/pyproject.toml" "$here/devtools/pyproject.toml" "$here"/contrib/*/pyproject.toml \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing meshagent and test extras into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$here[test]"
  "$venv/bin/python" -m pip install -q -e "$here/devtools"  # lab, etcd runner, stand-ins
  for plugin in "$here"/contrib/*/; do
    [ -f "$plugin/pyproject.toml" ] && "$venv/bin/python" -m pip install -q -e "$plugin"
  done
  echo "$want" > "$stamp"
fi
log "ready: $venv"
