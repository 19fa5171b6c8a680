#!/usr/bin/env bash
# Installs everything Palisade needs to build and test on a fresh Debian 12 machine.
# Idempotent: every step checks first, so a second run takes seconds.
set -euo pipefail

step() { printf '==> %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages: CNI plugins for real pod networking, tools the tests and demo drive.
PKGS=(containernetworking-plugins iproute2 jq netcat-openbsd iptables nftables iputils-ping procps kmod python3-venv)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust: stable for the agent, nightly + rust-src for the eBPF crate (-Z build-std=core).
command -v rustup >/dev/null || { echo "rustup is required (https://rustup.rs)" >&2; exit 1; }
if ! rustup toolchain list | grep -q '^nightly'; then
  step "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
sysroot="$(rustc +nightly --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/src/rust/library" ]; then
  step "rustup component add rust-src (nightly)"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker must link the same LLVM major as nightly rustc; Debian has no LLVM of that
# version, so link it against the libLLVM that the nightly toolchain itself ships.
llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
stamp="$HOME/.cargo/.palisade-bpf-linker-llvm"
if ! command -v bpf-linker >/dev/null || [ "$(cat "$stamp" 2>/dev/null)" != "$sysroot" ]; then
  step "cargo install bpf-linker (LLVM $llvm_major from $sysroot)"
  llvm_so="$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)"
  prefix="$HOME/.local/rust-llvm"
  mkdir -p "$prefix/lib"
  ln -sf "$llvm_so" "$prefix/lib/libLLVM.so"
  ln -sf "$llvm_so" "$prefix/lib/"
  LLVM_PREFIX="$prefix" cargo install bpf-linker --version 0.13.0 --locked --force \
    --no-default-features --features "llvm-$llvm_major"
  echo "$sysroot" > "$stamp"
fi

# Kubernetes schema validator for the manifests (tests/tests/deploy_manifests.rs), pinned,
# in its own venv so it never touches the system Python.
KUBERNETES_VALIDATE_VERSION=1.37.0
venv=/opt/palisade-venv
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  step "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv"
  $SUDO /usr/bin/python3 -m venv "$venv"
  $SUDO "$venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "jsonschema==4.26.0"
fi

# bpffs: the agent mounts it itself when missing, but tests and the CLI expect it.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  step "mount bpffs at /sys/fs/bpf"
  $SUDO mount -t bpf bpf /sys/fs/bpf
fi
step "setup done"
