#!/usr/bin/env bash
# compare.sh: abproxy against nginx, side by side, on one machine.
#
# Usage: bash loadtest/compare.sh [--duration 10s] [--rate 5000] [--repeats 3] [--quick]
#                                 [--scenarios split,mirror,h2c,tls] [--port-base 18100]
#                                 [--handshake-connections 4] [--skip-build] [--keep] [--tuned]
#
#   --duration D   length of each measured run: N, Ns or Nm (default 10s)
#   --rate R       request rate of the fixed-rate (latency) runs, req/s (default 5000)
#   --repeats N    measurements per proxy and scenario; the median is reported (default 3)
#   --quick        smoke test: --duration 3s --repeats 1
#   --scenarios L  comma-separated, any of split (with predict and direct), mirror, h2c, tls
#                  (default: all four; `--scenarios tls` runs the tls scenario alone)
#   --port-base P  loopback ports P+1 .. P+21 are used (default 18100)
#   --handshake-connections N
#                  tls scenario: new connections in flight in the handshake run (default 4)
#   --skip-build   use the release binaries already built
#   --keep         keep the temp dir (configs, logs, every run's JSON); always kept on failure
#   --tuned        also run abproxy-tuned in split and mirror, beside (never instead of) abproxy
#                  on its defaults: `--threads 1`, `max_upstream_connections = 64`, shadow
#                  `max_queue = 4096`, `max_concurrency = 64` (the settings of the figures
#                  before issue 15)
#
# What it does: builds the release binaries, starts three loadtest-backend processes
# (control, treatment, candidate), then for each scenario
#   split   80/20 split on the x-user-id header                 nginx, abproxy, direct
#   predict the split + [metrics] prediction = "/prediction" and a [canary] guard of
#           treatment against control (no steps: weights stay 80/20)       abproxy
#   mirror  the split + every request mirrored to candidate     nginx, abproxy
#   h2c     the split with HTTP/2 cleartext (prior knowledge) to the backends:
#           abproxy-h2c (`protocol = "h2c"` on both variants, default h2_connections = 2),
#           abproxy-h1 (the split's config, HTTP/1.1 upstreams) and nginx-grpc (`grpc_pass
#           grpc://`, nginx's only HTTP/2 upstream; one stream per connection, keepalive 64);
#           no RSS run
#   tls     the split behind TLS termination: nginx (OpenSSL) and abproxy (rustls, `[server.tls]`
#           cert and key, no tuning flags) present one ECDSA P-256 certificate, signed by a
#           P-256 CA made for the run; nginx allows only TLS 1.3, TLS_AES_128_GCM_SHA256 and
#           X25519, its session cache and tickets off, and the load generator offers exactly
#           that (abproxy follows the client's offer), with ALPN http/1.1, SNI localhost and no
#           session resumption. Two runs per proxy and repetition, each on a fresh proxy after
#           a keep-alive warm-up, and neither with a fixed-rate or RSS run:
#             h1   keep-alive HTTP/1.1 over TLS: --mode max, 64 connections, --duration
#             hs   new connections: --new-connections --mode max, --handshake-connections in
#                  flight, --duration; each a TCP connect, a full TLS handshake, one request
#                  with `Connection: close` and the close, so requests/s = handshakes/s
#           both with the proxy's CPU per request (handshake), user and kernel, and the load
#           generator's own CPU per request (its rustls client on CPU 1, from bash `times`)
# and in split, mirror and h2c each proxy (nginx: 1 worker; abproxy: `run --config FILE` with no
# tuning flags and no tuned config keys, its defaults; pinned to one CPU it picks its
# current-thread runtime) measures
#   throughput  loadtest --mode max, 64 connections, --duration
#   p99         loadtest --rate R, 64 connections, --duration (latency from the due time)
#   CPU us/req  the proxy's utime+stime (/proc/PID/stat) over the max run / answers, with the
#               utime (user) and stime (kernel) parts; the same at the fixed rate. Split and
#               mirror also read schedstat (ns, no 10 ms tick rounding) for the per-repetition
#               ratios of CPU in all
#   switches    context switches per request of the proxy's threads at the fixed rate
#               (voluntary + involuntary, /proc/PID/task/*/status)
#   peak RSS    VmHWM of the proxy after a 1000-connection run
#   upstream    TCP segments per request between proxy and backends (max and rate runs): segs_in
#   segments    + segs_out (ss -ti) of the proxy's sockets to the backend ports, read before and
#               after the run, per connection (4-tuple), the proxy still running
# The proxy runs on CPU 0, backends and the load generator on CPU 1 (taskset). Proxies are
# restarted for every repetition and the nginx/abproxy order alternates. nginx has nothing like
# predict: it runs within the split's repetitions, next to abproxy's split run (order alternating
# too), and the report compares the two runs' CPU per request, as a ratio and in µs.
# Everything listens on 127.0.0.1 only. A Markdown report goes to stdout, progress to stderr.
# With the defaults a run takes about 15.5 minutes (h2c: 3.5 of them, tls: 2.5); --quick about 2.5.
# compare-tls.sh measures HTTP/2 over TLS (h2load) and OpenSSL's own client (s_time) beside it.
#
# Needs: cargo, taskset, curl, ss (iproute2), jq or python3, nginx with its grpc module
# (Debian nginx-light has it; installed with apt-get when missing and running as root); for
# the tls scenario openssl and nginx's ssl module.

set -euo pipefail

DURATION=10s
RATE=5000
REPEATS=3
SCENARIOS=split,mirror,h2c,tls
PORT_BASE=18100
SKIP_BUILD=0
KEEP=0
TUNED=0
CONNECTIONS=64
USERS=10000
RSS_CONNECTIONS=1000
RSS_DURATION=2s
WARMUP=1s
HS_CONNECTIONS=4
# The tls scenario's offer, nginx's only choice (as compare-tls.sh has them).
CIPHER=TLS_AES_128_GCM_SHA256
GROUP=X25519
COMMAND_LINE="bash loadtest/compare.sh"
(($# == 0)) || COMMAND_LINE+="$(printf ' %q' "$@")"

LOG_TAG=compare
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while (($# > 0)); do
    case $1 in
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --rate) RATE=${2:?--rate needs a value}; shift 2 ;;
        --repeats) REPEATS=${2:?--repeats needs a value}; shift 2 ;;
        --scenarios) SCENARIOS=${2:?--scenarios needs a value}; shift 2 ;;
        --port-base) PORT_BASE=${2:?--port-base needs a value}; shift 2 ;;
        --handshake-connections) HS_CONNECTIONS=${2:?--handshake-connections needs a value}; shift 2 ;;
        --quick) DURATION=3s; REPEATS=1; shift ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --tuned) TUNED=1; shift ;;
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
if ! [[ $RATE =~ ^[0-9]+$ ]] || ((RATE == 0)); then
    die "--rate must be a positive integer, got $RATE"
fi
if ! [[ $REPEATS =~ ^[0-9]+$ ]] || ((REPEATS == 0)); then
    die "--repeats must be a positive integer, got $REPEATS"
fi
declare -A SELECTED=()  # scenario -> 1 when --scenarios names it
IFS=, read -ra names <<<"$SCENARIOS"
for name in "${names[@]}"; do
    case $name in
        split | mirror | h2c | tls) SELECTED[$name]=1 ;;
        *) die "--scenarios takes split, mirror, h2c and tls, comma-separated; got $name" ;;
    esac
done
((${#SELECTED[@]} > 0)) || die "--scenarios names no scenario"
selected() { [[ -n ${SELECTED[$1]:-} ]]; }
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65499)); then
    die "--port-base must be between 1024 and 65499, got $PORT_BASE"
fi
if ! [[ $HS_CONNECTIONS =~ ^[0-9]+$ ]] || ((HS_CONNECTIONS < 1 || HS_CONNECTIONS > 256)); then
    die "--handshake-connections must be between 1 and 256, got $HS_CONNECTIONS"
fi

PORT_CONTROL=$((PORT_BASE + 1))
PORT_TREATMENT=$((PORT_BASE + 2))
PORT_CANDIDATE=$((PORT_BASE + 3))
PORT_NGINX=$((PORT_BASE + 10))
PORT_ABPROXY=$((PORT_BASE + 20))
PORT_ADMIN=$((PORT_BASE + 21))

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/abproxy-compare.XXXXXX")
PIDS=()      # every long-lived child: backends and proxies
LOAD_PID=""  # the load generator currently running, if any

# Stops the children on any exit, Ctrl-C included: TERM, up to 5 s, then KILL.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $LOAD_PID ]]; then
        kill -TERM "$LOAD_PID" 2>/dev/null || true
    fi
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}" $LOAD_PID; do
        stop_wait "$pid" 5
    done
    if ((rc == 130 || rc == 143)); then
        log "interrupted; configs and logs kept in $TMP"
    elif ((rc != 0)); then
        log "failed; configs and logs kept in $TMP"
    elif ((KEEP)); then
        log "configs, logs and run JSON kept in $TMP"
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

NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if [[ -z $NGINX ]]; then
    if ((EUID == 0)) && have apt-get; then
        log "nginx is missing: installing nginx-light"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >&2
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    else
        die "nginx is missing: install it (Debian: apt-get install nginx-light)"
    fi
fi
[[ -x $NGINX ]] || die "nginx not found at $NGINX"
for tool in taskset curl getconf cargo ss; do
    have "$tool" || die "$tool is missing"
done
if selected tls; then
    have openssl || die "openssl is missing (the tls scenario makes its certificate with it)"
    "$NGINX" -V 2>&1 | grep -q -- --with-http_ssl_module || die "$NGINX has no ssl module"
fi
if have jq; then
    JSON=jq
elif have python3; then
    JSON=python3
else
    die "need jq or python3 to read the load generator's JSON"
fi
(($(nproc) >= 2)) || die "needs at least 2 CPUs (proxy on CPU 0, load on CPU 1)"
CLK_TCK=$(getconf CLK_TCK)

