#!/usr/bin/env python3
"""Helper of bench/compare.sh: process lists, RSS sampling, parsing of the
load generator's output (wrk's text or oha's JSON) and the Markdown report.
Not meant to be run by hand.

    compare_report.py pids MASTER_PID          master + its children, one a line
    compare_report.py reset-hwm PID...         VmHWM := VmRSS (clear_refs 5); prints ok|no
    compare_report.py hwm PID...               sum of VmHWM, KiB
    compare_report.py sample OUT [--tree] PID...
                                               every 100 ms: max of sum(VmRSS) and sum(Pss)
                                               so far, written to OUT, until SIGTERM;
                                               --tree: PID and its children, listed anew
                                               at every sample
    compare_report.py cpu PID...               CPU time (user + system) used so far, summed, s
    compare_report.py line RESULT_FILE         one-line summary for progress output
                                               (FILE.wrk: wrk's text; FILE.oha: oha's JSON)
    compare_report.py report RAW_DIR META      Markdown report on stdout; exit 3 when a
                                               target was missed

With --upstream-tls, each measurement also has FILE.hs (the marks "ACCEPTS
LINES" before the warm-up, after it and after the measured seconds: the
upstream's stub_status accepts, its query included, and the lines of its
per-connection log) and FILE.conns-warmup / FILE.conns-measured (those
lines: `$connection $ssl_session_reused ...`); the report adds TLS
handshakes per 10 000 calls and the target that pandagate makes no more
than nginx.

With the nginx-lua row (the peer: nginx plus Lua signing, see
bench/confs.sh), the report adds each pandagate row's ratios against the
peer and against the limit (the static nginx row), and the targets against
the peer: calls/s >= 1.0 x, CPU per call <= 1.0 x, p99 <= 1.1 x the peer's
at every level (counted as targets), and the stretch CPU per call <= 1.15 x
the static nginx's (reported, not counted).

Python 3 standard library only.
"""

import json
import os
import re
import signal
import statistics
import sys
import time

# No __pycache__ in the work tree (it would mark the commit dirty in reports).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import memory_kib  # noqa: E402

TARGETS = ("direct", "nginx", "nginx-lua", "pandagate", "pandagate-1t")
# The peer: nginx with the Lua module signing each call, what a team builds
# instead of pandagate; nginx (static headers, no signature) is the limit.
PEER = "nginx-lua"
# The targets against the peer (ratio of pandagate to the peer) and the stretch
# against the limit.
PEER_RPS_MIN = 1.0
PEER_CPU_MAX = 1.0
PEER_P99_MAX = 1.1
LIMIT_CPU_STRETCH = 1.15
# The rows judged against nginx: the default worker threads, and one thread.
GATEWAYS = ("pandagate", "pandagate-1t")
# oha's error for the calls still in flight when -z runs out: the tool's cut,
# not an answer of the target (wrk drops those calls silently).
OHA_DEADLINE = "aborted due to deadline"
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


# ---------------------------------------------------------------- processes


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d))
    return out


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmd_sample(out, pids, tree):
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    peak_rss = peak_pss = samples = 0
    while not stop:
        if tree:
            # nginx's master may still be forking workers when sampling starts.
            pids = [pids[0]] + children(pids[0])
        peak_rss = max(peak_rss, sum(memory_kib(p).get("VmRSS", 0) for p in pids))
        peak_pss = max(peak_pss, sum(memory_kib(p, "smaps_rollup").get("Pss", 0) for p in pids))
        samples += 1
        # Written every time so that a kill -9 still leaves the figure so far.
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{peak_rss} {peak_pss} {samples}\n")
        os.replace(tmp, out)
        time.sleep(0.1)


