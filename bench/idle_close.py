#!/usr/bin/env python3
"""A provider that closes idle connections after 2 s: no failed call, no write twice.

Real providers close keep-alive connections that stay idle for a while
(nginx's `keepalive_timeout`, a load balancer's idle timeout). A gateway
that pools connections can pick one that the provider is closing at that
very moment: its request goes out on a connection that is already gone at
the other end. This script puts pandagate in front of such a provider and
counts what callers see.

Setup, all on 127.0.0.1, on free ports, stopped by pid at the end:
- a test CA and a certificate for localhost / 127.0.0.1 (openssl, made in
  the work directory through `make_test_certs` of bench/confs.sh);
- the provider stand-in: a Python `ssl` server (TLS 1.2/1.3, session
  tickets), HTTP/1.1 keep-alive, that closes a connection after
  `--idle-timeout` (2.0) s without a request, sending a TLS close_notify
  then a FIN, as nginx does on its keepalive_timeout. It answers `GET
  /open/product/get` (a read) and `POST /alibaba/order/create` (a write,
  `outOrderId` in the JSON body, a different one per call) with the
  provider's envelope, and records every write it receives by
  `outOrderId`, every connection (full or resumed handshake, requests,
  how it ended). Python rather than nginx so that it can count writes;
- the relay (bench/relay.py, `--delay-ms` 20 each way) between pandagate
  and the provider, as on the real path (`--no-relay`: straight to it).
  The delay is what makes the race window real: the provider's close takes
  20 ms to reach the gateway, and the gateway's request 20 ms to reach the
  provider, so a request sent up to ~2 x delay before the gateway sees the
  close finds the connection closed;
- pandagate (`--binary`) with `PANDAGATE_UPSTREAM=https://localhost:PORT`,
  `[tls] ca_file` = the test CA, the default pool (`upstream.
  pool_idle_timeout_ms` 60 s unless `--pool-idle-timeout-ms`) and retry
  settings (reads are retried after a dropped connection, writes are not).

Two phases:
1. steady: `--rate` (5) calls per second for `--seconds` (60), on a fixed
   schedule (open loop: a call starts on time even if the one before is
   slow), reads and writes alternating, spread round-robin over
   `--callers` (4) keep-alive caller connections. At 5 calls/s the
   gateway's pooled connections are rarely idle long enough to meet the
   provider's close: this is the issue's scenario as written.
2. sweep (unless `--no-sweep`): one caller connection, one call at a
   time. For each pause from `--sweep-from` 1.90 s to `--sweep-to` 2.10 s
   by `--sweep-step` 0.01 s, twice (for a write, then for a read): a
   priming read (the gateway's pooled connection is then freshly used),
   the pause, the call under test. The gateway's one pooled connection has
   been idle just under, at and just over the provider's timeout: this is
   the race, on purpose. About 90 s.

Checks (each phase and overall): 0 failed calls (anything but a 200 with
the envelope, or no answer, at the caller); 0 writes received twice by the
provider. Reported besides: writes that failed and never reached the
provider, reads the gateway retried (its access log), the provider's
connections and idle closes, the relay's resets, and for each failed call
the gateway's access-log line (status, attempts, retry_reasons,
retry_skipped, error).

    python3 bench/idle_close.py [--binary target/release/pandagate] [--rate 5]
        [--seconds 60] [--callers 4] [--idle-timeout 2.0] [--delay-ms 20] [--no-relay]
        [--no-sweep] [--sweep-from 1.90] [--sweep-to 2.10] [--sweep-step 0.01]
        [--pool-idle-timeout-ms N] [--out FILE] [--keep]

Python 3.11 standard library only (plus bench/benchlib.py). Installs
openssl (Debian package) when missing. The Markdown report goes to stdout
and to bench/results/YYYY-MM-DD-idle-close.md (or --out); progress to
stderr. Exit 0 when every check passed, 1 when one failed, 2 when the run
is INVALID (a process died, calls not made in time).
"""

