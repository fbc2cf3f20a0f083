#!/usr/bin/env bash
# pandagate next to nginx as a reverse proxy, and next to no proxy at all.
# On one box, in one run:
#   direct        load -> upstream (nginx `return 200` with a provider envelope)
#   nginx         load -> nginx proxy_pass (keepalive 64, credential headers, access log) -> upstream
#                 (the limit: what a proxy costs that does not sign)
#   nginx-lua     the peer: the same nginx plus the Lua module signing each call (ms timestamp,
#                 32-character nonce, UPPER(MD5(key + timestamp + nonce + secret))) and
#                 putting the answer's requestId and code in its JSON access log line
#                 (bench/confs.sh nginx_lua_proxy_conf; bench/peer_check.sh shows that a
#                 provider stand-in accepts its signatures)
#   pandagate     load -> pandagate (signing, json access log, local rate limit) -> upstream,
#                 worker threads at the default (PANDAGATE_WORKER_THREADS as the caller set it)
#   pandagate-1t  the same binary and config with PANDAGATE_WORKER_THREADS=1
# where load is wrk (default) or oha, at several connection counts, several
# runs; medians of calls/s, p50, p99, errors, CPU per call and peak RSS of the
# proxy, ratios of each pandagate row against nginx and direct, and a pass/fail
# of each pandagate row against the targets (calls/s >= nginx, CPU per call
# <= nginx, p99 <= 1.1 x nginx at every level; peak RSS <= 30 MiB at 256
# connections), and against the peer (calls/s >= nginx-lua, CPU per call <=
# nginx-lua, p99 <= 1.1 x nginx-lua at every level; stretch, reported apart
# and not counted as a target: CPU per call <= 1.15 x nginx). The Markdown report goes to stdout and to
# bench/results/YYYY-MM-DD-compare.md (progress goes to stderr).
#
#   bench/compare.sh [--seconds 10] [--warmup 3] [--conns "16 64 256"] [--runs 3]
#                    [--threads 2] [--binary PATH] [--out FILE] [--strict]
#                    [--nginx-log-buffer SIZE] [--keep] [--tool wrk|oha] [--no-single]
#                    [--upstream-tls] [--tls-settle 1] [--nginx-keepalive 64] [--no-peer]
#
#   --out FILE               write the report there instead of bench/results/
#   --strict                 exit 1 when a target was missed (by either pandagate row)
#   --nginx-log-buffer SIZE  nginx access_log buffer=SIZE flush=1s (default: unbuffered)
#   --keep                   keep the work directory (configs, logs, raw load output)
#   --tool wrk|oha           load generator (default wrk):
#                              wrk -t THREADS -c CONNS -d SECONDSs --latency URL
#                              oha -z SECONDSs -c CONNS --worker-threads THREADS -t 2s
#                                  --no-tui --output-format json URL   (keep-alive on)
#                            --threads is wrk's -t or oha's --worker-threads; the warm-up
#                            uses the same tool
#   --no-single              leave out the pandagate-1t row
#   --no-peer                leave out the nginx-lua row (and its targets)
#   --nginx-keepalive N      idle upstream connections the nginx proxy (and the peer) keeps per worker
#                            (`upstream { keepalive N; }`, default 64): beyond that,
#                            nginx closes a connection after its call (with
#                            --upstream-tls, a new handshake for a later one)
#   --upstream-tls           the upstream serves TLS (a test CA and certificate for
#                            localhost / 127.0.0.1 made in the work directory with
#                            openssl, never kept): direct is https to it; nginx
#                            proxies with proxy_pass https, proxy_ssl_verify on against
#                            the test CA, proxy_ssl_session_reuse on and keepalive 64
#                            (the peer the same);
#                            pandagate has PANDAGATE_UPSTREAM=https://localhost:PORT and
#                            [tls] ca_file = the test CA. Adds TLS handshakes per 10 000
#                            calls after the warm-up (connections the upstream accepted,
#                            from its stub_status, split into full handshakes and resumed
#                            sessions from $ssl_session_reused in its per-connection log)
#                            and the target: pandagate makes no more than nginx.
#                            The report goes to bench/results/YYYY-MM-DD-compare-tls.md.
#   --tls-settle S           with --upstream-tls: the handshakes judged are those from S
#                            seconds into the measured run to its end (default 1, less
#                            than --seconds), per 10 000 calls the upstream answered in
#                            that time: a new load run first replaces the upstream
#                            connections the previous run's cut left broken. The whole
#                            measured run's count is reported too.
#
# The same settings can come from the environment: BENCH_SECONDS, BENCH_WARMUP,
# BENCH_CONNS, BENCH_RUNS, BENCH_THREADS, BENCH_BINARY, BENCH_TOOL,
# BENCH_UPSTREAM_TLS=1, BENCH_NGINX_KEEPALIVE, UPSTREAM_WORKERS (nginx workers of the upstream, default 1).
# PANDAGATE_WORKER_THREADS, when set, reaches the pandagate row and is recorded
# in the report; the pandagate-1t row always runs with 1.
# Without --binary, builds with `cargo build --release -q`.
# Installs wrk, nginx, curl, libnginx-mod-http-lua (for the peer; it brings the NDK module,
# LuaJIT and lua-resty-core) (and openssl with --upstream-tls) from Debian when missing, and oha with
# `cargo install oha --locked` when --tool oha and oha is not on PATH (a few
# minutes on 2 cores). Talks only to 127.0.0.1.
# Exit status: 0 when the harness ran (targets met or not), 1 when --strict and
# a target was missed, 2 on a usage error, other non-zero when the harness failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helper="$root/bench/compare_report.py"
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
command_line="bench/compare.sh${*:+$(printf ' %q' "$@")}"

