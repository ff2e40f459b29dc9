#!/usr/bin/env bash
# Print the extra cmake arguments ggml-cuda needs on this machine (for `make CUDA=1 CUDA_CMAKE_ARGS=...`),
# nothing where the toolkit is complete. GPU images often ship cuBLAS as a Python wheel
# (nvidia-cublas) instead of inside the toolkit, and the driver library outside it.
set -euo pipefail
nvcc=$(command -v nvcc) || { echo "cuda-cmake-args.sh: no nvcc on PATH" >&2; exit 1; }
# the toolkit root as nvcc itself reports it (nvcc on PATH is often a wrapper script)
top=$(cd "${TMPDIR:-/tmp}" && : > tnn-probe.cu && "$nvcc" --dryrun -c tnn-probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
tk=$(readlink -f "${top:-$(dirname "$nvcc")/..}")
args=()
if ! ls "$tk"/lib*/libcublas.so* "$tk"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
    cb=$(python3 -c '
import glob, os, sys
for p in sys.path:
    for lib in sorted(glob.glob(os.path.join(p or ".", "nvidia", "*", "lib", "libcublas.so*"))):
        print(os.path.dirname(os.path.dirname(lib))); raise SystemExit
')
    [ -n "$cb" ] || { echo "cuda-cmake-args.sh: no cuBLAS in $tk nor in python3's nvidia packages" >&2; exit 1; }
    args+=("-DCUDA_cublas_LIBRARY=$(ls "$cb"/lib/libcublas.so* | head -1)"
           "-DCUDA_cublasLt_LIBRARY=$(ls "$cb"/lib/libcublasLt.so* | head -1)"
           "-DCMAKE_CUDA_FLAGS=-I$cb/include")
fi
if ! ls "$tk"/lib*/stubs/libcuda.so "$tk"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1; then
    drv=$( (ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 /{print $NF; exit}')
    [ -n "$drv" ] || drv=$(find /usr/local/nvidia /usr/lib64 /usr/lib/x86_64-linux-gnu -name libcuda.so.1 2>/dev/null | head -1)
    [ -n "$drv" ] || { echo "cuda-cmake-args.sh: no libcuda (driver or toolkit stub) found" >&2; exit 1; }
    args+=("-DCUDA_cuda_driver_LIBRARY=$drv")
fi
echo "${args[@]}"
