# clawbus — the two commands a newcomer needs: `make setup && make run`, and `make test`.
SHELL := /bin/bash
TOOLS := $(CURDIR)/.tools
export CLAWBUS_NATS_SERVER ?= $(TOOLS)/bin/nats-server
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)
space := $(subst ,, )

.PHONY: setup tools nats build release run run-release test test-cluster fuzz bench lint fmt clean up down

## Install what a fresh machine lacks (pinned nats-server, PostgreSQL for the store's
## tests, bubblewrap for the sandbox) and build. Idempotent.
setup: tools build

tools: nats
	@bash scripts/install-pytools.sh
	@bash scripts/install-postgres.sh
	@bash scripts/install-bwrap.sh
	@bash scripts/install-ngircd.sh
	@bash scripts/install-synapse.sh
	@bash scripts/install-cargo-fuzz.sh

## Running the suite needs only nats-server.
nats:
	@bash scripts/install-nats.sh

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

## Run the whole suite locally (nats-server + every service as its own process),
## from the binaries `make setup` built. `make run-release` uses an optimised build.
run: nats build
	PATH="$(TOOLS)/bin:$$PATH" $(TARGET_DIR)/debug/clawbus up

run-release: nats release
	PATH="$(TOOLS)/bin:$$PATH" $(TARGET_DIR)/release/clawbus up

## Every test: each fuzz target for a short while from its seed corpus; unit, wire
## fixtures, and end-to-end against real processes; then the end-to-end tests again
## with the store on Postgres (SQLite is the default).
SUITE_TESTS := e2e crash scale cli privilege openai_client tools
FUZZ_SECONDS ?= 15
test: tools build
	bash scripts/fuzz.sh $(FUZZ_SECONDS)
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --no-fail-fast
	CLAWBUS_TEST_DATABASE=postgres $(CARGO) nextest run -p clawbus-tests --no-fail-fast \
		-E '$(subst $(space),$(space)|$(space),$(foreach t,$(SUITE_TESTS),binary($(t))))'
else
	$(CARGO) test --workspace --no-fail-fast
	CLAWBUS_TEST_DATABASE=postgres $(CARGO) test -p clawbus-tests --no-fail-fast \
		$(foreach t,$(SUITE_TESTS),--test $(t))
endif

## The scale-out tests alone (replicas, fencing, a three-node NATS cluster losing a node).
test-cluster: tools build
	$(CARGO) nextest run -p clawbus-tests --test scale

## Every libFuzzer target for FUZZ_LONG seconds (default 300); `make fuzz
## FUZZ_LONG=3600 FUZZ_TARGETS=wire_decode` for one target longer.
FUZZ_LONG ?= 300
fuzz: tools
	bash scripts/fuzz.sh $(FUZZ_LONG) $(FUZZ_TARGETS)

## Drive N turns through the suite against the emulator and print the figures.
bench: tools release
	CLAWBUS_BIN_DIR=$(TARGET_DIR)/release $(TARGET_DIR)/release/clawbus-bench $(BENCH_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## The suite as containers (needs a Docker engine).
up:
	docker compose up -d --build

down:
	docker compose down

clean:
	$(CARGO) clean
