#!/usr/bin/env bash
# Added latency of the gateway on loopback: wrk with one connection (one call
# at a time) straight to a fixed-answer upstream (nginx `return 200`) and
# through pandagate (signing, access log to a file), same upstream.
#
#   bench/latency.sh [seconds]      (default 10 s per run, after a 2 s warm-up)
#
# Installs wrk and nginx from Debian when missing. Talks only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}

need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
up_port=$(free_port); gw_port=$(free_port)
cleanup() { [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null; nginx -p "$work" -c nginx.conf -s stop 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work;
  server {
    listen 127.0.0.1:$up_port;
    keepalive_requests 1000000;
    location / {
      default_type application/json;
      return 200 '{"requestId":"4cfda0b725184ab8a1e3ee3b9051ec35","code":200,"developId":"1014533973088404335","msg":"ok","data":{}}';
    }
  }
}
CONF
nginx -p "$work" -c nginx.conf

cargo build --release -q
PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret \
PANDAGATE_LISTEN=127.0.0.1:$gw_port PANDAGATE_UPSTREAM=http://127.0.0.1:$up_port \
PANDAGATE_LOG_FORMAT=json env ${GW_ENV:-} ./target/release/pandagate >"$work/access.log" 2>"$work/gateway.err" &
gw_pid=$!
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$gw_port/open/product/get" && break; sleep 0.05; done

run() { # name url
  wrk -t1 -c1 -d2s "$2" >/dev/null
  wrk -t1 -c1 -d"${secs}s" --latency "$2" > "$work/$1.txt"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/$1.txt")
  p50=$(awk '$1=="50%" {print $2}' "$work/$1.txt")
  p99=$(awk '$1=="99%" {print $2}' "$work/$1.txt")
  printf '%-10s %10s calls/s   p50 %8s   p99 %8s\n' "$1" "$rps" "$p50" "$p99"
}
echo "one connection, ${secs}s, $(nproc) cores"
run direct "http://127.0.0.1:$up_port/open/product/get?itemId=1"
run pandagate "http://127.0.0.1:$gw_port/open/product/get?itemId=1"
echo "access-log lines written: $(wc -l < "$work/access.log")"