# ---------------------------------------------------------------- wrk output


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unknown wrk time {text!r}")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(path):
    with open(path) as f:
        text = f.read()
    r = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0,
         "connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if m:
            r[key] = to_ms(m.group(1))
    m = re.search(r"^\s+(\d+) requests in", text, re.M)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["connect"], r["read"], r["write"], r["timeout"] = map(int, m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    r["errors"] = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["detail"] = f"{r['connect']}/{r['read']}/{r['write']}/{r['timeout']}"
    return r


# ---------------------------------------------------------------- oha output


def parse_oha(path):
    """oha --output-format json, to the figures parse_wrk gives: calls/s are the
    HTTP answers over the run's duration, latencies in ms, errors = non-2xx/3xx
    answers + every error oha counted except the cut at the deadline."""
    r = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0,
         "connect": 0, "read": 0, "write": 0, "timeout": 0, "errors": 0, "detail": "—"}
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return r
    codes = {int(k): v for k, v in (doc.get("statusCodeDistribution") or {}).items()}
    errs = dict(doc.get("errorDistribution") or {})
    cut = errs.pop(OHA_DEADLINE, 0)
    total_s = (doc.get("summary") or {}).get("total")
    r["requests"] = sum(codes.values())
    if total_s:
        r["rps"] = r["requests"] / total_s
    pct = doc.get("latencyPercentiles") or {}
    for key in ("p50", "p99"):
        # Seconds in oha's JSON; null (NaN) when no call was answered.
        if isinstance(pct.get(key), (int, float)):
            r[key] = pct[key] * 1000.0
    r["non2xx"] = sum(v for k, v in codes.items() if not 200 <= k < 400)
    r["timeout"] = errs.get("timeout", 0)
    r["errors"] = r["non2xx"] + sum(errs.values())
    detail = "; ".join(f"{k}: {v}" for k, v in sorted(errs.items())) or "0"
    r["detail"] = f"{detail} (cut at the deadline, not counted: {cut})"
    return r


def parse_result(path):
    return parse_oha(path) if path.endswith(".oha") else parse_wrk(path)


def cmd_line(path):
    r = parse_result(path)
    if r["rps"] is None or r["p99"] is None:
        print("the load generator gave no result")
        return 1
    print(f"{r['rps']:10.0f} calls/s  p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f} ms  "
          f"errors {r['errors']}")
    return 0


# ---------------------------------------------------------------- report


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            meta[key] = value
    return meta


def load(raw):
    """{(run, target, conns): figures} from r<run>_<target>_c<conns>.wrk|.oha,
    .rss and .cpu."""
    data = {}
    for name in sorted(os.listdir(raw)):
        m = re.fullmatch(r"r(\d+)_([\w-]+)_c(\d+)\.(wrk|oha)", name)
        if not m:
            continue
        run, target, conns = int(m.group(1)), m.group(2), int(m.group(3))
        fig = parse_result(os.path.join(raw, name))
        stem = os.path.join(raw, name[: -len(m.group(4)) - 1])
        with open(stem + ".rss") as f:
            hwm, sampled_rss, sampled_pss, _samples = (int(x) for x in f.read().split())
        with open(stem + ".cpu") as f:
            cpu = float(f.read())
        fig.update(hwm=hwm, sampled_rss=sampled_rss, sampled_pss=sampled_pss,
                   cpu_us=cpu * 1e6 / fig["requests"] if fig["requests"] else None)
        hs = load_handshakes(stem)
        fig["hs"] = hs
        if hs is not None:
            m = hs["steady"]
            fig.update(hs_10k=per_10k(m["accepted"], m["calls"]),
                       hs_full_10k=per_10k(m["full"], m["calls"]),
                       hs_resumed_10k=per_10k(m["resumed"], m["calls"]),
                       hs_run_10k=per_10k(hs["measured"]["accepted"], hs["measured"]["calls"]))
        data[(run, target, conns)] = fig
    return data


def load_handshakes(stem):
    """TLS connections the upstream accepted (each is one handshake) and
    calls it answered, in the warm-up, in the measured seconds and in their
    steady part (from --tls-settle seconds in), with the split of those
    connections that sent a request into full handshakes and resumed
    sessions; None without --upstream-tls."""
    try:
        with open(stem + ".hs") as f:
            v = [int(x) for x in f.read().split()]
    except OSError:
        return None
    # Marks: before the warm-up, after it, `settle` seconds into the
    # measured run, after it; each "ACCEPTS REQUESTS LINES", each counting
    # its own stub_status connection and request.
    marks = [v[i:i + 3] for i in range(0, 12, 3)]
    out = {}
    for name, i, j in (("warmup", 0, 1), ("measured", 1, 3), ("steady", 2, 3)):
        full = resumed = 0
        with open(f"{stem}.conns-{name}") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2:
                    continue
                if fields[1] == "r":
                    resumed += 1
                else:
                    full += 1
        # The marks taken after mark i up to mark j are not the proxy's.
        queries = j - i
        out[name] = {"accepted": max(0, marks[j][0] - marks[i][0] - queries),
                     "calls": max(0, marks[j][1] - marks[i][1] - queries),
                     "full": full, "resumed": resumed}
    return out


