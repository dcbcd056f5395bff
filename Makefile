# cim: `make run` starts a standalone node, `make test` runs every test
# (bringing up Redis and ZooKeeper itself).  `make help` lists the rest.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export CIM_REDIS_PORT ?= 16379
export CIM_ZK_PORT ?= 12181
export CIM_TEST_REDIS ?= redis://127.0.0.1:$(CIM_REDIS_PORT)/0
export CIM_TEST_ZK ?= zk://127.0.0.1:$(CIM_ZK_PORT)/cim
PROTOC := $(BIN)/python -m grpc_tools.protoc

.PHONY: help install test unit proto proto-check lint typecheck services-up \
	services-down run demo cluster cluster-down bench bench-quick soak fuzz clean \
	dev-certs sim screenshot

help:
	@echo "make run          start a standalone cim node (route :8083, server :11211, WebSocket :8084)"
	@echo "make test         install, start Redis and ZooKeeper, run all tests, stop them"
	@echo "make unit         the tests that need no Redis or ZooKeeper"
	@echo "make demo         two scripted clients chat through a standalone node"
	@echo "make cluster      Redis, ZooKeeper, one route, two servers (make cluster-down)"
	@echo "make bench        the benchmark (bench-quick: a short run)"
	@echo "make soak         the soak test: 2,000 clients, 10 minutes (SOAK_ARGS=--quick: 200, 1 minute)"
	@echo "make fuzz         the frame/codec fuzzer (FUZZ_SECONDS, default 60)"
	@echo "make sim          the cluster simulator: SEEDS seeds (default 200) from FIRST; SEED=n: one, with its trace"
	@echo "make proto        regenerate the protobuf code (proto-check: fail if stale)"
	@echo "make screenshot   refresh docs/web-client.png from the browser test"
	@echo "make dev-certs    a development CA and certificates for localhost in .run/certs"
	@echo "make lint / typecheck / install / services-up / services-down"

install: $(STAMP)

# The pinned run-time and development packages (requirements-dev.txt
# includes requirements.txt), then cim itself, editable; `pip check` fails
# the install when the pins do not satisfy what cim declares.
$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e . --config-settings editable_mode=compat
	$(BIN)/python -m pip check
	touch $@

test: install
	scripts/services.sh up
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; scripts/services.sh down; exit $$rc

unit: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

services-up:
	scripts/services.sh up
	@scripts/services.sh env

services-down:
	scripts/services.sh down

proto: install
	$(PROTOC) -Iproto --python_out=cim/_proto --pyi_out=cim/_proto proto/cim.proto

proto-check: install
	@tmp=$$(mktemp -d); \
	$(PROTOC) -Iproto --python_out=$$tmp --pyi_out=$$tmp proto/cim.proto && \
	if diff -q $$tmp/cim_pb2.py cim/_proto/cim_pb2.py >/dev/null && \
	   diff -q $$tmp/cim_pb2.pyi cim/_proto/cim_pb2.pyi >/dev/null; then \
		echo "generated protobuf code is up to date"; rm -rf $$tmp; \
	else \
		echo "cim/_proto is stale: run 'make proto' and commit" >&2; rm -rf $$tmp; exit 1; \
	fi

lint: install
	$(BIN)/ruff check cim tests twisted scripts bench
	$(BIN)/ruff format --check cim tests twisted scripts bench

typecheck: install
	$(BIN)/mypy

run: install
	@echo "Starting a standalone cim node: route http://127.0.0.1:8083, server 127.0.0.1:11211, WebSocket ws://127.0.0.1:8084/"
	@echo "In a browser:         open http://127.0.0.1:8083/"
	@echo "In another terminal:  $(BIN)/twistd -n cim-client --user alice"
	@mkdir -p .run
	$(BIN)/twistd --pidfile=.run/standalone.pid -n cim-standalone

# A development CA and a certificate for localhost, 127.0.0.1 and ::1
# (README: "Running with TLS"); DEV_CERTS names another folder.
DEV_CERTS ?= .run/certs
dev-certs: install
	$(BIN)/python -m cim.devcerts $(DEV_CERTS)

clean:
	rm -rf .run build *.egg-info .pytest_cache .mypy_cache .ruff_cache

cluster: install
	scripts/cluster.sh up

cluster-down:
	scripts/cluster.sh down

demo: install
	$(BIN)/python scripts/demo.py

fuzz: install
	$(BIN)/python fuzz/fuzz_frames.py -max_total_time=$${FUZZ_SECONDS:-60}

# The deterministic cluster simulator (README: "The simulator").  A run
# depends on the order of sets of strings: PYTHONHASHSEED is fixed so that
# a seed reproduces exactly.  `make test` runs its CI budget
# (tests/test_sim.py).  SIM_ARGS: more options (--broken NAME, -v, --jobs).
SEEDS ?= 200
FIRST ?= 1
sim: install
	@if [ -n "$(SEED)" ]; then \
		PYTHONHASHSEED=0 $(BIN)/python -m cim.sim --seed $(SEED) $(SIM_ARGS); \
	else \
		PYTHONHASHSEED=0 $(BIN)/python -m cim.sim --seeds $(SEEDS) --first $(FIRST) $(SIM_ARGS); \
	fi

# README's screenshot of the web client, taken by its browser test.
screenshot: install
	CIM_WEB_SCREENSHOT=$(CURDIR)/docs/web-client.png $(BIN)/python -m pytest \
		tests/test_web.py -k two_pages_chat -p no:randomly -q

bench: install
	$(BIN)/python -m bench.harness

bench-quick: install
	$(BIN)/python -m bench.harness --quick

soak: install
	$(BIN)/python -m bench.soak $(SOAK_ARGS)
