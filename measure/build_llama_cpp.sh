#!/usr/bin/env bash
# Builds llama.cpp's tools that benchmark.py races against (llama-batched-bench, llama-quantize), and keeps its
# convert_hf_to_gguf.py beside them, from the llama.cpp that the llama-cpp-python sdist on PyPI vendors: PyPI is
# reachable where GitHub may not be. About 5 minutes on two cores. Usage:
#
#     bash measure/build_llama_cpp.sh                # into out/llama.cpp, where benchmark.py looks
#     bash measure/build_llama_cpp.sh DIR            # anywhere else: then LLAMA_CPP_DIR=DIR python benchmark.py ...
#
# Needs cmake and a C++ compiler (Debian: apt-get install cmake build-essential) and pip.
set -euo pipefail
VERSION=0.3.36  # the llama-cpp-python release whose vendored llama.cpp docs/benchmark.md was measured with
DEST=$(realpath -m "${1:-out/llama.cpp}")
PYTHON=${PYTHON:-python}
mkdir -p "$DEST"
cd "$DEST"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
    tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SOURCE="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Native flags: the tools use every instruction this CPU has, as a user building llama.cpp here would.
cmake -S "$SOURCE" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF
cmake --build build --config Release -j "$(nproc)" --target llama-batched-bench llama-quantize
mkdir -p bin
cp build/bin/llama-batched-bench build/bin/llama-quantize bin/
ln -sfn "$SOURCE/convert_hf_to_gguf.py" bin/convert_hf_to_gguf.py
ln -sfn "$SOURCE/gguf-py" bin/gguf-py
echo "llama.cpp tools in $DEST/bin"
