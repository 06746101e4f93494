# lib.sh: helpers shared by loadtest/compare.sh, compare-tls.sh, floor.sh and callgrind.sh.
# shellcheck shell=bash
#
# Sourced, not run: `source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"` after `set -euo pipefail`.
# Before sourcing, the script sets LOG_TAG (the [tag] of its progress lines). At call time the
# functions use the script's globals:
#   TMP      temp dir (logs, and where failures point to)
#   PIDS     array of the long-lived children (backends and proxies)
#   BACKEND  the loadtest-backend binary
#   CLK_TCK  clock ticks per second
#   RESULTS  associative array "scenario/proxy/metric" -> space-separated values
#   CERT, KEY, CIPHER, GROUP  the TLS certificate, its key, and the one suite and group offered
# It holds only what both scripts do the same way; what differs (cleanup, note, the proxies'
# start, stop and CPU counters, pair_ratios) stays in each script.

# ---------------------------------------------------------------------------------------------
# nginx

# nginx's TLS directives in both comparisons, for its server block: the run's $CERT and $KEY,
# TLS 1.3 only with one suite ($CIPHER) and one group ($GROUP), and every handshake a full one
# (no session cache, no tickets; OpenSSL still sends its two TLS 1.3 tickets, never usable).
nginx_tls() {
    cat <<EOF
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites $CIPHER;
        ssl_ecdh_curve $GROUP;
        ssl_session_cache off;
        ssl_session_tickets off;
EOF
}

# The 80/20 split on x-user-id of floor.sh and callgrind.sh, for a proxy listening on port $1
# with the control and treatment backends on $1+1 and $1+2 (abproxy's admin port: $1+9).
split_abproxy_conf() {
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin = "127.0.0.1:$(($1 + 9))"
[assignment]
sources = ["header:x-user-id"]
[[variant]]
name = "control"
upstream = "http://127.0.0.1:$(($1 + 1))"
weight = 80
[[variant]]
name = "treatment"
upstream = "http://127.0.0.1:$(($1 + 2))"
weight = 20
EOF
}

