#!/usr/bin/env python3
"""Helper of bench/rtt.sh: the warm-up client, wrk output, the Markdown report.
Not meant to be run by hand.

    rtt_report.py warmup URL CONNS SECONDS CA_FILE
        CONNS threads, each on its own keep-alive connection, call URL one
        call after another until SECONDS have passed, each finishing the call
        it is in (so that no call is cut in flight); https URLs are checked
        against CA_FILE. Prints the count; exit 1 on any failed call.
    rtt_report.py line FILE.wrk      one-line summary for progress output
    rtt_report.py report RAW_DIR META
        Markdown report on stdout; exit 3 when the target was missed.

Python 3 standard library only.
"""

import http.client
import os
import re
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

# No __pycache__ in the work tree (it would mark the commit dirty in reports).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_report import med, parse_wrk, read_meta  # noqa: E402

TARGETS = ("direct", "nginx", "pandagate")
PROXIES = ("nginx", "pandagate")
# What pandagate may add beyond what nginx adds, in ms.
MARGIN_MS = 1.0


def cmd_warmup(url, conns, seconds, ca_file):
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    deadline = time.monotonic() + seconds
    counts = [0] * conns
    errors = []

    def worker(i):
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca_file)
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=10, context=ctx)
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        try:
            while time.monotonic() < deadline:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(f"status {resp.status}")
                    return
                counts[i] += 1
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 30)
    print(f"warm-up: {sum(counts)} calls on {conns} connections in {seconds} s; "
          f"errors: {len(errors)} {errors[:3]}")
    return 1 if errors or any(t.is_alive() for t in threads) else 0


def cmd_line(path):
    r = parse_wrk(path)
    if r["rps"] is None or r["p99"] is None:
        print("wrk gave no result")
        return 1
    print(f"{r['rps']:8.1f} calls/s  p50 {r['p50']:8.3f} ms  p99 {r['p99']:8.3f} ms  "
          f"errors {r['errors']}")
    return 0


def fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def signed(v, digits=3):
    return "—" if v is None else f"{v:+.{digits}f}"


def load(raw):
    data = {}
    for name in sorted(os.listdir(raw)):
        m = re.fullmatch(r"r(\d+)_(\w+)_c(\d+)\.wrk", name)
        if not m:
            continue
        run, target, conns = int(m.group(1)), m.group(2), int(m.group(3))
        fig = parse_wrk(os.path.join(raw, name))
        try:
            with open(os.path.join(raw, name[:-4] + ".handshakes")) as f:
                fig["handshakes"] = int(f.read())
        except (OSError, ValueError):
            fig["handshakes"] = None
        data[(run, target, conns)] = fig
    return data


