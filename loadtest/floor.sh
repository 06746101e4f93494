#!/usr/bin/env bash
# floor.sh: CPU per request of nginx, abproxy and relay-floor (a bare tokio HTTP/1.1 relay),
# side by side, pinned as compare.sh pins them: the proxy alone on CPU 0, the load generator
# and two backends on CPU 1.
#
#   bash loadtest/floor.sh [ROUNDS]      (default 5; build first: cargo build --release --workspace)
#
# Each round runs the three proxies in turn (the order rotates between rounds), each started
# fresh: 1 s warm-up, then 5 s at max load and 5 s at 5000 req/s, 64 keep-alive connections.
# CPU is read from /proc/PID/task/*/schedstat (time on CPU in ns, user and kernel together),
# the user share from /proc/PID/stat (clock ticks). nginx: one worker, master included,
# `keepalive 64` as in compare.sh. abproxy: `run --config FILE` with its defaults.
# relay-floor sends every request to the first backend; the other two split 80/20.
# Prints one line per run and the medians; traffic stays on 127.0.0.1.
set -euo pipefail
LOG_TAG=floor
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
BIN=target/release
LT=$BIN/loadtest
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
for tool in "$BIN/abproxy" "$LT" "$BIN/loadtest-backend" "$BIN/relay-floor" "$NGINX"; do
    [[ -x $tool ]] || die "$tool is missing (cargo build --release --workspace)"
done

TMP=$(mktemp -d)
PIDS=()
# A failed run keeps its logs.
cleanup() {
    local status=$?
    kill "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    if ((status == 0)); then rm -rf "$TMP"; else log "logs kept in $TMP"; fi
}
trap cleanup EXIT

BACKEND=$BIN/loadtest-backend
start_backend control 18951
start_backend treatment 18952

split_abproxy_conf 18950 >"$TMP/abproxy.toml"
mkdir -p "$TMP/nginx"
split_nginx_conf 18950 "$TMP/nginx" >"$TMP/nginx/nginx.conf"

start() {
    case $1 in
        nginx) taskset -c 0 "$NGINX" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" \
            >"$TMP/$1.log" 2>&1 & ;;
        abproxy) RUST_LOG=warn taskset -c 0 "$BIN/abproxy" run --config "$TMP/abproxy.toml" \
            >"$TMP/$1.log" 2>&1 & ;;
        relay) taskset -c 0 "$BIN/relay-floor" --listen 127.0.0.1:18950 \
            --upstream 127.0.0.1:18951 >"$TMP/$1.log" 2>&1 & ;;
    esac
    PROXY=$!
    PIDS+=("$PROXY")
    wait_ready http://127.0.0.1:18950/ "$PROXY" "$1"
}

stop() {
    kill "$PROXY" 2>/dev/null || true
    stop_wait "$PROXY" 5
    forget_pid "$PROXY"
}

# "ns user_ticks total_ticks" of the proxy's processes (nginx: master and worker).
cpu() {
    local pids user system
    read -ra pids <<<"$PROXY $(children_of "$PROXY" | tr '\n' ' ')"
    read -r user system < <(cpu_ticks "${pids[@]}")
    echo "$(cpu_ns "${pids[@]}") $user $((user + system))"
}

answers() { sed -n 's/^ *"answers": \([0-9]*\),$/\1/p' "$1"; }

# Runs load "$@" and prints "ns_per_request user_share".
measure() {
    local before after
    before=$(cpu)
    taskset -c 1 "$LT" --url http://127.0.0.1:18950 --connections 64 --duration 5s -q --json \
        "$@" >"$TMP/run.json"
    after=$(cpu)
    awk -v b="$before" -v a="$after" -v n="$(answers "$TMP/run.json")" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        ticks = y[3] - x[3]
        printf "%.2f %.2f\n", (y[1] - x[1]) / n / 1000, (ticks > 0 ? (y[2] - x[2]) / ticks : 0) }'
}

PROXIES=(nginx abproxy relay)
for round in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        proxy=${PROXIES[(i + round) % 3]}
        start "$proxy"
        taskset -c 1 "$LT" --url http://127.0.0.1:18950 --connections 64 --duration 1s -q \
            >/dev/null
        read -r max_us max_user < <(measure --mode max)
        read -r rate_us rate_user < <(measure --mode rate --rate 5000)
        stop
        echo "$round $proxy $max_us $max_user $rate_us $rate_user" | tee -a "$TMP/rows"
    done
done

echo
echo "medians of $ROUNDS rounds: CPU µs per request (user share of it, from clock ticks)"
for proxy in "${PROXIES[@]}"; do
    awk -v p="$proxy" '$2 == p' "$TMP/rows" | python3 -c '
import statistics, sys
rows = [list(map(float, line.split()[2:])) for line in sys.stdin]
m = [statistics.median(column) for column in zip(*rows)]
print(f"{sys.argv[1]:8} max {m[0]:6.2f} µs (user {m[1] * 100:3.0f} %, {m[0] * m[1]:5.2f} µs)"
      f"   at 5000 req/s {m[2]:6.2f} µs (user {m[3] * 100:3.0f} %, {m[2] * m[3]:5.2f} µs)")' "$proxy"
done
