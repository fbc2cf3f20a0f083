# shellcheck shell=bash
# The plumbing the shell benchmarks share, sourced by ab.sh, compare.sh,
# floor.sh, instructions.sh, latency.sh and rtt.sh (the nginx and pandagate
# configurations they share are in confs.sh).
#
#   usage                  the calling script's header comment (its --help)
#   log MSG / die MSG      MSG on stderr after the script's name; die exits 70
#   bad_usage MSG          a usage error: MSG on stderr, exit 2
#   free_port              a free TCP port on 127.0.0.1
#   need COMMAND PACKAGE   installs the Debian PACKAGE when COMMAND is missing
#   need_file FILE PACKAGE installs the Debian PACKAGE when FILE is missing
#   stop_pids PID...       TERM to each, KILL after 5 s, and reaped
#   on_exit FUNCTION       FUNCTION runs on every exit; Ctrl-C exits 130, TERM 143
#   end_run RC FILE...     the end of an EXIT trap: see below
#   bench_binary           the binary under test, copied into $work: see below
#   meta_common            the first lines of a run's meta.tsv: see below
#   write_report STEM      the helper's report to bench/results: see below

bench_name=$(basename "$0")

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
log() { echo "$bench_name: $*" >&2; }
die() { log "$*"; exit 70; }
bad_usage() { echo "$bench_name: $* (see --help)" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

need() {
  command -v "$1" >/dev/null && return
  log "installing $2"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

need_file() {
  [ -e "$1" ] && return
  log "installing $2"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

stop_pids() {
  local p
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

on_exit() {
  trap "$1" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# The end of an EXIT trap, once its processes are stopped: when the harness
# failed (RC other than 0, 1, 130 and 143) the last lines of each FILE that
# is not empty; $work kept when $keep is 1, else removed; exit RC.
end_run() {
  local rc=$1 f
  shift
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
    for f in "$@"; do
      if [ -s "$f" ]; then log "--- tail of $f"; tail -n 5 "$f" >&2; fi
    done
  fi
  if [ "$keep" = 1 ]; then log "work files kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}

# The binary under test: $binary (given with --binary), or else
# target/release/pandagate after `cargo build --release -q` of the work tree
# in $root; copied to $work/pandagate so that a rebuild during the run cannot
# swap it. Sets gw_bin (the copy) and binary_shown (for the report).
bench_binary() {
  if [ -z "$binary" ]; then
    log "building (cargo build --release -q)"
    (cd "$root" && cargo build --release -q)
    cp "${CARGO_TARGET_DIR:-$root/target}/release/pandagate" "$work/pandagate"
    binary_shown="target/release/pandagate (cargo build --release of the work tree at the commit below)"
  else
    [ -x "$binary" ] || die "not an executable: $binary"
    cp "$binary" "$work/pandagate"
    binary_shown="$binary (given with --binary: not necessarily built from the commit below)"
  fi
  gw_bin="$work/pandagate"
}

# The lines of meta.tsv every report has: date ($started), commit (+dirty
# when the work tree has changes), the binary ($binary_shown, $gw_bin), the
# machine, and the load average at start and end ($load_start, $load_end).
meta_common() {
  local commit
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$commit" != unknown ] && [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then commit="$commit+dirty"; fi
  printf 'date\t%s\n' "$started"
  printf 'commit\t%s\n' "$commit"
  printf 'binary\t%s\n' "$binary_shown"
  printf 'binary_version\t%s\n' "$("$gw_bin" --version 2>/dev/null || echo "version unknown")"
  printf 'binary_sha\t%s\n' "$(sha256sum "$gw_bin" | cut -c1-12)"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  printf 'kernel\t%s\n' "$(uname -sr)"
  printf 'load_start\t%s\n' "$load_start"
  printf 'load_end\t%s\n' "$load_end"
}

# `$helper report $work/raw $work/meta.tsv` to $out (by default
# bench/results/STEM.md, or STEM-2.md, STEM-3.md ... when taken) and to
# stdout. Sets report_rc: 0, or 3 when a target was missed; dies on any other.
write_report() {
  report_rc=0
  python3 "$helper" report "$work/raw" "$work/meta.tsv" > "$work/report.md" || report_rc=$?
  [ "$report_rc" = 0 ] || [ "$report_rc" = 3 ] || die "the report failed (status $report_rc)"
  if [ -z "$out" ]; then
    mkdir -p "$root/bench/results"
    out="$root/bench/results/$1.md"
    local n=2
    while [ -e "$out" ]; do out="$root/bench/results/$1-$n.md"; n=$((n + 1)); done
  fi
  mkdir -p "$(dirname "$out")"
  cp "$work/report.md" "$out"
  cat "$work/report.md"
  log "report written to $out"
}
