#!/bin/sh
# Print the link flags for the CUDA libraries that CMake found when it configured ggml-cuda
# (read from its cache, so libtinynn links exactly what ggml was compiled against).
# The runtime folders get an rpath; the driver library (often a link-time stub) never does:
# at run time libcuda.so.1 must come from the installed NVIDIA driver.
cache=${1:?usage: cuda-libs.sh path/to/CMakeCache.txt}
for var in CUDA_cudart_LIBRARY CUDA_cublas_LIBRARY CUDA_cublasLt_LIBRARY CUDA_cuda_driver_LIBRARY; do
    lib=$(sed -n "s/^$var:FILEPATH=//p" "$cache")
    case $lib in
        "" | *NOTFOUND) echo "cuda-libs.sh: CMake found no $var (see $cache); is the CUDA toolkit with cuBLAS installed?" >&2
                        exit 1 ;;
    esac
    printf '%s ' "$lib"
    case $var in
        *driver*) ;;
        *) printf -- '-Wl,-rpath,%s ' "$(dirname "$lib")" ;;
    esac
done
echo
