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
        [--backend local|postgres] [--replicas 2] [--kill-at 0.5]
        [--subscriber-delay 0] [--binary PATH | --no-build] [--seed N]
        [--wait 60] [--keep]

--backend local (the default) is one gateway on its redb store in a temp
dir. --backend postgres starts a PostgreSQL 15 server for the run (temp data
dir owned by the `postgres` user, free port, 127.0.0.1 only, fsync on: the
defaults), creates the database `pandagate`, and starts --replicas gateways
(2) with `[callbacks] backend = "postgres"` on that database, each on its own
free ports, all delivering to the same subscriber. The pushes go round-robin
over the live replicas. When --kill-at (0.5) of the pushes were acknowledged,
replica 0 is killed (SIGKILL, by its pid); afterwards only the survivors get
pushes, and a push whose connection failed because its replica was being
killed is sent again to a survivor (the provider pushes again), counted. The
subscriber finds which replica sent each delivery (the owner of the TCP
connection, from /proc), so the report gives per replica acks and
deliveries, the deliveries in flight at the kill, and how long the survivors
took to take over the killed replica's deliveries. --subscriber-delay makes
the subscriber wait that long before each answer (a slow subscriber: claimed
deliveries queue in each replica behind its 16 delivery slots). --keep keeps
the temp dirs and writes the raw records there (posts.jsonl, pushes.jsonl,
kill.json).

Python 3.11 standard library only. Talks only to 127.0.0.1; every server it
starts is on a free port and is stopped by its own pid. Installs the Debian
package postgresql when /usr/lib/postgresql/15/bin/postgres is missing.
Prints a Markdown summary on stdout (progress on stderr). Exit 1 when a push
was not acknowledged, an acknowledged push never reached the subscriber with
a 200 within --wait seconds, or an acknowledgement took >= 1000 ms; with
--backend postgres also when a delivery id was posted again after a 2xx that
was not in flight at the kill (rule in bench/callbacks.md), or a replica
that was not killed died.
"""

import argparse
import hashlib
import hmac
import http.client
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict, namedtuple
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RELEASE_BINARY, git_version, hist, pct, quantile  # noqa: E402
from benchlib import Gateway, LoopbackServer, Postgres, QuietHandler, build_release, ensure_postgres  # noqa: E402
from benchlib import event_time, http_get, logger, scrape_metrics, serve_in_thread, stop_server  # noqa: E402

SECRET = "bench-callback-secret"
PUSH_PATH = "/callbacks/pandapon"
SUBSCRIBER_PATH = "/pandapon/messages"
ACK_LIMIT_MS = 1000.0
# The gateway's default callbacks.delivery_timeout_ms; written out in the
# postgres config, and the width of the "in flight at the kill" window.
DELIVERY_TIMEOUT_MS = 10_000
PG_POOL_SIZE = 8
PG_STATEMENT_TIMEOUT_MS = 500
PUSH_TIMEOUT_S = 30
MAX_SENDS = 3  # per push: the first, and at most two more after a killed replica
# A first delivery this long after its ack waited for something (a lease).
LATE_FIRST_POST_MS = 5000.0


log = logger("callbacks:")


# --------------------------------------------------------------------------
# Subscriber
# --------------------------------------------------------------------------

# One delivery POST as the subscriber saw it. t_recv: body read; t_answer:
# just before the answer was written (all time.monotonic()); sender: the
# replica owning the connection (None: not determined); written: the answer
# went out without a socket error.
Post = namedtuple("Post", "t_recv t_answer delivery_id order_id status sender written")


CLOSED = "(closed)"


def socket_owner(peer_port, server_port, pids, tries=3):
    """Name (a key of `pids`, name -> pid) of the process holding the TCP
    connection 127.0.0.1:peer_port -> 127.0.0.1:server_port; CLOSED when
    that end is held by no process any more (its socket's inode is 0: the
    process closed it or died); None when not found. /proc/net/tcp is read
    a page at a time and can miss a row while the table changes, hence the
    tries."""
    for i in range(tries):
        owner = socket_owner_once(peer_port, server_port, pids)
        if owner is not None:
            return owner
        time.sleep(0.002 * (i + 1))
    return None


def socket_owner_once(peer_port, server_port, pids):
    local, remote = f"0100007F:{peer_port:04X}", f"0100007F:{server_port:04X}"
    inode = None
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[2] == remote:
                    inode = fields[9]
                    break
    except OSError:
        return None
    if inode == "0":
        return CLOSED
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for name, pid in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return name
            except OSError:
                continue
    return None


class Subscriber(LoopbackServer):
    """Records every delivery as a Post."""

    def __init__(self, fail, seed, delay=0.0):
        super().__init__(SubscriberHandler, seed)
        self.fail = fail
        self.delay = delay  # seconds before each answer
        self.posts = []
        self.ok_orders = set()
        self.bad_requests = 0
        self.senders = {}  # replica name -> pid; empty: senders not looked up
        self.conn_sender = {}  # peer port -> sender, looked up when accepted

    def process_request(self, request, client_address):
        # Runs on the accepting thread, right after the gateway connected
        # (before its process can be gone), not later on the handler's.
        if self.senders:
            owner = socket_owner(client_address[1], self.server_address[1], self.senders)
            with self.lock:
                self.conn_sender[client_address[1]] = owner
        super().process_request(request, client_address)

    def draw_status(self):
        with self.lock:
            return 500 if self.rng.random() < self.fail else 200

    def record(self, post):
        with self.lock:
            self.posts.append(post)
            if post.status == 200:
                self.ok_orders.add(post.order_id)

    def acked_count(self, wanted):
        with self.lock:
            return len(wanted & self.ok_orders)

    def handle_error(self, request, client_address):
        pass  # a connection closed by the gateway at shutdown is not news


class SubscriberHandler(QuietHandler):
    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        t_recv = time.monotonic()
        with self.server.lock:
            sender = self.server.conn_sender.get(self.client_address[1])
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
        reply = b'{"ok":true}' if status == 200 else b'{"ok":false}'
        if self.server.delay > 0:
            time.sleep(self.server.delay)
        t_answer = time.monotonic()
        written = self.answer_json(status, reply)
        self.server.record(Post(t_recv, t_answer, delivery_id, order_id, status, sender, written))


# --------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------

def gateway_toml(store, subscriber_port, pg_url=None):
    if pg_url is None:
        backend = f'store = "{store}"\n'
    else:
        backend = (f'backend = "postgres"\n'
                   f'postgres_url = "{pg_url}"\n'
                   f"postgres_pool_size = {PG_POOL_SIZE}\n"
                   f"postgres_statement_timeout_ms = {PG_STATEMENT_TIMEOUT_MS}\n"
                   f"delivery_timeout_ms = {DELIVERY_TIMEOUT_MS}\n")
    return f"""\
