# toy_llm: fetch the pinned ggml, build libtinynn + its cffi binding, run things.
#
#   make            .venv, ggml (static), libtinynn.so, the cffi extension, editable install
#   make test       the above + test deps + llama-cpp-python oracle, then pytest
#   make demo       the above + the default SmolLM2 model, greedy "The capital of France is"
#   make CUDA=1     add ggml's CUDA backend (CUDA_ARCH=90 by default; CUDA_CMAKE_ARGS=... passes
#                   more to ggml's cmake, by default what scripts/cuda-cmake-args.sh finds)
#   make bench      the bench table for SmolLM2: start-up, prefill, decode, parallel, speculative, peak RSS of
#                   the fused and per-head graphs against llama-cpp-python (BENCH_ARGS="-t 2 --markdown" adds flags)
#   make fuzz       the GGUF loader fuzz campaign at full size: FUZZ_N mutated tiny models (default 20000)
#                   + FUZZ_MODEL_N SmolLM2 header mutations, each loaded + evaluated in a forked child
#   make asan       ggml + libtinynn under AddressSanitizer + UBSan (build/ggml-asan, build/asan/), then the
#                   op, error, loader and fuzz-corpus tests against that library (README, "Sanitizers")
#
# ggml comes from the llama-cpp-python sdist (never committed); its sha256 is checked.

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
PIP         := $(VPY) -m pip
BUILD       := build
SDIST_VER   := 0.3.36
SDIST_SHA   := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST_TGZ   := $(BUILD)/llama_cpp_python-$(SDIST_VER).tar.gz
SDIST_DIR   := $(BUILD)/llama_cpp_python-$(SDIST_VER)
LLAMA_DIR   := $(SDIST_DIR)/vendor/llama.cpp
GGML_INC    := $(LLAMA_DIR)/ggml/include
JOBS        ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

CUDA        ?= 0
CUDA_ARCH   ?= 90
UNAME_S     := $(shell uname -s)

GGML_CMAKE  := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
               -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF
TNN_CFLAGS  := -O2 -std=c11 -D_GNU_SOURCE -fPIC -Wall -Wextra -Wno-unused-parameter -Ilibtinynn -I$(GGML_INC)
# the CPU flavour's flags, before a backend adds to them: `make asan` always builds that flavour
GGML_CMAKE_CPU := $(GGML_CMAKE)
TNN_CFLAGS_CPU := $(TNN_CFLAGS)
GGML_TAG    := cpu
ifeq ($(CUDA),1)
  GGML_TAG   := cuda$(CUDA_ARCH)
  GGML_CMAKE += -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)
  # where cuBLAS or the driver library is not inside the toolkit (cuBLAS from the nvidia-cublas
  # wheel, as on many GPU images), the probe names them; set CUDA_CMAKE_ARGS to override
  CUDA_CMAKE_ARGS ?= $(shell scripts/cuda-cmake-args.sh 2>/dev/null)
  GGML_CMAKE += $(CUDA_CMAKE_ARGS)
  TNN_CFLAGS += -DTNN_HAVE_CUDA
endif
ifeq ($(UNAME_S),Darwin)
  GGML_TAG   := metal
  GGML_CMAKE += -DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON
  TNN_CFLAGS += -DTNN_HAVE_METAL
  TNN_SYS_LIBS := -framework Foundation -framework Metal -framework MetalKit -framework Accelerate
endif
GGML_BUILD_DIR := $(BUILD)/ggml-$(GGML_TAG)
GGML_LIBS   := $(GGML_BUILD_DIR)/ggml/src/libggml.a $(GGML_BUILD_DIR)/ggml/src/libggml-cpu.a \
               $(GGML_BUILD_DIR)/ggml/src/libggml-base.a
ifeq ($(CUDA),1)
  GGML_LIBS  += $(GGML_BUILD_DIR)/ggml/src/ggml-cuda/libggml-cuda.a
