#!/usr/bin/env bash
# Two (or more) pandagate binaries, one after the other, round after round,
# against the same fixed-answer nginx upstream: calls/s (wrk) and the
# gateway's CPU time per call (/proc/PID/stat), per run. For telling a real
# change in per-call cost from the noise of a shared box: interleaving puts
# both binaries under the same neighbours, and the per-run figures show the
# spread that a median would hide.
#
#   bench/ab.sh [--rounds 5] [--seconds 8] [--conns 64] BINARY_A BINARY_B [...]
#
# Installs nothing: needs wrk, nginx and curl (bench/compare.sh installs the
# first two). Talks only to 127.0.0.1, on free ports; stops what it started.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

rounds=5 secs=8 conns=64
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --help|-h) usage; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || { echo "ab.sh: give two binaries or more (see --help)" >&2; exit 2; }
for b in "$@"; do [ -x "$b" ] || { echo "ab.sh: $b is not executable" >&2; exit 2; }; done
for tool in wrk nginx curl python3; do
  command -v "$tool" >/dev/null || { echo "ab.sh: $tool is missing" >&2; exit 2; }
done

work=$(mktemp -d /tmp/pandagate-ab.XXXXXX)
up_port=$(free_port) gw_port=$(free_port) admin_port=$(free_port)
up_pid="" gw_pid=""
cleanup() {
  for p in $gw_pid $up_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=bench/confs.sh
. "$(dirname "$0")/confs.sh"
mkdir -p "$work/up"
nginx_upstream_conf "$work/up" "$up_port" 1 "$(ulimit -n)" > "$work/up/nginx.conf"
nginx -p "$work/up" -e "$work/up/error.log" -c "$work/up/nginx.conf" -g 'daemon off;' \
  </dev/null >/dev/null 2>&1 &
up_pid=$!
pandagate_bench_conf > "$work/pandagate.toml"

url="http://127.0.0.1:$gw_port/open/product/get?itemId=652874751412"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
printf 'round\tbinary\tcalls/s\tCPU µs/call\n'
for round in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret PANDAPON_USER_ID=bench-user \
      PANDAGATE_LISTEN="127.0.0.1:$gw_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port" PANDAGATE_CONTROL_LISTEN="127.0.0.1:0" \
      PANDAGATE_UPSTREAM="http://127.0.0.1:$up_port" PANDAGATE_LOG_FORMAT=json \
      "$bin" --config "$work/pandagate.toml" run >"$work/access.log" 2>"$work/gateway.err" &
    gw_pid=$!
    for _ in $(seq 1 200); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ] && break
      sleep 0.05
    done
    wrk -t2 -c"$conns" -d2s "$url" >/dev/null 2>&1
    before=$(cpu_ticks "$gw_pid")
    out=$(wrk -t2 -c"$conns" -d"${secs}s" "$url" 2>&1)
    after=$(cpu_ticks "$gw_pid")
    calls=$(echo "$out" | awk '/requests in/ {print $1}')
    rate=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
    per_call=$(python3 -c "print(round(($after - $before) * 10000 / $calls, 1))")
    printf '%s\t%s\t%s\t%s\n' "$round" "$bin" "$rate" "$per_call"
    kill -TERM "$gw_pid"; wait "$gw_pid" 2>/dev/null || true; gw_pid=""
  done
done