secs=${BENCH_SECONDS:-10}
warmup=${BENCH_WARMUP:-3}
conns=${BENCH_CONNS:-16 64 256}
runs=${BENCH_RUNS:-3}
threads=${BENCH_THREADS:-2}
binary=${BENCH_BINARY:-}
upstream_workers=${UPSTREAM_WORKERS:-1}
tool=${BENCH_TOOL:-wrk}
single=1
peer=1
upstream_tls=${BENCH_UPSTREAM_TLS:-0}
tls_settle=1
nginx_keepalive=${BENCH_NGINX_KEEPALIVE:-64}
out=""
strict=0
keep=0
nginx_log_buffer=""
call_path="/open/product/get?itemId=652874751412"

while [ $# -gt 0 ]; do
  case "$1" in
    --seconds|--warmup|--conns|--runs|--threads|--binary|--out|--nginx-log-buffer|--tool|--tls-settle|--nginx-keepalive)
      [ $# -ge 2 ] || bad_usage "$1 needs a value" ;;
  esac
  case "$1" in
    --seconds) secs=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --nginx-log-buffer) nginx_log_buffer=$2; shift 2 ;;
    --tool) tool=$2; shift 2 ;;
    --no-single) single=0; shift ;;
    --no-peer) peer=0; shift ;;
    --upstream-tls) upstream_tls=1; shift ;;
    --tls-settle) tls_settle=$2; shift 2 ;;
    --nginx-keepalive) nginx_keepalive=$2; shift 2 ;;
    --strict) strict=1; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
  esac
done
for v in "$secs" "$warmup" "$runs" "$threads"; do
  [[ $v =~ ^[0-9]+$ ]] || bad_usage "not a whole number: $v"
done
if [ "$secs" -eq 0 ] || [ "$runs" -eq 0 ] || [ "$threads" -eq 0 ]; then
  bad_usage "--seconds, --runs and --threads must be > 0"
