#!/usr/bin/env bash
# compare-tls.sh: TLS termination, abproxy (rustls) against nginx (OpenSSL), side by side.
#
# Usage: bash loadtest/compare-tls.sh [--duration 10s] [--repeats 3] [--quick]
#                                     [--handshake-clients 3] [--tuned]
#                                     [--port-base 18300] [--skip-build] [--keep]
#
#   --duration D           length of each measured run: N, Ns or Nm (default 10s)
#   --repeats N            measurements per proxy and scenario; the median is reported (default 3)
#   --quick                smoke test: --duration 3s --repeats 1
#   --handshake-clients K  openssl s_time processes of the parallel handshake scenario (default 3)
#   --tuned                also measure abproxy with `--threads 1` (labelled abproxy-t1)
#   --port-base P          loopback ports P+1 .. P+21 are used (default 18300)
#   --skip-build           use the release binaries already built
#   --keep                 keep the temp dir (certificate, configs, logs, every run's output);
#                          always kept on failure
#
# compare.sh's tls scenario now measures keep-alive HTTP/1.1 over TLS and new connections (full
# handshakes) with the project's own load generator (loadtest, a rustls client). This script
# stays for what loadtest cannot do: HTTP/2 over TLS (h2load) and handshakes by an OpenSSL client
# (s_time, which sends no request), with the same h1 and handshake runs beside them for
# comparison. It generates one ECDSA P-256 certificate, which both proxies present, starts two
# loadtest-backend processes (control and treatment, 80/20 split on x-user-id), and measures
# for each proxy (nginx: 1 worker; abproxy: `run` with no tuning flags)
#   h1   keep-alive HTTP/1.1 over TLS: h2load --h1, 64 connections, 1 request in flight each
#   h2   HTTP/2 over TLS (ALPN h2): h2load, 64 connections, 10 streams in flight each
#   hs1  new TLS connections, full handshakes: one `openssl s_time -new`
#   hsK  the same with K s_time processes in parallel
# Every client offers TLS 1.3 with TLS_AES_128_GCM_SHA256 only (h2load --tls13-ciphers, s_time
# -tls1_3 -ciphersuites) and an X25519 key share (h2load --groups X25519; s_time's default);
# nginx is also set to exactly that. The report shows what an openssl s_client negotiated.
# Session caches and tickets are off in nginx; s_time -new never resumes a session anyway.
#   rate     h2load's requests per second of its main phase (after a 1 s warm-up in the same
#            connections); s_time: handshakes over the wall time of the run
#   CPU      the proxy's utime+stime (/proc/PID/stat) over the measured phase, per request or
#            handshake, and the kernel (stime) part of it; nginx counts master and worker
# The proxy runs on CPU 0; the backends and the clients on CPU 1 (taskset). Each run has a
# fresh proxy; for every scenario and repetition the proxies run one after the other, the order
# alternating between repetitions. Everything listens on 127.0.0.1 only. A Markdown report goes
# to stdout, progress to stderr. With the defaults a run takes about 5 minutes (8 with --tuned);
# --quick about 1.
#
# Needs: cargo, taskset, curl, openssl, h2load (Debian nghttp2-client) and nginx (Debian
# nginx-light) with the ssl and http2 modules; h2load and nginx are installed with apt-get when
# missing and running as root.

set -euo pipefail

DURATION=10s
REPEATS=3
PORT_BASE=18300
SKIP_BUILD=0
KEEP=0
TUNED=0
HS_CLIENTS=3
CONNECTIONS=64
STREAMS=10
WARMUP_S=1
CIPHER=TLS_AES_128_GCM_SHA256
GROUP=X25519
USER_ID="user-42"
COMMAND_LINE="bash loadtest/compare-tls.sh"
(($# == 0)) || COMMAND_LINE+="$(printf ' %q' "$@")"

LOG_TAG=compare-tls
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while (($# > 0)); do
    case $1 in
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --repeats) REPEATS=${2:?--repeats needs a value}; shift 2 ;;
        --handshake-clients) HS_CLIENTS=${2:?--handshake-clients needs a value}; shift 2 ;;
        --port-base) PORT_BASE=${2:?--port-base needs a value}; shift 2 ;;
        --quick) DURATION=3s; REPEATS=1; shift ;;
        --tuned) TUNED=1; shift ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage 0 ;;
        *) printf 'unknown option: %s\n\n' "$1" >&2; usage 2 ;;
    esac