# The same split for nginx (one worker, `keepalive 64` as in compare.sh), its files in $2;
# $3: more main-context directives (`master_process off;` to run under valgrind).
split_nginx_conf() {
    cat <<EOF
worker_processes 1;
daemon off;
${3:-}
pid $2/nginx.pid;
error_log $2/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $2/body;
    proxy_temp_path $2/proxy;
    fastcgi_temp_path $2/fastcgi;
    uwsgi_temp_path $2/uwsgi;
    scgi_temp_path $2/scgi;
    keepalive_requests 1000000;
    upstream control { server 127.0.0.1:$(($1 + 1)); keepalive 64; keepalive_requests 1000000; }
    upstream treatment { server 127.0.0.1:$(($1 + 2)); keepalive 64; keepalive_requests 1000000; }
    split_clients "\${http_x_user_id}" \$variant { 80% control; * treatment; }
    server {
        listen 127.0.0.1:$1 backlog=1024;
        location / {
            proxy_pass http://\$variant;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# ---------------------------------------------------------------------------------------------
# Messages

# Prints the script's header comment (its usage) and exits with $1 (default 2).
usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2
    exit "${1:-2}"
}

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() {
    printf '[%s] error: %s\n' "$LOG_TAG" "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------
# Processes

# Waits up to $2 seconds for PID $1 to exit, then kills it.
stop_wait() {
    local pid=$1 tries=$(($2 * 10))
    while kill -0 "$pid" 2>/dev/null && ((tries-- > 0)); do
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Drops PID $1 from PIDS.
forget_pid() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ $pid == "$1" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# The children of PID $1.
children_of() {
    local stat rest fields
    for stat in /proc/[0-9]*/stat; do
        { stat=$(<"$stat"); } 2>/dev/null || continue
        rest=${stat##*) }
        read -ra fields <<<"$rest"
        [[ ${fields[1]} == "$1" ]] && echo "${stat%% *}"
    done
    return 0
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Polls until URL answers 200 (up to 10 s), failing early if PID died. -k: the TLS script's
# proxies present a self-signed certificate (no effect on http:// URLs).
wait_ready() {
    local url=$1 pid=$2 what=$3 tries=100
    until curl -skf -o /dev/null --max-time 1 -H 'x-user-id: probe' "$url"; do
        kill -0 "$pid" 2>/dev/null || die "$what exited during startup; see $TMP"
        ((tries-- > 0)) || die "$what not ready after 10 s; see $TMP"
        sleep 0.1
    done
}

# Starts backend $1 on 127.0.0.1:$2, one thread, on CPU 1 with the load generator.
start_backend() {
    local name=$1 port=$2
    taskset -c 1 "$BACKEND" --listen "127.0.0.1:$port" --name "$name" \
        >"$TMP/backend-$name.log" 2>&1 &
    PIDS+=("$!")
    wait_ready "http://127.0.0.1:$port/" "$!" "backend $name"
}

# ---------------------------------------------------------------------------------------------
# Results and the report

# CPU time of processes $@ in clock ticks, summed: "user system" (utime, stime). A process
# that has exited counts nothing.
cpu_ticks() {
    local pid stat rest fields user=0 system=0
    for pid in "$@"; do
        { stat=$(<"/proc/$pid/stat"); } 2>/dev/null || continue
        rest=${stat##*) }
        read -ra fields <<<"$rest"
        # Fields 14 and 15 of stat(5); `rest` starts at field 3.
        user=$((user + fields[11]))
        system=$((system + fields[12]))
    done
    echo "$user $system"
}

# Microseconds per unit (answer, request or handshake) of CPU ticks $1 over $2 units.
us_per() {
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.2f", (n > 0 ? t * 1e6 / hz / n : 0) }'
}

# Appends value $2 to RESULTS key $1.
record() { RESULTS[$1]="${RESULTS[$1]:-} $2"; }

# Records the proxy's CPU per unit (answer or handshake) under the key prefix $1: cpu_us, and its
# user_us and kernel sys_us parts, from $2 user and $3 system clock ticks over $4 units; with $5,
# the run's wall time in seconds, also busy (cores: CPU time over wall time).
# Time on the CPU of every thread of the processes "$@", in ns (/proc/PID/task/*/schedstat):
# exact where utime and stime count whole clock ticks (10 ms; at 5000 req/s for 6 s, one tick
# is ~1.5 % of a proxy's CPU). Threads that exit during a run take their time with them.
cpu_ns() {
    local pid
    for pid in "$@"; do
        cat /proc/"$pid"/task/*/schedstat 2>/dev/null || true
    done | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

record_cpu() {
    local at=$1 user=$2 system=$3 units=$4 elapsed=${5:-}
    record "${at}cpu_us" "$(us_per $((user + system)) "$units")"
    record "${at}user_us" "$(us_per "$user" "$units")"
    record "${at}sys_us" "$(us_per "$system" "$units")"
    if [[ -n $elapsed ]]; then
        record "${at}busy" "$(awk -v t=$((user + system)) -v hz="$CLK_TCK" -v s="$elapsed" \
            'BEGIN { printf "%.2f", (s > 0 ? t / hz / s : 0) }')"
    fi
}

# The median of the space-separated numbers $1 ("nan" ignored), or nan when there are none.
median() {
    # shellcheck disable=SC2086 # word splitting of the space-separated values is intended
    printf '%s\n' $1 | awk 'NF && $1 != "nan"' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "nan";
             else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med() { median "${RESULTS[$1]:-}"; }
fmt() { # $1 printf format, $2 value; "—" when missing
    # shellcheck disable=SC2059 # the format is the argument
    if [[ -z $2 || $2 == nan ]]; then printf '—'; else printf "$1" "$2"; fi
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b + 0 == 0)
        printf "—"; else printf "%.2f×", a / b }'
}