fi
[[ $upstream_workers =~ ^([1-9][0-9]*|auto)$ ]] || bad_usage "UPSTREAM_WORKERS: a number or auto, not $upstream_workers"
[[ -z $nginx_log_buffer || $nginx_log_buffer =~ ^[0-9]+[kKmM]?$ ]] || bad_usage "--nginx-log-buffer: a size like 64k"
[[ $tool == wrk || $tool == oha ]] || bad_usage "--tool: wrk or oha, not $tool"
[[ $upstream_tls == 0 || $upstream_tls == 1 ]] || bad_usage "BENCH_UPSTREAM_TLS: 0 or 1, not $upstream_tls"
[[ $tls_settle =~ ^[0-9]+$ ]] || bad_usage "--tls-settle: whole seconds, not $tls_settle"
[[ $nginx_keepalive =~ ^[1-9][0-9]*$ ]] || bad_usage "--nginx-keepalive: a whole number > 0, not $nginx_keepalive"
[ "$upstream_tls" = 0 ] || [ "$tls_settle" -lt "$secs" ] || bad_usage "--tls-settle must be less than --seconds"
read -r -a levels <<< "$conns"
[ ${#levels[@]} -gt 0 ] || bad_usage "--conns is empty"
for c in "${levels[@]}"; do
  [[ $c =~ ^[1-9][0-9]*$ ]] || bad_usage "bad connection count $c (a whole number > 0)"
  # wrk gives each thread conns/threads connections: fewer conns than threads is an error.
  [ "$tool" != wrk ] || [ "$c" -ge "$threads" ] || bad_usage "bad connection count $c (wrk needs >= --threads)"
done
# Relative paths are the caller's, taken before anything changes directory.
if [ -n "$binary" ]; then binary=$(realpath "$binary"); fi
if [ -n "$out" ]; then out=$(realpath -m "$out"); fi

[ "$tool" != wrk ] || need wrk wrk
need nginx nginx
need curl curl
[ "$upstream_tls" = 0 ] || need openssl openssl
command -v python3 >/dev/null || die "python3 is needed"
oha_bin=""
if [ "$tool" = oha ]; then
  oha_bin=$(command -v oha || true)
  cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  if [ -z "$oha_bin" ] && [ -x "$cargo_bin/oha" ]; then oha_bin="$cargo_bin/oha"; fi
  if [ -z "$oha_bin" ]; then
    command -v cargo >/dev/null || die "oha is not on PATH and cargo is not there to install it"
    log "oha is not on PATH: installing it with 'cargo install oha --locked' (a few minutes on 2 cores)"
    cargo install oha --locked >&2 || die "cargo install oha --locked failed"
    oha_bin=$(command -v oha || echo "$cargo_bin/oha")
    [ -x "$oha_bin" ] || die "oha installed but not found at $oha_bin"
  fi
fi

# Every process this script starts is recorded here and stopped on exit,
# whatever the exit (error, Ctrl-C, kill).
work=$(mktemp -d /tmp/pg-compare.XXXXXX)
up_pid="" px_pid="" gw_pid="" gw1_pid="" sampler_pid="" load_pid="" plx_pid=""
# shellcheck disable=SC2317  # reached through the trap below
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # All are children of this shell (nginx runs with `daemon off`): TERM, then
  # wait, so that none outlives the script, not even as a zombie. nginx's
  # master stops its workers on TERM (fast shutdown); pandagate drains with
  # nothing in flight.
  # shellcheck disable=SC2086 # the empty ones drop out
  stop_pids $load_pid $sampler_pid $gw_pid $gw1_pid $px_pid $plx_pid $up_pid
  end_run "$rc" "$work"/up/error.log "$work"/px/error.log "$work"/plx/error.log "$work"/gateway.err
}
on_exit cleanup
# 256 client connections plus as many upstream ones, per process: well within
# any default, raised anyway where allowed. nginx is told the limit it really got.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)

up_port=$(free_port); nx_port=$(free_port); gw_port=$(free_port); admin_port=$(free_port)
gw1_port=$(free_port); admin1_port=$(free_port)
mkdir -p "$work/up" "$work/px" "$work/raw"
. "$root/bench/confs.sh"
plx_port=""
if [ "$peer" = 1 ]; then
  need_nginx_lua
  plx_port=$(free_port)
  mkdir -p "$work/plx"
fi
# With --upstream-tls: the test CA and the upstream's certificate, made here
# for this run only; curl checks the upstream against that CA.
up_scheme=http tls_ca="" status_port="" curl_tls=()
if [ "$upstream_tls" = 1 ]; then
  make_test_certs "$work/tls" || die "openssl could not make the test certificates: $(cat "$work/tls/openssl.err")"
  up_scheme=https tls_ca="$work/tls/ca.pem" status_port=$(free_port) curl_tls=(--cacert "$tls_ca")
fi

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
day=$(date -u +%Y-%m-%d)
if awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  log "warning: load average $load_start on $(nproc) cores; the figures will be noisy"
fi

# ------------------------------------------------------------------ binary
bench_binary

# ------------------------------------------------------------------ upstream
if [ "$upstream_tls" = 1 ]; then
  nginx_upstream_conf "$work/up" "$up_port" "$upstream_workers" "$nofile" \
    "$work/tls/server.pem" "$work/tls/server.key" "$status_port" > "$work/up/nginx.conf"
else
  nginx_upstream_conf "$work/up" "$up_port" "$upstream_workers" "$nofile" > "$work/up/nginx.conf"
fi
nginx -p "$work/up" -e "$work/up/error.log" -c "$work/up/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
up_pid=$!

# ------------------------------------------------------------------ nginx proxy
if [ -n "$nginx_log_buffer" ]; then
  nx_log_opts=" buffer=$nginx_log_buffer flush=1s"
  nx_log_desc="access_log buffer=$nginx_log_buffer flush=1s"
else
  nx_log_opts=""
  nx_log_desc="access_log unbuffered, nginx's default: one write() per call"
fi
nginx_proxy_conf "$work/px" "$nx_port" "$up_port" "$nofile" "$nx_log_opts" "$tls_ca" "$nginx_keepalive" > "$work/px/nginx.conf"

# ------------------------------------------------------------------ the peer
# The same nginx, log settings, pool and TLS settings, plus the Lua signing
# and envelope logging, with the credentials pandagate is given below.
if [ "$peer" = 1 ]; then
  nginx_lua_proxy_conf "$work/plx" "$plx_port" "$up_port" "$nofile" "$nx_log_opts" "$tls_ca" "$nginx_keepalive" \
    bench-key bench-secret bench-user > "$work/plx/nginx.conf"
  nginx -t -p "$work/plx" -e "$work/plx/error.log" -c "$work/plx/nginx.conf" >/dev/null 2>"$work/plx/check.err" \
    || die "nginx rejected the peer's config: $(cat "$work/plx/check.err")"
fi

# ------------------------------------------------------------------ pandagate
pandagate_bench_conf "$tls_ca" > "$work/pandagate.toml"
if [ "$upstream_tls" = 1 ]; then
  # The name the certificate is for, as a provider's URL names its host.
  gw_upstream="https://localhost:$up_port"
else
  gw_upstream="http://127.0.0.1:$up_port"
fi
gw_common_env=(
  PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret PANDAPON_USER_ID=bench-user
  PANDAGATE_UPSTREAM="$gw_upstream" PANDAGATE_LOG_FORMAT=json
)
# The pandagate row keeps PANDAGATE_WORKER_THREADS as the caller set it (unset:
# the default); pandagate-1t is the same binary and config on one worker thread.
# Each has its own ports, so that both can be checked side by side.
gw_env=("${gw_common_env[@]}" PANDAGATE_LISTEN="127.0.0.1:$gw_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port" PANDAGATE_CONTROL_LISTEN="127.0.0.1:0")
gw1_env=("${gw_common_env[@]}" PANDAGATE_LISTEN="127.0.0.1:$gw1_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin1_port" PANDAGATE_CONTROL_LISTEN="127.0.0.1:0"
  PANDAGATE_WORKER_THREADS=1)
env "${gw_env[@]}" "$gw_bin" check --config "$work/pandagate.toml" >/dev/null 2>"$work/check.err" \
  || die "pandagate check rejected the config: $(cat "$work/check.err")"
if [ "$single" = 1 ]; then
  env "${gw1_env[@]}" "$gw_bin" check --config "$work/pandagate.toml" >/dev/null 2>"$work/check.err" \
    || die "pandagate check rejected PANDAGATE_WORKER_THREADS=1: $(cat "$work/check.err")"
fi

# ------------------------------------------------------------------ checks
proxies=(nginx)
[ "$peer" = 0 ] || proxies+=(nginx-lua)
proxies+=(pandagate)
[ "$single" = 0 ] || proxies+=(pandagate-1t)
declare -A base=(
  [direct]="$up_scheme://127.0.0.1:$up_port"
  [nginx]="http://127.0.0.1:$nx_port"
  [nginx-lua]="http://127.0.0.1:$plx_port"
  [pandagate]="http://127.0.0.1:$gw_port"
  [pandagate-1t]="http://127.0.0.1:$gw1_port"
)
declare -A url
for t in "${!base[@]}"; do url[$t]="${base[$t]}$call_path"; done
declare -A access_log=([pandagate]="$work/access.log" [pandagate-1t]="$work/access-1t.log")
pid_of() {
  case "$1" in
    direct) echo "$up_pid" ;; nginx) echo "$px_pid" ;; pandagate) echo "$gw_pid" ;; pandagate-1t) echo "$gw1_pid" ;;
    nginx-lua) echo "$plx_pid" ;;
  esac
}
wait_ok() { # target: 200 within 10 s
  for _ in $(seq 1 200); do
    [ "$(curl -s "${curl_tls[@]}" -o /dev/null -w '%{http_code}' "${url[$1]}" || true)" = 200 ] && return 0
    kill -0 "$(pid_of "$1")" 2>/dev/null || die "$1 exited at start"
    sleep 0.05
  done
  die "$1 did not answer 200 at ${url[$1]}"
}
# Each proxy is started afresh for every measurement (and stopped after it), so
# that its peak RSS is that of the level alone and nothing carries over from
# one measurement to the next (pools, allocator arenas, log files).
start_proxy() {
  case "$1" in
    nginx)
      rm -f "$work/px/access.log"
      nginx -p "$work/px" -e "$work/px/error.log" -c "$work/px/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
      px_pid=$! ;;
    nginx-lua)
      rm -f "$work/plx/access.log"
      nginx -p "$work/plx" -e "$work/plx/error.log" -c "$work/plx/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
      plx_pid=$! ;;
    pandagate)
      env "${gw_env[@]}" "$gw_bin" --config "$work/pandagate.toml" run >"${access_log[$1]}" 2>>"$work/gateway.err" &
      gw_pid=$! ;;
    pandagate-1t)
      env "${gw1_env[@]}" "$gw_bin" --config "$work/pandagate.toml" run >"${access_log[$1]}" 2>>"$work/gateway.err" &
      gw1_pid=$! ;;
    *) return 0 ;;
  esac
  wait_ok "$1"
}
stop_proxy() {
  local p
  case "$1" in
    nginx) p=$px_pid; px_pid="" ;;
    nginx-lua) p=$plx_pid; plx_pid="" ;;
    pandagate) p=$gw_pid; gw_pid="" ;;
    pandagate-1t) p=$gw1_pid; gw1_pid="" ;;
    *) return 0 ;;
  esac
  stop_pids "$p"
}

