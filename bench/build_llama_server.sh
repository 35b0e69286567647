#!/usr/bin/env bash
# Builds llama.cpp's llama-server (and llama-quantize, which writes the f32/bf16 copies of the
# shipped Q4_1 file) once, from the sources vendored in the llama-cpp-python sdist,
# into bench/.llama/ (ignored by git). `make bench` uses it as the peer; `make test` never does.
# About 10 minutes on 2 cores; a second call returns at once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/.llama"
bin="$dest/build/bin/llama-server"
quantize="$dest/build/bin/llama-quantize"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
py="${PYTHON:-python3}"
if [ -x "$bin" ] && [ -x "$quantize" ]; then echo "$bin"; exit 0; fi
mkdir -p "$dest"
cd "$dest"
sdist="llama_cpp_python-$version.tar.gz"
[ -f "$sdist" ] || "$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d . >&2
[ -d "llama_cpp_python-$version" ] || tar xzf "$sdist"
src="$dest/llama_cpp_python-$version/vendor/llama.cpp"
# Native CPU flags, as llama.cpp's own release builds for a given box, less AMX: where the CPU has AMX
# but the kernel or sandbox does not grant its tiles to the process, llama-server dies of SIGILL on
# the first Q4_1 matrix product. No curl: nothing is downloaded.
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$dest/build" --target llama-server llama-quantize -j "$(nproc)" >&2
echo "$bin"
