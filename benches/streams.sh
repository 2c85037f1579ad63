#!/usr/bin/env bash
# Stream memory of the example proxy, every layer and the JSONL audit log on, in front of the
# bundled mock upstream on loopback:
# - 1,000 SSE streams open at once: the proxy's RSS per stream (goal <= 16 KiB);
# - one streamed response of 1 GiB: the proxy's peak RSS (goal < 64 MiB).
#
#   benches/streams.sh
#   STREAMS=200 BIG_BYTES=268435456 benches/streams.sh
#   NO_POLICY=1 benches/streams.sh     # the same proxy with --no-policy: the floor
#
# Builds the release binaries, starts the mock and the proxy, runs `stream_memory`
# (examples/proxy/src/bin/stream_memory.rs), prints its two lines, and exits with its status.
# Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail

STREAMS=${STREAMS:-1000}
BIG_BYTES=${BIG_BYTES:-1073741824}
MOCK_PORT=${MOCK_PORT:-19390}
PROXY_PORT=${PROXY_PORT:-19391}

source "$(dirname "$0")/common.sh"
# Each stream is a client connection and an upstream connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

KEY=sk-streams-test-key-0123456789abcdef
cat >"$work/proxy.toml" <<EOF
listen = "127.0.0.1:$PROXY_PORT"

[upstream]
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "STREAMS_PROVIDER_KEY"
idle_timeout = "30s"

[server]
max_connections = $((STREAMS + 64))

[audit]
jsonl = "$work/audit.jsonl"

[[keys]]
name = "streams"
secret = "$KEY"
model_limits_enabled = true
model_limits = ["gpt-4o-mini"]
EOF

"$target/release/mock_upstream" --listen "127.0.0.1:$MOCK_PORT" 2>"$work/mock.log" &
pids+=($!)
STREAMS_PROVIDER_KEY=sk-provider-streams "$target/release/proxy" --config "$work/proxy.toml" \
    ${NO_POLICY:+--no-policy} >"$work/proxy.out" 2>"$work/proxy.log" &
proxy=$!
pids+=($proxy)
wait_ready "$MOCK_PORT" "$PROXY_PORT"

"$target/release/stream_memory" --url "http://127.0.0.1:$PROXY_PORT/v1" --key "$KEY" \
    --pid "$proxy" --streams "$STREAMS" --big-bytes "$BIG_BYTES"