wait_ok direct
for t in "${proxies[@]}"; do start_proxy "$t"; done
for t in direct "${proxies[@]}"; do
  body=$(curl -s "${curl_tls[@]}" "${url[$t]}")
  [[ $body == *4cfda0b725184ab8a1e3ee3b9051ec35* ]] || die "$t answered an unexpected body: $body"
done
# Every proxy must really add the credential headers, or the comparison is moot.
headers_re='access-key=bench-key user-id=bench-user signature=[0-9a-fA-F]{32} timestamp=[0-9.]+ nonce-str=[^ ]+'
declare -A seen_of
for t in "${proxies[@]}"; do
  seen=$(curl -s "${base[$t]}/open/bench/headers" || true)
  seen_of[$t]=$seen
  if [[ $seen =~ $headers_re ]]; then
    log "$t adds: $seen"
  else
    die "$t did not forward the credential headers: ${seen:-no answer}"
  fi
done
gw_threads=""
for t in "${proxies[@]}"; do
  [[ $t == pandagate* ]] || continue
  f=${access_log[$t]}
  # The access log line is written by a background thread: give it a moment.
  for _ in $(seq 1 50); do grep -q '"request_id"' "$f" && break; sleep 0.1; done
  grep -q '"request_id":"4cfda0b725184ab8a1e3ee3b9051ec35"' "$f" \
    || die "$t wrote no json access line with the provider's request_id: $(head -c 300 "$f")"
  # Threads of the process once it has served calls: shows that the worker
  # thread setting took (the runtime's workers plus pandagate's own threads).
  gw_threads+="${gw_threads:+, }$t: $(find "/proc/$(pid_of "$t")/task" -mindepth 1 -maxdepth 1 | wc -l) threads"