import argparse
import http.client
import json
import os
import queue
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# No __pycache__ in the work tree (it would mark the commit dirty in reports).
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, apt_install, binary_option, git_version, hist, leave_work, logger  # noqa: E402
from benchlib import prebuilt_binary, quantile, read_events, serve_in_thread, start_gateway, stop, stop_server  # noqa: E402

READ_PATH = "/open/product/get"
WRITE_PATH = "/alibaba/order/create"
CALLER_TIMEOUT = 15.0


log = logger("idle_close:")


# --------------------------------------------------------------------------
# The provider stand-in
# --------------------------------------------------------------------------

class Provider(ThreadingHTTPServer):
    """TLS, keep-alive, idle connections closed after `idle_timeout` s."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, ctx, idle_timeout):
        super().__init__(("127.0.0.1", 0), Handler)
        self.ctx = ctx
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.conns = {}  # id -> {"accepted", "resumed", "version", "requests", "end", "how"}
        self.writes = defaultdict(list)  # outOrderId -> [(monotonic, conn id, x-request-id)]
        self.reads = 0
        self.next_conn = 0
        self.errors = Counter()

    def get_request(self):
        sock, addr = self.socket.accept()
        # Headers and body go out as two TLS records: without this, Nagle
        # holds the second until the first is acknowledged.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The handshake runs in the connection's thread (Handler.setup), not
        # in the accept loop: a handshake costs round trips behind the relay.
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def shutdown_request(self, request):
        # A close_notify first, as nginx sends when its keepalive_timeout
        # ends, without waiting for the peer's; then the FIN.
        try:
            request.setblocking(False)
            request.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        with self.lock:
            self.errors[type(exc).__name__] += 1

    def new_conn(self):
        with self.lock:
            self.next_conn += 1
            self.conns[self.next_conn] = {"accepted": time.monotonic(), "resumed": None,
                                          "version": None, "requests": 0, "end": None,
                                          "how": None}
            return self.next_conn


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.conn_id = self.server.new_conn()
        self.timed_out = False
        self.request.settimeout(10)
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as e:
            self.end(f"handshake failed ({type(e).__name__})")
            raise
        with self.server.lock:
            c = self.server.conns[self.conn_id]
            c["resumed"] = self.request.session_reused
            c["version"] = self.request.version()
        # From here every wait for the next request is bounded by the idle
        # timeout (StreamRequestHandler.setup sets it on the socket).
        self.timeout = self.server.idle_timeout
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            self.end("idle timeout" if self.timed_out else "closed by the gateway or an error")

    def end(self, how):
        with self.server.lock:
            c = self.server.conns[self.conn_id]
            if c["end"] is None:
                c["end"], c["how"] = time.monotonic(), how

    def log_message(self, fmt, *args):
        pass

    def log_error(self, fmt, *args):
        # BaseHTTPRequestHandler reports its own read timeout this way.
        if fmt.startswith("Request timed out"):
            self.timed_out = True

    def answer(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def envelope(self, data):
        return {"requestId": uuid.uuid4().hex, "code": 200, "msg": "success", "data": data}

    def do_GET(self):
        with self.server.lock:
            self.server.conns[self.conn_id]["requests"] += 1
            self.server.reads += 1
        self.answer(self.envelope({"itemId": self.path.rsplit("=", 1)[-1]}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            order = json.loads(body).get("outOrderId")
        except ValueError:
            order = None
        with self.server.lock:
            self.server.conns[self.conn_id]["requests"] += 1
            self.server.writes[order].append((time.monotonic(), self.conn_id,
                                              self.headers.get("x-request-id")))
        self.answer(self.envelope({"orderId": f"PO-{order}"}))


# --------------------------------------------------------------------------
# Callers
# --------------------------------------------------------------------------

class Caller:
    """One keep-alive connection to the gateway, reopened after a failure."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def call(self, kind, order, xrid):
        """One call; returns a record (status, error, ok, seconds...)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CALLER_TIMEOUT)
        started = time.monotonic()
        rec = {"kind": kind, "order": order, "xrid": xrid, "start": started, "status": None,
               "error": None, "ok": False}
        try:
            if kind == "write":
                body = json.dumps({"outOrderId": order, "offerId": 652874751412,
                                   "quantity": 1}).encode()
                self.conn.request("POST", WRITE_PATH, body=body,
                                  headers={"Content-Type": "application/json",
                                           "x-request-id": xrid})
            else:
                self.conn.request("GET", f"{READ_PATH}?itemId={order}",
                                  headers={"x-request-id": xrid})
            resp = self.conn.getresponse()
            data = resp.read()
            rec["status"] = resp.status
            if resp.status == 200:
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = {}
                want = {"orderId": f"PO-{order}"} if kind == "write" else {"itemId": str(order)}
                rec["ok"] = payload.get("code") == 200 and payload.get("data") == want
                if not rec["ok"]:
                    rec["error"] = f"unexpected body {data[:120]!r}"
            else:
                rec["error"] = data[:200].decode(errors="replace")
            if resp.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            self.close()
        rec["end"] = time.monotonic()
        return rec

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def steady_phase(args, port, run_id):
    """--rate calls/s for --seconds, on a fixed schedule, reads and writes
    alternating, round-robin over --callers connections (a thread each)."""
    n_calls = int(round(args.rate * args.seconds))
    queues = [queue.Queue() for _ in range(args.callers)]
    results = [None] * n_calls

    def worker(q):
        caller = Caller(port)
        while True:
            item = q.get()
            if item is None:
                break
            i, kind = item
            results[i] = caller.call(kind, f"{run_id}-s{i}", f"{run_id}-s{i}")
        caller.close()

    threads = [threading.Thread(target=worker, args=(q,), daemon=True) for q in queues]
    for t in threads:
        t.start()
    t0 = time.monotonic() + 0.2
    for i in range(n_calls):
        due = t0 + i / args.rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        queues[i % args.callers].put((i, "write" if i % 2 else "read"))
        if i and i % (int(args.rate) * 10 or 10) == 0:
            log(f"steady: {i}/{n_calls} calls sent")
    for q in queues:
        q.put(None)
    deadline = time.monotonic() + CALLER_TIMEOUT + 10
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    for i, r in enumerate(results):
        if r is not None:
            r["gap"] = None
            r["phase"] = "steady"
    return results


def sweep_phase(args, port, run_id, gaps):
    """One caller connection, one call at a time. For each pause in `gaps`,
    twice (before a write, then before a read): a priming read, which leaves
    the gateway's pooled connection just used (a new one if the call before
    broke it), then the pause (from the end of the priming call), then the
    call under test."""
    caller = Caller(port)
    results = []
    n = 0
    for g in gaps:
        for kind in ("write", "read"):
            n += 1
            prime = caller.call("read", f"{run_id}-p{n}", f"{run_id}-p{n}")
            prime.update(phase="sweep (priming)", gap=None)
            results.append(prime)
            time.sleep(max(0.0, prime["end"] + g - time.monotonic()))
            r = caller.call(kind, f"{run_id}-w{n}", f"{run_id}-w{n}")
            r.update(phase="sweep", gap=g)
            results.append(r)
            if not r["ok"]:
                log(f"sweep: {kind} after {g:.3f} s failed: {r['status']} {r['error']}")
        if n % 10 == 0:
            log(f"sweep: {n}/{2 * len(gaps)} pauses")
    caller.close()
    return results


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def ensure_openssl():
    apt_install("openssl", lambda: shutil.which("openssl"), log=log)


def make_certs(work):
    tls = work / "tls"
    subprocess.run(["bash", "-c", '. "$1" && make_test_certs "$2"', "make_test_certs",
                    str(ROOT / "bench" / "confs.sh"), str(tls)], check=True, timeout=60)
    return tls


def start_relay(work, target_port, delay_ms):
    port_file = work / "relay.port"
    err = open(work / "relay.err", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "relay.py"),
                             "--target", str(target_port), "--delay-ms", str(delay_ms),
                             "--port-file", str(port_file), "--log", str(work / "relay.log")],
                            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    err.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if port_file.exists():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    stop(proc, grace=5)
    raise RuntimeError("the relay did not start: " + (work / "relay.err").read_text())


def read_access_log(path):
    return {e["x_request_id"]: e for e in read_events(path)
            if e.get("event") == "access" and e.get("x_request_id")}


def relay_summary(work):
    counts = Counter()
    try:
        for line in (work / "relay.log").read_text().splitlines():
            f = line.split()
            if len(f) >= 6:
                counts[f[5]] += 1
    except OSError:
        pass
    return counts


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def analyse(calls, provider, access):
    """Per phase: counts, failed calls, writes received twice or never."""
    with provider.lock:
        writes = {k: list(v) for k, v in provider.writes.items()}
    out = {}
    phases = ["steady", "sweep", "all"]
    for ph in phases:
        sel = [c for c in calls if c is not None and (ph == "all" or c["phase"].startswith(ph))]
        failed = [c for c in sel if not c["ok"]]
        wr = [c for c in sel if c["kind"] == "write"]
        twice = [c for c in wr if len(writes.get(c["order"], [])) > 1]
        failed_never = [c for c in failed if c["kind"] == "write" and not writes.get(c["order"])]
        failed_received = [c for c in failed if c["kind"] == "write" and writes.get(c["order"])]
        retried_reads = [c for c in sel if c["kind"] == "read"
                         and (access.get(c["xrid"]) or {}).get("attempts", 1) > 1]
        retried_any = [c for c in sel if (access.get(c["xrid"]) or {}).get("attempts", 1) > 1]
        lat = [1000 * (c["end"] - c["start"]) for c in sel if c["ok"]]
        out[ph] = {"calls": len(sel), "reads": len(sel) - len(wr), "writes": len(wr),
                   "failed": failed, "failed_reads": [c for c in failed if c["kind"] == "read"],
                   "failed_writes": [c for c in failed if c["kind"] == "write"],
                   "twice": twice, "failed_never": failed_never,
                   "failed_received": failed_received, "retried_reads": retried_reads,
                   "retried_any": retried_any, "p50": quantile(lat, 0.5),
                   "p99": quantile(lat, 0.99)}
    # Writes the provider received that no caller sent in this run (should be none).
    sent = {c["order"] for c in calls if c is not None and c["kind"] == "write"}
    stray = [k for k in writes if k not in sent]
    return out, writes, stray


def report(args, argv, started, binary, calls, expected, provider, access, relay_counts,
           gateway_alive, gaps):
    a, writes, stray = analyse(calls, provider, access)
    made = sum(1 for c in calls if c is not None)
    invalid = []
    if made < expected:
        invalid.append(f"only {made} of {expected} calls were made in time")
    if not gateway_alive:
        invalid.append("the gateway exited during the run")
    o = []
    w = o.append
    w(f"# Idle close: a TLS provider that closes idle connections after "
      f"{args.idle_timeout:g} s — {started:%Y-%m-%d %H:%M:%S} UTC")
    w("")
    w("## Settings")
    w("")
    w(f"- command: `python3 bench/idle_close.py{' ' + shlex.join(argv) if argv else ''}`")
    w(f"- build: {git_version()}; binary `{binary}`; {os.cpu_count()} cores; load average at "
      f"start {args.load_start}")
    path = (f"pandagate → relay ({args.delay_ms:g} ms each way, `bench/relay.py`) → provider"
            if not args.no_relay else "pandagate → provider (no relay: loopback round trip)")
    w(f"- path: caller → {path}; the provider is a Python `ssl` server (TLS 1.2/1.3, session "
      f"tickets, HTTP/1.1 keep-alive) that closes a connection {args.idle_timeout:g} s after its "
      f"last answer without a new request (close_notify, then FIN), with a test CA and "
      f"certificate made for the run")
    pool = (f"`upstream.pool_idle_timeout_ms = {args.pool_idle_timeout_ms}`"
            if args.pool_idle_timeout_ms else "`upstream.pool_idle_timeout_ms` at its default "
            "(60 000)")
    w(f"- pandagate: `PANDAGATE_UPSTREAM=https://localhost:PORT`, `[tls] ca_file` = the test CA, "
      f"{pool}, retry settings at their defaults (a read is retried after a dropped connection, "
      f"a write is not)")
    w(f"- steady phase: {args.rate:g} calls/s for {args.seconds:g} s on a fixed schedule, reads "
      f"(`GET {READ_PATH}`) and writes (`POST {WRITE_PATH}`, a new `outOrderId` each) "
      f"alternating, round-robin over {args.callers} keep-alive caller connections")
    if gaps:
        w(f"- sweep phase: one caller connection, one call at a time; for each pause from "
          f"{gaps[0]:.3f} to {gaps[-1]:.3f} s by {args.sweep_step:g} s, once for a write and once "
          f"for a read: a priming read (the gateway's pooled connection is then freshly used), "
          f"the pause (from the end of the priming call), the call under test. The provider's "
          f"close of that connection meets the request when the pause is about "
          f"{args.idle_timeout:g} s minus 0 to 2 × the one-way delay; priming calls count as "
          f"calls")
    else:
        w("- sweep phase: not run (`--no-sweep`)")
    w("")
    w("## Results")
    w("")
    w("| phase | calls (reads + writes) | failed calls | failed reads | failed writes | of which "
      "the provider never received / received | writes received twice | calls the gateway "
      "retried (of them reads) | p50 / p99 ms of calls that passed |")
    w("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for ph in ("steady", "sweep", "all"):
        s = a[ph]
        if not s["calls"]:
            continue
        w(f"| {ph} | {s['calls']} ({s['reads']} + {s['writes']}) | {len(s['failed'])} | "
          f"{len(s['failed_reads'])} | {len(s['failed_writes'])} | {len(s['failed_never'])} / "
          f"{len(s['failed_received'])} | {len(s['twice'])} | {len(s['retried_any'])} "
          f"({len(s['retried_reads'])}) | {s['p50']:.1f} / {s['p99']:.1f} |")
    w("")
    checks = []
    for ph in ("steady", "sweep"):
        s = a[ph]
        if not s["calls"]:
            continue
        checks.append((f"{ph}: 0 failed calls", not s["failed"], f"{len(s['failed'])} failed"))
        checks.append((f"{ph}: 0 writes received twice", not s["twice"],
                       f"{len(s['twice'])} received twice"))
    checks.append(("no write the callers did not send reached the provider", not stray,
                   f"{len(stray)} stray"))
    verdict = "INVALID" if invalid else ("PASS" if all(ok for _, ok, _ in checks) else "FAIL")
    w(f"## Checks: {verdict}")
    w("")
    for name, ok, detail in checks:
        w(f"- **{'PASS' if ok else 'FAIL'}** {name}" + ("" if ok else f" — {detail}"))
    for why in invalid:
        w(f"- **INVALID** {why}")
    w("")
    failed = a["all"]["failed"]
    if failed:
        w("## Failed calls")
        w("")
        w("What the caller got, what the gateway logged (access log, by x-request-id) and how "
          "often the provider received the write.")
        w("")
        w("| phase | call | pause before (s) | caller got | gateway: status, attempts, "
          "retry_reasons, retry_skipped, error | provider received |")
        w("| --- | --- | ---: | --- | --- | ---: |")
        for c in failed:
            e = access.get(c["xrid"])
            gw = ("no access-log line" if e is None else
                  f"{e.get('status')}, {e.get('attempts')}, {e.get('retry_reasons')}, "
                  f"{e.get('retry_skipped')}, {e.get('error')}")
            got = f"{c['status']} {c['error'] or ''}".strip()
            received = len(writes.get(c["order"], [])) if c["kind"] == "write" else "—"
            gap = "—" if c.get("gap") is None else f"{c['gap']:.3f}"
            w(f"| {c['phase']} | {c['kind']} `{c['order']}` | {gap} | {got[:100]} | {gw} | "
              f"{received} |")
        w("")
    if gaps:
        w("## Sweep, call by call")
        w("")
        w("The calls under test: `.` passed on the first attempt, `r` passed after the gateway "
          "retried, `X` failed.")
        w("")
        w("| pause s | write | read |")
        w("| ---: | :---: | :---: |")
        by_gap = defaultdict(dict)
        for c in calls:
            if c is not None and c["phase"] == "sweep":
                e = access.get(c["xrid"]) or {}
                mark = "X" if not c["ok"] else ("r" if e.get("attempts", 1) > 1 else ".")
                by_gap[c["gap"]][c["kind"]] = mark
        for g in gaps:
            w(f"| {g:.3f} | {by_gap[g].get('write', '?')} | {by_gap[g].get('read', '?')} |")
        # Priming calls that failed or were retried would muddle the picture: say so.
        odd = [c for c in calls if c is not None and c["phase"] == "sweep (priming)"
               and (not c["ok"] or (access.get(c["xrid"]) or {}).get("attempts", 1) > 1)]
        if odd:
            w("")
            w(f"Priming calls that failed or were retried: {len(odd)}.")
        w("")
    with provider.lock:
        conns = list(provider.conns.values())
        errors = Counter(provider.errors)
    hows = Counter(c["how"] or "open at the end" for c in conns)
    full = sum(1 for c in conns if c["resumed"] is False)
    resumed = sum(1 for c in conns if c["resumed"])
    versions = Counter(c["version"] for c in conns if c["version"])
    w("## Provider and relay")
    w("")
    w(f"- provider: {len(conns)} connections ({full} full handshakes, {resumed} resumed; "
      f"{hist(versions)}); how they ended: {hist(hows)}; {provider.reads} reads and "
      f"{sum(len(v) for v in writes.values())} writes received; server errors: {hist(errors)}")
    if not args.no_relay:
        w(f"- relay: {sum(relay_counts.values())} connections; how they ended: "
          f"{hist(relay_counts)} (`reset`: a reset passed on, e.g. a request that reached a "
          f"closed connection)")
    w("")
    w("## How to read")
    w("")
    w("A failed write that the provider never received is the race: the gateway sent it on a "
      "pooled connection the provider had already closed (its close_notify and FIN were still "
      "on their way), and the connection broke before any answer. From the gateway's side the "
      "write may or may not have reached the provider, so it is — rightly — not sent again: "
      "the caller gets a 502. A read in the same spot is retried on a new connection and "
      "passes (`r`). A write received twice would be the opposite error: a retry of something "
      "that had arrived. The fix is in the pool, not in the retry rule: never hand out a "
      "connection that has been idle longer than the provider keeps it (`upstream."
      "pool_idle_timeout_ms` below the provider's idle timeout minus a round trip; "
      "`--pool-idle-timeout-ms` runs this script that way).")
    print("\n".join(o), flush=True)
    text = "\n".join(o) + "\n"
    return text, verdict


# --------------------------------------------------------------------------


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    binary_option(p)
    p.add_argument("--rate", type=float, default=5.0, help="steady phase: calls per second (5)")
    p.add_argument("--seconds", type=float, default=60.0, help="steady phase: seconds (60)")
    p.add_argument("--callers", type=int, default=4, help="steady phase: caller connections (4)")
    p.add_argument("--idle-timeout", type=float, default=2.0,
                   help="the provider closes a connection idle this long, s (2.0)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="relay: one-way delay (20)")
    p.add_argument("--no-relay", action="store_true", help="pandagate straight to the provider")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep phase")
    p.add_argument("--sweep-from", type=float, default=1.90, help="first pause, s (1.90)")
    p.add_argument("--sweep-to", type=float, default=2.10, help="last pause, s (2.10)")
    p.add_argument("--sweep-step", type=float, default=0.01, help="pause step, s (0.01)")
    p.add_argument("--pool-idle-timeout-ms", type=int, default=None,
                   help="set upstream.pool_idle_timeout_ms (default: pandagate's default)")
    p.add_argument("--out", help="report file (default bench/results/YYYY-MM-DD-idle-close.md)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.callers < 1 or args.idle_timeout <= 0:
        p.error("--rate, --seconds, --idle-timeout must be > 0 and --callers >= 1")
    if args.rate * args.seconds > 100_000:
        p.error("--rate x --seconds: at most 100 000 calls")
    gaps = []
    if not args.no_sweep:
        if args.sweep_step <= 0 or args.sweep_to < args.sweep_from:
            p.error("need --sweep-step > 0 and --sweep-to >= --sweep-from")
        n = int(round((args.sweep_to - args.sweep_from) / args.sweep_step)) + 1
        if n > 200:
            p.error("at most 200 pauses in the sweep")
        gaps = [round(args.sweep_from + i * args.sweep_step, 6) for i in range(n)]
    binary = prebuilt_binary(args.binary, "idle_close")
    args.load_start = " ".join(open("/proc/loadavg").read().split()[:3])

    started = datetime.now(timezone.utc)
    ensure_openssl()
    work = Path(tempfile.mkdtemp(prefix="pandagate-idle-close-"))
    provider = provider_thread = relay = gateway = None
    try:
        tls = make_certs(work)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
        provider = Provider(ctx, args.idle_timeout)
        provider_thread = serve_in_thread(provider, 0.05)
        provider_port = provider.server_address[1]
        if args.no_relay:
            upstream_port = provider_port
        else:
            relay, upstream_port = start_relay(work, provider_port, args.delay_ms)
        log(f"provider on 127.0.0.1:{provider_port}"
            + ("" if args.no_relay else f", relay on 127.0.0.1:{upstream_port}"))
        config = f'[tls]\nca_file = "{tls / "ca.pem"}"\n'
        if args.pool_idle_timeout_ms:
            config += f"\n[upstream]\npool_idle_timeout_ms = {args.pool_idle_timeout_ms}\n"
        gateway, ports = start_gateway(binary, work, config,
                                       PANDAGATE_UPSTREAM=f"https://localhost:{upstream_port}",
                                       PANDAPON_USER_ID="bench-user")
        log(f"gateway on 127.0.0.1:{ports['gateway']}, pid {gateway.pid}")
        run_id = uuid.uuid4().hex[:8]
        # One call to check the whole path before the phases.
        check = Caller(ports["gateway"]).call("read", 0, f"{run_id}-check")
        if not check["ok"]:
            raise RuntimeError(f"the first call through the gateway failed: {check}")

        expected = 0
        calls = []
        log(f"steady: {args.rate:g} calls/s for {args.seconds:g} s")
        steady = steady_phase(args, ports["gateway"], run_id)
        expected += len(steady)
        calls += steady
        if gaps:
            # Long enough for the provider to close every connection the
            # steady phase left, and for the gateway to see it.
            time.sleep(args.idle_timeout + 1.0)
            log(f"sweep: {len(gaps)} pauses from {gaps[0]:.3f} to {gaps[-1]:.3f} s, "
                f"about {2 * sum(gaps) + 0.2 * len(gaps):.0f} s")
            sweep = sweep_phase(args, ports["gateway"], run_id, gaps)
            expected += len(sweep)
            calls += sweep
        gateway_alive = gateway.poll() is None
        # The access log is written by a background thread: give it a moment.
        time.sleep(1.0)
        access = read_access_log(work / "access.log")
        stop(gateway, grace=10)
        gateway = None
        if relay is not None:
            stop(relay, grace=5)
            relay = None
        text, verdict = report(args, argv, started, binary, calls, expected, provider, access,
                               relay_summary(work), gateway_alive, gaps)
        out = Path(args.out) if args.out else None
        if out is None:
            results = ROOT / "bench" / "results"
            results.mkdir(parents=True, exist_ok=True)
            out = results / f"{started:%Y-%m-%d}-idle-close.md"
            n = 2
            while out.exists():
                out = results / f"{started:%Y-%m-%d}-idle-close-{n}.md"
                n += 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log(f"report written to {out}")
        return {"PASS": 0, "FAIL": 1}.get(verdict, 2)
    finally:
        stop(gateway, grace=10)
        stop(relay, grace=5)
        stop_server(provider, provider_thread)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
