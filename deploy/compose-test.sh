#!/usr/bin/env bash
# Brings up deploy/docker-compose.yml (three Muster containers), then checks:
# registration and discovery through every node, writes continuing with the
# leader's container stopped, the leader catching up after it starts again, and a
# node cut off with `docker network disconnect` catching up after reconnecting.
# Tears everything down at the end. Without a Docker engine it says so and skips
# (or fails, with MUSTER_REQUIRE_DOCKER=1).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "SKIPPED: compose test: no Docker engine reachable"
    [ "${MUSTER_REQUIRE_DOCKER:-0}" = 1 ] && exit 1
    exit 0
fi
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose -p musterct -f deploy/docker-compose.yml)
else
    compose=(docker compose -p musterct -f deploy/docker-compose.yml)
fi
[ "${SKIP_IMAGE_BUILD:-0}" = 1 ] || deploy/image/build.sh
M=${MUSTER_BIN:-./target/release/muster}
checks=0
check() { checks=$((checks + 1)); echo "ok $checks - $*"; }
fail() { echo "FAILED: $*"; "${compose[@]}" logs --tail 50 || true; exit 1; }

cleanup() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap '[ "${KEEP_COMPOSE:-0}" = 1 ] || cleanup' EXIT
cleanup
"${compose[@]}" up -d
addrs=(127.0.0.1:7100 127.0.0.1:7101 127.0.0.1:7102)

# Waits until `cmd` succeeds, up to $1 seconds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}
status_field() { $M --addr "$1" --json cluster status | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["status"]; v=s.get(sys.argv[1]); print(v if v else "")' "$2"; }
leader_of() { status_field "$1" leader_id; }
has_leader() { [ -n "$(leader_of "$1")" ]; }
count_on() { $M --addr "$1" --json discover "$2" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["instances"]))'; }
digest_of() { status_field "$1" digest; }
count_is() { [ "$(count_on "$1" "$2" 2>/dev/null)" = "$3" ]; }
same_digest() { local d1 d2 d3; d1=$(digest_of "${addrs[0]}") && d2=$(digest_of "${addrs[1]}") && d3=$(digest_of "${addrs[2]}") && [ "$d1" = "$d2" ] && [ "$d2" = "$d3" ]; }

for a in "${addrs[@]}"; do wait_for 60 has_leader "$a" || fail "no leader seen from $a"; done
check "three containers formed a cluster with leader $(leader_of "${addrs[0]}")"

for i in 0 1 2; do
    $M --addr "${addrs[$i]}" register web --id "web-$i" --address "10.0.0.$i" --port 8080 >/dev/null || fail "register via ${addrs[$i]}"
done
for a in "${addrs[@]}"; do
    wait_for 10 count_is "$a" web 3 || fail "discover through $a"
done
check "registered through every node and discovered 3 instances through every node"

leader=$(leader_of "${addrs[0]}")
"${compose[@]}" stop "muster-$leader" >/dev/null
survivor=$(( leader % 3 ))
wait_for 20 has_leader "${addrs[$survivor]}" || fail "no new leader after stopping muster-$leader"
$M --addr "${addrs[$survivor]}" register web --id web-after-stop --address 10.0.1.1 --port 8080 >/dev/null || fail "write with the leader stopped"
check "stopped the leader's container (muster-$leader); new leader $(leader_of "${addrs[$survivor]}"); writes continue"

"${compose[@]}" start "muster-$leader" >/dev/null
wait_for 30 count_is "${addrs[$((leader - 1))]}" web 4 || fail "muster-$leader did not catch up"
wait_for 30 same_digest || fail "digests differ after restart"
check "started muster-$leader again; it caught up (same state digest on all three)"

victim=$(( (leader % 3) + 1 ))
container=$("${compose[@]}" ps -q "muster-$victim")
network=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$container" | awk '{print $1}')
docker network disconnect "$network" "$container"
other=$(( victim % 3 ))
wait_for 20 has_leader "${addrs[$other]}" || fail "no leader while muster-$victim is cut off"
$M --addr "${addrs[$other]}" register web --id web-during-cut --address 10.0.2.1 --port 8080 >/dev/null || fail "write while muster-$victim is cut off"
check "cut muster-$victim off the network; the other two keep taking writes"
docker network connect --alias "muster-$victim" "$network" "$container"
wait_for 30 count_is "${addrs[$((victim - 1))]}" web 5 || fail "muster-$victim did not catch up after reconnecting"
wait_for 30 same_digest || fail "digests differ after reconnecting"
check "reconnected muster-$victim; it caught up (same state digest on all three)"

echo "compose test passed: $checks checks"
