# Shared by benches/load.sh and benches/streams.sh (sourced, not run): builds the proxy
# package's release binaries, makes a work directory removed on exit, kills the processes
# whose pids are added to `pids` on exit, and waits for servers to answer.
#
# Sets: root (the repository), target (cargo's target directory), work (a fresh directory).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
cd "$root"
CARGO_TARGET_DIR=$target cargo build --release -p example-proxy --bins

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# wait_ready PORT...: waits (at most 10 s each) until each local server answers
# /healthz (the proxy) or /v1/models (the mock).
wait_ready() {
    local port
    for port in "$@"; do
        for _ in $(seq 100); do
            if curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null ||
                curl -fsS -o /dev/null "http://127.0.0.1:$port/v1/models" 2>/dev/null; then
                break
            fi
            sleep 0.1
        done
    done
}
