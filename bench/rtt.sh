#!/usr/bin/env bash
# What pandagate and nginx add to a call when the provider is a real round
# trip away over TLS. A delaying TCP relay (bench/relay.py, DELAY ms each
# way, TLS and TCP handshakes included) stands between every row and a TLS
# upstream (nginx `return 200` with the provider envelope, a test
# certificate made for the run):
#   direct     wrk -> relay -> upstream                       (https)
#   nginx      wrk -> nginx (proxy_pass https, keepalive, session reuse) -> relay -> upstream
#   pandagate  wrk -> pandagate ([tls] ca_file, https://localhost) -> relay -> upstream
# at 1 and 16 connections, several runs interleaved (the order rotates).
# Before each measurement a warm-up of clean calls (a Python client that
# lets every call finish, so that no upstream connection is cut) fills the
# proxy's pool; then wrk --latency for the measured seconds. Reported: the
# medians over runs of p50 and p99, of what each proxy adds to direct's
# (run by run, the same run's direct), and pass/fail of the target: at each
# level, what pandagate adds to the p50 and to the p99 is within 1 ms of
# what nginx adds (pandagate's addition <= nginx's + 1 ms). Also the TLS
# handshakes the upstream saw in each measured run (one costs 2 to 3 round
# trips: it should be 0 once the pools are warm).
#
#   bench/rtt.sh [--delay-ms 20] [--conns "1 16"] [--seconds 20] [--warmup 3]
#                [--runs 3] [--binary PATH] [--out FILE] [--strict] [--keep]
#
#   --out FILE   write the report there instead of bench/results/YYYY-MM-DD-rtt.md
#   --strict     exit 1 when the target is missed
#   --keep       keep the work directory (configs, logs, raw wrk output)
#
# Defaults take about 7 minutes (3 runs x 2 levels x 3 targets x 23 s and the checks).
# Without --binary, builds with `cargo build --release -q`. Installs wrk,
# nginx, curl and openssl from Debian when missing. Talks only to 127.0.0.1;
# every process it starts is stopped by its pid on exit.
# Exit status: 0 when the harness ran (target met or not), 1 when --strict
# and the target was missed, 2 on a usage error, other non-zero when the
# harness failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helper="$root/bench/rtt_report.py"
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
command_line="bench/rtt.sh${*:+$(printf ' %q' "$@")}"

delay_ms=20 conns="1 16" secs=20 warmup=3 runs=3 binary="" out="" strict=0 keep=0
call_path="/open/product/get?itemId=652874751412"

while [ $# -gt 0 ]; do
  case "$1" in
    --delay-ms|--conns|--seconds|--warmup|--runs|--binary|--out)
      [ $# -ge 2 ] || bad_usage "$1 needs a value" ;;
  esac
  case "$1" in
    --delay-ms) delay_ms=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --strict) strict=1; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
  esac
done
for v in "$secs" "$warmup" "$runs"; do [[ $v =~ ^[0-9]+$ ]] || bad_usage "not a whole number: $v"; done
[[ $delay_ms =~ ^[0-9]+(\.[0-9]+)?$ ]] || bad_usage "--delay-ms: a number of milliseconds, not $delay_ms"
[ "$secs" -gt 0 ] && [ "$runs" -gt 0 ] || bad_usage "--seconds and --runs must be > 0"
read -r -a levels <<< "$conns"
[ ${#levels[@]} -gt 0 ] || bad_usage "--conns is empty"
for c in "${levels[@]}"; do [[ $c =~ ^[1-9][0-9]*$ ]] || bad_usage "bad connection count $c"; done
if [ -n "$binary" ]; then binary=$(realpath "$binary"); fi
if [ -n "$out" ]; then out=$(realpath -m "$out"); fi

need wrk wrk
need nginx nginx
need curl curl
need openssl openssl
command -v python3 >/dev/null || die "python3 is needed"

work=$(mktemp -d /tmp/pg-rtt.XXXXXX)
up_pid="" relay_pid="" px_pid="" gw_pid="" load_pid=""
# shellcheck disable=SC2317  # reached through the trap below
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # shellcheck disable=SC2086 # the empty ones drop out
  stop_pids $load_pid $gw_pid $px_pid $relay_pid $up_pid
  end_run "$rc" "$work"/up/error.log "$work"/px/error.log "$work"/gateway.err "$work"/relay.err
}
on_exit cleanup
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)