done
log "threads after the checks: $gw_threads"
[ -n "$nginx_log_buffer" ] || grep -q '"upstream_status":"200"' "$work/px/access.log" \
  || die "nginx proxy wrote no access line with upstream_status 200"
# The rows that sign (all but the static nginx, whose signature is a fixed
# string) must sign as the provider checks: a millisecond timestamp, 32
# letters or digits, UPPER(MD5(access-key + timestamp + nonce-str +
# secret)) of what the upstream saw. (The upstream checks nothing:
# bench/peer_check.sh puts the peer in front of a provider stand-in that does.)
signed_re='access-key=([^ ]+) user-id=[^ ]* signature=([^ ]+) timestamp=([0-9]+) nonce-str=([A-Za-z0-9]{32})'
for t in "${proxies[@]}"; do
  [ "$t" != nginx ] || continue
  [[ ${seen_of[$t]} =~ $signed_re ]] || die "$t: no ms timestamp and 32-character nonce: ${seen_of[$t]}"
  want=$(printf '%s' "${BASH_REMATCH[1]}${BASH_REMATCH[3]}${BASH_REMATCH[4]}bench-secret" | md5sum | cut -c1-32 | tr a-f A-F)
  [ "${BASH_REMATCH[2]}" = "$want" ] || die "$t signed ${BASH_REMATCH[2]}, expected $want: ${seen_of[$t]}"
