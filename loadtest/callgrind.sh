#!/usr/bin/env bash
# callgrind.sh: instructions and atomic read-modify-writes per request, under valgrind's
# callgrind, of abproxy, nginx or relay-floor on the split (as floor.sh runs them).
#
#   bash loadtest/callgrind.sh abproxy|nginx|relay   (build first: cargo build --release --workspace)
#
# Counts, not seconds: the same binary and load give the same figures on a busy machine
# (within a few hundred instructions: how often a socket is found not ready varies).
# The proxy runs under callgrind with instrumentation off; 2,000 requests on 16 keep-alive
# connections warm it up, then instrumentation is on for 20,000 more. Instructions: every
# instruction the process ran, over the answers (a run with errors is refused). Atomic
# read-modify-writes: executions of `lock`-prefixed instructions and of `xchg` with memory
# (callgrind's per-instruction counts, matched against objdump), with the functions that ran
# most of them. Under valgrind, SHA-256 runs in software (~3,500 instructions of abproxy's
# count); the CPU's SHA extensions take a few hundred. Needs valgrind, objdump (binutils),
# curl and python3.
set -euo pipefail
LOG_TAG=callgrind
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."

PROXY=${1:-abproxy}
REQUESTS=20000
BIN=target/release
LT=$BIN/loadtest
for tool in valgrind callgrind_control objdump python3 curl; do
    have "$tool" || die "$tool is missing"
done
for tool in "$BIN/abproxy" "$LT" "$BIN/loadtest-backend" "$BIN/relay-floor"; do
    [[ -x $tool ]] || die "$tool is missing (cargo build --release --workspace)"
done

TMP=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

BACKEND=$BIN/loadtest-backend
start_backend control 18961
start_backend treatment 18962

case $PROXY in
    abproxy)
        split_abproxy_conf 18960 >"$TMP/abproxy.toml"
        COMMAND=("$BIN/abproxy" run --config "$TMP/abproxy.toml")
        export RUST_LOG=warn
        ;;
    nginx)
        mkdir -p "$TMP/nginx"
        split_nginx_conf 18960 "$TMP/nginx" "master_process off;" >"$TMP/nginx/nginx.conf"
        COMMAND=("$(command -v nginx || echo /usr/sbin/nginx)" -c "$TMP/nginx/nginx.conf")
        ;;
    relay)
        COMMAND=("$BIN/relay-floor" --listen 127.0.0.1:18960 --upstream 127.0.0.1:18961)
        ;;
    *) die "usage: callgrind.sh abproxy|nginx|relay" ;;
esac

valgrind --tool=callgrind --instr-atstart=no --dump-instr=yes \
    --callgrind-out-file="$TMP/callgrind.out" "${COMMAND[@]}" >"$TMP/proxy.log" 2>&1 &
VALGRIND=$!
PIDS+=("$VALGRIND")
answering=0
for _ in $(seq 120); do
    if curl -fs -o /dev/null -H 'x-user-id: probe' http://127.0.0.1:18960/; then
        answering=1
        break
    fi
    sleep 0.5
done
if ((!answering)); then
    cat "$TMP/proxy.log" >&2
    die "$PROXY did not answer under valgrind (its output above)"
fi

load() {
    "$LT" --url http://127.0.0.1:18960 --requests "$1" --connections 16 -q --json >"$TMP/load.json"
}
load 2000
callgrind_control -i on "$VALGRIND" >/dev/null
load "$REQUESTS"
# Per request means per answer: a run with errors is not a run of this proxy's path.
ANSWERS=$(sed -n 's/^ *"answers": \([0-9]*\),$/\1/p' "$TMP/load.json")
ERRORS=$(sed -n 's/^ *"errors_total": \([0-9]*\),$/\1/p' "$TMP/load.json")
if [[ -z $ANSWERS || $ANSWERS -eq 0 || ${ERRORS:-1} -ne 0 ]]; then
    die "the measured run had ${ERRORS:-?} errors in ${ANSWERS:-?} answers"
fi
callgrind_control -i off "$VALGRIND" >/dev/null
callgrind_control -d "$VALGRIND" >/dev/null
sleep 1
kill "$VALGRIND"
wait "$VALGRIND" 2>/dev/null || true

python3 - "$PROXY" "$ANSWERS" "$TMP"/callgrind.out* <<'PY'
import collections, re, subprocess, sys

proxy, requests, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = collections.Counter()  # (object, address) -> executions
instructions = 0

def position(token, last):
    if token == "*":
        return last
    if token[0] in "+-":
        return last + int(token, 0)
    return int(token, 0)

for path in files:
    objects, current, address, after_call = {}, None, 0, False
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        if line.startswith(("ob=", "cob=")):
            match = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
            if match.group(2):
                objects[match.group(1)] = match.group(2)
            if line.startswith("ob="):
                current = objects[match.group(1)]
            continue
        if line.startswith("calls="):
            after_call = True  # the next line is the call's inclusive cost
            continue
        if line[0] in "0123456789+-*":
            fields = line.split()
            address = position(fields[0], address)
            if after_call:
                after_call = False
            elif len(fields) >= 3:
                runs[(current, address)] += int(fields[2])
                instructions += int(fields[2])

atomics, by_function = 0, collections.Counter()
for obj in {obj for obj, _ in runs if obj and obj.startswith("/")}:
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", obj],
                             capture_output=True, text=True).stdout
    function = "?"
    for line in listing.splitlines():
        match = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if match:
            function = match.group(2)
            continue
        match = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if not match:
            continue
        text = match.group(2)
        if text.startswith("lock ") or (text.startswith("xchg") and "(" in text):
            count = runs.get((obj, int(match.group(1), 16)), 0)
            if count:
                atomics += count
                by_function[(obj.rsplit("/", 1)[-1], function)] += count

print(f"{proxy}: {instructions / requests:,.0f} instructions and "
      f"{atomics / requests:.1f} atomic read-modify-writes a request ({requests:,} requests)")
for (obj, function), count in by_function.most_common(20):
    if count / requests >= 0.05:
        print(f"  {count / requests:6.2f}  {obj}: {function[:100]}")
PY