cd "$REPO"
if ((!SKIP_BUILD)); then
    log "building release binaries (cargo build --release -p abproxy -p loadtest)"
    cargo build --release -p abproxy -p loadtest >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    if [[ $JSON == jq ]]; then
        jq -r .target_directory
    else
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
    fi)
ABPROXY=$TARGET_DIR/release/abproxy
LOADTEST=$TARGET_DIR/release/loadtest
BACKEND=$TARGET_DIR/release/loadtest-backend
for bin in "$ABPROXY" "$LOADTEST" "$BACKEND"; do
    [[ -x $bin ]] || die "$bin is missing (drop --skip-build?)"
done
# The code measured is the one built now: others may commit while the runs go on.
revision=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then revision+=" (uncommitted changes)"; fi

for port in "$PORT_CONTROL" "$PORT_TREATMENT" "$PORT_CANDIDATE" "$PORT_NGINX" "$PORT_ABPROXY" \
    "$PORT_ADMIN"; do
    ! port_in_use "$port" || die "127.0.0.1:$port is in use; pick other ports with --port-base"
done

# ---------------------------------------------------------------------------------------------
# tls: one ECDSA P-256 certificate for both proxies, for localhost and 127.0.0.1, signed by a
# P-256 CA made for this run, which the load generator trusts (--ca). Not self-signed as in
# compare-tls.sh: rustls (webpki) refuses a CA certificate as a server's own, and `openssl req
# -x509` makes one. Each proxy sends the leaf alone.

CA_CERT=$TMP/tls/ca.pem
CERT=$TMP/tls/cert.pem
KEY=$TMP/tls/key.pem
if selected tls; then
    mkdir -p "$TMP/tls"
    printf '%s\n' 'subjectAltName = DNS:localhost, IP:127.0.0.1' \
        'basicConstraints = critical, CA:FALSE' 'keyUsage = critical, digitalSignature' \
        'extendedKeyUsage = serverAuth' >"$TMP/tls/leaf.ext"
    {
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
            -subj "/CN=abproxy compare.sh CA" -keyout "$TMP/tls/ca.key" -out "$CA_CERT" &&
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -subj /CN=localhost -keyout "$KEY" -out "$TMP/tls/cert.csr" &&
            openssl x509 -req -in "$TMP/tls/cert.csr" -CA "$CA_CERT" -CAkey "$TMP/tls/ca.key" \
                -set_serial 1 -days 7 -sha256 -extfile "$TMP/tls/leaf.ext" -out "$CERT"
    } >"$TMP/tls/openssl.log" 2>&1 || die "openssl failed: $(head -c 500 "$TMP/tls/openssl.log")"
fi

# ---------------------------------------------------------------------------------------------
# Backends: one thread each, on CPU 1 with the load generator.

start_backend control "$PORT_CONTROL"
start_backend treatment "$PORT_TREATMENT"
start_backend candidate "$PORT_CANDIDATE"
BACKEND_PIDS=("${PIDS[@]}")
log "backends up on 127.0.0.1:$PORT_CONTROL-$PORT_CANDIDATE"

# ---------------------------------------------------------------------------------------------
# Proxy configs

# $1 scenario (split | mirror | h2c | tls)
write_nginx_conf() {
    local dir=$TMP/nginx-$1 mirror="" pass listen="" tls=""
    mkdir -p "$dir"
    if [[ $1 == mirror ]]; then
        mirror='
            mirror /mirror;
            mirror_request_body on;'
    fi
    # h2c: HTTP/2 with prior knowledge to the backends. grpc_pass is nginx's only HTTP/2
    # upstream (proxy_pass speaks HTTP/1.x only); it takes any request, gRPC or not, and
    # sends it as one HTTP/2 stream on a connection of its own (no multiplexing), which goes
    # back to the keepalive cache when the stream ends.
    # shellcheck disable=SC2016 # $variant is nginx's
    if [[ $1 == h2c ]]; then
        pass='grpc_pass grpc://$variant;'
    else
        pass='proxy_pass http://$variant;
            proxy_http_version 1.1;
            proxy_set_header Connection "";'
    fi
    # tls: the split behind TLS 1.3 with one cipher suite and one group, every handshake a full
    # one (as compare-tls.sh has it).
    if [[ $1 == tls ]]; then
        listen=" ssl"
        tls="
$(nginx_tls)
"
    fi
    cat >"$dir/nginx.conf" <<EOF
# Generated by loadtest/compare.sh ($1 scenario).
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 16384;

events {
    worker_connections 8192;
}

http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;

    # nginx closes a keep-alive connection after 1000 requests by default; abproxy does not.
    keepalive_requests 1000000;

    upstream control {
        server 127.0.0.1:$PORT_CONTROL;
        keepalive 64;
        keepalive_requests 1000000;
    }
    upstream treatment {
        server 127.0.0.1:$PORT_TREATMENT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    upstream candidate {
        server 127.0.0.1:$PORT_CANDIDATE;
        keepalive 64;
        keepalive_requests 1000000;
    }

    split_clients "\${http_x_user_id}" \$variant {
        80% control;
        *   treatment;
    }

    server {
        # backlog 1024: what abproxy's listener (tokio) asks for.
        listen 127.0.0.1:$PORT_NGINX$listen backlog=1024;
$tls
        location / {
            $pass
            add_header x-variant \$variant always;$mirror
        }

        location = /mirror {
            internal;
            proxy_pass http://candidate\$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# $1 scenario (split | mirror | predict | h2c | tls), $2 "tuned" for abproxy-tuned's config.
# abproxy's own config sets no limit but shutdown_grace: it runs on its defaults.
write_abproxy_conf() {
    local file=$TMP/abproxy-$1.toml protocol="" limits="" shadow_limits="" tls=""
    if [[ ${2:-} == tuned ]]; then
        file=$TMP/abproxy-tuned-$1.toml
        # Each backend answers one request at a time (one thread): more in flight only queue in
        # its socket. (nginx caches 64 idle connections per upstream, `keepalive 64`, but opens
        # as many as it has requests in flight.)
        limits='
max_upstream_connections = 64'
        shadow_limits='
max_queue = 4096
max_concurrency = 64'
    fi
    # h2c: the split's config with both variants on HTTP/2 cleartext; [limits] h2_connections
    # keeps its default (2 connections per upstream), max_upstream_connections still caps the
    # requests in flight per upstream (streams, here).
    [[ $1 == h2c ]] && protocol='
protocol = "h2c"'
    # tls: the split's config with TLS termination on `listen`, the certificate nginx has; the
    # versions, suites and groups are rustls's defaults (it follows the client's offer).
    [[ $1 == tls ]] && tls="

[server.tls]
cert = \"$CERT\"
key = \"$KEY\""
    cat >"$file" <<EOF
# Generated by loadtest/compare.sh ($1 scenario).
[server]
listen = "127.0.0.1:$PORT_ABPROXY"
admin = "127.0.0.1:$PORT_ADMIN"
variant_header = "x-variant"$tls

[limits]
shutdown_grace = "2s"$limits

[assignment]
sources = ["header:x-user-id"]

[[variant]]
name = "control"
upstream = "http://127.0.0.1:$PORT_CONTROL"
weight = 80$protocol

[[variant]]
name = "treatment"
upstream = "http://127.0.0.1:$PORT_TREATMENT"
weight = 20$protocol
EOF
    if [[ $1 == mirror ]]; then
        cat >>"$file" <<EOF

[[shadow]]
name = "candidate"
upstream = "http://127.0.0.1:$PORT_CANDIDATE"
percent = 100$shadow_limits
EOF
    fi
    if [[ $1 == predict ]]; then
        # Tables after the variants: TOML puts every key after a header into that table. The
        # canary has no steps, so the guard judges every interval but never moves the weights
        # (only three failed intervals in a row would roll it back, to 0 %; the report shows the
        # guard's state after each run).
        cat >>"$file" <<EOF

[metrics]
prediction = "/prediction"

[canary]
variant = "treatment"
baseline = "control"
interval = "10s"
min_requests = 100

[canary.checks]
max_error_rate = 0.05
max_error_rate_increase = 0.01
max_p99_ratio = 2
max_prediction_psi = 0.2
EOF
    fi
}

CONFIGS=()
selected split && CONFIGS+=(split predict)
selected mirror && CONFIGS+=(mirror)
selected h2c && CONFIGS+=(split h2c)  # abproxy-h1 runs the split's config
selected tls && CONFIGS+=(tls)
for scenario in "${CONFIGS[@]}"; do
    if [[ $scenario != predict ]]; then
        write_nginx_conf "$scenario"
        "$NGINX" -t -q -e "$TMP/nginx-$scenario/error.log" -c "$TMP/nginx-$scenario/nginx.conf" \
            >&2 || die "nginx rejects its $scenario config$([[ $scenario == h2c ]] &&
                echo ' (grpc_pass needs ngx_http_grpc_module: see nginx -V)')"
    fi
    write_abproxy_conf "$scenario"
    RUST_LOG=warn "$ABPROXY" check --config "$TMP/abproxy-$scenario.toml" >/dev/null ||
        die "abproxy rejects its $scenario config"
    if ((TUNED)) && [[ $scenario == split || $scenario == mirror ]]; then
        write_abproxy_conf "$scenario" tuned
        RUST_LOG=warn "$ABPROXY" check --config "$TMP/abproxy-tuned-$scenario.toml" >/dev/null ||
            die "abproxy rejects its tuned $scenario config"
    fi
done

# ---------------------------------------------------------------------------------------------
# Proxies: one at a time, on CPU 0.

PROXY_PID=""
PROXY_URL=""

# $1 proxy (nginx | abproxy | abproxy-tuned | nginx-grpc | abproxy-h1 | abproxy-h2c), $2 scenario
start_proxy() {
    case $1 in
        nginx | nginx-grpc)
            local dir=$TMP/nginx-$2
            taskset -c 0 "$NGINX" -e "$dir/error.log" -c "$dir/nginx.conf" >>"$dir/stderr.log" 2>&1 &
            PROXY_URL=http://127.0.0.1:$PORT_NGINX
            ;;
        abproxy)
            # Defaults: no flags; pinned to CPU 0 it picks its current-thread runtime itself.
            RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$TMP/abproxy-$2.toml" \
                >>"$TMP/abproxy-$2.log" 2>&1 &
            PROXY_URL=http://127.0.0.1:$PORT_ABPROXY
            ;;
        abproxy-tuned)
            RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$TMP/abproxy-tuned-$2.toml" \
                --threads 1 >>"$TMP/abproxy-tuned-$2.log" 2>&1 &
            PROXY_URL=http://127.0.0.1:$PORT_ABPROXY
            ;;
        abproxy-h1 | abproxy-h2c)
            # The h2c scenario, on abproxy's defaults too. abproxy-h1 runs the split's config,
            # abproxy-h2c the h2c one.
            local config=$TMP/abproxy-h2c.toml
            [[ $1 == abproxy-h1 ]] && config=$TMP/abproxy-split.toml
            RUST_LOG=warn taskset -c 0 "$ABPROXY" run --config "$config" >>"$TMP/$1-$2.log" 2>&1 &
            PROXY_URL=http://127.0.0.1:$PORT_ABPROXY
            ;;
        *) die "unknown proxy $1" ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    # tls: the same listener, behind TLS (wait_ready's curl does not verify the certificate).
    [[ $2 == tls ]] && PROXY_URL=https://${PROXY_URL#http://}
    wait_ready "$PROXY_URL/predict" "$PROXY_PID" "$1"
}

