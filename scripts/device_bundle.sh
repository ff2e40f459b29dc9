#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for scripts/device_check.sh, on a machine with network and the oracle.
# The GPU machine has no network and no llama-cpp-python, so everything it needs travels in .device/:
#   src.tar.xz  the pinned sdist's llama.cpp tree, trimmed to what the ggml build configures (~4 MB)
#   whl/        wheels its Python (3.12; DEVICE_PYTHON=3.11 for another) lacks: cffi, pycparser, gguf
#   cases/      synthetic models + llama.cpp's CPU logits and greedy tokens (tests/backend_cases.py);
#               the F32 files are left out (written again there, sha256-checked)
set -euo pipefail
cd "$(dirname "$0")/.."
make all oracle
rm -rf .device && mkdir -p .device/whl
sdist=$(basename build/llama_cpp_python-*/ )
tar -cJf .device/src.tar.xz -C build \
    --exclude="$sdist/vendor/llama.cpp/"{models,docs,tests,benches,examples,tools,gguf-py,media,.github,scripts} \
    "$sdist/vendor/llama.cpp"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/whl "cffi==$(.venv/bin/python -c 'import cffi; print(cffi.__version__)')" pycparser \
    "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
(cd tests && ../.venv/bin/python backend_cases.py ../.device/cases)
rm -f .device/cases/*.F32.gguf
du -sh .device/* && du -sh .device