up_port=$(free_port) status_port=$(free_port) relay_port=$(free_port)
nx_port=$(free_port) gw_port=$(free_port) admin_port=$(free_port)
mkdir -p "$work/up" "$work/px" "$work/raw"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
day=$(date -u +%Y-%m-%d)

# ------------------------------------------------------------------ binary
bench_binary

# ------------------------------------------------------------------ servers
. "$root/bench/confs.sh"
make_test_certs "$work/tls" || die "openssl could not make the test certificates: $(cat "$work/tls/openssl.err")"
ca="$work/tls/ca.pem"
nginx_upstream_conf "$work/up" "$up_port" 1 "$nofile" "$work/tls/server.pem" "$work/tls/server.key" \
  "$status_port" > "$work/up/nginx.conf"
nginx -p "$work/up" -e "$work/up/error.log" -c "$work/up/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
up_pid=$!
python3 "$root/bench/relay.py" --target "$up_port" --port "$relay_port" --delay-ms "$delay_ms" \
  --log "$work/relay.log" >/dev/null 2>"$work/relay.err" </dev/null &
relay_pid=$!
# Every row reaches the upstream through the relay.
nginx_proxy_conf "$work/px" "$nx_port" "$relay_port" "$nofile" "" "$ca" > "$work/px/nginx.conf"
nginx -p "$work/px" -e "$work/px/error.log" -c "$work/px/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
px_pid=$!
pandagate_bench_conf "$ca" > "$work/pandagate.toml"
env PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret PANDAPON_USER_ID=bench-user \
  PANDAGATE_UPSTREAM="https://localhost:$relay_port" PANDAGATE_LOG_FORMAT=json \
  PANDAGATE_LISTEN="127.0.0.1:$gw_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port" \
  PANDAGATE_CONTROL_LISTEN="127.0.0.1:0" \
  "$gw_bin" --config "$work/pandagate.toml" run >"$work/access.log" 2>"$work/gateway.err" </dev/null &
gw_pid=$!

declare -A base=(
  [direct]="https://127.0.0.1:$relay_port"
  [nginx]="http://127.0.0.1:$nx_port"
  [pandagate]="http://127.0.0.1:$gw_port"
)
declare -A pid_of=([direct]=relay_pid [nginx]=px_pid [pandagate]=gw_pid)
targets=(direct nginx pandagate)
for t in "${targets[@]}"; do
  ok=0
  for _ in $(seq 1 200); do
    code=$(curl -s --cacert "$ca" -o /dev/null -w '%{http_code}' "${base[$t]}$call_path" || true)
    [ "$code" = 200 ] && { ok=1; break; }
    kill -0 "$up_pid" 2>/dev/null || die "the upstream nginx exited at start"
    kill -0 "${!pid_of[$t]}" 2>/dev/null || die "$t exited at start"
    sleep 0.05
  done
  [ "$ok" = 1 ] || die "$t did not answer 200 at ${base[$t]}$call_path"
  body=$(curl -s --cacert "$ca" "${base[$t]}$call_path")
  [[ $body == *4cfda0b725184ab8a1e3ee3b9051ec35* ]] || die "$t answered an unexpected body: $body"
done
headers_re='access-key=bench-key user-id=bench-user signature=[0-9a-fA-F]{32} timestamp=[0-9.]+ nonce-str=[^ ]+'
for t in nginx pandagate; do
  seen=$(curl -s "${base[$t]}/open/bench/headers" || true)
  [[ $seen =~ $headers_re ]] || die "$t did not forward the credential headers: ${seen:-no answer}"