done

# Durations are whole seconds or minutes, so every run can be bounded with `timeout`.
if [[ $DURATION =~ ^([0-9]+)(s|m)?$ ]]; then
    DURATION_S=${BASH_REMATCH[1]}
    [[ ${BASH_REMATCH[2]} == m ]] && DURATION_S=$((DURATION_S * 60))
    DURATION=${DURATION_S}s
    ((DURATION_S > 0)) || die "--duration must be positive"
else
    die "--duration must look like 10, 10s or 2m, got $DURATION"
fi
if ! [[ $REPEATS =~ ^[0-9]+$ ]] || ((REPEATS == 0)); then
    die "--repeats must be a positive integer, got $REPEATS"
fi
if ! [[ $HS_CLIENTS =~ ^[0-9]+$ ]] || ((HS_CLIENTS < 2 || HS_CLIENTS > 16)); then
    die "--handshake-clients must be between 2 and 16, got $HS_CLIENTS"
fi
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65499)); then
    die "--port-base must be between 1024 and 65499, got $PORT_BASE"
fi
# EPOCHREALTIME (bash 5) times the handshake runs.
((BASH_VERSINFO[0] >= 5)) || die "needs bash 5 or later"

PORT_CONTROL=$((PORT_BASE + 1))
PORT_TREATMENT=$((PORT_BASE + 2))
PORT_NGINX=$((PORT_BASE + 10))
PORT_ABPROXY=$((PORT_BASE + 20))
PORT_ADMIN=$((PORT_BASE + 21))

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/abproxy-compare-tls.XXXXXX")
PIDS=()       # every long-lived child: backends and proxies
LOAD_PIDS=()  # the clients currently running, if any

# Stops the children on any exit, Ctrl-C included: TERM, up to 5 s, then KILL.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${LOAD_PIDS[@]}" "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${LOAD_PIDS[@]}" "${PIDS[@]}"; do
        stop_wait "$pid" 5
    done
    if ((rc == 130 || rc == 143)); then
        log "interrupted; certificate, configs and logs kept in $TMP"
    elif ((rc != 0)); then
        log "failed; certificate, configs and logs kept in $TMP"
    elif ((KEEP)); then
        log "certificate, configs, logs and run output kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Prerequisites and build

# Installs Debian package $1 when command $2 is missing and we may; fails otherwise.
need_package() {
    local package=$1 tool=$2
    have "$tool" && return 0
    [[ $tool == nginx && -x /usr/sbin/nginx ]] && return 0
    if ((EUID == 0)) && have apt-get; then
        log "$tool is missing: installing $package"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >&2
    else
        die "$tool is missing: install it (Debian: apt-get install $package)"
    fi
}
need_package nginx-light nginx
need_package nghttp2-client h2load
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found at $NGINX"
for tool in taskset curl getconf cargo openssl h2load timeout ss comm; do
    have "$tool" || die "$tool is missing"
done
"$NGINX" -V 2>&1 | grep -q -- --with-http_ssl_module || die "$NGINX has no ssl module"
"$NGINX" -V 2>&1 | grep -q -- --with-http_v2_module || die "$NGINX has no http2 module"
(($(nproc) >= 2)) || die "needs at least 2 CPUs (proxy on CPU 0, clients on CPU 1)"
CLK_TCK=$(getconf CLK_TCK)

cd "$REPO"
if ((!SKIP_BUILD)); then
    log "building release binaries (cargo build --release -p abproxy -p loadtest)"
    cargo build --release -p abproxy -p loadtest >&2
fi
TARGET_DIR=${CARGO_TARGET_DIR:-}
if [[ -z $TARGET_DIR ]]; then
    TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
fi
ABPROXY=$TARGET_DIR/release/abproxy
BACKEND=$TARGET_DIR/release/loadtest-backend
for bin in "$ABPROXY" "$BACKEND"; do
    [[ -x $bin ]] || die "$bin is missing (drop --skip-build?)"