done
# The peer's access line has the provider's requestId and code from its body filter.
if [ "$peer" = 1 ] && [ -z "$nginx_log_buffer" ]; then
  grep -q '"request_id":"4cfda0b725184ab8a1e3ee3b9051ec35","code":"200"' "$work/plx/access.log" \
    || die "the peer wrote no access line with the provider's requestId and code: $(tail -n 2 "$work/plx/access.log")"
fi
for t in "${proxies[@]}"; do stop_proxy "$t"; done

# ------------------------------------------------------------------ measuring
pids_of() { # the processes whose memory counts for a target
  case "$1" in
    direct) python3 "$helper" pids "$up_pid" ;;
    nginx) python3 "$helper" pids "$px_pid" ;;
    nginx-lua) python3 "$helper" pids "$plx_pid" ;;
    pandagate|pandagate-1t) pid_of "$1" ;;
  esac
}
upstream_hwm_reset=1

# With --upstream-tls: how many connections the upstream has accepted and
# how many requests it has had (its stub_status; both include the query's
# own), and how many lines its per-connection log has (one per connection
# that sent a request, with $ssl_session_reused), at one moment:
# "ACCEPTS REQUESTS LINES".
hs_mark() {
  local counts lines=0
  counts=$(curl -s "http://127.0.0.1:$status_port/status" | awk 'NR == 3 { print $1, $3 }' || true)
  [[ $counts =~ ^[0-9]+\ [0-9]+$ ]] || die "the upstream's stub_status gave no accepts/requests counts"
  if [ -f "$work/up/conns.log" ]; then lines=$(wc -l < "$work/up/conns.log"); fi
  echo "$counts $lines"
}

