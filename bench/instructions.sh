#!/usr/bin/env bash
# Instructions per call of pandagate binaries, counted by valgrind's
# callgrind: the same for the same binary and inputs whatever else the box
# is doing, so a change of a few hundred instructions per call shows.
# Each binary serves, on one thread, a warm-up and then SHORT and LONG
# sequential keep-alive calls to the sandbox provider; the difference of
# the two totals over (LONG - SHORT) is the cost of one call, start-up and
# shutdown cancelled out.
#
#   bench/instructions.sh [--short 500] [--long 2500] BINARY [...]
#
# Needs valgrind and python3. Talks only to 127.0.0.1, on free ports.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

short=500 long=2500
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=$2; shift 2 ;;
    --long) long=$2; shift 2 ;;
    --help|-h) usage; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "instructions.sh: give a binary or more (see --help)" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is missing" >&2; exit 2; }

work=$(mktemp -d /tmp/pandagate-instr.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

calls() { # port n: n sequential calls over one keep-alive connection
  python3 - "$1" "$2" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
for _ in range(int(sys.argv[2])):
    c.request("GET", "/open/product/get?itemId=652874751412")
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

total() { # binary n: callgrind's instruction total for a warm-up and n calls
  local bin=$1 n=$2 sb_port gw_port admin_port sb gw
  sb_port=$(free_port) gw_port=$(free_port) admin_port=$(free_port)
  "$bin" sandbox --listen "127.0.0.1:$sb_port" >/dev/null 2>&1 &
  sb=$!; pids+=("$sb")
  PANDAPON_ACCESS_KEY=demo-access-key PANDAPON_ACCESS_SECRET=demo-secret \
    PANDAGATE_UPSTREAM="http://127.0.0.1:$sb_port" PANDAGATE_LISTEN="127.0.0.1:$gw_port" \
    PANDAGATE_ADMIN_LISTEN="127.0.0.1:$admin_port" PANDAGATE_CONTROL_LISTEN="127.0.0.1:0" PANDAGATE_WORKER_THREADS=1 \
    PANDAGATE_LOG_FORMAT=json \
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$n" "$bin" \
    >"$work/access.log" 2>"$work/valgrind.err" &
  gw=$!; pids+=("$gw")
  for _ in $(seq 1 300); do
    (echo >"/dev/tcp/127.0.0.1/$gw_port") 2>/dev/null && break
    sleep 0.1
  done
  calls "$gw_port" 200
  calls "$gw_port" "$n"
  kill -TERM "$gw"; wait "$gw" 2>/dev/null || true
  kill "$sb"; wait "$sb" 2>/dev/null || true
  awk '/^totals:/ {print $2}' "$work/cg.$n"
}

printf 'binary\tinstructions per call\n'
for bin in "$@"; do
  a=$(total "$bin" "$short")
  b=$(total "$bin" "$long")
  printf '%s\t%s\n' "$bin" "$(( (b - a) / (long - short) ))"
done