stop_proxy() {
    # nginx: QUIT is a graceful stop. abproxy: TERM drains (shutdown_grace 2 s).
    local signal=TERM
    [[ $1 == nginx* ]] && signal=QUIT
    kill "-$signal" "$PROXY_PID" 2>/dev/null || true
    stop_wait "$PROXY_PID" 10
    forget_pid "$PROXY_PID"
    PROXY_PID=""
}

# The proxy's processes: abproxy is one; nginx is the master and its worker(s).
proxy_pids() {
    echo "$PROXY_PID"
    children_of "$PROXY_PID"
}

# CPU time of the proxy's processes in clock ticks: "user system" (utime, stime).
# shellcheck disable=SC2046 # one word per PID
proxy_cpu_ticks() { cpu_ticks $(proxy_pids); }
# shellcheck disable=SC2046 # one word per PID
proxy_cpu_ns() { cpu_ns $(proxy_pids); }
# Records µs of CPU per answer from a schedstat difference: $1 key, $2 ns, $3 answers.
record_ns() { record "$1" "$(awk -v t="$2" -v n="$3" 'BEGIN { printf "%.2f", (n > 0 ? t / n / 1000 : 0) }')"; }

# Context switches so far of every thread of the proxy's processes: "voluntary involuntary".
proxy_ctxt_switches() {
    local pid
    for pid in $(proxy_pids); do
        cat /proc/"$pid"/task/*/status 2>/dev/null || true
    done | awk '$1 == "voluntary_ctxt_switches:" { v += $2 }
                $1 == "nonvoluntary_ctxt_switches:" { n += $2 }
                END { print v + 0, n + 0 }'
}

# CPU time of the three backends in clock ticks: "user system".
backend_cpu_ticks() { cpu_ticks "${BACKEND_PIDS[@]}"; }

# The proxy's established connections to the backends, one line each: "local peer segments",
# segments being segs_in + segs_out of the proxy's end (both directions, each segment once;
# the backend's end of the same connection has the backend port as its source, not matched).
upstream_segments() {
    ss -tinHO state established \
        "( dport = :$PORT_CONTROL or dport = :$PORT_TREATMENT or dport = :$PORT_CANDIDATE )" |
        awk '{ n = 0
               for (i = 1; i <= NF; i++) if ($i ~ /^segs_(in|out):[0-9]+$/) { split($i, kv, ":"); n += kv[2] }
               print $3, $4, n }'
}

# Segments between two upstream_segments snapshots $1 (before) and $2 (after): "segments
# connections closed", counting each connection's growth (a new one from 0). A connection
# closed in between loses its segments since $1, hence the count of those.
segment_delta() {
    awk 'NR == FNR { before[$1 " " $2] = $3; next }
         { key = $1 " " $2; segs += $3 - before[key]; conns++; seen[key] = 1 }
         END { for (key in before) if (!(key in seen)) closed++
               print segs + 0, conns + 0, closed + 0 }' "$1" "$2"
}

# Peak RSS in KiB of the process serving traffic: abproxy, or the nginx worker (the largest).
proxy_hwm_kib() {
    local pid kib peak=0
    for pid in $(proxy_pids); do
        kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        if [[ -n $kib ]] && ((kib > peak)); then peak=$kib; fi
    done
    echo "$peak"
}

# TCP connections opened (connect()) on this machine so far: /proc/net/snmp ActiveOpens.
tcp_active_opens() {
    awk '$1 == "Tcp:" { if (!col) { for (i = 2; i <= NF; i++) if ($i == "ActiveOpens") col = i }
                        else { print $col; exit } }' /proc/net/snmp
}

# abproxy's shadow requests dropped so far (bounded queue full), from its admin port.
abproxy_shadow_dropped() {
    curl -sf --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" |
        awk '/^abproxy_shadow_requests_total\{.*result="dropped"/ { n += $NF } END { print n + 0 }'
}

# Predictions abproxy has read so far (answers counted in its abproxy_prediction histogram;
# rendering /metrics folds the pending samples in first).
abproxy_predictions() {
    curl -sf --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" |
        awk '/^abproxy_prediction_count\{/ { n += $NF } END { print n + 0 }'
}

# TLS handshakes abproxy's listener failed so far, every reason.
abproxy_tls_failures() {
    # An admin port that does not answer must not end the run (set -e, pipefail): it reads 0
    # and the remarks compare it with the load generator's own count of failed handshakes.
    { curl -sf --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" || true; } |
        awk '/^abproxy_tls_handshake_failures_total\{/ { n += $NF } END { print n + 0 }'
}

# ---------------------------------------------------------------------------------------------
# The load generator, on CPU 1, always bounded.

# CPU time of this shell's children that have been waited for, from bash's `times` (its
# second line), in microseconds: "user system". Reads file $1, which `times >"$1"` wrote: run in
# a subshell, as $(times) would be, `times` sees only the subshell's own children.
children_cpu_us() {
    awk 'function us(t, m) { m = t; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", t); sub(/s$/, "", t)
                            return int((m * 60 + t) * 1e6 + 0.5) }
         NR == 2 { print us($1), us($2) }' "$1"
}

LOAD_CPU_US=""  # "user system" µs of CPU the last load run took (the load generator's own)

# $1 JSON output file, $2 URL, rest: loadtest options
load() {
    local out=$1 url=$2 rc=0 u0 s0 u1 s1
    shift 2
    LC_ALL=C times >"$out.times-before"
    timeout -k 5 $((DURATION_S + 60)) taskset -c 1 "$LOADTEST" --url "$url" --path /predict \
        --users "$USERS" --id-source header:x-user-id --json --quiet "$@" \
        >"$out" 2>"$out.stderr" &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    LC_ALL=C times >"$out.times-after"
    ((rc == 0)) || die "loadtest exited with $rc ($*): $(head -c 500 "$out.stderr")"
    read -r u0 s0 <<<"$(children_cpu_us "$out.times-before")"
    read -r u1 s1 <<<"$(children_cpu_us "$out.times-after")"
    LOAD_CPU_US="$((u1 - u0)) $((s1 - s0))"
}

# One line from a run's JSON: throughput p99_us answers errors elapsed control_pct missing_header
summary() {
    if [[ $JSON == jq ]]; then
        jq -r '[.throughput_rps, (.latency_us.p99 // "nan"), .answers, .errors_total,
                .elapsed_seconds,
                ((.split[]? | select(.variant == "control") | .requests_pct) // "nan"),
                .missing_variant_header] | @tsv' "$1"
    else
        python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
control = [s["requests_pct"] for s in r.get("split", []) if s["variant"] == "control"]
p99 = (r.get("latency_us") or {}).get("p99", "nan")
print("\t".join(str(v) for v in [r["throughput_rps"], p99, r["answers"], r["errors_total"],
      r["elapsed_seconds"], control[0] if control else "nan", r["missing_variant_header"]]))
EOF
    fi
}

declare -A RESULTS=()  # "scenario/proxy/metric" -> space-separated values, one per repetition
declare -A NOTES=()    # "scenario/proxy" -> remarks (errors, split seen, shadow counters)
note() { NOTES[$1]="${NOTES[$1]:-}$2"$'\n'; }

# The TLS side of a run's JSON, one line: version cipher group alpn handshake-kinds handshakes
# connections-opened tls-errors distinct-parameter-sets ("none" where the run had no handshake).
tls_summary() {
    if [[ $JSON == jq ]]; then
        jq -r '[(.tls.negotiated[0].version // "none"), (.tls.negotiated[0].cipher_suite // "none"),
                (.tls.negotiated[0].key_exchange // "none"), (.tls.negotiated[0].alpn // "none"),
                ([.tls.negotiated[]?.handshake] | unique | join("+") | if . == "" then "none" else . end),
                (.tls.handshakes // 0), .connections_opened, .errors.tls,
                ((.tls.negotiated // []) | length)] | @tsv' "$1"
    else
        python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
tls = r.get("tls") or {}
n = tls.get("negotiated") or []
first = n[0] if n else {}
kinds = "+".join(sorted({x["handshake"] for x in n})) or "none"
print("\t".join(str(v) for v in [first.get("version") or "none", first.get("cipher_suite") or "none",
      first.get("key_exchange") or "none", first.get("alpn") or "none", kinds,
      tls.get("handshakes", 0), r["connections_opened"], r["errors"]["tls"], len(n)]))
EOF
    fi
}

# Why the first failed TLS handshake of a run failed, from its JSON (empty when none did).
tls_first_error() {
    if [[ $JSON == jq ]]; then
        jq -r '.tls.first_error // ""' "$1"
    else
        python3 -c 'import json, sys; print((json.load(open(sys.argv[1])).get("tls") or {}).get("first_error") or "")' "$1"
    fi
}

# Tracks request errors of one run under key $1 (scenario/proxy), run label $2, summary $3.
check_errors() {
    local key=$1 label=$2 errors missing
    read -r _ _ _ errors _ _ missing <<<"$3"
    if ((errors > 0)); then
        note "$key" "$label: $errors request errors"
        log "  warning: $key $label had $errors request errors"
    fi
    if [[ ${key#*/} != direct ]] && ((missing > 0)); then
        note "$key" "$label: $missing answers without x-variant"
    fi
}

