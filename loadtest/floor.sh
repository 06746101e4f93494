#!/usr/bin/env bash
# floor.sh: CPU per request of nginx, abproxy and relay-floor (a bare tokio HTTP/1.1 relay),
# side by side, pinned as compare.sh pins them: the proxy alone on CPU 0, the load generator
# and two backends on CPU 1.
#
#   bash loadtest/floor.sh [ROUNDS] [--perf]   (default 5; build first: cargo build --release --workspace)
#
# ABPROXY=PATH runs another abproxy binary (an earlier build, to compare) in abproxy's place.
# Each round runs the three proxies in turn (the order rotates between rounds), each started
# fresh: 1 s warm-up, then 5 s at max load and 5 s at 5000 req/s, 64 keep-alive connections.
# CPU is read from /proc/PID/task/*/schedstat (time on CPU in ns, user and kernel together),
# the user share from /proc/PID/stat (clock ticks: ~500 a proxy's run at max load, so a share
# is good to a few per cent). With --perf, the user share at max load is counted instead from
# `perf record -F 4999 -e cpu-clock` samples of the proxy (~20,000 a run; the sampling costs
# both proxies alike, ~1 % of a CPU). The run at 5000 req/s is not sampled: there, waking for
# each sample adds ~3.5 µs of kernel time a request. nginx: one worker, master included,
# `keepalive 64` as in compare.sh. abproxy: `run --config FILE` with its defaults.
# relay-floor sends every request to the first backend; the other two split 80/20.
# Prints one line per run and the medians; traffic stays on 127.0.0.1.
set -euo pipefail
LOG_TAG=floor
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
PERF=${2:-}
[[ -z $PERF || $PERF == --perf ]] || usage
BIN=target/release
LT=$BIN/loadtest
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
ABPROXY=${ABPROXY:-$BIN/abproxy}
for tool in "$ABPROXY" "$LT" "$BIN/loadtest-backend" "$BIN/relay-floor" "$NGINX"; do
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
        abproxy) RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$TMP/abproxy.toml" \
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

# The share of the samples in $1 (perf.data) taken in user space.
user_share() {
    perf report -i "$1" --stdio --sort dso -q 2>/dev/null | awk '
        { share = $1; sub(/%/, "", share); all += share; if ($2 ~ /^\[kernel/) kernel += share }
        END { printf "%.4f\n", (all > 0 ? 1 - kernel / all : 0) }'
}

# Runs load "$@" and prints "ns_per_request user_share"; with `sampled` first, the user share
# is perf's.
measure() {
    local before after sampler="" share=""
    if [[ $1 == sampled ]]; then
        shift
        perf record -F 4999 -e cpu-clock -q -o "$TMP/perf.data" \
            -p "$(echo "$PROXY" $(children_of "$PROXY") | tr ' ' ',')" 2>/dev/null &
        sampler=$!
        sleep 0.2
    fi
    before=$(cpu)
    taskset -c 1 "$LT" --url http://127.0.0.1:18950 --connections 64 --duration 5s -q --json \
        "$@" >"$TMP/run.json"
    after=$(cpu)
    if [[ -n $sampler ]]; then
        kill -INT "$sampler"
        wait "$sampler" 2>/dev/null || true
        share=$(user_share "$TMP/perf.data")
    fi
    awk -v b="$before" -v a="$after" -v n="$(answers "$TMP/run.json")" -v s="$share" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        ticks = y[3] - x[3]
        if (s == "") s = (ticks > 0 ? (y[2] - x[2]) / ticks : 0)
        printf "%.2f %.4f\n", (y[1] - x[1]) / n / 1000, s }'
}

PROXIES=(nginx abproxy relay)
for round in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        proxy=${PROXIES[(i + round) % 3]}
        start "$proxy"
        taskset -c 1 "$LT" --url http://127.0.0.1:18950 --connections 64 --duration 1s -q \
            >/dev/null
        read -r max_us max_user < <(measure ${PERF:+sampled} --mode max)
        read -r rate_us rate_user < <(measure --mode rate --rate 5000)
        stop
        echo "$round $proxy $max_us $max_user $rate_us $rate_user" | tee -a "$TMP/rows"
    done
done

echo
if [[ -n $PERF ]]; then
    shares="perf samples at max load, clock ticks at 5000 req/s"
else
    shares="clock ticks"
fi
echo "medians of $ROUNDS rounds: CPU µs per request (user share of it, from $shares)"
for proxy in "${PROXIES[@]}"; do
    awk -v p="$proxy" '$2 == p' "$TMP/rows" | python3 -c '
import statistics, sys
rows = [list(map(float, line.split()[2:])) for line in sys.stdin]
m = [statistics.median(column) for column in zip(*rows)]
print(f"{sys.argv[1]:8} max {m[0]:6.2f} µs (user {m[1] * 100:3.0f} %, {m[0] * m[1]:5.2f} µs)"
      f"   at 5000 req/s {m[2]:6.2f} µs (user {m[3] * 100:3.0f} %, {m[2] * m[3]:5.2f} µs)")' "$proxy"
done
python3 - "$TMP/rows" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    round_, proxy, max_us, max_user, rate_us, rate_user = line.split()
    max_us, max_user, rate_us, rate_user = map(float, (max_us, max_user, rate_us, rate_user))
    runs.setdefault(round_, {})[proxy] = {
        "user CPU at max load": max_us * max_user,
        "CPU at max load": max_us,
        "CPU at 5000 req/s": rate_us,
    }
print("abproxy / nginx per request, per round:")
for what in next(iter(runs.values()))["abproxy"]:
    ratios = [r["abproxy"][what] / r["nginx"][what] for r in runs.values()
              if r.get("nginx", {}).get(what)]
    if ratios:
        print(f"  {what}: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.2f}×)")
PY