def report(raw, meta_path):
    meta = read_meta(meta_path)
    data = load(raw)
    runs = sorted({k[0] for k in data})
    levels = sorted({k[2] for k in data})

    def fig(r, t, c, key):
        d = data.get((r, t, c))
        return None if d is None else d.get(key)

    def added(r, t, c, key):
        a, b = fig(r, t, c, key), fig(r, "direct", c, key)
        return None if a is None or b is None else a - b

    o = []
    w = o.append
    d_ms = meta["delay_ms"]
    w(f"# Added latency over a {float(d_ms) * 2:g} ms round trip to a TLS provider — {meta['date']}")
    w("")
    w("## Machine and build")
    w("")
    w(f"- git commit: `{meta['commit']}`; binary: `{meta['binary']}` ({meta['binary_version']}, "
      f"sha256 {meta['binary_sha']})")
    w(f"- cores (nproc): {meta['nproc']}; CPU: {meta['cpu']}; kernel: {meta['kernel']}")
    w(f"- load average at start: {meta['load_start']}; at end: {meta['load_end']}")
    w(f"- {meta['tool_version']}; {meta['nginx_version']}; {meta['openssl_version']}")
    w("")
    w("## Settings")
    w("")
    w(f"- command: `{meta['command']}`")
    w(f"- path: every row reaches the upstream through `bench/relay.py` (one-way delay {d_ms} ms "
      f"on every chunk, in both directions, order kept; a new connection's first bytes wait for "
      f"the emulated TCP handshake's round trip too), so a call on a warm connection costs at "
      f"least {float(d_ms) * 2:g} ms and a new TLS connection 2 to 3 round trips more. Relay "
      f"totals: {meta.get('relay', '?')}. Check before the load: curl's first call on a new "
      f"connection through the relay had its first byte after {meta.get('relay_check', '?').split(' ')[0]} s")
    w("- upstream: nginx `return 200` with the provider envelope over TLS (test CA and a "
      "certificate for localhost / 127.0.0.1, ECDSA P-256, made for the run), session cache and "
      "tickets on, keepalive_timeout 300s")
    w("- **direct**: wrk `https://127.0.0.1:RELAY` (wrk's own TLS; its connections are made "
      "before it starts timing calls); **nginx**: `proxy_pass https://provider` (upstream "
      "`keepalive 64`, `proxy_ssl_verify on`, `proxy_ssl_name localhost`, "
      "`proxy_ssl_session_reuse on`), credential headers, JSON access log; **pandagate**: "
      "`PANDAGATE_UPSTREAM=https://localhost:RELAY`, `[tls] ca_file` = the test CA, signing, "
      "JSON access log, defaults otherwise (one serving thread per CPU)")
    w(f"- per measurement: {meta['warmup']} s of clean warm-up calls on as many connections (a "
      f"Python client that lets every call finish, so the proxy's pool is full and no upstream "
      f"connection was cut), then wrk `-t min(2, CONNS) -c CONNS -d{meta['seconds']}s "
      f"--latency`; connections {meta['conns']}; {meta['runs']} runs, the order of the three "
      f"rows rotated from run to run and level to level")
    w("- **adds** = the row's percentile minus direct's in the same run and level; figures "
      "below are medians over runs (of the percentiles, and of the run-by-run additions)")
    w("")
    w("## Results (medians)")
    w("")
    w("| conns | target | calls/s | p50 ms | p99 ms | adds to p50 ms | adds to p99 ms | errors "
      "(all runs) | TLS handshakes in the measured runs |")
    w("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    summary = {}
    for c in levels:
        for t in TARGETS:
            s = {
                "rps": med([fig(r, t, c, "rps") for r in runs]),
                "p50": med([fig(r, t, c, "p50") for r in runs]),
                "p99": med([fig(r, t, c, "p99") for r in runs]),
                "add50": med([added(r, t, c, "p50") for r in runs]) if t != "direct" else None,
                "add99": med([added(r, t, c, "p99") for r in runs]) if t != "direct" else None,
                "errors": sum(fig(r, t, c, "errors") or 0 for r in runs),
                "hs": [fig(r, t, c, "handshakes") for r in runs],
            }
            summary[(t, c)] = s
            hs = ", ".join("—" if h is None else str(h) for h in s["hs"])
            if t == "direct":
                hs += " (wrk's own)"
            w(f"| {c} | {t} | {fmt(s['rps'], 1)} | {fmt(s['p50'])} | {fmt(s['p99'])} | "
              f"{signed(s['add50'])} | {signed(s['add99'])} | {s['errors']} | {hs} |")
    w("")
    w("## Target")
    w("")
    w(f"At each level, what pandagate adds to direct's p50 and p99 is within {MARGIN_MS:g} ms of "
      f"what nginx adds: pandagate's addition ≤ nginx's + {MARGIN_MS:g} ms (a smaller "
      f"addition than nginx's passes). Medians of the run-by-run additions; in brackets the "
      f"additions run by run.")
    w("")
    w("| conns | percentile | nginx adds ms | pandagate adds ms | pandagate − nginx ms | |")
    w("| ---: | --- | ---: | ---: | ---: | --- |")
    missed = 0
    for c in levels:
        for key, label in (("p50", "p50"), ("p99", "p99")):
            add_key = "add50" if key == "p50" else "add99"
            nx, pg = summary[("nginx", c)][add_key], summary[("pandagate", c)][add_key]
            diff = None if nx is None or pg is None else pg - nx
            ok = diff is not None and diff <= MARGIN_MS
            missed += not ok
            per_nx = ", ".join(signed(added(r, "nginx", c, key), 2) for r in runs)
            per_pg = ", ".join(signed(added(r, "pandagate", c, key), 2) for r in runs)
            w(f"| {c} | {label} | {signed(nx)} [{per_nx}] | {signed(pg)} [{per_pg}] | "
              f"{signed(diff)} | **{'HELD' if ok else 'MISSED'}** |")
    total = 2 * len(levels)
    w("")
    w(f"{total - missed} of {total} held.")
    errors = sum(summary[(t, c)]["errors"] for t in TARGETS for c in levels)
    handshakes = sum(h or 0 for t in PROXIES for c in levels for h in summary[(t, c)]["hs"])
    notes = []
    if errors:
        notes.append(f"{errors} wrk errors over all runs (see the last table): a row with errors "
                     f"is not comparable")
    if handshakes:
        notes.append(f"{handshakes} TLS handshakes happened while a proxy row was measured: each "
                     f"costs the calls behind it 2 to 3 round trips, and can move the p99")
    if notes:
        w("")
        for n in notes:
            w(f"- **Note:** {n}")
    w("")
    w("## Every measurement")
    w("")
    w("| run | conns | target | calls/s | p50 ms | p99 ms | requests | errors (non-2xx, "
      "connect/read/write/timeout) | handshakes |")
    w("| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in runs:
        for c in levels:
            for t in TARGETS:
                d = data.get((r, t, c))
                if not d:
                    continue
                w(f"| {r} | {c} | {t} | {fmt(d['rps'], 1)} | {fmt(d['p50'])} | {fmt(d['p99'])} | "
                  f"{d['requests']} | {d['non2xx']}, {d['detail']} | "
                  f"{'—' if d['handshakes'] is None else d['handshakes']} |")
    print("\n".join(o))
    return 3 if missed else 0


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "warmup":
        return cmd_warmup(args[0], int(args[1]), float(args[2]), args[3])
    if cmd == "line":
        return cmd_line(args[0])
    if cmd == "report":
        return report(args[0], args[1])
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