# $1 scenario, $2 proxy, $3 repetition
measure_proxy() {
    local scenario=$1 proxy=$2 rep=$3 key=$1/$2 out=$TMP/$1-$2-$3
    local user_before system_before user_after system_after
    local opens_before line tput p99 answers elapsed control_pct dropped=0 predictions=0
    local mirroring=0 predicting=0 full=1 segs conns closed backend_before backend_after
    local vol_before invol_before vol_after invol_after
    [[ $proxy == abproxy* && $scenario == mirror ]] && mirroring=1
    [[ $scenario == predict ]] && predicting=1
    # h2c: no 1000-connection RSS run.
    [[ $scenario == h2c ]] && full=0
    log "$scenario / $proxy (repetition $rep of $REPEATS)"
    start_proxy "$proxy" "$scenario"

    # Fills both sides' connection pools and pages everything in; not measured.
    load "$out-warmup.json" "$PROXY_URL" --duration "$WARMUP" --connections "$CONNECTIONS"

    ((mirroring)) && dropped=$(abproxy_shadow_dropped)
    ((predicting)) && predictions=$(abproxy_predictions)
    upstream_segments >"$out-segments-before.txt"
    opens_before=$(tcp_active_opens)
    backend_before=$(backend_cpu_ticks)
    read -r user_before system_before < <(proxy_cpu_ticks)
    ns_before=$(proxy_cpu_ns)
    load "$out-max.json" "$PROXY_URL" --mode max --duration "$DURATION" \
        --connections "$CONNECTIONS"
    ns_after=$(proxy_cpu_ns)
    read -r user_after system_after < <(proxy_cpu_ticks)
    backend_after=$(backend_cpu_ticks)
    record "$key/opens" $(($(tcp_active_opens) - opens_before))
    upstream_segments >"$out-segments-after.txt"
    read -r segs conns closed < <(segment_delta "$out-segments-before.txt" "$out-segments-after.txt")
    line=$(summary "$out-max.json")
    check_errors "$key" "max run $rep" "$line"
    read -r tput _ answers _ elapsed control_pct _ <<<"$line"
    record "$key/tput" "$tput"
    # The kernel's share (sys_us): TCP on loopback, charged to the proxy whichever proxy it is.
    record_cpu "$key/" $((user_after - user_before)) $((system_after - system_before)) \
        "$answers" "$elapsed"
    record_ns "$key/ns_cpu_us" $((ns_after - ns_before)) "$answers"
    record "$key/control_pct" "$control_pct"
    record "$key/opens_per_k" "$(awk -v o="${RESULTS[$key/opens]##* }" -v n="$answers" \
        'BEGIN { printf "%.1f", (n > 0 ? o * 1000 / n : 0) }')"
    record "$key/backend_us" "$(awk -v b="$backend_before" -v a="$backend_after" -v hz="$CLK_TCK" \
        -v n="$answers" 'BEGIN { split(b, x, " "); split(a, y, " ")
            printf "%.2f", (n > 0 ? (y[1] + y[2] - x[1] - x[2]) * 1e6 / hz / n : 0) }')"
    record "$key/segs_per_req" "$(awk -v s="$segs" -v n="$answers" \
        'BEGIN { printf "%.3f", (n > 0 ? s / n : 0) }')"
    record "$key/upstream_conns" "$conns"
    if ((closed > 0)); then
        note "$key" "max run $rep: $closed upstream connections closed during the run (their segments are not counted)"
    fi
    log "  max:  $(printf '%.0f' "$tput") req/s, $((user_after - user_before + system_after - system_before)) ticks of proxy CPU for $answers answers," \
        "${RESULTS[$key/opens]##* } TCP connections opened; upstream: $conns connections," \
        "$segs segments ($closed closed)"
    if ((mirroring)); then
        # Every request is mirrored (percent = 100), so drops / answers is the share not mirrored.
        dropped=$(($(abproxy_shadow_dropped) - dropped))
        record "$key/drop_max_pct" "$(awk -v d="$dropped" -v n="$answers" \
            'BEGIN { printf "%.1f", (n > 0 ? d * 100 / n : 0) }')"
        log "  max:  $dropped shadow requests dropped"
    fi
    if ((predicting)); then
        # Every answer is JSON with a prediction, so this is 100 % unless reading is skipped.
        predictions=$(($(abproxy_predictions) - predictions))
        record "$key/read_pct" "$(awk -v p="$predictions" -v n="$answers" \
            'BEGIN { printf "%.1f", (n > 0 ? p * 100 / n : 0) }')"
        log "  max:  $predictions predictions read"
    fi

    # Lets a mirror backlog from the max run drain before latency is measured.
    sleep 1
    ((mirroring)) && dropped=$(abproxy_shadow_dropped)
    upstream_segments >"$out-rate-segments-before.txt"
    read -r vol_before invol_before < <(proxy_ctxt_switches)
    read -r user_before system_before < <(proxy_cpu_ticks)
    ns_before=$(proxy_cpu_ns)
    load "$out-rate.json" "$PROXY_URL" --mode rate --rate "$RATE" --duration "$DURATION" \
        --connections "$CONNECTIONS"
    ns_after=$(proxy_cpu_ns)
    read -r user_after system_after < <(proxy_cpu_ticks)
    read -r vol_after invol_after < <(proxy_ctxt_switches)
    upstream_segments >"$out-rate-segments-after.txt"
    read -r segs _ closed < <(segment_delta "$out-rate-segments-before.txt" \
        "$out-rate-segments-after.txt")
    line=$(summary "$out-rate.json")
    check_errors "$key" "rate run $rep" "$line"
    read -r tput p99 answers _ <<<"$line"
    record "$key/p99" "$p99"
    record "$key/rate_tput" "$tput"
    # At a fixed rate both proxies mirror every request, so this is the like-for-like CPU cost.
    record_cpu "$key/rate_" $((user_after - user_before)) $((system_after - system_before)) \
        "$answers"
    record_ns "$key/rate_ns_cpu_us" $((ns_after - ns_before)) "$answers"
    record "$key/rate_vcsw" "$(awk -v d=$((vol_after - vol_before)) -v n="$answers" \
        'BEGIN { printf "%.3f", (n > 0 ? d / n : 0) }')"
    record "$key/rate_ivcsw" "$(awk -v d=$((invol_after - invol_before)) -v n="$answers" \
        'BEGIN { printf "%.3f", (n > 0 ? d / n : 0) }')"
    record "$key/rate_segs_per_req" "$(awk -v s="$segs" -v n="$answers" \
        'BEGIN { printf "%.3f", (n > 0 ? s / n : 0) }')"
    if ((closed > 0)); then
        note "$key" "rate run $rep: $closed upstream connections closed during the run (their segments are not counted)"
    fi
    log "  rate: p99 ${p99} us at $(printf '%.0f' "$tput") req/s; upstream: $segs segments"
    if ((mirroring)); then
        dropped=$(($(abproxy_shadow_dropped) - dropped))
        record "$key/drop_rate_pct" "$(awk -v d="$dropped" -v n="$answers" \
            'BEGIN { printf "%.1f", (n > 0 ? d * 100 / n : 0) }')"
        log "  rate: $dropped shadow requests dropped"
    fi

    if ((full)); then
        load "$out-rss.json" "$PROXY_URL" --mode max --duration "$RSS_DURATION" \
            --connections "$RSS_CONNECTIONS"
        check_errors "$key" "$RSS_CONNECTIONS-connection run $rep" "$(summary "$out-rss.json")"
        record "$key/rss_kib" "$(proxy_hwm_kib)"
        log "  rss:  peak $(proxy_hwm_kib) KiB after $RSS_CONNECTIONS connections"
    fi

    if ((mirroring)); then
        curl -sf --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" |
            grep '^abproxy_shadow' >"$out-shadow-metrics.txt" || true
    fi
    if ((predicting)); then
        # The guard's state at the end of the run: it must still hold treatment at 20 %.
        local state weight failed
        curl -sf --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" |
            grep -E '^abproxy_(canary|prediction_unread)' >"$out-canary-metrics.txt" || true
        state=$(sed -n 's/^abproxy_canary_state{.*state="\([a-z_]*\)"} 1$/\1/p' \
            "$out-canary-metrics.txt" | head -n 1)
        weight=$(awk '/^abproxy_canary_weight_percent/ { print $NF; exit }' "$out-canary-metrics.txt")
        failed=$(awk '/^abproxy_canary_checks_total\{.*outcome="fail"/ { n += $NF } END { print n + 0 }' \
            "$out-canary-metrics.txt")
        record "$key/guard" "${state:-unknown}@${weight:-nan}%"
        record "$key/checks" "$(awk '/^abproxy_canary_checks_total/ { n += $NF } END { print n + 0 }' \
            "$out-canary-metrics.txt")"
        record "$key/failed" "$failed"
        if [[ $state != running || $weight != 20 ]] || ((failed > 0)); then
            note "$key" "run $rep: canary guard ${state:-unknown} at ${weight:-?} %, $failed failed checks"
            log "  warning: canary guard ${state:-unknown} at ${weight:-?} %, $failed failed checks"
        fi
        log "  guard: ${state:-unknown} at ${weight:-?} %, $failed failed checks"
    fi
    if [[ $proxy == nginx* ]]; then
        local master_kib
        master_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$PROXY_PID/status" 2>/dev/null || echo 0)
        record "$key/master_kib" "$master_kib"
    fi
    stop_proxy "$proxy"
    if [[ $proxy == nginx* ]]; then
        local nerr
        nerr=$(grep -c '\[error\]' "$TMP/nginx-$scenario/error.log" || true)
        if ((nerr > 0)); then
            note "$key" "nginx error.log: $nerr [error] lines so far, e.g. $(grep -m1 '\[error\]' \
                "$TMP/nginx-$scenario/error.log" | cut -c1-200)"
        fi
    fi
}

