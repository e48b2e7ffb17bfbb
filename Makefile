# Muster: a Raft-replicated service registry.
CARGO ?= cargo

.PHONY: dev build release test lint fmt chaos fuzz bench bench-micro image compose-test clean

## Build and start a three-node cluster on loopback (Ctrl-C stops it).
dev:
	$(CARGO) build --release -p muster
	./target/release/muster dev

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release -p muster

## Every test: unit, property, in-process cluster and multi-process fault tests.
test:
	$(CARGO) build -p muster
	$(CARGO) test --workspace --no-fail-fast

## Formatting, clippy with warnings as errors, docs.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

fmt:
	$(CARGO) fmt --all

## Fault suite: ROUNDS rounds of random faults (kill, pause, partition, restart,
## membership change, clock jump/drift) under load, checked for linearizability.
## SEED=n replays from a seed; FAULTS=kill-leader,pause picks faults.
ROUNDS ?= 20
SEED ?=
FAULTS ?=
chaos:
	$(CARGO) build --release -p muster -p muster-chaos
	./target/release/muster-chaos --bin ./target/release/muster --rounds $(ROUNDS) $(if $(SEED),--seed $(SEED)) $(if $(FAULTS),--faults $(FAULTS))

## Property-based fuzzing of network input and of apply: FUZZ_CASES cases per pass,
## passes repeated per target until FUZZ_SECONDS have gone by (make fuzz FUZZ_SECONDS=600).
FUZZ_CASES ?= 20000
FUZZ_SECONDS ?= 0
fuzz:
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SECONDS=$(FUZZ_SECONDS) ./tests/fuzz.sh

## Muster vs etcd side by side (installs etcd-server if missing); writes BENCHMARKS.md.
## One workload or system: make bench ARGS="--workload discover --system muster"
bench:
	@command -v etcd >/dev/null || (apt-get update -q && apt-get install -y -q etcd-server)
	@command -v protoc >/dev/null && test -f /usr/include/google/protobuf/descriptor.proto \
		|| (apt-get update -q && apt-get install -y -q protobuf-compiler libprotobuf-dev)
	$(CARGO) build --release -p muster -p muster-bench
	./target/release/muster-bench $(ARGS)

## Criterion micro-benchmarks of the core (apply, index lookup).
bench-micro:
	$(CARGO) bench -p muster-core

## The container image (FROM scratch, no registry needed).
image:
	deploy/image/build.sh

## Three containers with docker-compose: register, fail over, partition, heal.
compose-test:
	deploy/compose-test.sh

clean:
	$(CARGO) clean
