#!/usr/bin/env bash
# Added latency on loopback, one call at a time: wrk with one connection
# straight to a fixed-answer upstream (nginx `return 200`, "direct"),
# through an nginx reverse proxy (keep-alive pool, credential headers,
# access log), through the peer (nginx-lua: the same nginx plus Lua signing
# each call and logging the answer's requestId and code, as bench/confs.sh
# nginx_lua_proxy_conf makes it) and through pandagate (signing, JSON access
# log to a file), to the same upstream, in the same run. Several runs,
# interleaved; medians of p50 and p99, what each proxy adds to the direct
# p50 and p99, and two judgements: pandagate adds no more to the p50 than
# nginx, and no more than the peer.
#
#   bench/latency.sh [--seconds 10] [--runs 3] [--binary PATH]
#
# (A bare number as the first argument is taken as --seconds.) Without
# --binary, builds with `cargo build --release -q`. GW_ENV="K=V ..." adds
# environment to pandagate (e.g. GW_ENV=PANDAGATE_WORKER_THREADS=1).
# Installs wrk, nginx and libnginx-mod-http-lua from Debian when missing.
# Talks only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

secs=10 runs=3 binary=""
[[ ${1:-} =~ ^[0-9]+$ ]] && { secs=$1; shift; }
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) secs=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "latency.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

need wrk wrk
need nginx nginx

work=$(mktemp -d)
mkdir -p "$work/up" "$work/px"
up_port=$(free_port) nx_port=$(free_port) gw_port=$(free_port) admin_port=$(free_port)
lx_port=$(free_port)
up_pid="" nx_pid="" gw_pid="" lx_pid=""
cleanup() {
  for p in $gw_pid $lx_pid $nx_pid $up_pid; do kill "$p" 2>/dev/null || true; done
  for p in $gw_pid $lx_pid $nx_pid $up_pid; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

. bench/confs.sh
nofile=$(ulimit -n)
nginx_upstream_conf "$work/up" "$up_port" 1 "$nofile" > "$work/up/nginx.conf"
# The nginx proxy of bench/compare.sh: what the gateway does minus the signature.
nginx_proxy_conf "$work/px" "$nx_port" "$up_port" "$nofile" > "$work/px/nginx.conf"
nginx -p "$work/up" -e "$work/up/error.log" -c "$work/up/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
up_pid=$!
nginx -p "$work/px" -e "$work/px/error.log" -c "$work/px/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
nx_pid=$!
# The peer: the same nginx proxy plus the Lua signing, with the credentials
# pandagate is given below.
need_nginx_lua
mkdir -p "$work/lx"
nginx_lua_proxy_conf "$work/lx" "$lx_port" "$up_port" "$nofile" "" "" 64 bench-key bench-secret bench-user > "$work/lx/nginx.conf"
nginx -p "$work/lx" -e "$work/lx/error.log" -c "$work/lx/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
lx_pid=$!

if [ -z "$binary" ]; then cargo build --release -q; binary=./target/release/pandagate; fi
# shellcheck disable=SC2086 # GW_ENV is a list of K=V words
env PANDAPON_ACCESS_KEY=bench-key PANDAPON_ACCESS_SECRET=bench-secret \
  PANDAGATE_LISTEN="127.0.0.1:$gw_port" PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port" PANDAGATE_CONTROL_LISTEN="127.0.0.1:0" \
  PANDAGATE_UPSTREAM="http://127.0.0.1:$up_port" PANDAGATE_LOG_FORMAT=json ${GW_ENV:-} \
  "$binary" >"$work/access.log" 2>"$work/gateway.err" &
gw_pid=$!
for port in $up_port $nx_port $lx_port $gw_port; do
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/open/product/get" && break; sleep 0.05; done
  curl -sf -o /dev/null "http://127.0.0.1:$port/open/product/get" || { echo "latency.sh: nothing answers on $port" >&2; exit 1; }
done

declare -A port=([direct]=$up_port [nginx]=$nx_port [nginx-lua]=$lx_port [pandagate]=$gw_port)
results="$work/results.tsv"
for run in $(seq 1 "$runs"); do
  for t in direct nginx nginx-lua pandagate; do
    url="http://127.0.0.1:${port[$t]}/open/product/get?itemId=1"
    wrk -t1 -c1 -d2s "$url" >/dev/null
    wrk -t1 -c1 -d"${secs}s" --latency "$url" > "$work/$t.$run.txt"
    python3 - "$t" "$run" "$work/$t.$run.txt" >>"$results" <<'PY'
import re, sys
name, run, path = sys.argv[1:]
text = open(path).read()
def us(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
p = {m.group(1): us(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", text, re.M)}
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
print(f"{name}\t{run}\t{rps:.0f}\t{p['50']:.1f}\t{p['99']:.1f}")
PY
  done
done

python3 - "$results" "$secs" "$runs" "$(nproc)" <<'PY'
import statistics, sys
path, secs, runs, cores = sys.argv[1:]
rows = [l.split("\t") for l in open(path).read().split("\n") if l]
by = {}
for name, run, rps, p50, p99 in rows:
    by.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: [statistics.median(c) for c in zip(*v)] for n, v in by.items()}
print(f"one connection, {secs} s per run, {runs} runs interleaved, {cores} cores; medians")
print("| target | calls/s | p50 µs | p99 µs | adds to p50 | adds to p99 |")
print("|---|---:|---:|---:|---:|---:|")
d = med["direct"]
for n in ("direct", "nginx", "nginx-lua", "pandagate"):
    rps, p50, p99 = med[n]
    add = "" if n == "direct" else f"{p50 - d[1]:.0f} µs | {p99 - d[2]:.0f} µs"
    print(f"| {n} | {rps:.0f} | {p50:.0f} | {p99:.0f} | {add or ' | '} |")
a_pg, a_nx = med["pandagate"][1] - d[1], med["nginx"][1] - d[1]
print(f"\npandagate adds {a_pg:.0f} µs to the p50, nginx {a_nx:.0f} µs: "
      + ("target held (pandagate adds no more than nginx)" if a_pg <= a_nx else "target missed"))
a_lx = med["nginx-lua"][1] - d[1]
print(f"pandagate adds {a_pg:.0f} µs to the p50 at one connection, the peer (nginx-lua) {a_lx:.0f} µs: "
      + ("target held (pandagate adds no more than the peer)" if a_pg <= a_lx
         else "target missed (pandagate adds more than the peer)"))
print("per run (target, run, calls/s, p50 µs, p99 µs):")
for r in rows:
    print("  " + "  ".join(r))
PY
echo "access-log lines written by pandagate: $(wc -l < "$work/access.log")"