# $1 repetition: the load generator straight at the control backend.
measure_direct() {
    local rep=$1 key=split/direct out=$TMP/split-direct-$1 url=http://127.0.0.1:$PORT_CONTROL
    local line tput max_tput p99
    log "split / direct (repetition $rep of $REPEATS)"
    load "$out-warmup.json" "$url" --duration "$WARMUP" --connections "$CONNECTIONS"
    load "$out-max.json" "$url" --mode max --duration "$DURATION" --connections "$CONNECTIONS"
    line=$(summary "$out-max.json")
    check_errors "$key" "max run $rep" "$line"
    read -r max_tput _ <<<"$line"
    record "$key/tput" "$max_tput"
    load "$out-rate.json" "$url" --mode rate --rate "$RATE" --duration "$DURATION" \
        --connections "$CONNECTIONS"
    line=$(summary "$out-rate.json")
    check_errors "$key" "rate run $rep" "$line"
    read -r tput p99 _ <<<"$line"
    record "$key/p99" "$p99"
    record "$key/rate_tput" "$tput"
    log "  max $(printf '%.0f' "$max_tput") req/s; rate: p99 $p99 us at $(printf '%.0f' "$tput") req/s"
}

# The tls scenario's client: trusts the run's CA, sends SNI localhost (the certificate's name;
# the URL is 127.0.0.1), and offers exactly what nginx allows. No --tls-resume: every new
# connection is a full handshake.
TLS_ARGS=(--ca "$CA_CERT" --server-name localhost --tls-version 1.3 --tls-ciphers "$CIPHER"
    --tls-groups "$GROUP")

# $1 proxy (nginx | abproxy), $2 run (h1 | hs), $3 repetition: one tls run on a fresh proxy.
# Metrics go under tls/PROXY, the hs run's with an hs_ prefix.
measure_tls() {
    local proxy=$1 run=$2 rep=$3 key=tls/$1 out=$TMP/tls-$1-$2-$3 m="" args failures=0
    local user_before system_before user_after system_after line
    local tput answers elapsed control_pct client_user client_system reason
    local version cipher group alpn kinds handshakes tls_errors sets
    [[ $run == hs ]] && m=hs_
    log "tls $run / $proxy (repetition $rep of $REPEATS)"
    start_proxy "$proxy" tls
    # Fills the proxy's upstream pools and pages everything in; not measured.
    load "$out-warmup.json" "$PROXY_URL" --duration "$WARMUP" --connections "$CONNECTIONS" \
        "${TLS_ARGS[@]}"
    if [[ $run == h1 ]]; then
        args=(--connections "$CONNECTIONS")
    else
        args=(--connections "$HS_CONNECTIONS" --new-connections)
    fi
    [[ $proxy == abproxy ]] && failures=$(abproxy_tls_failures)
    # Here-strings, not process substitutions: bash reaps those whenever it likes, and one
    # reaped between load()'s two `times` would count as the load generator's CPU.
    read -r user_before system_before <<<"$(proxy_cpu_ticks)"
    load "$out.json" "$PROXY_URL" --mode max --duration "$DURATION" "${args[@]}" "${TLS_ARGS[@]}"
    read -r user_after system_after <<<"$(proxy_cpu_ticks)"
    read -r client_user client_system <<<"$LOAD_CPU_US"
    line=$(summary "$out.json")
    check_errors "$key" "$run run $rep" "$line"
    read -r tput _ answers _ elapsed control_pct _ <<<"$line"
    record "$key/${m}tput" "$tput"
    record_cpu "$key/$m" $((user_after - user_before)) $((system_after - system_before)) \
        "$answers" "$elapsed"
    record "$key/${m}client_us" "$(awk -v u="$client_user" -v s="$client_system" -v n="$answers" \
        'BEGIN { printf "%.2f", (n > 0 ? (u + s) / n : 0) }')"
    record "$key/${m}client_busy" "$(awk -v u="$client_user" -v s="$client_system" -v e="$elapsed" \
        'BEGIN { printf "%.2f", (e > 0 ? (u + s) / 1e6 / e : 0) }')"
    [[ $run == h1 ]] && record "$key/control_pct" "$control_pct"

    IFS=$'\t' read -r version cipher group alpn kinds handshakes _ tls_errors sets \
        < <(tls_summary "$out.json")
    record "$key/${m}negotiated" "$version|$cipher|$group|$alpn|$kinds"
    record "$key/${m}handshakes" "$handshakes"
    if [[ $version != TLSv1.3 || $cipher != "$CIPHER" || $group != "$GROUP" || $alpn != http/1.1 ||
        $kinds != full ]] || ((sets != 1)); then
        note "$key" "$run run $rep negotiated $version $cipher $group ALPN $alpn, $kinds handshakes ($sets parameter sets)"
    fi
    if ((tls_errors > 0)); then
        reason=$(tls_first_error "$out.json")
        note "$key" "$run run $rep: $tls_errors failed TLS handshakes, the first: ${reason:0:200}"
    fi
    if [[ $run == hs ]] && ((handshakes != answers)); then
        note "$key" "hs run $rep: $handshakes handshakes for $answers answers"
    fi
    if [[ $proxy == abproxy ]]; then
        failures=$(($(abproxy_tls_failures) - failures))
        ((failures == 0)) || note "$key" "$run run $rep: abproxy counted $failures failed TLS handshakes"
    fi
    log "  $run: $(printf '%.0f' "$tput") $([[ $run == hs ]] && echo handshakes || echo req)/s," \
        "$((user_after - user_before + system_after - system_before)) ticks of proxy CPU for $answers answers, $handshakes handshakes ($version $cipher" \
        "$group $alpn $kinds), load generator ${RESULTS[$key/${m}client_us]##* } µs CPU per answer"
    stop_proxy "$proxy"
    if [[ $proxy == nginx ]]; then
        local nerr
        nerr=$(grep -c '\[error\]' "$TMP/nginx-tls/error.log" || true)
        if ((nerr > 0)); then
            note "$key" "nginx error.log: $nerr [error] lines so far, e.g. $(grep -m1 '\[error\]' \
                "$TMP/nginx-tls/error.log" | cut -c1-200)"
        fi
    fi
}

STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for scenario in split mirror h2c; do
    selected "$scenario" || continue
    for ((rep = 1; rep <= REPEATS; rep++)); do
        # "scenario/proxy" runs: nginx next to abproxy, and in the split's repetitions abproxy's
        # predict run next to its split run; in h2c's, abproxy-h1 between nginx-grpc and
        # abproxy-h2c, so that abproxy's two protocols always run back to back. Every other
        # repetition in reverse order.
        if [[ $scenario == h2c ]]; then
            runs=(h2c/nginx-grpc h2c/abproxy-h1 h2c/abproxy-h2c)
        else
            runs=("$scenario/nginx" "$scenario/abproxy")
            ((TUNED)) && runs+=("$scenario/abproxy-tuned")
        fi
        [[ $scenario == split ]] && runs+=(predict/abproxy)
        if ((rep % 2 == 0)); then
            order=()
            for ((i = ${#runs[@]} - 1; i >= 0; i--)); do order+=("${runs[i]}"); done
            runs=("${order[@]}")
        fi
        for run in "${runs[@]}"; do
            measure_proxy "${run%/*}" "${run#*/}" "$rep"
        done
        [[ $scenario == split ]] && measure_direct "$rep"
    done
done
if selected tls; then
    # Each run of a repetition next to the other proxy's same run; every other repetition in
    # the reverse order.
    for ((rep = 1; rep <= REPEATS; rep++)); do
        order=(nginx abproxy)
        ((rep % 2 == 0)) && order=(abproxy nginx)
        for run in h1 hs; do
            for proxy in "${order[@]}"; do
                measure_tls "$proxy" "$run" "$rep"
            done
        done
    done
fi

# ---------------------------------------------------------------------------------------------
# Report

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_version=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')

# Ratios of the two runs of each repetition, which ran minutes apart at most: this machine's
# speed drifts over minutes, and a ratio of neighbours shows how far that moves the figure.
# $1 key over, $2 key under, $3 metric.
pair_ratio_of() {
    awk -v a="${RESULTS[$1/$3]:-}" -v b="${RESULTS[$2/$3]:-}" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 1; i <= n; i++) printf "%s%.2f", (i > 1 ? ", " : ""), (y[i] + 0 ? x[i] / y[i] : 0)
    }'
}
pair_ratios() { pair_ratio_of "$1/abproxy" "$1/nginx" "$2"; } # $1 scenario, $2 metric
nth() { # $1 key, $2 repetition from 1: that repetition's value, or nan
    local values
    read -ra values <<<"${RESULTS[$1]:-}"
    echo "${values[$2 - 1]:-nan}"
}
quotient() { # $1 / $2 to 4 places, or nan
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b + 0 == 0)
        print "nan"; else printf "%.4f\n", a / b }'
}
difference() { # $1 - $2 with a sign, or nan
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "")
        print "nan"; else printf "%+.2f\n", a - b }'
}
commas() { # the space-separated values $1 as "a, b, c", or — when there are none
    local values
    read -ra values <<<"${1:-}"
    if ((${#values[@]} == 0)); then printf '—'; else printf '%s, ' "${values[@]}" | sed 's/, $//'; fi
}
span() { # the smallest and largest of the space-separated numbers $1: "a to b", or "a"
    # shellcheck disable=SC2086 # word splitting of the space-separated values is intended
    printf '%s\n' $1 | awk 'NF && $1 != "nan"' | sort -g | sed -n '1p;$p' | uniq | paste -sd ' ' |
        sed 's/ / to /'
}
ran() { [[ -n ${RESULTS[$1/tput]:-} ]]; } # $1 key: whether it was measured
# The keys among $@ that were measured, each as "key value, " with value printf $1 of metric $2.
measured() {
    local format=$1 metric=$2 key
    shift 2
    for key in "$@"; do
        if ran "$key"; then printf '%s %s, ' "$key" "$(fmt "$format" "$(med "$key/$metric")")"; fi
    done | sed 's/, $//'
}
# The split-and-mirror table's scenarios, in the order reported (predict comes with split).
TABLE_SCENARIOS=()
selected split && TABLE_SCENARIOS+=(split)
selected mirror && TABLE_SCENARIOS+=(mirror)
selected split && TABLE_SCENARIOS+=(predict)

echo "## abproxy vs nginx"
echo
echo "- date: $STARTED"
echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $(uname -sr)"
abproxy_run="\`run --config FILE\` with no tuning flags and no tuned config keys (its defaults)"
if ((TUNED)); then
    abproxy_run+="; abproxy-tuned: \`run --threads 1\`, \`max_upstream_connections = 64\`, shadow"
    abproxy_run+=" \`max_queue = 4096\`, \`max_concurrency = 64\`"
fi
echo "- abproxy: $revision, $abproxy_run, RUST_LOG=warn; nginx: $nginx_version," \
    "\`worker_processes 1\`, \`keepalive 64\` (idle connections kept per upstream; no cap on open ones)"
echo "- pinning: proxy on CPU 0; load generator and the three backends (loadtest-backend, one thread each) on CPU 1"
if ((${#TABLE_SCENARIOS[@]} > 0)); then
    echo "- runs: $DURATION each; throughput with \`--mode max --connections $CONNECTIONS\`;" \
        "p99 with \`--rate $RATE --connections $CONNECTIONS\` (from the due time);" \
        "peak RSS (VmHWM) after a $RSS_DURATION run with $RSS_CONNECTIONS connections;" \
        "$USERS users by \`x-user-id\`; median of $REPEATS$(selected h2c &&
            printf '; h2c scenario: no RSS run')$(selected tls &&
            printf '; tls scenario: no fixed-rate or RSS run, see its section')"
else
    echo "- runs: $DURATION each, median of $REPEATS; each scenario's section says what its runs do"
fi
echo "- command: \`$COMMAND_LINE\`"
if ((${#TABLE_SCENARIOS[@]} > 0)); then
    echo
    echo "CPU in µs per request: at max load (\"max\") and at $RATE req/s (\"rate\"), each in all, user"
    echo "space and kernel; switches: the proxy's context switches per request at $RATE req/s,"
    echo "voluntary + involuntary."
    echo
    echo "| scenario | proxy | throughput (req/s) | p99 at $RATE req/s (µs) | CPU max | user max | kernel max | CPU rate | user rate | kernel rate | switches rate | proxy CPU busy (cores) | peak RSS (MiB) |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for scenario in "${TABLE_SCENARIOS[@]}"; do
        case $scenario in
            split) proxies=(nginx abproxy abproxy-tuned direct) ;;
            mirror) proxies=(nginx abproxy abproxy-tuned) ;;
            predict) proxies=(abproxy) ;;
        esac
        for proxy in "${proxies[@]}"; do
            key=$scenario/$proxy
            ran "$key" || continue
            rss=$(med "$key/rss_kib")
            [[ $rss != nan ]] && rss=$(awk -v k="$rss" 'BEGIN { print k / 1024 }')
            switches=$(awk -v v="$(med "$key/rate_vcsw")" -v i="$(med "$key/rate_ivcsw")" \
                'BEGIN { if (v == "nan") print "nan"; else printf "%.3f\n", v + i }')
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$scenario" "$proxy" \
                "$(fmt '%.0f' "$(med "$key/tput")")" "$(fmt '%.0f' "$(med "$key/p99")")" \
                "$(fmt '%.2f' "$(med "$key/cpu_us")")" "$(fmt '%.2f' "$(med "$key/user_us")")" \
                "$(fmt '%.2f' "$(med "$key/sys_us")")" "$(fmt '%.2f' "$(med "$key/rate_cpu_us")")" \
                "$(fmt '%.2f' "$(med "$key/rate_user_us")")" "$(fmt '%.2f' "$(med "$key/rate_sys_us")")" \
                "$(fmt '%.2f' "$switches")" \
                "$(fmt '%.2f' "$(med "$key/busy")")" "$(fmt '%.1f' "$rss")"
        done
        # abproxy against nginx; predict, which nginx has no equivalent of, against abproxy's split.
        pairs=("$scenario/abproxy $scenario/nginx abproxy / nginx")
        ran "$scenario/abproxy-tuned" &&
            pairs+=("$scenario/abproxy-tuned $scenario/nginx abproxy-tuned / nginx")
        [[ $scenario == predict ]] && pairs=("predict/abproxy split/abproxy predict / split (abproxy)")
        for pair in "${pairs[@]}"; do
            read -r over under label <<<"$pair"
            printf '| %s | **%s** | %s | %s | %s | %s | %s | %s | %s | %s | | | %s |\n' "$scenario" "$label" \
                "$(ratio "$(med "$over/tput")" "$(med "$under/tput")")" \
                "$(ratio "$(med "$over/p99")" "$(med "$under/p99")")" \
                "$(ratio "$(med "$over/cpu_us")" "$(med "$under/cpu_us")")" \
                "$(ratio "$(med "$over/user_us")" "$(med "$under/user_us")")" \
                "$(ratio "$(med "$over/sys_us")" "$(med "$under/sys_us")")" \
                "$(ratio "$(med "$over/rate_cpu_us")" "$(med "$under/rate_cpu_us")")" \
                "$(ratio "$(med "$over/rate_user_us")" "$(med "$under/rate_user_us")")" \
                "$(ratio "$(med "$over/rate_sys_us")" "$(med "$under/rate_sys_us")")" \
                "$(ratio "$(med "$over/rss_kib")" "$(med "$under/rss_kib")")"
        done
    done
    echo
    echo "abproxy / nginx within each repetition (the runs of one repetition ran back to back):"
    for scenario in split mirror; do
        selected "$scenario" || continue
        for proxy in abproxy abproxy-tuned; do
            ran "$scenario/$proxy" || continue
            echo "$scenario, $proxy: throughput $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" tput);" \
                "CPU at max $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" cpu_us);" \
                "user CPU at max $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" user_us);" \
                "CPU at $RATE req/s $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" rate_cpu_us);" \
                "p99 $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" p99)."
            echo "$scenario, $proxy, CPU in ns (schedstat), no tick rounding: at max" \
                "$(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" ns_cpu_us)" \
                "(median $(ratio "$(med "$scenario/$proxy/ns_cpu_us")" "$(med "$scenario/nginx/ns_cpu_us")"));" \
                "at $RATE req/s $(pair_ratio_of "$scenario/$proxy" "$scenario/nginx" rate_ns_cpu_us)" \
                "(median $(ratio "$(med "$scenario/$proxy/rate_ns_cpu_us")" "$(med "$scenario/nginx/rate_ns_cpu_us")"))."
        done
    done
    if selected split && selected mirror; then
        echo
        echo "What mirroring every request adds at $RATE req/s (both proxies mirror all of them there):"
        echo "mirror's CPU per request minus split's, medians, and that over split's."
        for proxy in nginx abproxy abproxy-tuned; do
            ran "mirror/$proxy" || continue
            a=$(med "mirror/$proxy/rate_cpu_us") b=$(med "split/$proxy/rate_cpu_us")
            echo "- $proxy: $(fmt '%.2f' "$a") − $(fmt '%.2f' "$b") = $(fmt '%+.2f' "$(difference "$a" "$b")") µs," \
                "$(awk -v a="$a" -v b="$b" 'BEGIN { if (a == "nan" || b == "nan" || b + 0 == 0) printf "—";
                    else printf "%.2f×", (a - b) / b }') of a split request" \
                "(user $(fmt '%+.2f' "$(difference "$(med "mirror/$proxy/rate_user_us")" "$(med "split/$proxy/rate_user_us")")")," \
                "kernel $(fmt '%+.2f' "$(difference "$(med "mirror/$proxy/rate_sys_us")" "$(med "split/$proxy/rate_sys_us")")") µs)"
        done
    fi
fi

