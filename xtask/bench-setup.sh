#!/usr/bin/env bash
# Installs the traffic generators and the firewalls `cargo xtask bench` compares Palisade
# against. Idempotent: installs only what is missing, so a second run takes a second.
# netperf is in Debian's non-free section, so request/response uses sockperf (main).
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# package -> a binary it provides (checked, so a removed binary is reinstalled).
declare -A BIN=(
  [iperf3]=iperf3
  [sockperf]=sockperf
  [ipset]=ipset
  [nftables]=nft
  [iptables]=iptables
  [iproute2]=ip
)
missing=()
for p in "${!BIN[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
    || ! command -v "${BIN[$p]}" >/dev/null; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  printf '==> apt-get install %s\n' "${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# iperf3's Debian package may start a system-wide server; the benchmark runs its own
# servers inside its namespaces and does not need it.
printf '==> bench tools: %s\n' "$(iperf3 --version | head -n1); $(sockperf --version 2>&1 | head -n1); $(ipset --version); $(nft --version); $(iptables --version)"
