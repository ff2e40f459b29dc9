#!/usr/bin/env bash
# The one GPU check, for a machine with no network (the device tool's): build libtinynn with CUDA,
# run every op and the model cases there against llama.cpp's CPU numbers, then time decode.
# Prepare .device/ first with scripts/device_bundle.sh and carry it; the log goes to $OUT.
#   scripts/device_check.sh            # CUDA build (CUDA=0: the same steps on the CPU, a rehearsal)
set -uo pipefail
cd "$(dirname "$0")/.."
CUDA=${CUDA:-1}
BACKEND=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
OUT=${OUT:-build/device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi -L 2>/dev/null; nvcc --version 2>/dev/null | tail -1; python3 --version; nproc
[ -f .device/src.tar.xz ] || { echo "no .device/: run scripts/device_bundle.sh and carry .device"; exit 2; }

step "python: this machine's python3 + carried wheels, behind a .venv shim the Makefile uses"
SITE=$PWD/build/device-site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/whl/*.whl || exit 2
mkdir -p .venv/bin
printf '#!/bin/sh\nPYTHONPATH=%s:%s${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' \
    "$PWD" "$SITE" "$(command -v python3)" > .venv/bin/python
chmod +x .venv/bin/python
touch .venv/.base .venv/.installed .venv/.oracle
PY=.venv/bin/python
$PY -c "import cffi, gguf, numpy, pytest, hypothesis; print('python deps ok')" || exit 2

step "sources: the pinned sdist's llama.cpp tree, trimmed (sha256 of the sdist was checked where it was made)"
SDIST=build/llama_cpp_python-$(sed -n 's/^SDIST_VER *:= *//p' Makefile)
mkdir -p build && tar -xJf .device/src.tar.xz -C build && touch "$SDIST/.extracted" || exit 2
MAKE_OFFLINE="-o $SDIST.tar.gz -o .venv/.base -o .venv/.installed"

CUDA_CMAKE_ARGS=""
if [ "$CUDA" = 1 ]; then
    step "CUDA toolkit: where cuBLAS and the driver library are"
    command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
    CUDA_CMAKE_ARGS=$(scripts/cuda-cmake-args.sh) || exit 2
    echo "extra cmake arguments: ${CUDA_CMAKE_ARGS:-none}"
fi

step "build: make CUDA=$CUDA"
time make CUDA="$CUDA" CUDA_CMAKE_ARGS="$CUDA_CMAKE_ARGS" JOBS="$(nproc)" $MAKE_OFFLINE lib \
    || { tail -40 build/cmake-*.log; exit 1; }
if ! make CUDA="$CUDA" CUDA_CMAKE_ARGS="$CUDA_CMAKE_ARGS" $MAKE_OFFLINE ffi; then
    echo "cffi API-mode extension did not build here (Python headers?): ABI mode from now on"
    export TINYNN_FFI=abi
fi
$PY -c "from toy_llm import tinynn as t; s = t.tnn_session_new($CUDA); print('session backend:', t.tnn_backend_name(s)); t.tnn_session_free(s)"

step "model cases on $BACKEND vs llama.cpp (CPU)"
export TOY_LLM_BACKEND_CASES=$PWD/.device/cases
if [ "$CUDA" = 1 ]; then
    $PY -m pytest -q -s -p no:cacheprovider tests/test_backends.py 2>&1 | tee "$OUT/backends.log" | grep -E "^\[backend\]|passed|failed|Error"
else   # rehearsal: the cases load and the CPU engine runs them
    $PY -c "
import sys, numpy as np, toy_llm; sys.path.insert(0, 'tests'); import backend_cases as b
for c in b.load_cases('$TOY_LLM_BACKEND_CASES'):
    for graph in ('per_head', 'fused'):
        with toy_llm.load(c['gguf'], max_T=256, kv_type=c['kv_type'], flash_attn=c['flash'], graph=graph, n_batch=1) as m:
            d = np.abs(m.eval(c['tokens']) - np.load(c['logits'])).max()
        print(f\"[backend] cpu {c['name']} {graph}: max|Δlogit|={d:.3g}\")"
fi

step "every op on $BACKEND vs float64 numpy (a quarter of the CI examples)"
TOY_LLM_TEST_BACKEND=$BACKEND TNN_TEST_EXAMPLES=0.25 $PY -m pytest -q -s -p no:cacheprovider tests/test_ops.py 2>&1 \
    | tee "$OUT/ops.log" | grep -E "^\s+\S+\s+[0-9.e+-]+|passed|failed|Error" | tail -60

step "decode speed, synthetic llama Q4_K (tiny: launch-bound, not a model figure)"
for b in cpu $BACKEND; do
    for graph in "--graph per_head" "--batch 1" "--batch 128"; do
        $PY -m toy_llm bench -m .device/cases/llama.Q4_K.gguf --backend "$b" -n 64 $graph 2>&1 | grep -v "call overhead"
    done
done

# last: already proven with a CUDA build on a machine without a GPU; least needed if time runs out
step "the shim's error paths and the engine API with this build (CPU sessions)"
$PY -m pytest -q -p no:cacheprovider tests/test_errors.py tests/test_engine_api.py 2>&1 | tail -5
step done