# predict against split, both abproxy: per repetition (the two runs next to each other), then
# the medians of the runs and of the per-repetition ratios and differences.
if selected split; then
    declare -A PAIRED=()  # metric/ratio and metric/diff -> space-separated values, one per repetition
    echo
    echo "predict against split, abproxy (the two runs of each repetition next to each other): CPU per"
    echo "request at max load, in all and in user space (the kernel's part is the rest), and at $RATE req/s:"
    echo
    echo "| repetition | throughput split / predict (req/s) | CPU split / predict (µs/req) | predict / split | predict − split (µs/req) | user CPU split / predict (µs/req) | predict / split | predict − split (µs/req) | at $RATE req/s: predict − split (µs/req) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for ((rep = 1; rep <= REPEATS; rep++)); do
        row=()
        for metric in cpu_us user_us rate_cpu_us; do
            a=$(nth "predict/abproxy/$metric" "$rep") b=$(nth "split/abproxy/$metric" "$rep")
            q=$(quotient "$a" "$b") d=$(difference "$a" "$b")
            PAIRED[$metric/ratio]="${PAIRED[$metric/ratio]:-} $q"
            PAIRED[$metric/diff]="${PAIRED[$metric/diff]:-} $d"
            row+=("$(fmt '%.2f' "$b") / $(fmt '%.2f' "$a")" "$(fmt '%.3f×' "$q")" "$(fmt '%+.2f' "$d")")
        done
        printf '| %s | %s / %s | %s | %s | %s | %s | %s | %s | %s |\n' "$rep" \
            "$(fmt '%.0f' "$(nth split/abproxy/tput "$rep")")" \
            "$(fmt '%.0f' "$(nth predict/abproxy/tput "$rep")")" "${row[@]:0:6}" "${row[8]}"
    done
    printf '| median | %s / %s | %s / %s | %s | %s | %s / %s | %s | %s | %s |\n' \
        "$(fmt '%.0f' "$(med split/abproxy/tput)")" "$(fmt '%.0f' "$(med predict/abproxy/tput)")" \
        "$(fmt '%.2f' "$(med split/abproxy/cpu_us)")" "$(fmt '%.2f' "$(med predict/abproxy/cpu_us)")" \
        "$(fmt '%.3f×' "$(median "${PAIRED[cpu_us/ratio]}")")" \
        "$(fmt '%+.2f' "$(median "${PAIRED[cpu_us/diff]}")")" \
        "$(fmt '%.2f' "$(med split/abproxy/user_us)")" "$(fmt '%.2f' "$(med predict/abproxy/user_us)")" \
        "$(fmt '%.3f×' "$(median "${PAIRED[user_us/ratio]}")")" \
        "$(fmt '%+.2f' "$(median "${PAIRED[user_us/diff]}")")" \
        "$(fmt '%+.2f' "$(median "${PAIRED[rate_cpu_us/diff]}")")"
    echo
    echo "The median row: medians of the runs, then of the per-repetition ratios and differences."
    cpu_diff=$(median "${PAIRED[cpu_us/diff]}")
    user_diff=$(median "${PAIRED[user_us/diff]}")
    verdict=$(awk -v d="$cpu_diff" 'BEGIN { if (d == "nan") print "not measured";
        else if (d < 1) print "met"; else print "not met" }')
    echo "Aim of issue 11, predict under 1 µs of CPU per request more than split: median difference" \
        "$(fmt '%+.2f' "$cpu_diff") µs (user space $(fmt '%+.2f' "$user_diff") µs; repetitions" \
        "$(span "${PAIRED[cpu_us/diff]}") µs): $verdict."
    echo "Share of answers whose prediction abproxy read, predict max runs:" \
        "$(commas "${RESULTS[predict/abproxy/read_pct]:-}") %. The canary guard after each predict run" \
        "(state@weight): $(commas "${RESULTS[predict/abproxy/guard]:-}"); checks judged:" \
        "$(commas "${RESULTS[predict/abproxy/checks]:-}"), of which failed:" \
        "$(commas "${RESULTS[predict/abproxy/failed]:-}")."
fi
if ((${#TABLE_SCENARIOS[@]} > 0)); then
    echo
    echo "Throughput: higher is better; p99, CPU and RSS: lower is better. \"CPU busy\" is the proxy's"
    echo "CPU time over the max run's wall time: near 1.00 the proxy was the bottleneck, well below it"
    echo "the load generator or backends on CPU 1 were. nginx CPU counts master and worker; its RSS is"
    echo "the worker's (master: $(fmt '%.1f' "$(awk -v k="$(med "${TABLE_SCENARIOS[0]}/nginx/master_kib")" \
        'BEGIN { if (k == "nan") print "nan"; else print k / 1024 }')") MiB more)."
    if selected split; then
        echo "nginx splits with \`split_clients\` (MurmurHash2), abproxy with SHA-256 buckets: same 80/20"
        echo "shares, different users per variant. Control share of requests seen in the max runs:"
        echo "nginx $(fmt '%.1f' "$(med split/nginx/control_pct)") %, abproxy $(fmt '%.1f' "$(med split/abproxy/control_pct)") %," \
            "abproxy predict $(fmt '%.1f' "$(med predict/abproxy/control_pct)") %."
    fi
    ALL_KEYS=(split/nginx split/abproxy split/abproxy-tuned split/direct mirror/nginx mirror/abproxy
        mirror/abproxy-tuned predict/abproxy)
    echo "In the rate runs the achieved rate was: $(measured '%.0f' rate_tput "${ALL_KEYS[@]}") req/s."
    echo "TCP connections opened per 1000 requests during the max runs (system-wide ActiveOpens, so"
    echo "the load generator's $CONNECTIONS count too; near 0 means upstream keep-alive works):" \
        "$(measured '%.1f' opens_per_k "${ALL_KEYS[@]/split\/direct/}")."
    echo "Upstream TCP segments per request in the max runs (proxy to backends, both directions," \
        "shadows included): $(measured '%.2f' segs_per_req "${ALL_KEYS[@]/split\/direct/}")."
    echo "Upstream connections at the end of the max runs: $(measured '%.0f' upstream_conns \
        "${ALL_KEYS[@]/split\/direct/}")."
    if selected mirror; then
        echo "Mirroring: nginx mirrors every request (the next request on a client connection waits for"
        echo "the mirror to finish); abproxy drops what does not fit its shadow queue and counts it."
        for proxy in abproxy abproxy-tuned; do
            ran "mirror/$proxy" || continue
            echo "$proxy's share of requests not mirrored:" \
                "$(fmt '%.1f' "$(med "mirror/$proxy/drop_max_pct")") % in the max runs" \
                "($(commas "${RESULTS[mirror/$proxy/drop_max_pct]:-}"))," \
                "$(fmt '%.1f' "$(med "mirror/$proxy/drop_rate_pct")") % at $RATE req/s" \
                "($(commas "${RESULTS[mirror/$proxy/drop_rate_pct]:-}"))."
        done
    fi
fi
if selected h2c; then
    echo
    echo "### h2c upstream: abproxy over HTTP/2 cleartext against HTTP/1.1, and nginx grpc_pass"
    echo
    echo "The split, with HTTP/1.1 clients as above ($CONNECTIONS connections; $DURATION max and"
    echo "$RATE req/s runs); only the proxy's upstream side changes. abproxy runs \`run --config"
    echo "FILE\` with no tuning flags; abproxy-h2c adds \`protocol = \"h2c\"\` to both variants"
    echo "(\`h2_connections\` default 2 per upstream). nginx-grpc sends each request as an HTTP/2"
    echo "stream with \`grpc_pass grpc://\$variant\`, one stream at a time per connection,"
    echo "\`keepalive 64\`. Upstream segments: segs_in + segs_out of the proxy's sockets to the"
    echo "backends (ss -ti) over the run, per request; upstream connections: those established at"
    echo "the end of the max run. Backends' CPU: the three loadtest-backend processes (on CPU 1)."
    echo
    echo "At max load:"
    echo
    echo "| proxy | upstream | throughput (req/s) | proxy CPU (µs/req) | user (µs/req) | kernel (µs/req) | proxy CPU busy (cores) | backends' CPU (µs/req) | upstream connections | upstream segments per request | TCP opens per 1000 requests |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    h2c_proxies=(nginx-grpc abproxy-h1 abproxy-h2c)
    h2c_pairs=(abproxy-h2c/abproxy-h1 abproxy-h2c/nginx-grpc abproxy-h1/nginx-grpc)
    for proxy in "${h2c_proxies[@]}"; do
        key=h2c/$proxy
        case $proxy in
            nginx-grpc) upstream="HTTP/2 (grpc_pass), 1 stream per connection" ;;
            abproxy-h1) upstream="HTTP/1.1" ;;
            abproxy-h2c) upstream="h2c, multiplexed" ;;
        esac
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$proxy" "$upstream" \
            "$(fmt '%.0f' "$(med "$key/tput")")" "$(fmt '%.1f' "$(med "$key/cpu_us")")" \
            "$(fmt '%.1f' "$(med "$key/user_us")")" "$(fmt '%.1f' "$(med "$key/sys_us")")" \
            "$(fmt '%.2f' "$(med "$key/busy")")" "$(fmt '%.1f' "$(med "$key/backend_us")")" \
            "$(fmt '%.0f' "$(med "$key/upstream_conns")")" \
            "$(fmt '%.2f' "$(med "$key/segs_per_req")")" "$(fmt '%.1f' "$(med "$key/opens_per_k")")"
    done
    for pair in "${h2c_pairs[@]}"; do
        over=h2c/${pair%/*} under=h2c/${pair#*/}
        printf '| **%s / %s** | | %s | %s | %s | %s | | %s | | %s | |\n' "${pair%/*}" "${pair#*/}" \
            "$(ratio "$(med "$over/tput")" "$(med "$under/tput")")" \
            "$(ratio "$(med "$over/cpu_us")" "$(med "$under/cpu_us")")" \
            "$(ratio "$(med "$over/user_us")" "$(med "$under/user_us")")" \
            "$(ratio "$(med "$over/sys_us")" "$(med "$under/sys_us")")" \
            "$(ratio "$(med "$over/backend_us")" "$(med "$under/backend_us")")" \
            "$(ratio "$(med "$over/segs_per_req")" "$(med "$under/segs_per_req")")"
    done
    echo
    echo "At $RATE req/s (no proxy saturated, so the same work for each):"
    echo
    echo "| proxy | p99 (µs) | proxy CPU (µs/req) | kernel (µs/req) | upstream segments per request |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    for proxy in "${h2c_proxies[@]}"; do
        key=h2c/$proxy
        printf '| %s | %s | %s | %s | %s |\n' "$proxy" "$(fmt '%.0f' "$(med "$key/p99")")" \
            "$(fmt '%.1f' "$(med "$key/rate_cpu_us")")" "$(fmt '%.1f' "$(med "$key/rate_sys_us")")" \
            "$(fmt '%.2f' "$(med "$key/rate_segs_per_req")")"
    done
    for pair in "${h2c_pairs[@]}"; do
        over=h2c/${pair%/*} under=h2c/${pair#*/}
        printf '| **%s / %s** | %s | %s | %s | %s |\n' "${pair%/*}" "${pair#*/}" \
            "$(ratio "$(med "$over/p99")" "$(med "$under/p99")")" \
            "$(ratio "$(med "$over/rate_cpu_us")" "$(med "$under/rate_cpu_us")")" \
            "$(ratio "$(med "$over/rate_sys_us")" "$(med "$under/rate_sys_us")")" \
            "$(ratio "$(med "$over/rate_segs_per_req")" "$(med "$under/rate_segs_per_req")")"
    done
    echo
    echo "Within each repetition (runs back to back), at max load:"
    for pair in abproxy-h2c/abproxy-h1 abproxy-h2c/nginx-grpc; do
        over=h2c/${pair%/*} under=h2c/${pair#*/}
        echo "${pair%/*} / ${pair#*/}: throughput $(pair_ratio_of "$over" "$under" tput); CPU" \
            "$(pair_ratio_of "$over" "$under" cpu_us); upstream segments" \
            "$(pair_ratio_of "$over" "$under" segs_per_req)."
    done
    echo "Upstream segments per request, every max run: $(for proxy in "${h2c_proxies[@]}"; do
        printf '%s %s; ' "$proxy" "$(commas "${RESULTS[h2c/$proxy/segs_per_req]:-}")"
    done | sed 's/; $//'); every $RATE req/s run: $(for proxy in "${h2c_proxies[@]}"; do
        printf '%s %s; ' "$proxy" "$(commas "${RESULTS[h2c/$proxy/rate_segs_per_req]:-}")"
    done | sed 's/; $//')."
    echo "Achieved rate in the $RATE req/s runs: $(measured '%.0f' rate_tput h2c/nginx-grpc \
        h2c/abproxy-h1 h2c/abproxy-h2c) req/s. Control share of requests seen in the max runs:" \
        "$(measured '%.1f' control_pct h2c/nginx-grpc h2c/abproxy-h1 h2c/abproxy-h2c) %."
