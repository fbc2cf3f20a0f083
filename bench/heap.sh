#!/usr/bin/env bash
# Where pandagate's heap goes at its peak under load: pandagate runs under
# heaptrack in front of an nginx `return 200` upstream while wrk holds
# CONNS keep-alive connections; the live heap at its highest point is then
# split by who allocated it (the first frame of a known owner on each
# allocation's stack: hyper's read buffers, its write buffers, its request
# queue, the serving future, ...). A second run without heaptrack gives the
# process's peak RSS split into anonymous memory (the heap and stacks) and
# file-backed pages (the binary's code as it is mapped).
#
#   bench/heap.sh [--conns 256] [--seconds 5] [--keep]
#
# The binary is built with symbols into target/heap (the release profile
# with `strip = false` and line tables; the code is the release build's).
# Installs wrk, nginx and heaptrack from Debian when missing. Talks only to
# 127.0.0.1. Prints a Markdown table on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=bench/lib.sh
. bench/lib.sh
# shellcheck source=bench/confs.sh
. bench/confs.sh
conns=256; secs=5; keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns=$2; shift 2 ;; --seconds) secs=$2; shift 2 ;; --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
  esac
done
[[ $conns =~ ^[1-9][0-9]*$ ]] || bad_usage "--conns: a positive number, not $conns"
[[ $secs =~ ^[1-9][0-9]*$ ]] || bad_usage "--seconds: a positive number, not $secs"

need wrk wrk
need nginx nginx
need heaptrack heaptrack
need heaptrack_print heaptrack

log "building with symbols (target/heap)"
CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release -q --bin pandagate --target-dir "$root/target/heap"
bin="$root/target/heap/release/pandagate"

work=$(mktemp -d /tmp/pg-heap.XXXXXX)
up_pid=""; gw_pid=""
cleanup() {
  local rc=$?
  stop_pids $gw_pid $up_pid
  end_run "$rc" "$work/gateway.err" "$work/up/error.log"
}
on_exit cleanup

nofile=$(ulimit -n)
up_port=$(free_port); gw_port=$(free_port); admin_port=$(free_port)
mkdir -p "$work/up"
nginx_upstream_conf "$work/up" "$up_port" 1 "$nofile" > "$work/up/nginx.conf"
nginx -p "$work/up" -e "$work/up/error.log" -c "$work/up/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
up_pid=$!
pandagate_bench_conf > "$work/pandagate.toml"
url="http://127.0.0.1:$gw_port/open/product/get?itemId=652874751412"
gw_env=(PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret PANDAPON_USER_ID=bench-user
  PANDAGATE_UPSTREAM="http://127.0.0.1:$up_port" PANDAGATE_LOG_FORMAT=json
  PANDAGATE_LISTEN="127.0.0.1:$gw_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port"
  PANDAGATE_CONTROL_LISTEN=127.0.0.1:0)

wait_ok() {
  for _ in $(seq 1 400); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ] && return 0
    kill -0 "$gw_pid" 2>/dev/null || die "pandagate exited at start"
    sleep 0.05
  done
  die "pandagate did not answer 200 at $url"
}

# 1. Peak RSS, anonymous and file-backed, without heaptrack in the way.
env "${gw_env[@]}" "$bin" --config "$work/pandagate.toml" run >/dev/null 2>>"$work/gateway.err" &
gw_pid=$!
wait_ok
idle=$(awk '/^RssAnon|^RssFile/ {printf "%s ", $2}' "/proc/$gw_pid/status")
wrk -t2 -c"$conns" -d"${secs}s" "$url" > "$work/wrk-rss.txt"
peak=$(awk '/^VmHWM/ {print $2}' "/proc/$gw_pid/status")
after=$(awk '/^RssAnon|^RssFile/ {printf "%s ", $2}' "/proc/$gw_pid/status")
stop_pids "$gw_pid"; gw_pid=""

