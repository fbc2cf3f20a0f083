#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every target for a set
# time, starting from the seeds and every saved regression. Prints, and
# writes to fuzz/results/DATE.md, a table of executions, coverage, corpus
# size and findings. A crash is copied to fuzz/regressions/TARGET/ (replayed
# by tests/it/fuzz_regressions.rs in every test run from then on) and makes the
# script exit 1.
#
#   fuzz/run.sh [--seconds 300] [--jobs 1] [target ...]
#
# Needs the nightly toolchain (libFuzzer's sanitizer flags) and cargo-fuzz;
# installs cargo-fuzz when missing. Not part of CI (too slow, and CI has
# stable only); tests/it/fuzz_regressions.rs is the stable smoke run there.
set -euo pipefail
cd "$(dirname "$0")"
secs=300; jobs=1; targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) secs=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(request_edge envelope_prefix config_text callback)

cargo +nightly --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -O 2>&1 | tail -1

mkdir -p results
out="results/$(date -u +%F).md"
rows=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "regressions/$t"
  cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
  find "regressions/$t" -type f ! -name '.*' -exec cp -n {} "corpus/$t/" \;
  log=$(mktemp); marker=$(mktemp)
  set +e
  parallel=(); [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
    "${parallel[@]}" >"$log" 2>&1
  rc=$?
  set -e
  if [ "$jobs" -gt 1 ]; then cat fuzz-*.log >>"$log" 2>/dev/null; rm -f fuzz-*.log; fi
  execs=$(awk '/stat::number_of_executed_units/{s+=$NF} END{print s+0}' "$log")
  rate=$(awk '/stat::average_exec_per_sec/{s+=$NF} END{print s+0}' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(find "corpus/$t" -type f | wc -l)
  found=0
  for a in $(find "artifacts/$t" -type f -newer "$marker"); do
    cp "$a" "regressions/$t/"; found=$((found + 1))
  done
  rm -f "$marker"
  if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
    failed=1
    echo "== $t: rc=$rc, $found new finding(s); log: $log" >&2
    grep -m5 -A8 'panicked at\|ERROR: libFuzzer' "$log" >&2 || true
  else
    rm -f "$log"
  fi
  rows+=("| $t | ${secs} s × $jobs | $execs | $rate | ${cov:-?} | $corpus | $found |")
done

{
  [ -s "$out" ] && echo
  echo "# Fuzzing run, $(date -u '+%F %H:%M UTC')"
  echo
  echo "\`fuzz/run.sh --seconds $secs --jobs $jobs\` at $(git rev-parse --short HEAD), $(nproc) cores, $(cargo +nightly --version)."
  echo
  echo "| target | time | executions | execs/s | coverage (edges) | corpus | new findings |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} | tee -a "$out"
exit $failed