done
# The code measured is the one built now: others may commit while the runs go on.
revision=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then revision+=" (uncommitted changes)"; fi
rustls_version=$(awk '/^name = "rustls"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' \
    "$REPO/Cargo.lock" 2>/dev/null || true)

for port in "$PORT_CONTROL" "$PORT_TREATMENT" "$PORT_NGINX" "$PORT_ABPROXY" "$PORT_ADMIN"; do
    ! port_in_use "$port" || die "127.0.0.1:$port is in use; pick other ports with --port-base"
done

# ---------------------------------------------------------------------------------------------
# Certificate: ECDSA P-256, self-signed, the same files for both proxies.

CERT=$TMP/cert.pem
KEY=$TMP/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
    -keyout "$KEY" -out "$CERT" >"$TMP/openssl-req.log" 2>&1 ||
    die "openssl req failed: $(head -c 500 "$TMP/openssl-req.log")"

# ---------------------------------------------------------------------------------------------
# Backends: one thread each, on CPU 1 with the clients.

start_backend control "$PORT_CONTROL"
start_backend treatment "$PORT_TREATMENT"
log "backends up on 127.0.0.1:$PORT_CONTROL-$PORT_TREATMENT"

# ---------------------------------------------------------------------------------------------
# Proxy configs: compare.sh's split, behind TLS.

NGINX_DIR=$TMP/nginx
NGINX_KEEPALIVE=1024
mkdir -p "$NGINX_DIR"
cat >"$NGINX_DIR/nginx.conf" <<EOF
# Generated by loadtest/compare-tls.sh.
worker_processes 1;
daemon off;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
worker_rlimit_nofile 16384;

events {
    worker_connections 8192;
}

http {
    access_log off;
    client_body_temp_path $NGINX_DIR/client_body;
    proxy_temp_path $NGINX_DIR/proxy;
    fastcgi_temp_path $NGINX_DIR/fastcgi;
    uwsgi_temp_path $NGINX_DIR/uwsgi;
    scgi_temp_path $NGINX_DIR/scgi;

    # nginx closes a keep-alive connection (HTTP/1.1 or HTTP/2) after 1000 requests by
    # default; abproxy does not.
    keepalive_requests 1000000;

    # Idle connections kept per upstream. compare.sh's 64 is enough for 64 requests in flight, but
    # the h2 scenario has $((CONNECTIONS * STREAMS)): with 64 nginx closed and reopened an upstream
    # connection for every other request there. abproxy opens at most 64 (below) and queues.
    upstream control {
        server 127.0.0.1:$PORT_CONTROL;
        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 1000000;
    }
    upstream treatment {
        server 127.0.0.1:$PORT_TREATMENT;
        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 1000000;
    }

    split_clients "\${http_x_user_id}" \$variant {
        80% control;
        *   treatment;
    }

    server {
        # backlog 1024: what abproxy's listener (tokio) asks for.
        listen 127.0.0.1:$PORT_NGINX ssl http2 backlog=1024;

$(nginx_tls)

        location / {
            proxy_pass http://\$variant;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header x-variant \$variant always;
        }
    }
}
EOF
"$NGINX" -t -q -e "$NGINX_DIR/error.log" -c "$NGINX_DIR/nginx.conf" >&2 ||
    die "nginx rejects its config"

ABPROXY_CONF=$TMP/abproxy.toml
cat >"$ABPROXY_CONF" <<EOF
# Generated by loadtest/compare-tls.sh: compare.sh's split, behind TLS.
[server]
listen = "127.0.0.1:$PORT_ABPROXY"
admin = "127.0.0.1:$PORT_ADMIN"
variant_header = "x-variant"

[server.tls]
cert = "$CERT"
key = "$KEY"

[limits]
shutdown_grace = "2s"
# As in compare.sh: each backend answers one request at a time, so more in flight only queue.
max_upstream_connections = 64

[assignment]
sources = ["header:x-user-id"]

[[variant]]
name = "control"
upstream = "http://127.0.0.1:$PORT_CONTROL"
weight = 80

[[variant]]
name = "treatment"
upstream = "http://127.0.0.1:$PORT_TREATMENT"
weight = 20
EOF
RUST_LOG=warn "$ABPROXY" check --config "$ABPROXY_CONF" >/dev/null || die "abproxy rejects its config"

