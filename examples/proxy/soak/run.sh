#!/bin/sh
# The proxy's soak: builds the release binaries and runs `soak` (src/bin/soak.rs), which starts
# the mock upstream and the proxy on loopback, keeps 500 connections busy for 5 minutes with
# allowed, blocked and streamed requests, and reports unexpected errors, the proxy's RSS at the
# start and the end, and whether every request left exactly one audit record.
#
#   examples/proxy/soak/run.sh                       # 5 minutes, 500 connections
#   examples/proxy/soak/run.sh --duration 30s --connections 100
#
# Exits 0 if the soak passed. It stops by itself; everything runs on 127.0.0.1.
set -eu
root=$(cd "$(dirname "$0")/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
CARGO_TARGET_DIR=$target cargo build --release -p example-proxy --bins
exec "$target/release/soak" "$@"