fi
if selected tls; then
    rustls_version=$(awk '/^name = "rustls"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' \
        "$REPO/Cargo.lock" 2>/dev/null || true)
    nginx_openssl=$("$NGINX" -V 2>&1 | sed -n 's/^built with \(OpenSSL [^ ]*\).*(running with \(OpenSSL [^ )]*\)[^)]*).*/\2 (built with \1)/p;
        s/^built with \(OpenSSL [^ ]*\)[^(]*$/\1/p' | head -n 1)
    tls_label() { # $1 run (h1 | hs)
        if [[ $1 == h1 ]]; then
            echo "keep-alive HTTP/1.1 over TLS ($CONNECTIONS connections)"
        else
            echo "new connections, full handshakes ($HS_CONNECTIONS in flight)"
        fi
    }
    echo
    echo "### TLS termination: abproxy (rustls) against nginx (OpenSSL)"
    echo
    echo "The split behind TLS, driven by the project's load generator on CPU 1 (rustls"
    echo "${rustls_version:-?} with ring, as abproxy). It offers only TLS 1.3, $CIPHER and an"
    echo "$GROUP key share, with ALPN http/1.1, SNI localhost and no session resumption (every new"
    echo "connection a full handshake). nginx allows only that, on ${nginx_openssl:-OpenSSL ?}:"
    echo "\`ssl_protocols TLSv1.3\`, \`ssl_conf_command Ciphersuites $CIPHER\`,"
    echo "\`ssl_ecdh_curve $GROUP\`, session cache and tickets off, \`keepalive 64\`. abproxy runs"
    echo "\`run --config FILE\` with \`[server.tls]\` cert and key and no tuning flags (rustls's"
    echo "defaults, which follow the client's offer). Both present one ECDSA P-256 certificate, signed"
    echo "by a P-256 CA made for the run. Each run has a fresh proxy and a $WARMUP keep-alive warm-up;"
    echo "runs of $DURATION, median of $REPEATS."
    echo
    echo "- h1: \`--mode max --connections $CONNECTIONS\`, keep-alive. Its $CONNECTIONS handshakes fall in the"
    echo "  measured run (well under 1 % of the proxy's CPU at these rates)."
    echo "- hs: \`--new-connections --mode max --connections $HS_CONNECTIONS\`: each request a TCP connect, a full"
    echo "  handshake, the request with \`Connection: close\` and the close. Its rate is handshakes per"
    echo "  second, and its CPU per handshake includes the proxied request."
    echo
    echo "Negotiated, as the load generator saw every handshake (all runs):"
    echo
    echo "| proxy | run | protocol | cipher | key exchange | ALPN | handshake kinds | handshakes per run |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    for proxy in nginx abproxy; do
        for run in h1 hs; do
            m=""
            [[ $run == hs ]] && m=hs_
            # shellcheck disable=SC2086 # one word per run
            while IFS='|' read -r version cipher group alpn kinds; do
                printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$proxy" "$run" "$version" \
                    "$cipher" "$group" "$alpn" "$kinds" "$(commas "${RESULTS[tls/$proxy/${m}handshakes]:-}")"
            done < <(printf '%s\n' ${RESULTS[tls/$proxy/${m}negotiated]:-} | sort -u)
        done
    done
    echo
    echo "CPU in µs per request (h1) or per handshake with its request (hs): the proxy's in all, user"
    echo "space and kernel; the load generator's own (its user + system time, from bash \`times\`, on CPU"
    echo "1 with the backends). Busy: CPU time over the run's wall time, in cores."
    echo
    echo "| run | proxy | rate (per s) | proxy CPU | user | kernel | proxy CPU busy | load generator CPU | load generator busy |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for run in h1 hs; do
        m=""
        [[ $run == hs ]] && m=hs_
        for proxy in nginx abproxy; do
            key=tls/$proxy/$m
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$(tls_label "$run")" "$proxy" \
                "$(fmt '%.0f' "$(med "${key}tput")")" "$(fmt '%.2f' "$(med "${key}cpu_us")")" \
                "$(fmt '%.2f' "$(med "${key}user_us")")" "$(fmt '%.2f' "$(med "${key}sys_us")")" \
                "$(fmt '%.2f' "$(med "${key}busy")")" "$(fmt '%.2f' "$(med "${key}client_us")")" \
                "$(fmt '%.2f' "$(med "${key}client_busy")")"
        done
        over=tls/abproxy/$m under=tls/nginx/$m
        printf '| %s | **abproxy / nginx** | %s | %s | %s | %s | | %s | |\n' "$(tls_label "$run")" \
            "$(ratio "$(med "${over}tput")" "$(med "${under}tput")")" \
            "$(ratio "$(med "${over}cpu_us")" "$(med "${under}cpu_us")")" \
            "$(ratio "$(med "${over}user_us")" "$(med "${under}user_us")")" \
            "$(ratio "$(med "${over}sys_us")" "$(med "${under}sys_us")")" \
            "$(ratio "$(med "${over}client_us")" "$(med "${under}client_us")")"
    done
    echo
    echo "abproxy / nginx within each repetition (the two runs back to back), then the median of those:"
    echo
    verdicts=()
    for run in h1 hs; do
        m=""
        [[ $run == hs ]] && m=hs_
        rates=$(pair_ratio_of tls/abproxy tls/nginx "${m}tput")
        cpus=$(pair_ratio_of tls/abproxy tls/nginx "${m}cpu_us")
        users=$(pair_ratio_of tls/abproxy tls/nginx "${m}user_us")
        r=$(median "${cpus//,/}")
        echo "- $run: rate $rates (median $(fmt '%.2f' "$(median "${rates//,/}")")); CPU per" \
            "$([[ $run == hs ]] && echo handshake || echo request) $cpus (median $(fmt '%.2f' "$r"));" \
            "user CPU $users (median $(fmt '%.2f' "$(median "${users//,/}")"))"
        verdicts+=("$run $(fmt '%.2f×' "$r") $(awk -v r="$r" 'BEGIN { if (r == "nan") print "(not measured)";
            else if (r <= 1) print "(at or below)"; else printf "(%.0f %% above)\n", (r - 1) * 100 }')")
    done
    echo
    echo "Aim of issue 12, abproxy's CPU per request at or below nginx's: median paired ratio" \
        "$(printf '%s, ' "${verdicts[@]}" | sed 's/, $//')."
    echo
    echo "Busy near 1.00: the proxy was the bottleneck. Well below it, CPU 1 was: the load generator"
    echo "(its rustls client handshakes too, in hs) and the two backends share it. Control share of"
    echo "requests in the h1 runs: nginx $(fmt '%.1f' "$(med tls/nginx/control_pct)") %, abproxy" \
        "$(fmt '%.1f' "$(med tls/abproxy/control_pct)") %."
fi
remarks=0
for key in split/nginx split/abproxy split/abproxy-tuned split/direct mirror/nginx mirror/abproxy \
    mirror/abproxy-tuned predict/abproxy h2c/nginx-grpc h2c/abproxy-h1 h2c/abproxy-h2c tls/nginx \
    tls/abproxy; do
    if [[ -n ${NOTES[$key]:-} ]]; then
        ((remarks++)) || { echo; echo "Remarks:"; echo; }
        while IFS= read -r line; do
            if [[ -n $line ]]; then echo "- $key: $line"; fi
        done <<<"${NOTES[$key]}"
    fi
done