def per_10k(n, calls):
    return None if n is None or not calls else n * 10_000 / calls


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def mib(kib):
    return None if not kib else kib / 1024


def ratio(a, b):
    return None if a is None or not b else a / b


def load_tool_text(meta):
    """The load generator and how it was run, for the Settings section."""
    tool = meta.get("tool", "wrk")
    threads = meta["threads"]
    if tool == "oha":
        return (f"oha `-z {meta['seconds']}s -c CONNS --worker-threads {threads} -t 2s --no-tui "
                f"--output-format json`, HTTP/1.1 with keep-alive; a call slower than 2 s counts "
                f"as an error (timeout); calls/s = HTTP answers (statusCodeDistribution) / "
                f"summary.total, leaving out the calls oha cuts when the duration runs out "
                f"(\"{OHA_DEADLINE}\", shown apart in the last table); p50/p99 are oha's "
                f"latencyPercentiles; the warm-up is the same command for its own duration")
    return (f"wrk `-t{threads} -c CONNS -d{meta['seconds']}s --latency`, default timeout 2 s "
            f"(a slower answer counts as a timeout error); calls/s is wrk's Requests/sec; "
            f"the warm-up is the same command for its own duration")


def gateway_text(meta, gateways):
    wt = meta.get("pandagate_worker_threads", "")
    default = (f"`PANDAGATE_WORKER_THREADS={wt}` (set by the caller)" if wt
               else "worker threads at the default (PANDAGATE_WORKER_THREADS unset: one per CPU)")
    rows = [f"**pandagate** {default}"]
    if "pandagate-1t" in gateways:
        rows.append("**pandagate-1t** the same binary and config with "
                    "`PANDAGATE_WORKER_THREADS=1`")
    text = "; ".join(rows)
    if meta.get("gateway_threads"):
        text += f"; threads of each process after the checks: {meta['gateway_threads']}"
    return text


def judge(checks, w, levels, details_when_held=False):
    """Writes one HELD or MISSED line per (name, levels missed, detail)
    check; returns how many were missed."""
    missed = 0
    for name, bad, detail in checks:
        if bad:
            missed += 1
            w(f"- **MISSED** {name} — at " + "; ".join(f"{c} conns: {detail(c)}" for c in bad)
              + f" (held at {len(levels) - len(bad)} of {len(levels)} levels)")
        elif details_when_held:
            w(f"- **HELD** {name} — at every level ({', '.join(map(str, levels))} conns: "
              + "; ".join(detail(c) for c in levels) + ")")
        else:
            w(f"- **HELD** {name} — at every level ({', '.join(map(str, levels))} conns)")
    return missed


