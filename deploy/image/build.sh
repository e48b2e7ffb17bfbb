#!/usr/bin/env bash
# Builds the `muster:latest` image from the release binary: a root filesystem with
# the binary, the shared libraries `ldd` lists for it, a non-root user and a data
# directory, then `docker build` on `FROM scratch`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
# MUSTER_BIN picks a binary already built (e.g. target/debug/muster in CI).
if [ -n "${MUSTER_BIN:-}" ]; then
    bin="$(cd "$root" && realpath "$MUSTER_BIN")"
else
    [ "${SKIP_CARGO_BUILD:-0}" = 1 ] || cargo build --release -p muster
    bin="$root/target/release/muster"
fi
ctx="$root/target/image"
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/data"
touch "$ctx/data/.muster-data"
cp "$bin" "$ctx/rootfs/usr/bin/muster"
# Every library the binary loads, and the dynamic loader, at their own paths.
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/.*ld-linux/{print $1}' | sort -u | while read -r lib; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done
echo "muster:x:10001:10001:muster:/var/lib/muster:/sbin/nologin" > "$ctx/rootfs/etc/passwd"
echo "muster:x:10001:" > "$ctx/rootfs/etc/group"
cp deploy/image/Dockerfile "$ctx/Dockerfile"
# /tmp world-writable; the data directory is handed to the muster user by the
# Dockerfile (COPY --chown).
chmod 1777 "$ctx/rootfs/tmp"
docker build -q -t muster:latest "$ctx"
echo "built image muster:latest ($(docker image inspect muster:latest --format '{{.Size}}') bytes)"