# ---------------------------------------------------------------------------------------------
# Proxies: one at a time, on CPU 0.

PROXY_PID=""
PROXY_PORT=""
PROXY_PIDS=()  # the proxy's processes: abproxy is one; nginx is the master and its worker

# $1 proxy (nginx | abproxy | abproxy-t1)
start_proxy() {
    case $1 in
        nginx)
            taskset -c 0 "$NGINX" -e "$NGINX_DIR/error.log" -c "$NGINX_DIR/nginx.conf" \
                >>"$NGINX_DIR/stderr.log" 2>&1 &
            PROXY_PORT=$PORT_NGINX
            ;;
        abproxy)
            # The defaults: one worker thread per CPU it may run on, which is one here.
            RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$ABPROXY_CONF" \
                >>"$TMP/abproxy.log" 2>&1 &
            PROXY_PORT=$PORT_ABPROXY
            ;;
        abproxy-t1)
            RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$ABPROXY_CONF" --threads 1 \
                >>"$TMP/abproxy-t1.log" 2>&1 &
            PROXY_PORT=$PORT_ABPROXY
            ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_ready "https://127.0.0.1:$PROXY_PORT/predict" "$PROXY_PID" "$1"
    # Looked up once, so that reading the CPU counters at a phase boundary is quick.
    mapfile -t PROXY_PIDS < <(echo "$PROXY_PID"; children_of "$PROXY_PID")
}

stop_proxy() {
    # nginx: QUIT is a graceful stop. abproxy: TERM drains (shutdown_grace 2 s).
    local signal=TERM
    [[ $1 == nginx ]] && signal=QUIT
    kill "-$signal" "$PROXY_PID" 2>/dev/null || true
    stop_wait "$PROXY_PID" 10
    forget_pid "$PROXY_PID"
    PROXY_PID=""
    PROXY_PIDS=()
}

# CPU time of the proxy's processes in clock ticks: "user system" (utime, stime).
proxy_cpu_ticks() { cpu_ticks "${PROXY_PIDS[@]}"; }

# The TCP connections between a proxy and the backends now in TIME-WAIT, that is closed in the
# last minute: "local peer", sorted. Those new at the end of a phase were closed during it
# (counted by connection, unlike ActiveOpens, which other processes on the machine move too).
upstream_time_wait() {
    ss -Htan state time-wait "( sport = :$PORT_CONTROL or dport = :$PORT_CONTROL or \
        sport = :$PORT_TREATMENT or dport = :$PORT_TREATMENT )" | awk '{ print $3, $4 }' | sort
}

declare -A RESULTS=()  # "scenario/proxy/metric" -> space-separated values, one per repetition
declare -A NOTES=()    # "scenario/proxy" -> remarks
declare -A TLS_SEEN=() # "proxy" -> what the verification handshake negotiated
note() {
    NOTES[$1]="${NOTES[$1]:-}$2"$'\n'
    log "  warning: $1: $2"
}

# ---------------------------------------------------------------------------------------------
# What each proxy negotiates, seen once by openssl s_client with the clients' offer.

# $1 proxy: "protocol|cipher|key exchange|signature|ALPN|session tickets per handshake"
tls_parameters() {
    local out=$TMP/s_client-$1.txt protocol cipher group signature alpn tickets
    # The pause lets the server's post-handshake session tickets arrive before stdin closes.
    (sleep 0.5) | timeout 10 openssl s_client -connect "127.0.0.1:$PROXY_PORT" -tls1_3 \
        -ciphersuites "$CIPHER" -groups "$GROUP" -alpn h2,http/1.1 >"$out" 2>&1 || true
    read -r protocol cipher < <(sed -n 's/^New, \([^,]*\), Cipher is \(.*\)$/\1 \2/p' "$out" | head -n 1)
    group=$(sed -n 's/^Server Temp Key: //p' "$out" | head -n 1)
    signature=$(sed -n 's/^Peer signature type: //p' "$out" | head -n 1)
    alpn=$(sed -n 's/^ALPN protocol: //p' "$out" | head -n 1)
    tickets=$(grep -a -c 'New Session Ticket arrived' "$out" || true)
    [[ -n $cipher ]] || die "$1: no TLS handshake with openssl s_client; see $out"
    echo "${protocol:-?}|${cipher:-?}|${group:-?}|${signature:-?}|${alpn:-none}|${tickets:-0}"
}

