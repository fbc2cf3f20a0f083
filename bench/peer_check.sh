#!/usr/bin/env bash
# Does the peer (the nginx-lua row of compare.sh and latency.sh) really sign?
# The benchmarks' upstream is nginx `return 200`: it checks no signature. Here
# the peer's config, exactly as bench/confs.sh makes it for the benchmarks,
# stands in front of `pandagate sandbox`, the stand-in provider that checks
# what the provider checks (access key, timestamp within 600 s, a
# 32-character nonce never seen before, the MD5 signature) and answers a
# refused call with HTTP 200 and `code` 401 naming the check:
#   1. CALLS calls through the peer with the bench credentials (bench-key /
#      bench-secret, which the sandbox is given): each must come back with
#      `code` 200, and the peer's access log must hold each call's own
#      requestId and code 200 (its body filter read them);
#   2. one call through the same config with another secret: the sandbox
#      must refuse it ("signature mismatch"), or step 1 proved nothing.
# Prints what it saw; exit 0 when both held, 1 when not.
#
#   bench/peer_check.sh [--binary PATH] [--calls 50]
#
# Without --binary, builds with `cargo build --release -q`. Installs nginx,
# curl and libnginx-mod-http-lua from Debian when missing. Talks only to
# 127.0.0.1, on free ports; stops what it started. Takes a second or two.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
# shellcheck source=bench/confs.sh
. "$root/bench/confs.sh"

binary="" calls=50 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || bad_usage "--binary needs a value"; binary=$2; shift 2 ;;
    --calls) [ $# -ge 2 ] || bad_usage "--calls needs a value"; calls=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
  esac
done
[[ $calls =~ ^[1-9][0-9]*$ ]] || bad_usage "--calls: a whole number > 0"
if [ -n "$binary" ]; then binary=$(realpath "$binary"); fi

need nginx nginx
need curl curl
need_nginx_lua

work=$(mktemp -d /tmp/pg-peer-check.XXXXXX)
sb_pid="" px_pid="" bad_pid=""
# shellcheck disable=SC2317  # reached through the trap below
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # shellcheck disable=SC2086 # the empty ones drop out
  stop_pids $px_pid $bad_pid $sb_pid
  end_run "$rc" "$work/sandbox.err" "$work/px/error.log" "$work/bad/error.log"
}
on_exit cleanup
bench_binary

sb_port=$(free_port) px_port=$(free_port) bad_port=$(free_port)
mkdir -p "$work/px" "$work/bad"
PANDAPON_ACCESS_SECRET=bench-secret "$gw_bin" sandbox --listen "127.0.0.1:$sb_port" --access-key bench-key \
  >/dev/null 2>"$work/sandbox.err" </dev/null &
sb_pid=$!
# The peer as compare.sh and latency.sh run it (plain HTTP upstream, the
# default keepalive and an unbuffered log), and the same with a wrong secret.
nginx_lua_proxy_conf "$work/px" "$px_port" "$sb_port" "$(ulimit -n)" > "$work/px/nginx.conf"
nginx_lua_proxy_conf "$work/bad" "$bad_port" "$sb_port" "$(ulimit -n)" "" "" 64 bench-key not-the-secret bench-user \
  > "$work/bad/nginx.conf"
nginx -p "$work/px" -e "$work/px/error.log" -c "$work/px/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
px_pid=$!
nginx -p "$work/bad" -e "$work/bad/error.log" -c "$work/bad/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
bad_pid=$!
for port in "$sb_port" "$px_port" "$bad_port"; do
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
  curl -s -o /dev/null "http://127.0.0.1:$port/" || die "nothing answers on 127.0.0.1:$port"
done
# The probes above are in the peer's access log: only the lines after them count.
log_start=0
if [ -f "$work/px/access.log" ]; then log_start=$(wc -l < "$work/px/access.log"); fi

# 1. Calls through the peer: all accepted.
: > "$work/answers"
for _ in $(seq 1 "$calls"); do
  curl -s "http://127.0.0.1:$px_port/open/product/get?itemId=652874751412" >> "$work/answers"
  echo >> "$work/answers"
done
# 2. The same config with another secret: refused.
bad_answer=$(curl -s "http://127.0.0.1:$bad_port/open/product/get?itemId=652874751412")
sleep 0.2 # the access log is written after the answer

python3 - "$work/answers" "$work/px/access.log" "$log_start" "$bad_answer" "$calls" <<'PY'
import json, sys
answers_path, log_path, skip, bad, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
answers = [json.loads(l) for l in open(answers_path) if l.strip()]
lines = [json.loads(l) for l in open(log_path).read().splitlines()[skip:] if l.strip()]
ok = [a for a in answers if a.get("code") == 200]
refused = [a for a in answers if a.get("code") != 200]
logged = {(l.get("request_id"), l.get("code")) for l in lines}
matched = [a for a in answers if (a.get("requestId"), str(a.get("code"))) in logged]
bad = json.loads(bad)
print(f"peer (bench-key / bench-secret) in front of pandagate sandbox: {len(ok)} of {calls} calls accepted (code 200)")
for a in refused[:3]:
    print(f"  refused: code {a.get('code')}, msg {a.get('msg')!r}")
print(f"  distinct requestIds {len({a.get('requestId') for a in answers})}; "
      f"access-log lines with the call's requestId and code: {len(matched)} of {len(answers)}")
if lines:
    print(f"  one access-log line: {json.dumps(lines[-1])}")
print(f"the same peer with another secret: code {bad.get('code')}, msg {bad.get('msg')!r}")
held = (len(ok) == calls and len(answers) == calls and len(matched) == calls
        and bad.get("code") == 401 and bad.get("msg") == "signature mismatch")
print("PASS: the peer signs as the provider checks" if held else "FAIL")
sys.exit(0 if held else 1)
PY