[callbacks]
path = "{PUSH_PATH}"
{backend}backoff_base_ms = 50
backoff_cap_ms = 500

[[callbacks.subscribers]]
url = "http://127.0.0.1:{subscriber_port}{SUBSCRIBER_PATH}"
"""


class Replica(Gateway):
    """One pandagate process in a directory of its own (config, access.log,
    gateway.err), that the run may kill."""

    def __init__(self, name, binary, work, toml):
        super().__init__(name, binary, work, toml,
                         PANDAPON_ACCESS_SECRET=SECRET,
                         PANDAGATE_UPSTREAM="http://127.0.0.1:9")  # never called
        self.killing = False  # set just before the SIGKILL
        self.killed_at = None  # (t before os.kill, t reaped), time.monotonic()
        self.events = []
        self.exit_code = None  # read before the final stop

    def kill(self):
        self.killing = True
        t0 = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.killed_at = (t0, time.monotonic())

    def read_logs(self):
        self.events = self.log_events("gateway.err")


def pending_count(admin_port):
    """Pending deliveries, counted through the pages of GET /callbacks (at
    most 1000 pages of 1000); None when a page could not be read."""
    total, after = 0, None
    try:
        for _ in range(1000):
            status, body = http_get(admin_port, "/callbacks?limit=1000" + (f"&after={after}" if after else ""))
            if status != 200:
                return None
            page = json.loads(body)
            total += len(page["deliveries"])
            after = page["next"]
            if after is None:
                return total
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        pass
    return None


def callback_metrics(admin_port):
    return {name: value
            for name, value in scrape_metrics(admin_port, "pandagate_callbacks_", numbers=False).items()
            if not name.startswith("pandagate_callbacks_delivery_lag")
            and "_bucket{" not in name}  # histograms: their _sum and _count only


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


def expected_delivery_id(body, subscriber_url):
    """The local store's id: the first 16 bytes of SHA-256 over
    "<message id>|<subscriber url>", the message id being SHA-256 of the
    push body (hex). Used to name deliveries in the report."""
    message_id = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{message_id}|{subscriber_url}".encode()).hexdigest()[:32], message_id


# One push as the client saw it: the final answer (status None: no answer,
# error names why), the latency of the send that got it (ms), the replica
# that gave it, and every send: (replica, t0, t1, status or error).
PushResult = namedtuple("PushResult", "order_id status latency_ms error replica sends")


class Targets:
    """The live replicas, round-robin by push index."""

    def __init__(self, replicas):
        self.lock = threading.Lock()
        self.live = list(replicas)

    def pick(self, i, exclude):
        with self.lock:
            live = [r for r in self.live if r not in exclude]
        return live[i % len(live)] if live else None

    def remove(self, replica):
        with self.lock:
            self.live = [r for r in self.live if r is not replica]

    def snapshot(self):
        with self.lock:
            return list(self.live)


class KillSwitch:
    """SIGKILLs `victim` from the thread whose acknowledgement makes the
    count reach `threshold`, then takes it out of the targets."""

    def __init__(self, victim, threshold, targets):
        self.victim, self.threshold, self.targets = victim, threshold, targets
        self.lock = threading.Lock()
        self.acks = 0
        self.answered = 0
        self.in_progress = 0
        self.fired = None  # {"acks":, "answered":, "in_progress":} at the kill

    def started(self):
        with self.lock:
            self.in_progress += 1

    def finished(self, acked):
        fire = False
        with self.lock:
            self.in_progress -= 1
            self.answered += 1
            if acked:
                self.acks += 1
                if self.victim is not None and self.fired is None and self.acks >= self.threshold:
                    self.fired = {"acks": self.acks, "answered": self.answered,
                                  "in_progress": self.in_progress}
                    fire = True
        if fire:
            log(f"SIGKILL {self.victim.name} (pid {self.victim.pid}) after {self.fired['acks']} acks")
            self.victim.kill()
            self.targets.remove(self.victim)


def send_pushes(targets, pushes, concurrency, max_seconds, switch):
    """Each thread takes the next push and sends it to the live replica its
    index falls on (round-robin), on one keep-alive connection per replica.
    One send per push, except when the connection failed because its replica
    was being killed: then the push goes to another live replica (at most
    MAX_SENDS in all). Returns PushResults in push order."""
    results = [None] * len(pushes)
    next_index = iter(range(len(pushes)))
    index_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def send(conn, push):
        order_id, body, signature = push
        conn.request("POST", PUSH_PATH, body=body, headers={
            "Content-Type": "application/json",
            "Authorization": signature,
        })
        r = conn.getresponse()
        r.read()
        return r.status, r.will_close

    def worker():
        conns = {}
        while time.monotonic() < deadline:
            with index_lock:
                i = next(next_index, None)
            if i is None:
                break
            switch.started()
            sends, tried = [], set()
            status = error = replica = None
            latency = float("nan")
            for _ in range(MAX_SENDS):
                replica = targets.pick(i, tried)
                if replica is None:
                    error = error or "no live replica"
                    break
                conn = conns.get(replica.name)
                if conn is None:
                    conn = conns[replica.name] = http.client.HTTPConnection(
                        "127.0.0.1", replica.port, timeout=PUSH_TIMEOUT_S)
                t0 = time.perf_counter()
                m0 = time.monotonic()
                try:
                    status, close = send(conn, pushes[i])
                    error = None
                except (OSError, http.client.HTTPException) as e:
                    status, close, error = None, True, type(e).__name__
                latency = (time.perf_counter() - t0) * 1000
                sends.append((replica.name, m0, time.monotonic(), status if status is not None else error))
                if close:
                    conn.close()
                    del conns[replica.name]
                if status is not None or not replica.killing:
                    break
                tried.add(replica)  # its replica was killed: the provider pushes again
            results[i] = PushResult(pushes[i][0], status, latency, error,
                                    replica.name if replica else None, sends)
            switch.finished(status == 200)
        for conn in conns.values():
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + PUSH_TIMEOUT_S * MAX_SENDS + 5)
    return [r if r is not None else PushResult(pushes[i][0], None, float("nan"), "not sent", None, [])
            for i, r in enumerate(results)]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def counters(metrics):
    shown = [f"{k.removeprefix('pandagate_callbacks_')}={v}" for k, v in metrics.items()]
    return ", ".join(shown) or "n/a"


def mono_of(event, wall_minus_mono):
    """A log line's timestamp on the script's monotonic clock, or None."""
    t = event_time(event)
    return None if t is None else t - wall_minus_mono


def fmt_ms(values, qs=(0.5, 0.99)):
    if not values:
        return "n/a"
    return " / ".join(f"{quantile(values, q):.0f}" for q in qs) + f" / {max(values):.0f} ms"


def duplicates_after_2xx(posts, kill):
    """Deliveries posted again after a 2xx of the same delivery id.

    A 2xx counts as given when the answer went out (`written`) to a replica
    that could still read it: not written after the killed replica was
    reaped. A POST is a repeat after a 2xx when its receipt is later than
    the start of writing a given 2xx of the same id. A given 2xx was in
    flight at the kill when (kill = (t0 before os.kill, t1 reaped)):
      kill.t0 - delivery timeout <= its POST's receipt <= kill.t1,
      its answer was written at or before kill.t1, and
      it came from the killed replica (or its sender is unknown).
    A repeat is excused when every given 2xx before it was in flight at the
    kill. Returns a dict of lists of (delivery id, repeat Post, 2xx Posts
    before it)."""
    by_id = defaultdict(list)
    for p in posts:
        by_id[p.delivery_id].append(p)
    victim = kill["victim"] if kill else None

    def given(p):
        if not (200 <= p.status < 300 and p.written):
            return False
        return not (kill and p.sender == victim and p.t_answer > kill["t1"])

    def in_flight(p):
        return bool(kill) and p.sender in (victim, None) \
            and kill["t0"] - DELIVERY_TIMEOUT_MS / 1000 <= p.t_recv <= kill["t1"] \
            and p.t_answer <= kill["t1"]

    out = {"excused": [], "unexcused": [], "overlapping": [], "dead_2xx": [], "given_twice": []}
    for did, seq in by_id.items():
        seq.sort(key=lambda p: p.t_recv)
        oks = [p for p in seq if given(p)]
        if len(oks) > 1:
            out["given_twice"].append((did, oks[1], oks[:1]))
        for p in seq:
            before = [g for g in oks if g is not p and g.t_answer <= p.t_recv]
            if before:
                out["excused" if all(in_flight(g) for g in before) else "unexcused"].append((did, p, before))
            if kill and p.sender == victim and 200 <= p.status < 300 and p.t_answer > kill["t1"]:
                out["dead_2xx"].append((did, p, []))
        for a, b in zip(seq, seq[1:]):
            if b.t_recv < a.t_answer:  # the next POST arrived before the previous was answered
                out["overlapping"].append((did, b, [a]))
    return out


def analyse(args, results, subscriber, replicas, kill, pg, t_start, send_wall, deliver_wall, wall,
            delivered_in_time, pending_note, push_info, wall_minus_mono):
    ok = [r for r in results if r.status == 200]
    acked_orders = {r.order_id for r in ok}
    by_order_replica = {r.order_id: r.replica for r in ok}
    lat = [r.latency_ms for r in ok]
    statuses = Counter(str(r.status) if r.status is not None else r.error for r in results)
    postgres = args.backend == "postgres"

    with subscriber.lock:
        posts = sorted(subscriber.posts, key=lambda p: p.t_recv)
        ok_orders = set(subscriber.ok_orders)
        bad = subscriber.bad_requests
    # A connection whose gateway end had no owner left when it was accepted
    # was opened by a process that died right after: with a kill, the victim.
    inferred = sum(1 for p in posts if p.sender == CLOSED)
    if kill:
        posts = [p._replace(sender=kill["victim"]) if p.sender == CLOSED else p for p in posts]
    delivered = acked_orders & ok_orders
    missing = sorted(acked_orders - ok_orders)
    per_status = Counter(p.status for p in posts)

    dups = duplicates_after_2xx(posts, kill)
    after_ok = dups["excused"] + dups["unexcused"]
    after_ok_ids = {d for d, _, _ in after_ok}
    after_ok_gaps = [(p.t_recv - before[0].t_answer) * 1000 for _, p, before in after_ok]
    ids_per_order = defaultdict(set)
    for p in posts:
        ids_per_order[p.order_id].add(p.delivery_id)
    ok_twice_ids = {d for d, _, _ in dups["given_twice"]}
    multi_id_orders = sum(1 for s in ids_per_order.values() if len(s) > 1)
    id_formula = sum(1 for p in posts if push_info.get(p.order_id, {}).get("delivery_id") == p.delivery_id)

    events = [(r.name, e) for r in replicas for e in r.events]
    gw_delivered = [e for _, e in events if e.get("message") == "callback delivered"]
    lags = [float(e["lag_ms"]) for e in gw_delivered if "lag_ms" in e]
    attempts = Counter(int(e.get("attempts", 0)) for e in gw_delivered)
    gw_ids = Counter(e.get("delivery_id") for e in gw_delivered)
    gw_dup_lines = sum(n - 1 for n in gw_ids.values() if n > 1)
    rejected = Counter(e.get("reason") for _, e in events if e.get("message") == "callback rejected")
    dead = sum(1 for _, e in events if e.get("message") == "callback delivery gave up: dead letter")
    errors = Counter(e.get("message") for _, e in events if e.get("level") in ("ERROR", "error"))
    warnings = Counter(e.get("message") for _, e in events if e.get("level") in ("WARN", "warn"))

    # Client-side delivery time: the push's ack to the first 200 for its orderId.
    first_ok = {}
    for p in posts:
        if p.status == 200 and p.order_id not in first_ok:
            first_ok[p.order_id] = p.t_answer
    ack_at = {r.order_id: r.sends[-1][2] for r in ok if r.sends}
    to_deliver = [(first_ok[o] - ack_at[o]) * 1000 for o in delivered if o in ack_at]
    first_post = {}
    for p in posts:
        first_post.setdefault(p.order_id, p)
    to_first_post = {o: (first_post[o].t_recv - ack_at[o]) * 1000 for o in ack_at if o in first_post}
    late_first = {o: ms for o, ms in to_first_post.items() if ms >= LATE_FIRST_POST_MS}

    slow = [r for r in ok if r.latency_ms >= ACK_LIMIT_MS]
    problems = []
    if len(ok) != len(results):
        problems.append(f"{len(results) - len(ok)} push(es) not acknowledged with 200")
    if missing:
        problems.append(f"{len(missing)} acknowledged push(es) never reached the subscriber with a 200 "
                        f"within {args.wait:g} s (e.g. {', '.join(missing[:3])})")
    if slow:
        problems.append(f"{len(slow)} acknowledgement(s) took >= {ACK_LIMIT_MS:.0f} ms")
    if postgres and dups["unexcused"]:
        ids = sorted({d for d, _, _ in dups["unexcused"]})
        problems.append(f"{len(dups['unexcused'])} delivery(ies) posted again after a 2xx that was not in "
                        f"flight at the kill ({len(ids)} ids, e.g. {', '.join(ids[:3])})")
    died = [r.name for r in replicas if r.killed_at is None and r.exit_code is not None]
    if died:
        problems.append(f"replica(s) not killed by the script died: {', '.join(died)}")

    n = len(results)
    cmd = " ".join(shlex.quote(a) for a in ["python3", "bench/callbacks.py"] + sys.argv[1:])
    settings = (f"Settings: {args.pushes} pushes, concurrency {args.concurrency}, subscriber fails "
                f"{args.fail:.0%} of deliveries (HTTP 500)"
                + (f", answers after {args.subscriber_delay:g} s" if args.subscriber_delay else "")
                + f", backoff 50 ms doubling to 500 ms, seed {args.seed}; "
                f"{os.cpu_count()} CPUs, load average before start {args.loadavg}.")
    if postgres:
        settings += (f" Backend postgres (PostgreSQL {pg.version()}, fsync {pg.stats_before.get('fsync', '?')}, "
                     f"synchronous_commit {pg.stats_before.get('synchronous_commit', '?')}), "
                     f"{args.replicas} replicas, pool {PG_POOL_SIZE}, statement timeout "
                     f"{PG_STATEMENT_TIMEOUT_MS} ms, delivery timeout {DELIVERY_TIMEOUT_MS} ms, "
                     + (f"replica0 SIGKILLed at {args.kill_at:.0%} of the pushes acknowledged."
                        if kill else "no kill."))
    else:
        settings += " Backend local (redb store in a temp dir)."
    lines = [
        f"## bench/callbacks.py — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {git_version()}",
        "",
        f"Command: `{cmd}`" + (f"; binary `{args.binary_path}`" if args.binary else ""),
        "",
        settings,
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
        f"| ack → first subscriber 200 (client clock) p50 / p99 / max | {fmt_ms(to_deliver)} |",
        f"| ack → first POST p50 / p99 / max; first POST ≥ {LATE_FIRST_POST_MS / 1000:g} s after the ack "
        f"| {fmt_ms(list(to_first_post.values()))}; **{len(late_first)}**"
        + (f" (sent by {hist(Counter(first_post[o].sender for o in late_first))}; acknowledged by "
           f"{hist(Counter(by_order_replica[o] for o in late_first))})" if late_first else "") + " |",
        f"| deliveries received by the subscriber | {len(posts)} ({hist(per_status)}) |",
        f"| redeliveries (deliveries − pushes) | {len(posts) - len(ok)} |",
    ]
    if postgres:
        exc_ids = {d for d, _, _ in dups["excused"]}
        lines.append(
            f"| repeated after a 2xx (same delivery id) | **{len(after_ok)}** (on {len(after_ok_ids)} ids), "
            f"of which in flight at the kill: **{len(dups['excused'])}** (on {len(exc_ids)} ids); "
            f"not in flight at the kill: **{len(dups['unexcused'])}**; ids given a 2xx more than once: "
            f"{len(ok_twice_ids)}; time after the 2xx p50 / max {quantile(after_ok_gaps, 0.5):.0f} / "
            f"{max(after_ok_gaps) if after_ok_gaps else float('nan'):.0f} ms |")
        lines.append(f"| POSTs of one id overlapping (next received before the previous was answered) | "
                     f"{len(dups['overlapping'])} |")
    else:
        lines.append(
            f"| deliveries arriving after the same delivery id already got a 200 | **{len(after_ok)}** "
            f"(on {len(after_ok_ids)} delivery ids; {len(ok_twice_ids)} ids answered 200 more than once); "
            f"time after the first 200 p50 / max {quantile(after_ok_gaps, 0.5):.0f} / "
            f"{max(after_ok_gaps) if after_ok_gaps else float('nan'):.0f} ms |")
    lines += [
        f"| orders seen under more than one delivery id | {multi_id_orders} |",
        f"| delivery ids equal to sha256(sha256(body) \\| subscriber)[:16] | {id_formula} of {len(posts)} |",
        f"| gateway \"callback delivered\" lines / distinct delivery ids | {len(gw_delivered)} / {len(gw_ids)} "
        f"({gw_dup_lines} repeated) |",
        f"| delivery lag (gateway lag_ms) p50 / p99 / max | {quantile(lags, 0.50):.0f} / {quantile(lags, 0.99):.0f} / "
        f"{max(lags) if lags else float('nan'):.0f} ms |",
        f"| attempts per delivery (gateway) | {hist(attempts)} |",
        f"| rejected pushes / dead letters / malformed deliveries | {sum(rejected.values())} / {dead} / {bad} |",
        f"| gateway errors logged | {hist(errors)} |",
    ]
    if postgres:
        lines.append(f"| gateway warnings logged | {hist(warnings)} |")
    for r in replicas:
        label = f"gateway counters (/metrics{', ' + r.name if postgres else ''})"
        shown = counters(r.metrics) if r.metrics else ("n/a (killed)" if r.killed_at else "n/a")
        lines.append(f"| {label} | {shown} |")
    if pending_note:
        lines.append(f"| pending after the wait | {pending_note} |")
    lines.append(f"| wall time | {wall:.2f} s |")

    if postgres:
        lines += kill_section(args, results, posts, replicas, kill, dups, inferred, t_start)
        lines += pg_section(pg)

    details = problem_details(args, results, posts, replicas, missing, slow, dups, push_info,
                              wall_minus_mono, t_start)
    if details:
        lines += ["", "### Details of the failed checks", ""] + details
    lines += [
        "",
        "Result: " + ("**PASS** — nothing lost, every ack under 1000 ms"
                      + (", no repeat after a 2xx outside the kill" if postgres else "")
                      if not problems else "**FAIL** — " + "; ".join(problems)),
    ]
    return "\n".join(lines), not problems


def kill_section(args, results, posts, replicas, kill, dups, inferred, t_start):
    lines = ["", "Per replica (acks from the client; deliveries by the owner of the subscriber's connection; "
             "\"delivered\" lines from the replica's stderr):", "",
             "| replica | pid | fate | pushes answered | acks (200) | sends failed on the kill, pushed again "
             "elsewhere | POSTs received from it | 200s it was given | \"callback delivered\" lines |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    answered = Counter(r.replica for r in results if r.status is not None)
    acks = Counter(r.replica for r in results if r.status == 200)
    failed_sends = Counter(s[0] for r in results for s in r.sends[:-1])
    post_from = Counter(p.sender for p in posts)
    ok_from = Counter(p.sender for p in posts if p.status == 200)
    delivered_lines = Counter()
    for r in replicas:
        delivered_lines[r.name] = sum(1 for e in r.events if e.get("message") == "callback delivered")
    for r in replicas:
        if r.killed_at:
            fate = f"SIGKILL at {r.killed_at[0] - t_start:.3f} s"
        elif r.exit_code not in (None, 0):
            fate = f"exited {r.exit_code} (**not killed by the script**)"
        else:
            fate = "stopped at the end (SIGTERM)"
        lines.append(f"| {r.name} | {r.pid} | {fate} | {answered[r.name]} | {acks[r.name]} | {failed_sends[r.name]} "
                     f"| {post_from[r.name]} | {ok_from[r.name]} | {delivered_lines[r.name]} |")
    for other in (None, CLOSED):
        if post_from[other]:
            lines.append(f"| ({'sender not determined' if other is None else 'connection already closed'}) "
                         f"| | | | | | {post_from[other]} | {ok_from[other]} | |")
    if inferred and kill:
        lines += ["", f"({inferred} POSTs counted for {kill['victim']} came on connections whose gateway end "
                  "had no owner left when the subscriber accepted them: opened by the process that was "
                  "being killed.)"]
    resent = [r for r in results if len(r.sends) > 1]
    resent_ok = [r for r in resent if r.status == 200]
    lines.append("")
    if not kill:
        lines.append("No replica was killed (--kill-at 0).")
        return lines
    t0, t1, victim = kill["t0"], kill["t1"], kill["victim"]
    lines.append(f"Kill: {victim} (pid {kill['pid']}) got SIGKILL {t0 - t_start:.3f} s after the first push, "
                 f"when {kill['acks']} pushes were acknowledged ({kill['answered']} answered, "
                 f"{kill['in_progress']} in progress); reaped {1000 * (t1 - t0):.1f} ms later. "
                 f"Pushes whose send failed because of the kill and were pushed again to a survivor: "
                 f"{len(resent)} ({len(resent_ok)} then acknowledged; first sends ended "
                 f"{hist(Counter(r.sends[0][3] for r in resent))}; acknowledging send p50 / max "
                 f"{fmt_ms([r.latency_ms for r in resent_ok], (0.5,))}).")
    # The victim's deliveries around the kill.
    window = [p for p in posts if p.sender == victim and t0 - DELIVERY_TIMEOUT_MS / 1000 <= p.t_recv <= t1]
    cut = [p for p in posts if p.sender == victim and p.t_recv <= t1 and p.t_answer > t1]
    late_2xx = [p for _, p, _ in dups["dead_2xx"]]
    last_victim = max((p.t_recv for p in posts if p.sender == victim), default=None)
    after_death = [p for p in posts if p.sender == victim and p.t_recv > t1]
    # Deliveries the survivors took over: ids whose latest POST from the
    # victim (before the kill) got no 2xx the victim could read, then posted
    # by a survivor.
    by_id = defaultdict(list)
    for p in posts:
        by_id[p.delivery_id].append(p)
    takeover = []
    excused_ids = {d for d, _, _ in dups["excused"]}
    for did, seq in by_id.items():
        mine = [p for p in seq if p.sender == victim]
        if not mine:
            continue
        last = mine[-1]
        read_2xx = 200 <= last.status < 300 and last.written and last.t_answer <= t1
        later = [p for p in seq if p.sender != victim and p.t_recv > t1]
        if later and (not read_2xx or did in excused_ids):
            takeover.append((later[0].t_recv - t1) * 1000)
    survivors_first = min((p.t_recv for p in posts if p.sender not in (victim, None) and p.t_recv > t1),
                          default=None)
    exc = dups["excused"]
    lines += [
        "",
        f"- POSTs from {victim} received in [kill − {DELIVERY_TIMEOUT_MS / 1000:g} s, kill]: {len(window)}; "
        f"received before it was reaped but answered after: {len(cut)}; received after it was reaped "
        f"(sent before its death, read late by the subscriber): {len(after_death)}"
        + (f", the last {1000 * (last_victim - t1):.0f} ms after" if after_death else "")
        + f"; 2xx answers to it after it was reaped (it could not read them): {len(late_2xx)} "
        f"({sum(1 for p in late_2xx if not p.written)} of them failed to write).",
        f"- Repeated after a 2xx: {len(exc) + len(dups['unexcused'])}, of which in flight at the kill: {len(exc)}"
        + (f" (the 2xx written {fmt_ms([1000 * (t1 - b[-1].t_answer) for _, _, b in exc], (0.5,))} before "
           f"it was reaped, p50 / max; repeats {fmt_ms([1000 * (p.t_recv - t1) for _, p, _ in exc], (0.5,))} "
           f"after it)" if exc else "") + ".",
        f"- Deliveries last posted by {victim} without a 2xx it read (or with one in flight at the kill), then "
        f"by a survivor: {len(takeover)}; kill → survivor's POST p50 / max {fmt_ms(takeover, (0.5,))}; "
        f"{sum(1 for x in takeover if x >= LATE_FIRST_POST_MS)} of them ≥ {LATE_FIRST_POST_MS / 1000:g} s "
        f"(waited for {victim}'s lease; the others were rescheduled by it before it died).",
        f"- First survivor POST after the kill: "
        + (f"{1000 * (survivors_first - t1):.0f} ms after it." if survivors_first else "none."),
    ]
    return lines


def pg_section(pg):
    s = pg.stats_after
    lines = ["", "PostgreSQL (pg_stat_*, after the run; table names as the gateway created them):", ""]
    if s["tables"]:
        lines += ["| table | inserted | updated | deleted | live rows |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {row[0]} | {' | '.join(row[1:])} |" for row in s["tables"] if len(row) == 5]
    else:
        lines.append("(no user tables, or psql failed)")
    if s["db"]:
        lines.append("")
        lines.append(f"Transactions committed / rolled back: {s['db'][0]} / {s['db'][1]}; deadlocks: {s['db'][2]}. "
                     f"Server log ERROR/FATAL/PANIC lines: {hist(pg.errors)}.")
    return lines


def problem_details(args, results, posts, replicas, missing, slow, dups, push_info, wall_minus_mono, t_start):
    """For each failed check (at most 5 examples each): the ids, timings and
    the replicas' stderr lines that mention it or are WARN/ERROR within 1 s."""
    out = []
    by_order = {r.order_id: r for r in results}
    posts_by_order = defaultdict(list)
    for p in posts:
        posts_by_order[p.order_id].append(p)

    def rel(t):
        return f"{t - t_start:+.3f} s"

    def nearby(t, needles):
        """Lines naming one of `needles` (at most 8), then the WARN/ERROR
        lines within 1 s of `t`, counted by replica, level and message."""
        found, close = [], Counter()
        for r in replicas:
            for e in r.events:
                text = json.dumps(e)
                tm = mono_of(e, wall_minus_mono)
                if any(n and n in text for n in needles):
                    found.append((tm or 0.0, f"{r.name}: {text}"))
                elif tm is not None and abs(tm - t) <= 1.0 and e.get("level") in ("WARN", "ERROR"):
                    close[(r.name, e.get("level"), e.get("message"))] += 1
        found.sort()
        out = [f"    {line[:400]}" for _, line in found[:8]]
        out += [f"    {name}: {n} × {level} \"{message}\" within 1 s of {rel(t)}"
                for (name, level, message), n in sorted(close.items())]
        return out

    def sends_of(r):
        return "; ".join(f"{name} {rel(a)}..{rel(b)} → {what}" for name, a, b, what in r.sends)

    for order in missing[:5]:
        r = by_order[order]
        info = push_info.get(order, {})
        out.append(f"- lost: order `{order}` (message id `{info.get('message_id')}`, delivery id "
                   f"`{info.get('delivery_id')}`), acknowledged: {sends_of(r)}; POSTs seen for it: "
                   + (", ".join(f"{p.sender or 'sender ?'} {rel(p.t_recv)} → {p.status}" for p in posts_by_order[order])
                      or "none"))
        out += nearby(r.sends[-1][2], [info.get("message_id"), info.get("delivery_id"), order])
    for r in sorted(slow, key=lambda r: -r.latency_ms)[:5]:
        out.append(f"- slow ack: order `{r.order_id}` {r.latency_ms:.0f} ms: {sends_of(r)}")
        out += nearby(r.sends[-1][1], [])
    for did, p, before in dups["unexcused"][:5]:
        out.append(f"- repeat after a 2xx outside the kill: delivery id `{did}` (order `{p.order_id}`): "
                   + ", ".join(f"2xx to {b.sender} received {rel(b.t_recv)} answered {rel(b.t_answer)}"
                               for b in before)
                   + f"; posted again by {p.sender} at {rel(p.t_recv)} → {p.status}")
        out += nearby(p.t_recv, [did])
    return out


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
    p.add_argument("--subscriber-delay", type=float, default=0.0,
                   help="seconds the subscriber waits before each answer (default 0: at once)")
    p.add_argument("--backend", choices=("local", "postgres"), default="local",
                   help="message store: local (redb, one gateway) or postgres (replicas on one database)")
    p.add_argument("--replicas", type=int, default=2, help="gateways with --backend postgres (default 2)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="SIGKILL replica 0 when this share of the pushes was acknowledged (postgres; 0: never)")
    p.add_argument("--binary", default=None, help="pandagate binary to run (implies --no-build)")
    p.add_argument("--no-build", action="store_true", help="use target/release/pandagate as is")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (config, store, logs, database)")
    args = p.parse_args()
    if args.pushes < 1 or args.concurrency < 1 or not 0 <= args.fail < 1 \
            or not 0 <= args.subscriber_delay < DELIVERY_TIMEOUT_MS / 1000:
        p.error("need --pushes >= 1, --concurrency >= 1, 0 <= --fail < 1, 0 <= --subscriber-delay < 10")
    if args.backend == "postgres" and (args.replicas < 1 or not 0 <= args.kill_at < 1
                                       or (args.kill_at > 0 and args.replicas < 2)):
        p.error("need --replicas >= 1, 0 <= --kill-at < 1, and 2 replicas or more for a kill")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    args.loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    def on_signal(*_):
        # End through the finally blocks; a second signal (e.g. `timeout`
        # signalling the child and then its group) must not cut them short.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(130)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    if args.binary:
        binary = Path(args.binary).resolve()
    else:
        if not args.no_build:
            build_release(log)
        binary = RELEASE_BINARY
    args.binary_path = binary
    if not binary.exists():
        sys.exit(f"no binary at {binary}; run without --no-build")
    if args.backend == "postgres":
        ensure_postgres(log)

    work = Path(tempfile.mkdtemp(prefix="pandagate-callbacks-bench-"))
    subscriber = subscriber_thread = pg = None
    replicas = []
    ok = False
    try:
        subscriber = Subscriber(args.fail, args.seed, args.subscriber_delay)
        subscriber_thread = serve_in_thread(subscriber, 0.1)
        sub_port = subscriber.server_address[1]
        sub_url = f"http://127.0.0.1:{sub_port}{SUBSCRIBER_PATH}"
        if args.backend == "postgres":
            pg = Postgres()
            pg.start()
            pg.stats_before = pg.stats()["settings"]
            log(f"postgres on 127.0.0.1:{pg.port}, postmaster pid {pg.postmaster_pid()}, dir {pg.dir}")
            toml = gateway_toml(None, sub_port, pg.url)
            for i in range(args.replicas):  # one after the other: each creates the schema at start
                replicas.append(Replica(f"replica{i}", binary, work, toml))
            subscriber.senders = {r.name: r.pid for r in replicas}
        else:
            replicas.append(Replica("gateway", binary, work, gateway_toml(work / "store", sub_port)))
        log("gateways: " + ", ".join(f"{r.name} pid {r.pid} port {r.port}" for r in replicas))

        run_id = uuid.uuid4().hex[:8]
        pushes = [make_push(run_id, i) for i in range(args.pushes)]
        push_info = {}
        for order_id, body, _ in pushes:
            did, mid = expected_delivery_id(body, sub_url)
            push_info[order_id] = {"delivery_id": did, "message_id": mid}
        targets = Targets(replicas)
        victim = replicas[0] if args.backend == "postgres" and args.kill_at > 0 else None
        switch = KillSwitch(victim, max(1, math.ceil(args.kill_at * args.pushes)), targets)
        wall_minus_mono = time.time() - time.monotonic()
        log(f"sending {args.pushes} pushes at concurrency {args.concurrency} to "
            + ", ".join(str(r.port) for r in replicas))
        t_start = time.monotonic()
        results = send_pushes(targets, pushes, args.concurrency, args.max_seconds, switch)
        t_sent = time.monotonic()
        kill = None
        if victim is not None and victim.killed_at:
            kill = dict(switch.fired, victim=victim.name, pid=victim.pid,
                        t0=victim.killed_at[0], t1=victim.killed_at[1])

        acked = {r.order_id for r in results if r.status == 200}
        deadline = t_sent + args.wait
        delivered_in_time = False
        while time.monotonic() < deadline:
            if subscriber.acked_count(acked) == len(acked):
                delivered_in_time = True
                break
            time.sleep(0.02)
        t_delivered = time.monotonic()
        # Listen on until the live gateways have nothing pending, then a
        # little more, so that repeats of finished deliveries are seen too.
        pending_note, unknown_since, counts = "", None, None
        while time.monotonic() < deadline:
            counts = [pending_count(r.admin_port) for r in targets.snapshot()]
            if all(c == 0 for c in counts):
                break
            if any(c is None for c in counts):
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > 5:
                    pending_note = "unknown (GET /callbacks failed for 5 s)"
                    break
            else:
                unknown_since = None
            time.sleep(0.1)
        else:
            pending_note = (f"still pending at the --wait deadline: {counts}" if counts is not None
                            else "not checked (the --wait deadline had passed)")
        time.sleep(args.settle)
        for r in replicas:
            if r.alive():
                r.metrics = callback_metrics(r.admin_port)
        wall = time.monotonic() - t_start

        for r in replicas:
            r.exit_code = r.proc.poll()  # before the stop: did it die on its own?
            r.stop()
            r.read_logs()
        if pg is not None:
            pg.stats_after = pg.stats()
            pg.errors = pg.log_errors()
        if args.keep:  # the raw records, for a closer look (times relative to the first push)
            with open(work / "posts.jsonl", "w") as f:
                for p in sorted(subscriber.posts, key=lambda p: p.t_recv):
                    f.write(json.dumps(dict(p._asdict(), t_recv=p.t_recv - t_start,
                                            t_answer=p.t_answer - t_start)) + "\n")
            with open(work / "pushes.jsonl", "w") as f:
                for r in results:
                    f.write(json.dumps(dict(r._asdict(), **push_info[r.order_id],
                                            sends=[(n, a - t_start, b - t_start, w) for n, a, b, w in r.sends]))
                            + "\n")
            if kill:
                (work / "kill.json").write_text(json.dumps(dict(kill, t0=kill["t0"] - t_start,
                                                                t1=kill["t1"] - t_start)))
        text, ok = analyse(args, results, subscriber, replicas, kill, pg, t_start,
                           t_sent - t_start, t_delivered - t_sent, wall, delivered_in_time, pending_note,
                           push_info, wall_minus_mono)
        print(text, flush=True)
    finally:
        for r in replicas:
            r.stop()
        stop_server(subscriber, subscriber_thread)
        if pg is not None:
            pg.stop()
        if args.keep:
            log(f"kept {work}" + (f" and {pg.dir}" if pg is not None else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
            if pg is not None:
                pg.remove()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