# ---------------------------------------------------------------------------------------------
# The clients, on CPU 1, always bounded.

# $1 scenario (h1 | h2), $2 proxy, $3 repetition. h2load prints when its main phase starts and
# ends; the proxy's CPU counters are read at those two lines, so the connections' handshakes and
# the warm-up stay out of the figure.
measure_h2load() {
    local scenario=$1 proxy=$2 rep=$3 key=$1/$2 out=$TMP/$1-$2-$3.txt fifo=$TMP/h2load.fifo
    local line rc=0 u0="" s0="" u1="" s1="" closed rps done_ succeeded failed errored
    local protocol cipher group alpn want_alpn=http/1.1
    local args=(-c "$CONNECTIONS" -t 1 --warm-up-time "$WARMUP_S" -D "$DURATION_S"
        --tls13-ciphers "$CIPHER" --groups "$GROUP" -H "x-user-id: $USER_ID")
    if [[ $scenario == h1 ]]; then
        args+=(--h1)
    else
        args+=(-m "$STREAMS")
        want_alpn=h2
    fi
    rm -f "$fifo"
    mkfifo "$fifo"
    timeout -k 5 $((DURATION_S + WARMUP_S + 60)) taskset -c 1 h2load "${args[@]}" \
        "https://127.0.0.1:$PROXY_PORT/predict" >"$fifo" 2>&1 &
    LOAD_PIDS=("$!")
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$out"
        case $line in
            'Main benchmark duration is started'*)
                read -r u0 s0 < <(proxy_cpu_ticks)
                upstream_time_wait >"$out.time-wait-before"
                ;;
            'Main benchmark duration is over'*)
                read -r u1 s1 < <(proxy_cpu_ticks)
                upstream_time_wait >"$out.time-wait-after"
                ;;
        esac
    done <"$fifo"
    wait "${LOAD_PIDS[0]}" || rc=$?
    LOAD_PIDS=()
    rm -f "$fifo"
    ((rc == 0)) || die "h2load exited with $rc ($scenario, $proxy): $(tail -c 500 "$out")"
    [[ -n $u0 && -n $u1 ]] || die "h2load printed no main phase ($scenario, $proxy); see $out"

    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
    read -r done_ succeeded failed errored < <(sed -n \
        's/^requests: [0-9]* total, [0-9]* started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2 \3 \4/p' "$out")
    [[ -n $rps && -n $succeeded ]] || die "cannot read h2load's summary; see $out"
    protocol=$(sed -n 's/^TLS Protocol: //p' "$out" | head -n 1)
    cipher=$(sed -n 's/^Cipher: //p' "$out" | head -n 1)
    group=$(sed -n 's/^Server Temp Key: //p' "$out" | head -n 1)
    alpn=$(sed -n 's/^Application protocol: //p' "$out" | head -n 1)
    if [[ $protocol != TLSv1.3 || $cipher != "$CIPHER" || $group != "$GROUP"* || $alpn != "$want_alpn" ]]; then
        note "$key" "run $rep negotiated $protocol $cipher $group $alpn"
    fi
    if ((failed + errored > 0 || succeeded < done_)); then
        note "$key" "run $rep: $done_ done, $succeeded succeeded, $failed failed, $errored errored"
    fi

    record "$key/rate" "$rps"
    record_cpu "$key/" $((u1 - u0)) $((s1 - s0)) "$succeeded" "$DURATION_S"
    closed=$(comm -13 "$out.time-wait-before" "$out.time-wait-after" | wc -l)
    record "$key/closed_per_k" "$(awk -v c="$closed" -v n="$succeeded" \
        'BEGIN { printf "%.1f", (n > 0 ? c * 1000 / n : 0) }')"
    log "  $(printf '%.0f' "$rps") req/s, ${RESULTS[$key/cpu_us]##* } µs CPU/request (kernel ${RESULTS[$key/sys_us]##* }), busy ${RESULTS[$key/busy]##* }"
}

