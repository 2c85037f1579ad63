#!/usr/bin/env bash
# Proxy throughput: the example proxy with every layer and the JSONL audit log on, against the
# same proxy with `--no-policy`, both in front of the bundled mock upstream on loopback.
#
#   benches/load.sh                              # 4 rounds of 10 s, 64 connections
#   DURATION=30s CONNECTIONS=128 ROUNDS=6 benches/load.sh
#
# It builds the release binaries, starts the mock and both proxies on 127.0.0.1, runs wrk
# (installed with apt-get when absent and allowed) against each in turn, alternating
# (no-policy, policy, no-policy, policy, ...) so that drift on a shared machine hits both
# alike, and prints each run, the medians, and as its last line the ratios:
#   policy/no-policy requests per second (goal >= 0.95) and p99 latency (goal <= 1.1).
# Every request is a 2 KB chat completion with a valid key and an allowed model; a run with
# any non-2xx answer fails the script. Everything stops by itself; the processes it started
# are killed on exit.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-4}
MOCK_PORT=${MOCK_PORT:-19190}
POLICY_PORT=${POLICY_PORT:-19191}
OPEN_PORT=${OPEN_PORT:-19192}

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y wrk >/dev/null || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    else
        echo "wrk is not installed (apt-get install wrk)" >&2
        exit 2
    fi
fi

source "$(dirname "$0")/common.sh"

KEY=sk-load-test-key-0123456789abcdef
cat >"$work/proxy.toml" <<EOF
listen = "127.0.0.1:$POLICY_PORT"

[upstream]
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key_env = "LOAD_PROVIDER_KEY"

[audit]
jsonl = "$work/audit.jsonl"

[prompt_limits]
max_prompt_tokens = 100000
max_output_tokens = 4096

[[keys]]
name = "load"
secret = "$KEY"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]
blocked_features = ["images", "audio"]
EOF

# A ~2 KB chat request, as in benches/stack.rs.
text="Summarise the following notes for the weekly report, keeping every number. "
text4="$text$text$text$text"
messages=""
for i in 0 1 2 3 4 5; do
    role=user
    [ $((i % 2)) = 1 ] && role=assistant
    messages="$messages${messages:+,}{\"role\":\"$role\",\"content\":\"$text4\"}"
done
printf '{"model":"gpt-4o-mini-2024-07-18","messages":[%s],"temperature":0.3,"max_tokens":512,"user":"user-1234","stream":false}' \
    "$messages" >"$work/body.json"

cat >"$work/post.lua" <<EOF
local f = io.open("$work/body.json", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
EOF

"$target/release/mock_upstream" --listen "127.0.0.1:$MOCK_PORT" 2>"$work/mock.log" &
pids+=($!)
LOAD_PROVIDER_KEY=sk-provider-load "$target/release/proxy" --config "$work/proxy.toml" \
    2>"$work/policy.log" &
pids+=($!)
LOAD_PROVIDER_KEY=sk-provider-load "$target/release/proxy" --config "$work/proxy.toml" \
    --no-policy --listen "127.0.0.1:$OPEN_PORT" 2>"$work/open.log" &
pids+=($!)

wait_ready "$MOCK_PORT" "$POLICY_PORT" "$OPEN_PORT"
# Both answer the request (and the policy one admits it) before anything is measured.
for port in "$POLICY_PORT" "$OPEN_PORT"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' --data-binary @"$work/body.json" \
        "http://127.0.0.1:$port/v1/chat/completions")
    if [ "$code" != 200 ]; then
        echo "port $port answered $code to the benchmark request" >&2
        cat "$work/policy.log" >&2
        exit 1
    fi
done

# wrk's latency ("812.00us", "1.20ms", "2.01s") in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n *= 1; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n
    }'
}

run() { # name port -> "rps p99_ms"
    local out
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/post.lua" \
        "http://127.0.0.1:$2/v1/chat/completions")
    if grep -q "Non-2xx or 3xx responses" <<<"$out" || grep -q "Socket errors" <<<"$out"; then
        echo "$out" >&2
        echo "$1: errors during the run" >&2
        exit 1
    fi
    local rps p99
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$rps $(to_ms "$p99")"
}

median() { sort -g | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

: >"$work/open.txt"
: >"$work/policy.txt"
echo "wrk: $THREADS threads, $CONNECTIONS connections, $DURATION per run, $ROUNDS rounds (A/B alternating)"
for round in $(seq "$ROUNDS"); do
    open=$(run no-policy "$OPEN_PORT")
    policy=$(run policy "$POLICY_PORT")
    echo "$open" >>"$work/open.txt"
    echo "$policy" >>"$work/policy.txt"
    printf 'round %d: no-policy %8.0f req/s p99 %7.3f ms | policy %8.0f req/s p99 %7.3f ms\n' \
        "$round" $open $policy
done

open_rps=$(cut -d' ' -f1 "$work/open.txt" | median)
open_p99=$(cut -d' ' -f2 "$work/open.txt" | median)
policy_rps=$(cut -d' ' -f1 "$work/policy.txt" | median)
policy_p99=$(cut -d' ' -f2 "$work/policy.txt" | median)
records=$(wc -l <"$work/audit.jsonl" 2>/dev/null || echo 0)
echo "medians: no-policy $open_rps req/s p99 $open_p99 ms; policy $policy_rps req/s p99 $policy_p99 ms; audit records $records"
awk -v a="$policy_rps" -v b="$open_rps" -v c="$policy_p99" -v d="$open_p99" \
    'BEGIN { printf "ratio policy/no-policy: requests/s %.3f (goal >= 0.95), p99 %.3f (goal <= 1.1)\n", a / b, c / d }'