# Runs the load generator in the background and waits for it, so that a signal
# to the script is acted on at once. Keep-alive is on with both tools.
# run_load_start and run_load_wait are the two halves, for a look at the
# upstream while the load runs.
run_load_start() { # out seconds conns url
  if [ "$tool" = oha ]; then
    # JSON on stdout; oha's own messages apart, so that the JSON stays whole.
    # The direct row over TLS: oha checks certificates and the test CA is
    # not in its roots (wrk checks none).
    local insecure=()
    [[ $4 != https://* ]] || insecure=(--insecure)
    "$oha_bin" -z "${2}s" -c "$3" --worker-threads "$threads" -t 2s --no-tui --output-format json \
      "${insecure[@]}" "$4" >"$1" 2>"$1.err" </dev/null &
  else
    wrk -t"$threads" -c"$3" -d"${2}s" --latency "$4" >"$1" 2>&1 &
  fi
  load_pid=$!
}
run_load_wait() { wait "$load_pid" || true; load_pid=""; }
run_load() { run_load_start "$@"; run_load_wait; }

measure() { # run target conns
  local run=$1 t=$2 c=$3 base pids reset=ok
  base="$work/raw/r${run}_${t}_c${c}"
  local result="$base.$tool"
  start_proxy "$t"
  mapfile -t pids < <(pids_of "$t")
  if [ "$t" = direct ]; then
    # The upstream runs throughout, and VmHWM is a high-water mark since the
    # process started: reset it (clear_refs 5) so that it is this level's peak.
    # Where the reset is not allowed, the 100 ms samples stand in.
    reset=$(python3 "$helper" reset-hwm "${pids[@]}")
    [ "$reset" = ok ] || upstream_hwm_reset=0
  fi
  if [[ $t == pandagate* ]]; then
    python3 "$helper" sample "$base.sample" "$(pid_of "$t")" &
  else
    python3 "$helper" sample "$base.sample" --tree "$(pid_of "$t")" &
  fi
  sampler_pid=$!
  local hs0="" hs1="" hs_steady="" hs2=""
  [ "$upstream_tls" = 0 ] || hs0=$(hs_mark)
  if [ "$warmup" -gt 0 ]; then run_load "$base.warmup" "$warmup" "$c" "${url[$t]}"; fi
  [ "$upstream_tls" = 0 ] || hs1=$(hs_mark)
  # Listed again: every nginx worker is surely forked by now.
  mapfile -t pids < <(pids_of "$t")
  local cpu_before; cpu_before=$(python3 "$helper" cpu "${pids[@]}")
  run_load_start "$result" "$secs" "$c" "${url[$t]}"
  if [ "$upstream_tls" = 1 ]; then
    # The steady part of the measured seconds starts tls_settle seconds in:
    # the load generator of the warm-up cut its calls in flight when it
    # stopped, and each proxy closed those upstream connections (a
    # connection cannot be reused mid-answer), so the first moments of the
    # new run reconnect. Counted apart.
    sleep "$tls_settle"
    hs_steady=$(hs_mark)
  fi
  run_load_wait
  awk -v a="$cpu_before" -v b="$(python3 "$helper" cpu "${pids[@]}")" 'BEGIN { printf "%.2f\n", b - a }' > "$base.cpu"
  if [ "$upstream_tls" = 1 ]; then
    hs2=$(hs_mark)
    # The marks, and the upstream's per-connection lines of the warm-up, of
    # the measured seconds and of their steady part, for the report.
    echo "$hs0 $hs1 $hs_steady $hs2" > "$base.hs"
    local l0 l1 ls l2
    read -r _ _ l0 _ _ l1 _ _ ls _ _ l2 <<< "$hs0 $hs1 $hs_steady $hs2"
    awk -v a="$l0" -v b="$l1" 'NR > a && NR <= b' "$work/up/conns.log" > "$base.conns-warmup"
    awk -v a="$l1" -v b="$l2" 'NR > a && NR <= b' "$work/up/conns.log" > "$base.conns-measured"
    awk -v a="$ls" -v b="$l2" 'NR > a && NR <= b' "$work/up/conns.log" > "$base.conns-steady"
  fi
  local hwm; hwm=$(python3 "$helper" hwm "${pids[@]}")
  kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""
  local sampled="0 0 0"; [ -s "$base.sample" ] && sampled=$(cat "$base.sample")
  if [ "$reset" != ok ]; then
    # A high-water mark since start says nothing about this level: use the samples.
    hwm=${sampled%% *}
  fi
  echo "$hwm $sampled" > "$base.rss"
  kill -0 "$(pid_of "$t")" 2>/dev/null || die "$t died during run $run at $c connections"
  stop_proxy "$t"
  local line
  line=$(python3 "$helper" line "$result") \
    || die "$tool failed against $t at $c connections: $(tail -n 3 "$result" "$result.err" 2>/dev/null)"
  printf 'run %s/%s  %4s conns  %-12s %s  rss %s MiB\n' "$run" "$runs" "$c" "$t" "$line" \
    "$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')" >&2
}

targets=(direct "${proxies[@]}")
log "$(nproc) cores, load $load_start; ${#levels[@]} levels x ${#targets[@]} targets x $runs runs, ${warmup}+${secs} s each"
for run in $(seq 1 "$runs"); do
  for li in "${!levels[@]}"; do
    c=${levels[$li]}
    # The order rotates from run to run and level to level, so that a slow
    # drift of the box's load does not always hit the same target.
    shift_by=$(( (run - 1 + li) % ${#targets[@]} ))
    for i in "${!targets[@]}"; do
      measure "$run" "${targets[$(( (i + shift_by) % ${#targets[@]} ))]}" "$c"
    done
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ report
rss_method="each proxy is a fresh process for every measurement (started before the warm-up, stopped after the level); its peak RSS is VmHWM from /proc/PID/status read at the end of the level, summed over the processes (nginx: master + workers; pandagate: its one process). RSS and PSS sums sampled every 100 ms are in the last table as a cross-check"
if [ "$upstream_hwm_reset" = 1 ]; then
  rss_method+="; the upstream (direct row) runs throughout: its VmHWM is reset (clear_refs 5) before each level"
else
  rss_method+="; the upstream (direct row) runs throughout and the VmHWM reset was refused here: its figure is the largest sampled sum of VmRSS"
fi
notes=()
[ "$threads" = 2 ] || notes+=("$tool threads: $threads (the targets were set with 2)")
if [ "$single" = 1 ] && [ "${PANDAGATE_WORKER_THREADS:-}" = 1 ]; then
  notes+=("PANDAGATE_WORKER_THREADS=1 was set by the caller: the pandagate and pandagate-1t rows run the same setting")
fi
awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }' \
  && notes+=("load average at start ($load_start) above half the cores: other work was running")
{
  meta_common
  printf 'tool\t%s\n' "$tool"
  if [ "$tool" = oha ]; then
    printf 'tool_version\t%s\n' "$("$oha_bin" --version 2>&1 | head -n 1)"
  else
    printf 'tool_version\t%s\n' "$(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//')"
  fi
  printf 'nginx_version\t%s\n' "$(nginx -v 2>&1)"
  printf 'command\t%s\n' "$command_line"
  printf 'path\t%s\n' "$call_path"
  printf 'threads\t%s\n' "$threads"
  printf 'conns\t%s\n' "${levels[*]}"
  printf 'warmup\t%s\n' "$warmup"
  printf 'seconds\t%s\n' "$secs"
  printf 'runs\t%s\n' "$runs"
  printf 'upstream_workers\t%s\n' "$upstream_workers"
  printf 'upstream_tls\t%s\n' "$upstream_tls"
  printf 'tls_settle\t%s\n' "$tls_settle"
  printf 'nginx_keepalive\t%s\n' "$nginx_keepalive"
  if [ "$upstream_tls" = 1 ]; then
    printf 'tls_cert\t%s\n' "$(openssl x509 -in "$work/tls/server.pem" -noout -text \
      | awk '/Public Key Algorithm|ASN1 OID|NIST CURVE/ { sub(/^ +/, ""); printf "%s%s", sep, $0; sep = ", " }')"
    printf 'openssl_version\t%s\n' "$(openssl version)"
  fi
  printf 'pandagate_worker_threads\t%s\n' "${PANDAGATE_WORKER_THREADS:-}"
  printf 'gateway_threads\t%s\n' "$gw_threads"
  printf 'nginx_log_buffer\t%s\n' "$nx_log_desc"
  printf 'peer\t%s\n' "$peer"
  [ "$peer" = 0 ] || printf 'lua_module\t%s\n' "$(dpkg-query -W -f='${binary:Package} ${Version}; ' libnginx-mod-http-lua libluajit2-5.1-2 lua-resty-core 2>/dev/null | sed 's/; $//' || echo unknown)"
  printf 'rss_method\t%s\n' "$rss_method"
  printf 'notes\t%s\n' "$(IFS='|'; echo "${notes[*]}")"
} > "$work/meta.tsv"

stem="$day-compare"
[ "$upstream_tls" = 0 ] || stem="$day-compare-tls"
write_report "$stem"
if [ "$report_rc" = 3 ]; then
  log "a target was missed (see Targets)"
  [ "$strict" = 0 ] || exit 1
fi
exit 0