endif
ifeq ($(UNAME_S),Darwin)
  GGML_LIBS  += $(GGML_BUILD_DIR)/ggml/src/ggml-metal/libggml-metal.a $(GGML_BUILD_DIR)/ggml/src/ggml-blas/libggml-blas.a
  LINK_GROUP  = $(GGML_LIBS)
else
  LINK_GROUP  = -Wl,--start-group $(GGML_LIBS) -Wl,--end-group
endif

TNN_SRCS    := $(wildcard libtinynn/*.c)
TNN_HDRS    := $(wildcard libtinynn/*.h)
TNN_SO      := toy_llm/tinynn/libtinynn.so
FFI_STAMP   := $(BUILD)/.ffi-stamp
MODEL_DIR   := models
SMOLLM2     := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3      := $(MODEL_DIR)/gemma-3-270m-q4_k_m.gguf

.PHONY: all venv ggml lib ffi pyc test demo bench clean distclean models oracle asan fuzz

all: $(VENV)/.installed $(FFI_STAMP) pyc

# ---- python environment -------------------------------------------------
$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "cffi>=1.15" "numpy>=1.24" "gguf>=0.10" "regex>=2023.0" "jinja2>=3.1" "tqdm>=4.60" "setuptools>=70" wheel
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# byte-compile the package, as pip does when it installs one: the editable install leaves that to
# the first import, and where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every new
# process would compile ~25 modules again, 0.1-0.15 s of start-up (README, "Speed")
pyc: $(VENV)/.installed
	$(VPY) -m compileall -q toy_llm > /dev/null

# ---- ggml from the pinned sdist ------------------------------------------
$(SDIST_TGZ): | $(VENV)/.base
	mkdir -p $(BUILD)
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(SDIST_VER) -d $(BUILD)
	echo "$(SDIST_SHA)  $@" | sha256sum -c - || (rm -f $@; exit 1)
	touch $@

$(SDIST_DIR)/.extracted: $(SDIST_TGZ)
	tar -xzf $< -C $(BUILD)
	touch $@

$(GGML_BUILD_DIR)/.built: $(SDIST_DIR)/.extracted
	cmake -S $(LLAMA_DIR) -B $(GGML_BUILD_DIR) $(GGML_CMAKE) > $(BUILD)/cmake-$(GGML_TAG).log
	cmake --build $(GGML_BUILD_DIR) --target ggml -j $(JOBS)
	touch $@

ggml: $(GGML_BUILD_DIR)/.built

# ---- libtinynn + cffi ------------------------------------------------------
# one stamp per backend flavour: switching `make` <-> `make CUDA=1` relinks the library
FLAVOR_STAMP := $(BUILD)/.tnn-flavor-$(GGML_TAG)
$(FLAVOR_STAMP):
	mkdir -p $(BUILD)
	rm -f $(BUILD)/.tnn-flavor-*
	touch $@

# the system libraries a backend needs (CUDA: the exact files CMake found for ggml-cuda)
SYS_LIBS_TXT := $(BUILD)/sys-libs-$(GGML_TAG).txt
$(SYS_LIBS_TXT): $(GGML_BUILD_DIR)/.built libtinynn/cuda-libs.sh
ifeq ($(CUDA),1)
	sh libtinynn/cuda-libs.sh $(GGML_BUILD_DIR)/CMakeCache.txt > $@
else
	echo "$(TNN_SYS_LIBS)" > $@
endif

# -z defs (ELF): a library missing from the link fails here, not at load time
LINK_DEFS   := $(if $(filter Darwin,$(UNAME_S)),,-Wl,-z,defs)
$(TNN_SO): $(TNN_SRCS) $(TNN_HDRS) $(GGML_BUILD_DIR)/.built $(FLAVOR_STAMP) $(SYS_LIBS_TXT)
	$(CC) $(TNN_CFLAGS) -shared $(TNN_SRCS) -o $@ $(LINK_GROUP) $$(cat $(SYS_LIBS_TXT)) -lstdc++ -lm -lpthread $(LINK_DEFS)

lib: $(TNN_SO)

$(FFI_STAMP): $(TNN_SO) libtinynn/tinynn.h toy_llm/tinynn/_ffi_build.py $(VENV)/.installed
	$(VPY) toy_llm/tinynn/_ffi_build.py
	touch $@

ffi: $(FFI_STAMP)

# ---- models ---------------------------------------------------------------
$(SMOLLM2): | $(VENV)/.base
	$(VPY) -m toy_llm.fetch smollm2 --dest $(MODEL_DIR)

$(GEMMA3): | $(VENV)/.base
	$(VPY) -m toy_llm.fetch gemma3-270m --dest $(MODEL_DIR)

models: $(SMOLLM2) $(GEMMA3)

# ---- tests, demo, bench -----------------------------------------------------
$(VENV)/.oracle: $(VENV)/.base tests/requirements-oracle.txt
	$(PIP) install -q "pytest>=7" "hypothesis>=6" "matplotlib>=3.7" diskcache typing-extensions
	$(PIP) install --no-deps --require-hashes -r tests/requirements-oracle.txt
	touch $@

oracle: $(VENV)/.oracle

test: all $(VENV)/.oracle $(SMOLLM2) $(GEMMA3)
	$(VPY) -m pytest -q tests

demo: all $(SMOLLM2)
	$(VPY) -m toy_llm generate "The capital of France is" -n 24

bench: all $(VENV)/.oracle $(SMOLLM2)
	$(VPY) -m toy_llm bench -m $(SMOLLM2) $(BENCH_ARGS)

FUZZ_N       ?= 20000
FUZZ_SEED    ?= 0
FUZZ_MODEL_N ?= 300
fuzz: all $(SMOLLM2)
	$(VPY) -m toy_llm.testing.gguf_fuzz --n $(FUZZ_N) --seed $(FUZZ_SEED) --model $(SMOLLM2) --n-model $(FUZZ_MODEL_N)

# ---- sanitizers ---------------------------------------------------------------
# ggml and libtinynn built with ASan + UBSan into their own folders (the normal build is untouched), loaded
# by the binding in ABI mode. Python itself is not instrumented, so the runtimes are LD_PRELOADed; the
# child processes the tests spawn inherit all of this and run sanitized too. ASan writes each report to
# $(ASAN_REPORTS).<pid> and the recipe fails if such a file exists, even where no test checks the exit
# status of the process that had it. UBSan (a runtime of its own with GCC, which ignores log_path) prints to
# stderr and aborts that process (SIGABRT), which fails the test that ran it. detect_leaks=0: CPython
# "leaks" at exit (leaks are issue 11's RSS test). allocator_may_return_null=1: a too-large allocation
# fails as it does in libc (NULL; the shim reports it) instead of being an ASan error; ASan still notes it
# with a WARNING, which the recipe prints but does not count as a report.
ASAN_GGML_DIR := $(BUILD)/ggml-asan
ASAN_DIR    := $(BUILD)/asan
ASAN_SO     := $(ASAN_DIR)/libtinynn.so
ASAN_GGML_LIBS := $(ASAN_GGML_DIR)/ggml/src/libggml.a $(ASAN_GGML_DIR)/ggml/src/libggml-cpu.a \
               $(ASAN_GGML_DIR)/ggml/src/libggml-base.a
# -O1 -g1: fast enough for the tests, line numbers in reports; no recovery: the first finding stops the process
SAN_FLAGS   := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
SAN_OPT     := -O1 -g1
# ggml only: its GGUF reader stores a file's type id in an enum before range-checking it; that one check is
# recoverable so libtinynn/ubsan.supp can name it (the file says why it is benign). It still halts elsewhere.
SAN_GGML_FLAGS := $(SAN_FLAGS) -fsanitize-recover=enum
SAN_SUPP    := $(abspath libtinynn/ubsan.supp)
ASAN_REPORTS := $(abspath $(ASAN_DIR))/reports/san
ASAN_RT     = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)
ASAN_OPTS   := detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$(ASAN_REPORTS)
UBSAN_OPTS  := halt_on_error=1:abort_on_error=1:print_stacktrace=1:suppressions=$(SAN_SUPP)
ASAN_ENV    = TINYNN_FFI=abi TINYNN_LIB=$(abspath $(ASAN_SO)) LD_PRELOAD="$(ASAN_RT)" ASAN_OPTIONS=$(ASAN_OPTS) \
              UBSAN_OPTIONS=$(UBSAN_OPTS)
# the hypothesis tests run their full example counts (TNN_TEST_EXAMPLES scales them; README, "Sanitizers")
ASAN_EXAMPLES ?= 1
# the fuzz file whole: its corpus, the hypothesis mutations, and a mutation campaign of ASAN_FUZZ_N files
ASAN_FUZZ_N ?= 500
ASAN_TESTS  := tests/test_ops.py tests/test_errors.py tests/test_gguf_meta.py tests/test_gguf_fuzz.py
# --capture=sys: pytest captures Python's output only, so a report the runtime writes to fd 2 in this
# process is not lost when the process aborts
ASAN_PYTEST = $(ASAN_ENV) TNN_TEST_EXAMPLES=$(ASAN_EXAMPLES) TNN_FUZZ_N=$(ASAN_FUZZ_N) \
              $(VPY) -m pytest -q -p no:cacheprovider --capture=sys

$(ASAN_GGML_DIR)/.built: $(SDIST_DIR)/.extracted Makefile
	cmake -S $(LLAMA_DIR) -B $(ASAN_GGML_DIR) $(GGML_CMAKE_CPU) -DGGML_SANITIZE_ADDRESS=ON \
	  -DGGML_SANITIZE_UNDEFINED=ON -DCMAKE_C_FLAGS_RELEASE="$(SAN_OPT) -DNDEBUG" \
	  -DCMAKE_CXX_FLAGS_RELEASE="$(SAN_OPT) -DNDEBUG" -DCMAKE_C_FLAGS="$(SAN_GGML_FLAGS)" \
	  -DCMAKE_CXX_FLAGS="$(SAN_GGML_FLAGS)" > $(BUILD)/cmake-asan.log
	cmake --build $(ASAN_GGML_DIR) --target ggml -j $(JOBS)
	touch $@

$(ASAN_SO): $(TNN_SRCS) $(TNN_HDRS) $(ASAN_GGML_DIR)/.built
	mkdir -p $(ASAN_DIR)
	$(CC) $(filter-out -O2,$(TNN_CFLAGS_CPU)) $(SAN_OPT) $(SAN_FLAGS) -shared $(TNN_SRCS) -o $@ \
	  -Wl,--start-group $(ASAN_GGML_LIBS) -Wl,--end-group -lstdc++ -lm -lpthread $(LINK_DEFS)

asan: $(ASAN_SO) $(VENV)/.installed $(VENV)/.oracle
	rm -rf $(dir $(ASAN_REPORTS)) && mkdir -p $(dir $(ASAN_REPORTS))
	$(ASAN_ENV) $(VPY) -c "from toy_llm import tinynn as t; assert t.MODE == 'abi' and \
	  t.LIB_PATH.samefile('$(ASAN_SO)'), (t.MODE, t.LIB_PATH); print('make asan: binding loads', t.LIB_PATH)"
	@start=$$(date +%s); $(ASAN_PYTEST) $(ASAN_TESTS); rc=$$?; \
	  echo "make asan: sanitized tests took $$(( $$(date +%s) - start )) s"; \
	  if ls $(ASAN_REPORTS).* >/dev/null 2>&1; then cat $(ASAN_REPORTS).*; fi; \
	  if grep -qs "ERROR: " $(ASAN_REPORTS).*; then \
	    echo "make asan: FAILED, sanitizer report(s) above (kept in $(dir $(ASAN_REPORTS)))"; exit 1; fi; \
	  [ $$rc = 0 ] || echo "make asan: FAILED (pytest exit $$rc; UBSan reports are in the failing tests' output)"; \
	  exit $$rc

clean:
	rm -rf $(TNN_SO) toy_llm/tinynn/_tinynn_api*.so $(FFI_STAMP) $(BUILD)/cffi

distclean: clean
	rm -rf $(BUILD) $(VENV) $(MODEL_DIR)