# Runs $1 openssl s_time -new processes for $2 seconds; output files $3-N.txt. Sets HANDSHAKES
# to the handshakes they made in all (not echoed: a die in a $(...) subshell would skip cleanup).
HANDSHAKES=0
s_time_clients() {
    local clients=$1 seconds=$2 prefix=$3 i rc=0 pid total=0 n file
    LOAD_PIDS=()
    for ((i = 1; i <= clients; i++)); do
        timeout -k 5 $((seconds + 30)) taskset -c 1 openssl s_time \
            -connect "127.0.0.1:$PROXY_PORT" -new -time "$seconds" -tls1_3 \
            -ciphersuites "$CIPHER" >"$prefix-$i.txt" 2>&1 &
        LOAD_PIDS+=("$!")
    done
    for pid in "${LOAD_PIDS[@]}"; do
        wait "$pid" || rc=$?
    done
    LOAD_PIDS=()
    ((rc == 0)) || die "openssl s_time exited with $rc: $(tail -c 300 "$prefix-1.txt")"
    for ((i = 1; i <= clients; i++)); do
        file=$prefix-$i.txt
        # "N connections in X.XXs; ..." (X is the client's CPU time; the wall time is ours).
        n=$(sed -n 's/^\([0-9]*\) connections in [0-9.]*s;.*/\1/p' "$file" | head -n 1)
        [[ -n $n ]] || die "cannot read openssl s_time's count; see $file"
        total=$((total + n))
    done
    HANDSHAKES=$total
}

# $1 scenario (hs1 | hsK), $2 proxy, $3 repetition
measure_handshakes() {
    local scenario=$1 proxy=$2 rep=$3 key=$1/$2 prefix=$TMP/$1-$2-$3
    local clients=1 u0 s0 u1 s1 t0 t1 handshakes errors
    [[ $scenario == hs1 ]] || clients=$HS_CLIENTS
    s_time_clients 1 "$WARMUP_S" "$prefix-warmup"
    read -r u0 s0 < <(proxy_cpu_ticks)
    t0=$EPOCHREALTIME
    s_time_clients "$clients" "$DURATION_S" "$prefix"
    t1=$EPOCHREALTIME
    handshakes=$HANDSHAKES
    read -r u1 s1 < <(proxy_cpu_ticks)
    record "$key/rate" "$(awk -v n="$handshakes" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }')"
    record_cpu "$key/" $((u1 - u0)) $((s1 - s0)) "$handshakes" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
    errors=$(cat "$prefix"-[0-9]*.txt | grep -a -c -i 'error' || true)
    ((errors == 0)) || note "$key" "run $rep: $errors error lines from openssl s_time"
    log "  $(printf '%.0f' "${RESULTS[$key/rate]##* }") handshakes/s, ${RESULTS[$key/cpu_us]##* } µs CPU/handshake (kernel ${RESULTS[$key/sys_us]##* }), busy ${RESULTS[$key/busy]##* }"
}

# ---------------------------------------------------------------------------------------------
# Runs

PROXIES=(nginx abproxy)
((TUNED)) && PROXIES+=(abproxy-t1)
HSK=hs$HS_CLIENTS
SCENARIOS=(h1 h2 hs1 "$HSK")

for proxy in "${PROXIES[@]}"; do
    start_proxy "$proxy"
    TLS_SEEN[$proxy]=$(tls_parameters "$proxy")
    [[ $proxy == nginx ]] || TLS_SEEN[$proxy]+="|$(awk '/^Threads:/ { print $2 }' "/proc/$PROXY_PID/status")"
    stop_proxy "$proxy"
    log "$proxy negotiates: ${TLS_SEEN[$proxy]}"
done

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for ((rep = 1; rep <= REPEATS; rep++)); do
    for scenario in "${SCENARIOS[@]}"; do
        order=("${PROXIES[@]}")
        if ((rep % 2 == 0)); then
            order=()
            for ((i = ${#PROXIES[@]} - 1; i >= 0; i--)); do order+=("${PROXIES[i]}"); done
        fi
        for proxy in "${order[@]}"; do
            log "$scenario / $proxy (repetition $rep of $REPEATS)"
            start_proxy "$proxy"
            case $scenario in
                h1 | h2) measure_h2load "$scenario" "$proxy" "$rep" ;;
                *) measure_handshakes "$scenario" "$proxy" "$rep" ;;
            esac
            stop_proxy "$proxy"
        done
    done
done
nerr=$(grep -c '\[error\]' "$NGINX_DIR/error.log" || true)
if ((nerr > 0)); then
    NOTES[nginx]="nginx error.log: $nerr [error] lines, e.g. $(grep -m1 '\[error\]' \
        "$NGINX_DIR/error.log" | cut -c1-200)"$'\n'
fi

# ---------------------------------------------------------------------------------------------
# Report

# Ratios $1 / nginx of metric $3 in scenario $2, per repetition (the runs next to each other).
pair_ratios() {
    awk -v a="${RESULTS[$2/$1/$3]:-}" -v b="${RESULTS[$2/nginx/$3]:-}" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 1; i <= n; i++) printf "%s%.2f", (i > 1 ? ", " : ""), (y[i] + 0 ? x[i] / y[i] : 0)
    }'
}
pair_median() { # the median of pair_ratios
    median "$(pair_ratios "$@" | tr -d ,)"
}

