#!/usr/bin/env bash
# How much CPU one proxied call costs, and how much of it is the floor that
# hyper + tokio + the loopback kernel path set before pandagate does anything:
#   paired     examples/paired_proxy.rs: a current-thread runtime and SO_REUSEPORT
#              listener per core, each caller connection paired with one upstream
#              connection (hyper server + hyper::client::conn, nothing else)
#   bare-mt    examples/bare_proxy.rs (hyper server + hyper-util client, nothing else)
#   bare-ct    the same on a current-thread runtime
#   nginx      nginx proxy_pass, keepalive pool, credential headers, access log
#   pandagate  signing, json access log to a file
#   pandagate-1t  the same with worker_threads = 1 (one serving thread)
# each in front of the same nginx `return 200` upstream, wrk -t2 at one
# connection count. CPU per call = the proxy's user+system CPU time during
# the measured seconds / calls answered (from /proc/PID/stat, 10 ms ticks);
# user per call = its user time alone (the rest is the kernel's).
# Runs are interleaved; the last lines give the median of each target.
#
#   bench/floor.sh [--runs 3] [--seconds 5] [--conns 64]
#
# Installs wrk and nginx from Debian when missing. Talks only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
runs=3; secs=5; conns=64
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;; --seconds) secs=$2; shift 2 ;; --conns) conns=$2; shift 2 ;;
    *) echo "floor.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

need wrk wrk
need nginx nginx
cargo build --release -q --bin pandagate --example bare_proxy --example paired_proxy

work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  for conf in up px; do [ -f "$work/$conf.pid" ] && nginx -p "$work" -c "$work/$conf.conf" -s stop 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
up=$(free_port)
body='{"requestId":"4cfda0b725184ab8a1e3ee3b9051ec35","code":200,"developId":"1014533973088404335","msg":"ok","data":{}}'
cat > "$work/up.conf" <<CONF
worker_processes 1; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work;
  server { listen 127.0.0.1:$up; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '$body'; } } }
CONF
nginx -p "$work" -c "$work/up.conf" 2>/dev/null

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
uticks() { awk '{print $14}' "/proc/$1/stat"; }
start() { # target port -> sets pid
  case $1 in
    paired) LISTEN=127.0.0.1:$2 UPSTREAM_ADDR=127.0.0.1:$up target/release/examples/paired_proxy & pid=$! ;;
    bare-mt) LISTEN=127.0.0.1:$2 UPSTREAM=http://127.0.0.1:$up target/release/examples/bare_proxy & pid=$! ;;
    bare-ct) FLAVOR=current_thread LISTEN=127.0.0.1:$2 UPSTREAM=http://127.0.0.1:$up target/release/examples/bare_proxy & pid=$! ;;
    pandagate|pandagate-1t)
      threads=0; [ "$1" = pandagate-1t ] && threads=1
      PANDAGATE_WORKER_THREADS=$threads PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret PANDAPON_USER_ID=bench-user \
      PANDAGATE_LISTEN=127.0.0.1:$2 PANDAGATE_ADMIN_LISTEN=127.0.0.1:0 PANDAGATE_CONTROL_LISTEN=127.0.0.1:0 PANDAGATE_UPSTREAM=http://127.0.0.1:$up \
      PANDAGATE_LOG_FORMAT=json target/release/pandagate >"$work/access.log" 2>"$work/gw.err" & pid=$! ;;
    nginx)
      cat > "$work/px.conf" <<CONF
worker_processes auto; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log $work/px.log combined; client_body_temp_path $work; proxy_temp_path $work;
  upstream u { server 127.0.0.1:$up; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$2; keepalive_requests 1000000;
    location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header access-key bench-key; proxy_set_header user-id bench-user; proxy_set_header signature x; } } }
CONF
      nginx -p "$work" -c "$work/px.conf" 2>/dev/null; pid="" ;;
  esac
}
stop() { # target
  if [ "$1" = nginx ]; then nginx -p "$work" -c "$work/px.conf" -s stop 2>/dev/null; sleep 0.3
  else kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; fi
}
proxy_pids() { # target -> pids whose CPU counts
  if [ "$1" = nginx ]; then pgrep -f "nginx: worker process" -P "$(cat "$work/px.pid")" | tr '\n' ' '; else echo "$pid"; fi
}

results="$work/results"
: > "$results"
echo "$(nproc) cores, wrk -t2 -c$conns, ${secs}s per measurement, $runs runs"
for run in $(seq 1 "$runs"); do
  for t in paired bare-mt bare-ct nginx pandagate pandagate-1t; do
    port=$(free_port)
    start "$t" "$port"
    url="http://127.0.0.1:$port/open/product/get?itemId=1"
    for _ in $(seq 1 100); do curl -sf -o /dev/null "$url" && break; sleep 0.05; done
    wrk -t2 -c"$conns" -d2s "$url" >/dev/null
    pids=$(proxy_pids "$t")
    c0=0 u0=0; for p in $pids; do c0=$((c0 + $(ticks "$p"))); u0=$((u0 + $(uticks "$p"))); done
    wrk -t2 -c"$conns" -d"${secs}s" "$url" > "$work/wrk.txt"
    c1=0 u1=0; for p in $pids; do c1=$((c1 + $(ticks "$p"))); u1=$((u1 + $(uticks "$p"))); done
    stop "$t"
    n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    cpu=$(awk -v d=$((c1 - c0)) -v n="$n" 'BEGIN { printf "%.1f", d * 10000 / n }')
    user=$(awk -v d=$((u1 - u0)) -v n="$n" 'BEGIN { printf "%.1f", d * 10000 / n }')
    printf 'run %d  %-12s %9.0f calls/s  %6s us CPU/call  %6s us user/call\n' "$run" "$t" "$rps" "$cpu" "$user"
    echo "$t $rps $cpu $user" >> "$results"
  done
done
median() { # target column
  awk -v t="$1" -v c="$2" '$1 == t { print $c }' "$results" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
echo "median:"
for t in paired bare-mt bare-ct nginx pandagate pandagate-1t; do
  printf '  %-12s %9.0f calls/s  %6s us CPU/call  %6s us user/call\n' "$t" "$(median "$t" 2)" "$(median "$t" 3)" "$(median "$t" 4)"
done
