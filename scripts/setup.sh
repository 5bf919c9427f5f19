#!/usr/bin/env bash
# Installs the Debian packages the build needs, if any are missing. Safe to run repeatedly.
# Usage: scripts/setup.sh [--tests]     (--tests adds GoogleTest)
set -euo pipefail

pkgs=(cmake make gcc g++ libjansson-dev libpcre2-dev libopenblas-openmp-dev python3 python3-pip)
[[ "${1:-}" == "--tests" ]] && pkgs+=(libgtest-dev)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The CUDA toolkit is optional: without nvcc the CPU path builds alone.
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
    echo "setup: CUDA toolkit found; the CUDA kernels will be built"
else
    echo "setup: no CUDA toolkit; building the CPU path only"
fi