done
# The relay really delays: one call straight through it takes at least a round trip.
rt=$(curl -s --cacert "$ca" -o /dev/null -w '%{time_starttransfer} %{time_appconnect} %{time_pretransfer}' \
  "${base[direct]}$call_path")
log "curl through the relay (first byte, TLS done, request sent; s): $rt"
awk -v r="${rt%% *}" -v d="$delay_ms" 'BEGIN { exit !(r * 1000 >= 4 * d) }' \
  || die "a new connection through the relay answered in ${rt%% *} s: less than 4 x $delay_ms ms, the relay does not delay"

# ------------------------------------------------------------------ measuring
accepts() { curl -s "http://127.0.0.1:$status_port/status" | awk 'NR == 3 { print $1 }'; }

measure() { # run target conns
  local run=$1 t=$2 c=$3 th=2 base_name a0 a1
  base_name="$work/raw/r${run}_${t}_c${c}"
  [ "$c" -ge "$th" ] || th=$c
  kill -0 "${!pid_of[$t]}" 2>/dev/null || die "$t is gone (run $run, $c connections)"
  # Clean calls on c connections, each waiting for its answer: fills the
  # proxy's pool and leaves no call cut in flight.
  if [ "$warmup" -gt 0 ]; then
    python3 "$helper" warmup "${base[$t]}$call_path" "$c" "$warmup" "$ca" > "$base_name.warmup" \
      || die "the warm-up against $t failed: $(tail -n 3 "$base_name.warmup")"
  fi
  a0=$(accepts)
  wrk -t"$th" -c"$c" -d"${secs}s" --latency "${base[$t]}$call_path" > "$base_name.wrk" 2>&1 </dev/null &
  load_pid=$!; wait "$load_pid" || true; load_pid=""
  a1=$(accepts)
  # Connections the upstream accepted during the measured seconds (the
  # second query's own taken off). For direct these are wrk's own.
  echo $(( a1 - a0 - 1 )) > "$base_name.handshakes"
  python3 "$helper" line "$base_name.wrk" >&2 || die "wrk failed against $t at $c connections: $(tail -n 3 "$base_name.wrk")"
}

log "$(nproc) cores, load $load_start; delay $delay_ms ms each way; ${#levels[@]} levels x 3 targets x $runs runs, ${warmup}+${secs} s each"
for run in $(seq 1 "$runs"); do
  for li in "${!levels[@]}"; do
    c=${levels[$li]}
    shift_by=$(( (run - 1 + li) % ${#targets[@]} ))
    for i in "${!targets[@]}"; do
      t=${targets[$(( (i + shift_by) % ${#targets[@]} ))]}
      printf 'rtt.sh: run %s/%s  %3s conns  %-10s ' "$run" "$runs" "$c" "$t" >&2
      measure "$run" "$t" "$c"
    done
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ report
{
  meta_common
  printf 'tool_version\t%s\n' "$(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
  printf 'nginx_version\t%s\n' "$(nginx -v 2>&1)"
  printf 'openssl_version\t%s\n' "$(openssl version)"
  printf 'command\t%s\n' "$command_line"
  printf 'path\t%s\n' "$call_path"
  printf 'delay_ms\t%s\n' "$delay_ms"
  printf 'conns\t%s\n' "${levels[*]}"
  printf 'warmup\t%s\n' "$warmup"
  printf 'seconds\t%s\n' "$secs"
  printf 'runs\t%s\n' "$runs"
} > "$work/meta.tsv"
# The relay's totals are written when it stops: stop it first.
kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; relay_pid=""
printf 'relay\t%s\n' "$(tail -n 1 "$work/relay.err" 2>/dev/null | sed 's/^relay: //' || true)" >> "$work/meta.tsv"
printf 'relay_check\t%s\n' "$rt" >> "$work/meta.tsv"

write_report "$day-rtt"
if [ "$report_rc" = 3 ]; then
  log "the target was missed (see Target)"
  [ "$strict" = 0 ] || exit 1
fi
exit 0
