#!/usr/bin/env python3
"""Pushed messages: acknowledgement latency and at-least-once delivery.

pandagate receives N signed pushes (each a distinct order, unique orderId)
from C concurrent client threads on its callbacks path, stores each durably
before answering 200, and delivers it to one subscriber. The subscriber
answers 500 to a random share of deliveries (--fail, default 0.2), so the
gateway must retry with backoff until each delivery gets a 200. The script
measures how long acknowledgements take (as the client sees them), checks
that every acknowledged push reached the subscriber with a 200 at least once,
and reports redeliveries, deliveries repeated after a 200 (same delivery id),
and the gateway's own delivery lag ("callback delivered" lines).

    python3 bench/callbacks.py [--pushes 1000] [--concurrency 50] [--fail 0.2]

Python 3.11 standard library only. Talks only to 127.0.0.1. Exit 1 when a
push was not acknowledged, an acknowledged push never reached the subscriber
with a 200 within --wait seconds, or an acknowledgement took >= 1000 ms.
"""

import argparse
import hashlib
import hmac
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import git_version, hist, pct, quantile, stop  # noqa: E402
from benchlib import LoopbackServer, run_pool, start_gateway as benchlib_start_gateway  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-callback-secret"
PUSH_PATH = "/callbacks/pandapon"
ACK_LIMIT_MS = 1000.0


# --------------------------------------------------------------------------
# Subscriber
# --------------------------------------------------------------------------

class Subscriber(LoopbackServer):
    """Records every delivery: (monotonic time, delivery id, orderId, status)."""

    def __init__(self, fail, seed):
        super().__init__(SubscriberHandler, seed)
        self.fail = fail
        self.deliveries = []  # (t, delivery_id, order_id, status)
        self.ok_orders = set()
        self.bad_requests = 0

    def draw_status(self):
        with self.lock:
            return 500 if self.rng.random() < self.fail else 200

    def record(self, delivery_id, order_id, status):
        with self.lock:
            self.deliveries.append((time.monotonic(), delivery_id, order_id, status))
            if status == 200:
                self.ok_orders.add(order_id)

    def acked_count(self, wanted):
        with self.lock:
            return len(wanted & self.ok_orders)

    def handle_error(self, request, client_address):
        pass  # a connection closed by the gateway at shutdown is not news


class SubscriberHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        delivery_id = self.headers.get("x-pandagate-delivery-id")
        order_id = None
        try:
            body = json.loads(raw)
            inner = body.get("messageBody")
            if isinstance(inner, str):  # delivered decoded, but accept the raw string too
                inner = json.loads(inner)
            order_id = inner.get("orderId")
        except (ValueError, AttributeError):
            pass
        if delivery_id is None or order_id is None:
            with self.server.lock:
                self.server.bad_requests += 1
            status = 400
        else:
            status = self.server.draw_status()
        self.server.record(delivery_id, order_id, status)
        reply = b'{"ok":true}' if status == 200 else b'{"ok":false}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


# --------------------------------------------------------------------------
# Gateway
# --------------------------------------------------------------------------

def gateway_toml(store, subscriber_port):
    return f"""\
[callbacks]
path = "{PUSH_PATH}"
store = "{store}"
backoff_base_ms = 50
backoff_cap_ms = 500

[[callbacks.subscribers]]
url = "http://127.0.0.1:{subscriber_port}/pandapon/messages"
"""


def read_events(path):
    events = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return events
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def start_gateway(binary, work, subscriber_port):
    proc, ports = benchlib_start_gateway(
        binary, work, gateway_toml(work / "store", subscriber_port),
        PANDAPON_ACCESS_SECRET=SECRET,
        PANDAGATE_UPSTREAM="http://127.0.0.1:9")  # never called
    return proc, ports["gateway"], ports["admin"]