# 2. The heap at its peak, under heaptrack.
log "wrk -c$conns for ${secs}s under heaptrack"
env "${gw_env[@]}" heaptrack -o "$work/heap" "$bin" --config "$work/pandagate.toml" run \
  >/dev/null 2>>"$work/gateway.err" &
gw_pid=$!
wait_ok
wrk -t2 -c"$conns" -d"${secs}s" "$url" > "$work/wrk-heap.txt"
# heaptrack writes its file when the traced process exits: SIGINT drains.
pkill -INT -P "$gw_pid" 2>/dev/null || kill -INT "$gw_pid"
for _ in $(seq 1 300); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
wait "$gw_pid" 2>/dev/null || true
gw_pid=""
trace=$(ls "$work"/heap*.zst 2>/dev/null | head -1)
[ -n "$trace" ] || die "heaptrack wrote no trace"
heaptrack_print "$trace" --flamegraph-cost-type peak -F "$work/peak.folded" >/dev/null 2>"$work/print.err" \
  || die "heaptrack_print failed: $(tail -1 "$work/print.err")"

python3 - "$work/peak.folded" "$conns" "$idle" "$after" "$peak" <<'PY'
import sys

folded, conns = sys.argv[1], int(sys.argv[2])
idle_anon, idle_file = (int(x) for x in sys.argv[3].split())
anon, file_ = (int(x) for x in sys.argv[4].split())
peak = int(sys.argv[5])

# Owners, tried in order on each stack, from the allocation outwards: the
# first whose markers all appear in the stack owns the bytes.
OWNERS = [
    ("hyper: caller connection's read buffer", ["poll_read_from_io", "poll_read_head"]),
    ("hyper: provider connection's read buffer", ["poll_read_from_io", "pool.rs"]),
    ("hyper: provider request queue (tokio mpsc blocks)", ["send<> (unbounded.rs)"]),
    ("tokio: task cells (caller connections)", ["aligned_malloc", "(app.rs)"]),
    ("tokio: task cells (provider connections)", ["aligned_malloc", "(attempts.rs)"]),
    ("pandagate: preparing a call (headers, path)", ["prepare (prepare.rs)"]),
    ("pandagate: signing (header map)", ["sign (attempts.rs)"]),
    ("pandagate: access log", ["access_log.rs"]),
    ("pandagate: the serving future (per call)", ["recv_msg<> (dispatch.rs)"]),
    ("hyper: provider connection (handshake: buffers, state)", ["(http1.rs)", "(attempts.rs)"]),
    ("pandagate: the attempt (upstream request)", ["(attempts.rs)"]),
    ("hyper: caller connection (write buffer, state)", ["graceful.rs"]),
]
owned = {name: 0 for name, _ in OWNERS}
other = 0
for line in open(folded):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    if n == 0:
        continue
    for name, markers in OWNERS:
        if all(m in stack for m in markers):
            owned[name] += n
            break
    else:
        other += n
total = sum(owned.values()) + other
MiB = 1024 * 1024
print(f"## Heap at its peak with {conns} caller connections (heaptrack)\n")
print("| owner | MiB | KiB per connection |")
print("|---|---|---|")
for name, n in sorted(owned.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {n / MiB:.2f} | {n / 1024 / conns:.1f} |")
print(f"| everything else | {other / MiB:.2f} | {other / 1024 / conns:.1f} |")
print(f"| **heap at peak** | **{total / MiB:.2f}** | {total / 1024 / conns:.1f} |")
print(f"\n## Resident memory without heaptrack\n")
print("| | anonymous MiB | file-backed MiB |")
print("|---|---|---|")
print(f"| idle, after one call | {idle_anon / 1024:.1f} | {idle_file / 1024:.1f} |")
print(f"| after wrk -c{conns} | {anon / 1024:.1f} | {file_ / 1024:.1f} |")
print(f"\npeak RSS (VmHWM): {peak / 1024:.1f} MiB")
PY