label() {
    case $1 in
        h1) echo "keep-alive HTTP/1.1 over TLS ($CONNECTIONS conns)" ;;
        h2) echo "HTTP/2 over TLS ($CONNECTIONS conns × $STREAMS streams)" ;;
        hs1) echo "new connections, full handshakes (1 client)" ;;
        *) echo "new connections, full handshakes ($HS_CLIENTS clients)" ;;
    esac
}
unit() { case $1 in h1 | h2) echo request ;; *) echo handshake ;; esac; }

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_version=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
nginx_openssl=$("$NGINX" -V 2>&1 | sed -n 's/^built with \(OpenSSL [^ ]*\).*(running with \(OpenSSL [^ )]*\)[^)]*).*/\2 (built with \1)/p;
    s/^built with \(OpenSSL [^ ]*\)[^(]*$/\1/p' | head -n 1)
h2load_version=$(h2load --version 2>&1 | head -n 1)

echo "## TLS termination: abproxy (rustls) against nginx (OpenSSL)"
echo
echo "- date: $STARTED"
echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $(uname -sr)"
# shellcheck disable=SC2016 # the backquotes are Markdown
echo "- abproxy: $revision, rustls ${rustls_version:-?} (ring), \`run\` with no tuning flags" \
    "(one worker thread: one per CPU it may run on), RUST_LOG=warn, \`max_upstream_connections = 64\`$(
        ((TUNED)) && printf '; abproxy-t1: the same with `--threads 1` (tuned)')"
echo "- nginx: $nginx_version, ${nginx_openssl:-OpenSSL ?}, \`worker_processes 1\`, \`keepalive $NGINX_KEEPALIVE\` (idle connections kept per upstream)," \
    "\`ssl_protocols TLSv1.3\`, \`ssl_conf_command Ciphersuites $CIPHER\`, \`ssl_ecdh_curve $GROUP\`," \
    "session cache and tickets off"
echo "- certificate: ECDSA P-256, self-signed, the same files for both"
echo "- clients: $h2load_version (\`-t 1 -c $CONNECTIONS\`, \`--h1\` or \`-m $STREAMS\`," \
    "${WARMUP_S} s warm-up, \`--tls13-ciphers $CIPHER --groups $GROUP\`, one \`x-user-id\` for all);" \
    "\`openssl s_time -new -tls1_3 -ciphersuites $CIPHER\` ($(openssl version | cut -d' ' -f1-2))"
echo "- pinning: proxy on CPU 0; clients and the two backends (loadtest-backend, one thread each) on CPU 1"
echo "- runs: $DURATION each, median of $REPEATS; each run has a fresh proxy, the nginx/abproxy order alternates"
echo "- command: \`$COMMAND_LINE\`"
echo
echo "Negotiated (openssl s_client offering both ALPN protocols, TLS 1.3, $CIPHER, $GROUP):"
echo
echo "| proxy | protocol | cipher | key exchange | certificate signature | ALPN | session tickets sent per handshake | threads |"
echo "| --- | --- | --- | --- | --- | --- | ---: | ---: |"
for proxy in "${PROXIES[@]}"; do
    IFS='|' read -r protocol cipher group signature alpn tickets threads <<<"${TLS_SEEN[$proxy]}"
    [[ $proxy == nginx ]] && threads="1 worker process"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$proxy" "$protocol" "$cipher" "$group" \
        "$signature" "$alpn" "$tickets" "$threads"
done
echo
echo "| scenario | proxy | rate (per s) | proxy CPU (µs per request or handshake) | of which kernel | proxy CPU busy (cores) |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for scenario in "${SCENARIOS[@]}"; do
    for proxy in "${PROXIES[@]}"; do
        key=$scenario/$proxy
        printf '| %s | %s | %s | %s | %s | %s |\n' "$(label "$scenario")" "$proxy" \
            "$(fmt '%.0f' "$(med "$key/rate")")" "$(fmt '%.1f' "$(med "$key/cpu_us")")" \
            "$(fmt '%.1f' "$(med "$key/sys_us")")" "$(fmt '%.2f' "$(med "$key/busy")")"
    done
    for proxy in "${PROXIES[@]:1}"; do
        printf '| %s | **%s / nginx** | %s | %s | %s | |\n' "$(label "$scenario")" "$proxy" \
            "$(ratio "$(med "$scenario/$proxy/rate")" "$(med "$scenario/nginx/rate")")" \
            "$(ratio "$(med "$scenario/$proxy/cpu_us")" "$(med "$scenario/nginx/cpu_us")")" \
            "$(ratio "$(med "$scenario/$proxy/sys_us")" "$(med "$scenario/nginx/sys_us")")"
    done
done
echo
for proxy in "${PROXIES[@]:1}"; do
    echo "$proxy / nginx within each repetition (the runs next to each other), then the median of those:"
    echo
    for scenario in "${SCENARIOS[@]}"; do
        echo "- $scenario: rate $(pair_ratios "$proxy" "$scenario" rate) (median" \
            "$(fmt '%.2f' "$(pair_median "$proxy" "$scenario" rate)")); CPU per $(unit "$scenario")" \
            "$(pair_ratios "$proxy" "$scenario" cpu_us) (median" \
            "$(fmt '%.2f' "$(pair_median "$proxy" "$scenario" cpu_us)"))"
    done
    echo
done

# The aim of issue 12: abproxy's CPU per request at or below nginx's, keep-alive and handshakes.
verdicts=()
for scenario in "${SCENARIOS[@]}"; do
    r=$(pair_median abproxy "$scenario" cpu_us)
    verdicts+=("$scenario $(fmt '%.2f×' "$r") $(awk -v r="$r" 'BEGIN { if (r == "nan") print "(not measured)";
        else if (r <= 1) print "(at or below)"; else printf "(%.0f %% above)\n", (r - 1) * 100 }')")
done
echo "Aim of issue 12, abproxy's CPU per request at or below nginx's: median paired ratio" \
    "$(printf '%s, ' "${verdicts[@]}" | sed 's/, $//')."
echo
echo "Rate: higher is better; CPU: lower is better. \"CPU busy\" is the proxy's CPU time over the"
echo "measured wall time: near 1.00 the proxy was the bottleneck, well below it the clients or"
echo "backends on CPU 1 were. h2load sends the same \`x-user-id\` on every request, so each proxy"
echo "sends all of them to one backend (not necessarily the same one for both proxies)."
echo "Upstream connections closed per 1000 requests during the main phase (new TIME-WAIT sockets"
echo "on the backend ports; near 0 means upstream keep-alive held):" \
    "$(for scenario in h1 h2; do for proxy in "${PROXIES[@]}"; do
        printf '%s/%s %s, ' "$scenario" "$proxy" "$(fmt '%.1f' "$(med "$scenario/$proxy/closed_per_k")")"
    done; done | sed 's/, $//')."
remarks=0
for key in nginx $(for s in "${SCENARIOS[@]}"; do for p in "${PROXIES[@]}"; do echo "$s/$p"; done; done); do
    if [[ -n ${NOTES[$key]:-} ]]; then
        ((remarks++)) || { echo; echo "Remarks:"; echo; }
        while IFS= read -r line; do
            if [[ -n $line ]]; then echo "- $key: $line"; fi
        done <<<"${NOTES[$key]}"
    fi
done