def admin_get(port, path, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def pending_count(admin_port):
    try:
        status, body = admin_get(admin_port, "/callbacks")
        if status == 200:
            return len(json.loads(body))
    except (OSError, ValueError, http.client.HTTPException):
        pass
    return None


def callback_metrics(admin_port):
    out = {}
    try:
        status, body = admin_get(admin_port, "/metrics")
    except (OSError, http.client.HTTPException):
        return out
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("pandagate_callbacks_") and not line.startswith("pandagate_callbacks_delivery_lag"):
            name, _, value = line.rpartition(" ")
            out[name] = value
    return out


# --------------------------------------------------------------------------
# Pushes
# --------------------------------------------------------------------------

def make_push(run_id, i):
    order_id = f"bench-{run_id}-{i:06d}"
    inner = {"orderId": order_id, "status": "PAID", "payAmount": "12.34",
             "tradeNo": f"T{run_id}{i:06d}"}
    envelope = {
        "messageType": "ORDER_PAY_SUCCESS",
        "messageBody": json.dumps(inner, separators=(",", ":")),
        "messagePlatform": 1,
        "timestamp": str(int(time.time() * 1000)),
    }
    body = json.dumps(envelope, separators=(",", ":")).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return order_id, body, signature


def send_pushes(port, pushes, concurrency, max_seconds):
    """One attempt per push (the client never retries). Returns a list of
    (order_id, status or None, latency ms, error)."""
    def send(conn, push):
        order_id, body, signature = push
        t0 = time.perf_counter()
        conn.request("POST", PUSH_PATH, body=body, headers={
            "Content-Type": "application/json",
            "Authorization": signature,
        })
        r = conn.getresponse()
        r.read()
        return (order_id, r.status, (time.perf_counter() - t0) * 1000, None), r.will_close

    def failed(push, seconds, error):
        return (push[0], None, seconds * 1000, error)

    results = run_pool(port, pushes, concurrency, max_seconds, 30, send, failed)
    return [r if r is not None else (pushes[i][0], None, float("nan"), "not sent")
            for i, r in enumerate(results)]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def counters(metrics):
    shown = [f"{k.removeprefix('pandagate_callbacks_')}={v}" for k, v in metrics.items()]
    return ", ".join(shown) or "n/a"


def analyse(args, results, subscriber, events, metrics, send_wall, deliver_wall, wall, delivered_in_time):
    ok = [r for r in results if r[1] == 200]
    acked_orders = {r[0] for r in ok}
    lat = [r[2] for r in ok]
    statuses = Counter(str(r[1]) if r[1] is not None else r[3] for r in results)

    with subscriber.lock:
        deliveries = list(subscriber.deliveries)
        ok_orders = set(subscriber.ok_orders)
        bad = subscriber.bad_requests
    delivered = acked_orders & ok_orders
    missing = sorted(acked_orders - ok_orders)
    per_status = Counter(d[3] for d in deliveries)

    by_id = defaultdict(list)
    ids_per_order = defaultdict(set)
    for t, did, oid, st in deliveries:
        by_id[did].append((t, st))
        ids_per_order[oid].add(did)
    after_ok = 0          # deliveries arriving after the same id already got a 200
    after_ok_ids = set()
    after_ok_gaps = []    # ms from the id's first 200 to each later delivery
    ok_twice_ids = set()  # ids answered 200 more than once
    for did, seq in by_id.items():
        first_ok = None
        oks = 0
        for t, st in sorted(seq):
            if first_ok is not None:
                after_ok += 1
                after_ok_ids.add(did)
                after_ok_gaps.append((t - first_ok) * 1000)
            if st == 200:
                if first_ok is None:
                    first_ok = t
                oks += 1
        if oks > 1:
            ok_twice_ids.add(did)
    multi_id_orders = sum(1 for s in ids_per_order.values() if len(s) > 1)

    gw_delivered = [e for e in events if e.get("message") == "callback delivered"]
    lags = [float(e["lag_ms"]) for e in gw_delivered if "lag_ms" in e]
    attempts = Counter(int(e.get("attempts", 0)) for e in gw_delivered)
    gw_ids = Counter(e.get("delivery_id") for e in gw_delivered)
    gw_dup_lines = sum(n - 1 for n in gw_ids.values() if n > 1)
    rejected = Counter(e.get("reason") for e in events if e.get("message") == "callback rejected")
    dead = sum(1 for e in events if e.get("message") == "callback delivery gave up: dead letter")
    errors = Counter(e.get("message") for e in events if e.get("level") in ("ERROR", "error"))

    slow = [x for x in lat if x >= ACK_LIMIT_MS]
    problems = []
    if len(ok) != len(results):
        problems.append(f"{len(results) - len(ok)} push(es) not acknowledged with 200")
    if missing:
        problems.append(f"{len(missing)} acknowledged push(es) never reached the subscriber with a 200 "
                        f"within {args.wait:g} s (e.g. {', '.join(missing[:3])})")
    if slow:
        problems.append(f"{len(slow)} acknowledgement(s) took >= {ACK_LIMIT_MS:.0f} ms")

    n = len(results)
    lines = [
        f"## bench/callbacks.py — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {git_version()}",
        "",
        f"Settings: {args.pushes} pushes, concurrency {args.concurrency}, subscriber fails "
        f"{args.fail:.0%} of deliveries (HTTP 500), backoff 50 ms doubling to 500 ms, seed {args.seed}; "
        f"{os.cpu_count()} CPUs, load average before start {args.loadavg}.",
        "",
        "| | |",
        "|---|---|",
        f"| pushes sent / acknowledged (HTTP 200) | {n} / {len(ok)} ({pct(len(ok), n)}); answers: {hist(statuses)} |",
        f"| ack latency (client) p50 / p90 / p99 / max | {quantile(lat, 0.50):.1f} / {quantile(lat, 0.90):.1f} / "
        f"{quantile(lat, 0.99):.1f} / {max(lat) if lat else float('nan'):.1f} ms |",
        f"| acks >= {ACK_LIMIT_MS:.0f} ms | {len(slow)} |",
        f"| push phase | {send_wall:.2f} s ({n / send_wall:.0f} pushes/s) |",
        f"| delivered (acknowledged pushes whose orderId got a subscriber 200) | {len(delivered)} of {len(acked_orders)} "
        f"(**{pct(len(delivered), len(acked_orders))}**); all delivered {deliver_wall:.2f} s after the last ack"
        + ("" if delivered_in_time else f" (**not within {args.wait:g} s**)") + " |",
        f"| deliveries received by the subscriber | {len(deliveries)} ({hist(per_status)}) |",
        f"| redeliveries (deliveries − pushes) | {len(deliveries) - len(ok)} |",
        f"| deliveries arriving after the same delivery id already got a 200 | **{after_ok}** "
        f"(on {len(after_ok_ids)} delivery ids; {len(ok_twice_ids)} ids answered 200 more than once); "
        f"time after the first 200 p50 / max {quantile(after_ok_gaps, 0.5):.0f} / "
        f"{max(after_ok_gaps) if after_ok_gaps else float('nan'):.0f} ms |",
        f"| orders seen under more than one delivery id | {multi_id_orders} |",
        f"| gateway \"callback delivered\" lines / distinct delivery ids | {len(gw_delivered)} / {len(gw_ids)} "
        f"({gw_dup_lines} repeated) |",
        f"| delivery lag (gateway lag_ms) p50 / p99 / max | {quantile(lags, 0.50):.0f} / {quantile(lags, 0.99):.0f} / "
        f"{max(lags) if lags else float('nan'):.0f} ms |",
        f"| attempts per delivery (gateway) | {hist(attempts)} |",
        f"| rejected pushes / dead letters / malformed deliveries | {sum(rejected.values())} / {dead} / {bad} |",
        f"| gateway errors logged | {hist(errors)} |",
        f"| gateway counters (/metrics) | {counters(metrics)} |",
        f"| wall time | {wall:.2f} s |",
        "",
        "Result: " + ("**PASS** — nothing lost, every ack under 1000 ms" if not problems
                      else "**FAIL** — " + "; ".join(problems)),
    ]
    return "\n".join(lines), not problems


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pushes", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--fail", type=float, default=0.2, help="share of deliveries the subscriber answers 500")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every delivery after the last ack")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to keep listening once nothing is pending (late repeats)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the push phase")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-build", action="store_true", help="use target/release/pandagate as is")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (config, store, logs)")
    args = p.parse_args()
    if args.pushes < 1 or args.concurrency < 1 or not 0 <= args.fail < 1:
        p.error("need --pushes >= 1, --concurrency >= 1, 0 <= --fail < 1")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    args.loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())

    if not args.no_build:
        print("building: cargo build --release", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    binary = ROOT / "target" / "release" / "pandagate"
    if not binary.exists():
        sys.exit(f"no binary at {binary}; run without --no-build")

    work = Path(tempfile.mkdtemp(prefix="pandagate-callbacks-bench-"))
    subscriber = gateway = None
    sub_thread = None
    ok = False
    try:
        subscriber = Subscriber(args.fail, args.seed)
        sub_thread = threading.Thread(target=subscriber.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        sub_thread.start()
        gateway, port, admin_port = start_gateway(binary, work, subscriber.server_address[1])

        run_id = uuid.uuid4().hex[:8]
        pushes = [make_push(run_id, i) for i in range(args.pushes)]
        print(f"sending {args.pushes} pushes at concurrency {args.concurrency} to 127.0.0.1:{port}", file=sys.stderr)
        t_start = time.monotonic()
        results = send_pushes(port, pushes, args.concurrency, args.max_seconds)
        t_sent = time.monotonic()

        acked = {r[0] for r in results if r[1] == 200}
        deadline = t_sent + args.wait
        delivered_in_time = False
        while time.monotonic() < deadline:
            if subscriber.acked_count(acked) == len(acked):
                delivered_in_time = True
                break
            time.sleep(0.02)
        t_delivered = time.monotonic()
        # Listen on until the gateway has nothing pending, then a little more,
        # so that repeats of finished deliveries are seen too.
        while time.monotonic() < deadline and pending_count(admin_port) != 0:
            time.sleep(0.1)
        time.sleep(args.settle)
        metrics = callback_metrics(admin_port)
        wall = time.monotonic() - t_start

        stop(gateway)
        events = read_events(work / "gateway.err")
        text, ok = analyse(args, results, subscriber, events, metrics,
                           t_sent - t_start, t_delivered - t_sent, wall, delivered_in_time)
        print(text)
    finally:
        stop(gateway)
        if subscriber is not None:
            subscriber.shutdown()
            subscriber.server_close()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
