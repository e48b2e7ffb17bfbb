# Muster: a Raft-replicated service registry.
CARGO ?= cargo

.PHONY: dev build release test lint fmt chaos bench deny clean

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

clean:
	$(CARGO) clean
