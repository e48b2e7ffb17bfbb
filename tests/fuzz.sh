#!/usr/bin/env bash
# Property-based fuzzing of network input and of `apply` (`make fuzz`).
#
# Each target runs MUSTER_FUZZ_CASES cases per pass (proptest, a fresh random seed
# each pass), and passes repeat until the target has run FUZZ_SECONDS (one pass when
# 0). Prints cases and seconds per target; stops at the first failure, which
# proptest prints with its minimal failing input.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=${FUZZ_CASES:-20000}
seconds=${FUZZ_SECONDS:-0}
targets=(
    "muster-chaos fuzz_network_input arbitrary_bytes_as_any_client_request_never_panic"
    "muster-chaos fuzz_network_input arbitrary_bytes_as_any_peer_message_never_panic"
    "muster-chaos fuzz_network_input arbitrary_registrations_are_accepted_only_when_valid"
    "muster-chaos fuzz_network_input arbitrary_keys_and_filters_are_accepted_only_when_valid"
    "muster-core apply_fuzz apply_survives_arbitrary_command_sequences"
)

cargo test --release -q -p muster-chaos --test fuzz_network_input --no-run
cargo test --release -q -p muster-core --test apply_fuzz --no-run

printf '%-58s %12s %8s\n' target cases seconds
for target in "${targets[@]}"; do
    read -r package test name <<<"$target"
    start=$(date +%s)
    passes=0
    while :; do
        MUSTER_FUZZ_CASES=$cases cargo test --release -q -p "$package" --test "$test" -- --exact "$name" >/dev/null 2>"target/fuzz-$name.log" \
            || { cat "target/fuzz-$name.log"; echo "FAILED: $name (see above)"; exit 1; }
        passes=$((passes + 1))
        elapsed=$(( $(date +%s) - start ))
        [ "$elapsed" -ge "$seconds" ] && break
    done
    printf '%-58s %12s %8s\n' "$name" "$((passes * cases))" "$elapsed"
done