def report(raw, meta_path):
    meta = read_meta(meta_path)
    data = load(raw)
    runs = sorted({k[0] for k in data})
    levels = sorted({k[2] for k in data})
    targets = [t for t in TARGETS if any(k[1] == t for k in data)]
    gateways = [t for t in GATEWAYS if t in targets]
    tool = meta.get("tool", "wrk")
    tls = meta.get("upstream_tls") == "1"

    def series(target, conns, key):
        return [data[(r, target, conns)].get(key) for r in runs if (r, target, conns) in data]

    summary = {}
    for c in levels:
        for t in targets:
            errs = series(t, c, "errors")
            summary[(t, c)] = {
                "rps": med(series(t, c, "rps")),
                "p50": med(series(t, c, "p50")),
                "p99": med(series(t, c, "p99")),
                "errors": med(errs),
                "errors_total": sum(errs),
                "rss": mib(med(series(t, c, "hwm"))),
                "cpu_us": med(series(t, c, "cpu_us")),
                "per_run": series(t, c, "rps"),
                "hs_10k": med(series(t, c, "hs_10k")),
                "hs_full_10k": med(series(t, c, "hs_full_10k")),
                "hs_resumed_10k": med(series(t, c, "hs_resumed_10k")),
                "hs_run_10k": med(series(t, c, "hs_run_10k")),
            }

    o = []
    w = o.append
    w(f"# pandagate vs nginx vs direct{' — upstream over TLS' if tls else ''} — {meta['date']}")
    w("")
    w("## Machine and build")
    w("")
    w(f"- date (UTC): {meta['date']}")
    w(f"- git commit: `{meta['commit']}`")
    w(f"- binary: `{meta['binary']}` ({meta['binary_version']}, sha256 {meta['binary_sha']})")
    w(f"- cores (nproc): {meta['nproc']}; CPU: {meta['cpu']}")
    w(f"- load average at start: {meta['load_start']}; at end: {meta.get('load_end', '?')} "
      f"(the end figure includes this benchmark's own processes)")
    w(f"- kernel: {meta['kernel']}")
    w(f"- load generator: {tool} ({meta.get('tool_version', meta.get('wrk_version', '?'))}); "
      f"{meta['nginx_version']}")
    w("")
    w("## Settings")
    w("")
    w(f"- command: `{meta['command']}`")
    w(f"- call: `GET {meta['path']}` on 127.0.0.1; {load_tool_text(meta)}")
    w(f"- connections: {meta['conns']}; {meta['warmup']} s warm-up (discarded) then "
      f"{meta['seconds']} s measured, per target and level")
    w(f"- runs: {meta['runs']}; within a run each level measures all {len(targets)} targets back "
      f"to back, in an order rotated from run to run; figures below are medians over runs")
    if tls:
        w(f"- upstream (direct): nginx `return 200` with the provider envelope over TLS "
          f"(`listen ... ssl`, TLS 1.2 and 1.3, `ssl_session_cache shared:SSL:10m`, session "
          f"tickets on; a test CA and a certificate for localhost / 127.0.0.1 made for this run "
          f"with openssl: {meta.get('tls_cert', '?')}; {meta.get('openssl_version', '')}), "
          f"`worker_processes {meta['upstream_workers']}`, keepalive_requests 1000000, one "
          f"access-log line per connection (at the end of its first request: "
          f"`$ssl_session_reused`) and stub_status on a plain port; direct is "
          f"{tool} to `https://127.0.0.1:PORT`")
        w(f"- nginx proxy: `worker_processes auto`, `upstream {{ keepalive {meta.get('nginx_keepalive', '64')}; }}` (idle connections kept per worker), "
          f"`proxy_pass https://provider`, `proxy_ssl_verify on` against the test CA, "
          f"`proxy_ssl_name localhost`, `proxy_ssl_server_name on`, `proxy_ssl_protocols TLSv1.2 "
          f"TLSv1.3`, `proxy_ssl_session_reuse on`, "
          f"`proxy_http_version 1.1`, `Connection \"\"`, static access-key / user-id / signature "
          f"headers plus timestamp=`$msec` and nonce-str=`$request_id`, JSON access log to a file "
          f"({meta['nginx_log_buffer']})")
        w(f"- pandagate: `PANDAGATE_UPSTREAM=https://localhost:PORT`, `[tls] ca_file` = the test "
          f"CA (rustls, its default session resumption), signing on (MD5, recipe concat), "
          f"`PANDAGATE_LOG_FORMAT=json` with stdout to a file, `[rate_limit] requests_per_second "
          f"= 1000000` (local, does not bind), admin listener on a free loopback port, other "
          f"settings at their defaults. Rows: {gateway_text(meta, gateways)}")
        w(f"- TLS handshakes: each connection the upstream accepts is one handshake. Counted "
          f"from its stub_status (`accepts`, and `requests` for the calls; the queries' own "
          f"connections and requests taken off) from {meta.get('tls_settle', '?')} s into the "
          f"measured run to its end (**steady**: the warm-up's load generator cut its calls in "
          f"flight when it stopped, each proxy closed those upstream connections, and the new "
          f"run first replaces them; the whole measured run is shown too), per 10 000 calls the "
          f"upstream answered in that time; the split into full handshakes and resumed "
          f"sessions comes from the per-connection log lines (`$ssl_session_reused`) of the "
          f"connections whose first request ended in that time (the line is written then: a "
          f"connection opened earlier and first used in the window is counted there, one "
          f"that never sent a request has no line, so full + resumed need not add up to "
          f"all). The warm-up's handshakes "
          f"(where a pool fills) are in the last table. For direct they are {tool}'s own "
          f"connections")
    else:
        w(f"- upstream (direct): nginx `return 200` with the provider envelope, "
          f"`worker_processes {meta['upstream_workers']}`, access_log off, keepalive_requests "
          f"1000000")
        w(f"- nginx proxy: `worker_processes auto`, `upstream {{ keepalive {meta.get('nginx_keepalive', '64')}; }}` (idle connections kept per worker), "
          f"`proxy_http_version 1.1`, `Connection \"\"`, static access-key / user-id / signature "
          f"headers plus timestamp=`$msec` and nonce-str=`$request_id`, JSON access log to a file "
          f"({meta['nginx_log_buffer']})")
        w(f"- pandagate: signing on (MD5, recipe concat), `PANDAGATE_LOG_FORMAT=json` with stdout "
          f"to a file, `[rate_limit] requests_per_second = 1000000` (local, does not bind), "
          f"admin listener on a free loopback port, other settings at their defaults. Rows: "
          f"{gateway_text(meta, gateways)}")
    if PEER in targets:
        w(f"- nginx-lua (the peer): the nginx proxy above, the same config line for line "
          f"(`worker_processes auto`, the same pool{', TLS settings' if tls else ''} and access "
          f"log settings: {meta['nginx_log_buffer']}), plus the Lua module "
          f"({meta.get('lua_module', '?')}): in the access phase a millisecond timestamp "
          f"(`ngx.now()`), a 32-character nonce of letters and digits (`math.random`, seeded per "
          f"worker) and `UPPER(MD5(access-key + timestamp + nonce-str + secret))` (`ngx.md5`), "
          f"sent by `proxy_set_header` with the fixed access-key and user-id (the credentials "
          f"pandagate has: bench-key, bench-secret, bench-user); a `body_filter_by_lua_block` "
          f"reads `requestId` and `code` from the answer's first chunk with `string.match` into "
          f"`ngx.ctx` and into the JSON access log line (the nginx row's fields plus request_id "
          f"and code). Signatures checked at start against the headers the upstream saw "
          f"(`bench/peer_check.sh` checks them against the sandbox provider)")
    w(f"- peak RSS: {meta['rss_method']}")
    w("")
    w("## Results (medians)")
    w("")
    hs_head = (" TLS handshakes per 10k calls, steady: all (full + resumed) | the same, whole "
               "measured run |" if tls else "")
    w("| conns | target | calls/s | p50 ms | p99 ms | errors | peak RSS MiB | CPU µs/call |"
      f"{hs_head} calls/s per run |")
    w("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if tls else "")
      + " --- |")
    for c in levels:
        for t in targets:
            s = summary[(t, c)]
            errors = fmt(s["errors"], 0)
            if s["errors_total"] and len(runs) > 1:
                errors += f" (all runs: {s['errors_total']})"
            rss = fmt(s["rss"], 1)
            if t == "direct" and s["rss"] is not None:
                rss += " (upstream)"
            per_run = ", ".join(f"{v:.0f}" for v in s["per_run"] if v is not None)
            hs = ""
            if tls:
                hs = (f" {fmt(s['hs_10k'], 1)} ({fmt(s['hs_full_10k'], 1)} + "
                      f"{fmt(s['hs_resumed_10k'], 1)}) | {fmt(s['hs_run_10k'], 1)} |")
            w(f"| {c} | {t} | {fmt(s['rps'], 0)} | {fmt(s['p50'], 3)} | {fmt(s['p99'], 3)} "
              f"| {errors} | {rss} | {fmt(s['cpu_us'], 1)} |{hs} {per_run} |")
    w("")

    w("## Ratios")
    w("")
    w("Ratios of the medians above, for each pandagate row; in brackets the same ratio run by "
      "run (both targets measured within the same minute), which shows how much of a "
      "difference is noise.")
    w("")
    w("| conns | row | calls/s vs nginx | p99 vs nginx | calls/s vs direct "
      "| CPU per call vs nginx |")
    w("| ---: | --- | ---: | ---: | ---: | ---: |")

    def per_run_ratio(c, key, a, b):
        vals = []
        for r in runs:
            if (r, a, c) in data and (r, b, c) in data:
                vals.append(ratio(data[(r, a, c)][key], data[(r, b, c)][key]))
        return ", ".join(fmt(v) for v in vals)

    def ratio_rows(pairs):
        """One row per level and pandagate row: the ratio of each (key,
        other target) pair's medians, run by run in brackets."""
        for c in levels:
            for g in gateways:
                pg = summary[(g, c)]
                cells = []
                for key, other in pairs:
                    cells.append(fmt(ratio(pg.get(key), summary.get((other, c), {}).get(key))))
                if len(runs) > 1:
                    for i, (key, other) in enumerate(pairs):
                        cells[i] += f" [{per_run_ratio(c, key, g, other)}]"
                w(f"| {c} | {g} | " + " | ".join(cells) + " |")
        w("")

    ratio_rows((("rps", "nginx"), ("p99", "nginx"), ("rps", "direct"), ("cpu_us", "nginx")))

    if PEER in targets:
        w("## Against the peer and the limit")
        w("")
        w("Each pandagate row against **the peer** (nginx-lua: nginx signing with Lua, what a "
          "team builds instead) and against **the limit** (the static nginx row: a proxy that "
          "does not sign at all); ratios of the medians, run by run in brackets.")
        w("")
        w("| conns | row | calls/s vs peer | CPU per call vs peer | p99 vs peer "
          "| calls/s vs limit | CPU per call vs limit | p99 vs limit |")
        w("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        ratio_rows((("rps", PEER), ("cpu_us", PEER), ("p99", PEER),
                    ("rps", "nginx"), ("cpu_us", "nginx"), ("p99", "nginx")))

    # The targets, judged on the medians, for each pandagate row.
    w("## Targets")
    w("")
    w("Judged on the medians, for each pandagate row: calls/s ≥ nginx, CPU per call ≤ nginx "
      "and p99 ≤ 1.1 × nginx at every level; peak RSS ≤ 30 MiB at 256 connections"
      + ("; TLS handshakes per 10 000 calls after the warm-up (steady part) ≤ nginx's at "
         "every level." if tls else "."))
    w("")
    missed_rows = {}
    rss_level = 256 if 256 in levels else max(levels)
    rss_note = "" if rss_level == 256 else f" (256 not measured: judged at {rss_level})"

    def nx(c, key):
        return summary[("nginx", c)][key]

    for g in gateways:
        def gv(c, key, g=g):
            return summary[(g, c)][key]

        checks = [
            (f"{g} calls/s ≥ nginx calls/s",
             [c for c in levels if gv(c, "rps") is None or nx(c, "rps") is None
              or gv(c, "rps") < nx(c, "rps")],
             lambda c, gv=gv: f"{fmt(gv(c, 'rps'), 0)} vs {fmt(nx(c, 'rps'), 0)}"),
            (f"{g} CPU per call ≤ nginx CPU per call",
             [c for c in levels if gv(c, "cpu_us") is None or nx(c, "cpu_us") is None
              or gv(c, "cpu_us") > nx(c, "cpu_us")],
             lambda c, gv=gv: f"{fmt(gv(c, 'cpu_us'), 1)} µs vs {fmt(nx(c, 'cpu_us'), 1)} µs"),
            (f"{g} p99 ≤ 1.1 × nginx p99",
             [c for c in levels if gv(c, "p99") is None or nx(c, "p99") is None
              or gv(c, "p99") > 1.1 * nx(c, "p99")],
             lambda c, gv=gv: f"{fmt(gv(c, 'p99'), 3)} ms vs 1.1 × {fmt(nx(c, 'p99'), 3)} ms"),
        ]
        if tls:
            checks.append(
                (f"{g} TLS handshakes per 10 000 calls ≤ nginx's",
                 [c for c in levels if gv(c, "hs_10k") is None or nx(c, "hs_10k") is None
                  or gv(c, "hs_10k") > nx(c, "hs_10k")],
                 lambda c, gv=gv: f"{fmt(gv(c, 'hs_10k'), 1)} vs {fmt(nx(c, 'hs_10k'), 1)}"))
        n_targets = len(checks) + 1
        w(f"**{g}**")
        w("")
        missed = judge(checks, w, levels)
        rss = gv(rss_level, "rss")
        if rss is not None and rss <= 30:
            w(f"- **HELD** {g} peak RSS ≤ 30 MiB at {rss_level} conns — {rss:.1f} MiB{rss_note}")
        else:
            missed += 1
            w(f"- **MISSED** {g} peak RSS ≤ 30 MiB at {rss_level} conns — {fmt(rss, 1)} MiB"
              f"{rss_note}")
        w("")
        w(f"{g}: {n_targets - missed} of {n_targets} targets held.")
        w("")
        missed_rows[g] = missed
    if len(gateways) > 1:
        w("All rows: " + "; ".join(f"{g} {n_targets - m} of {n_targets}"
                                   for g, m in missed_rows.items()) + ".")
        w("")

    peer_missed = {}
    if PEER in targets:
        w("## Targets against the peer")
        w("")
        w(f"Judged on the medians, for each pandagate row, at every level: calls/s ≥ "
          f"{PEER_RPS_MIN:.1f} × the peer's, CPU per call ≤ {PEER_CPU_MAX:.1f} × the peer's, p99 ≤ "
          f"{PEER_P99_MAX:.1f} × the peer's (these count as targets); stretch, reported but not "
          f"counted: CPU per call ≤ {LIMIT_CPU_STRETCH:.2f} × the limit's (static nginx).")
        w("")

        def pv(c, key):
            return summary[(PEER, c)][key]

        for g in gateways:
            def gv(c, key, g=g):
                return summary[(g, c)][key]

            def off(c, key, limit, other=pv, ge=False, gv=gv):
                r = ratio(gv(c, key), other(c, key))
                return r is None or (r < limit if ge else r > limit)

            checks = [
                (f"{g} calls/s ≥ {PEER_RPS_MIN:.1f} × peer",
                 [c for c in levels if off(c, "rps", PEER_RPS_MIN, ge=True)],
                 lambda c, gv=gv: f"{fmt(gv(c, 'rps'), 0)} vs {fmt(pv(c, 'rps'), 0)} "
                                  f"({fmt(ratio(gv(c, 'rps'), pv(c, 'rps')))}×)"),
                (f"{g} CPU per call ≤ {PEER_CPU_MAX:.1f} × peer",
                 [c for c in levels if off(c, "cpu_us", PEER_CPU_MAX)],
                 lambda c, gv=gv: f"{fmt(gv(c, 'cpu_us'), 1)} µs vs {fmt(pv(c, 'cpu_us'), 1)} µs "
                                  f"({fmt(ratio(gv(c, 'cpu_us'), pv(c, 'cpu_us')))}×)"),
                (f"{g} p99 ≤ {PEER_P99_MAX:.1f} × peer",
                 [c for c in levels if off(c, "p99", PEER_P99_MAX)],
                 lambda c, gv=gv: f"{fmt(gv(c, 'p99'), 3)} ms vs {fmt(pv(c, 'p99'), 3)} ms "
                                  f"({fmt(ratio(gv(c, 'p99'), pv(c, 'p99')))}×)"),
            ]
            w(f"**{g} vs the peer**")
            w("")
            missed = judge(checks, w, levels, details_when_held=True)
            bad = [c for c in levels if off(c, "cpu_us", LIMIT_CPU_STRETCH, other=nx)]
            stretch = "; ".join(f"{c} conns: {fmt(gv(c, 'cpu_us'), 1)} µs vs "
                                f"{fmt(nx(c, 'cpu_us'), 1)} µs "
                                f"({fmt(ratio(gv(c, 'cpu_us'), nx(c, 'cpu_us')))}×)" for c in levels)
            w(f"- stretch, not counted: **{'MISSED' if bad else 'HELD'}** {g} CPU per call ≤ "
              f"{LIMIT_CPU_STRETCH:.2f} × static nginx — {stretch}"
              + (f" (held at {len(levels) - len(bad)} of {len(levels)} levels)" if bad else ""))
            w("")
            w(f"{g}: {len(checks) - missed} of {len(checks)} targets against the peer held; "
              f"stretch {'missed' if bad else 'held'}.")
            w("")
            peer_missed[g] = missed

    w("## How to read")
    w("")
    w("All targets answer the same call from the same upstream on the same box, in the "
      "same minute, so the differences between rows are what the proxy adds; the absolute "
      "figures are those of this machine and depend on its load. **direct** is the ceiling: "
      f"{tool} against the upstream alone. **nginx** and **pandagate** add one hop each, with "
      "credential headers and an access log line per call; pandagate also computes the MD5 "
      "signature, reads the response envelope for the log, and passes every call through its "
      "rate limiter, retry and circuit-breaker logic. "
      + ("**pandagate-1t** is the same pandagate on one worker thread: it can use one core at "
         "most, and spends no CPU on handing work between threads. "
         if "pandagate-1t" in gateways else "")
      + ("**nginx-lua** is the peer: the nginx row plus what a team writes in Lua to sign "
         "each call and log the provider's requestId and code, so the gap between nginx and "
         "nginx-lua is what that Lua costs; pandagate is held to the peer (the alternative) "
         "and measured against the limit (nginx, which does not sign). "
         if PEER in targets else "")
      + "calls/s counts every HTTP answer including non-2xx ones, so read it "
      "together with the errors column (non-2xx answers + socket errors + timeouts over 2 s). "
      f"p50/p99 are {tool}'s latency percentiles in milliseconds. {tool}, the proxies and the "
      "upstream share the same cores, so a proxy that spends less CPU leaves more for the "
      f"others and the closed loop of {tool}; at high connection counts latency mostly "
      "reflects queueing (connections / throughput). Compare per-run ratios rather than single "
      "figures: a difference smaller than their spread is noise. peak RSS is resident memory "
      "of the proxy under test during the level (for direct: of the upstream nginx). CPU "
      "µs/call is the CPU time (user + system) the proxy processes used during the measured "
      "seconds divided by the calls answered (for direct: the upstream's): the figure least "
      "disturbed by other work on the box, since it counts only the proxy's own cycles; it "
      f"leaves out the upstream's and {tool}'s share."
      + (" With the upstream over TLS, each proxy's CPU per call includes its TLS work "
         "(encrypting requests, decrypting answers, and any handshake); a handshake after the "
         "warm-up means a pooled connection was not reused: closed, or never pooled (nginx "
         "keeps at most `keepalive` idle connections per worker and closes the rest after "
         "their call). A resumed session skips the certificate check but still costs a "
         "round trip and a key exchange." if tls else ""))
    w("")

    w("## Every measurement")
    w("")
    errors_head = ("connect/read/write/timeout errors" if tool == "wrk"
                   else "other errors (oha's messages)")
    w("| run | conns | target | calls/s | p50 ms | p99 ms | requests | non-2xx | "
      f"{errors_head} | peak RSS (VmHWM) MiB | sampled RSS MiB | "
      "sampled PSS MiB | CPU µs/call |"
      + (" TLS handshakes, warm-up: all (full + resumed) / calls | whole measured run | "
         "steady part |" if tls else ""))
    w("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
      + (" ---: | ---: | ---: |" if tls else ""))
    for r in runs:
        for c in levels:
            for t in targets:
                d = data.get((r, t, c))
                if not d:
                    continue
                w(f"| {r} | {c} | {t} | {fmt(d['rps'], 0)} | {fmt(d['p50'], 3)} | "
                  f"{fmt(d['p99'], 3)} | {d['requests']} | {d['non2xx']} | "
                  f"{d['detail']} | "
                  f"{fmt(mib(d['hwm']), 1)} | {fmt(mib(d['sampled_rss']), 1)} | "
                  f"{fmt(mib(d['sampled_pss']), 1)} | {fmt(d['cpu_us'], 1)} |"
                  + (hs_cells(d.get("hs")) if tls else ""))
    if meta.get("notes"):
        w("")
        w("## Notes")
        w("")
        for n in meta["notes"].split("|"):
            w(f"- {n}")
    print("\n".join(o))
    return 3 if any(missed_rows.values()) or any(peer_missed.values()) else 0


def hs_cells(hs):
    if not hs:
        return " — | — | — |"
    return "".join(f" {hs[k]['accepted']} ({hs[k]['full']} + {hs[k]['resumed']}) / "
                   f"{hs[k]['calls']} |" for k in ("warmup", "measured", "steady"))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "pids":
        master = int(args[0])
        print("\n".join(map(str, [master] + children(master))))
    elif cmd == "reset-hwm":
        ok = True
        for p in args:
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                ok = False
        print("ok" if ok else "no")
    elif cmd == "cpu":
        print(f"{sum(cpu_seconds(int(p)) for p in args):.2f}")
    elif cmd == "hwm":
        print(sum(memory_kib(int(p)).get("VmHWM", 0) for p in args))
    elif cmd == "sample":
        tree = args[1:2] == ["--tree"]
        cmd_sample(args[0], [int(p) for p in args[1 + tree:]], tree)
    elif cmd == "line":
        return cmd_line(args[0])
    elif cmd == "report":
        return report(args[0], args[1])
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
