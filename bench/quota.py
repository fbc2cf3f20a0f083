#!/usr/bin/env python3
"""Shared quota through Redis: accuracy across replicas, what it costs, and
how it is shared among clients by weight.

Accuracy run: R gateway replicas share one GCRA quota in a redis-server this
script starts (`[rate_limit] backend = "redis"`, `max_wait_ms = 0`, burst 5,
all with the same AccessKey). Client threads offer 3 x quota calls per second
in total, spread evenly over the replicas and paced open-loop on a fixed
schedule. A fake provider records the arrival time of every request it gets;
its rate in 1-second bins is compared with the quota (PASS when every full
bin is within 5 %).

Cost run: one gateway with `backend = "local"` and one with `backend =
"redis"` (quota far above the load), each driven by one client thread making
sequential calls on one keep-alive connection; client-observed p50/p90/p99
for both and the difference the Redis decision makes. The pair is measured
3 times (alternating order) and the median of each figure is reported.

Topology (--topology, accuracy and cost runs only): `standalone` (default)
is the above, one redis-server. `cluster`: the script starts a Redis
Cluster of 3 masters (no replicas) on free loopback ports in its temp dir
and the gateways use it with `redis_mode = "cluster"` and `redis_urls`;
the cost run compares local with cluster. `both`: the accuracy run on the
standalone Redis and then on the cluster, and the cost run with three
gateways, local, standalone and cluster, measured in the same rounds (the
order turning by one each round). For a cluster the report shows, after
each run, each node's slots and key count, the run's keys with their
CLUSTER KEYSLOT, and the EVALSHA/EVAL calls each node ran (INFO
commandstats), i.e. whether every decision stayed on one node.

Fairness run (docs/quota.md, "Shares"): --fair-replicas (2) gateways on one
Redis, quota --fair-quota (60/s), burst 1, max_wait_ms 1000, three
`[[clients]]` A, B, C with quota_share 3, 1, 1 (bearer tokens from files).
Each client has --fair-callers (6) closed-loop callers per replica, so each
asks far above its share; C starts at half time. Every call carries its
client in the X-Bench-Client header, which the gateway forwards, so the
provider attributes each arrival. Reported per half: each client's granted
rate against its fair share (first half A 3/4, B 1/4; second half, from one
second after C starts, 3/5, 1/5, 1/5), Jain's index over rate / fair, the
utilisation (provider calls / quota x seconds), the busiest 1 s window,
the per-client answers (client side and access logs), Redis EVALSHA calls
per granted call (INFO commandstats before and after) and the gateways' CPU
per call (/proc/PID/stat). Targets (PASS/MISS): every rate within 10 % of
fair; utilisation >= 95 % in the first half (C's share used by A and B) and
overall; busiest 1 s window <= quota + 5 %.

Single-gateway case: one gateway (`backend = "local"`), quota 20/s, burst 1,
max_wait_ms 1500; checkout (share 3) paced open-loop at 10 calls/s (each call
on its own schedule) for 20 s, batch (share 1) with 24 closed-loop callers
for those 20 s and 6 s more alone. Targets: checkout >= 95 % answered 200,
its p95 latency < 400 ms; batch alone (from 1 s after checkout stops) uses
>= 95 % of the quota.

A closed-loop caller refused at once (< 10 ms) pauses 10 ms before it asks
again; one that waited asks again at once.

    python3 bench/quota.py [--scenario all|accuracy|fairness] [--no-build]
        [--quota 100] [--seconds 10] [--replicas 3]          (accuracy, cost)
        [--topology standalone|cluster|both]                 (accuracy, cost)
        [--fair-quota 60] [--fair-seconds 20] [--fair-callers 6] ...
        [--single-quota 20] [--checkout-rate 10] [--batch-callers 24] ...

--scenario accuracy: the accuracy and cost runs (as before); fairness: the
fairness run and the single-gateway case; all (default): both.

Python 3.11 standard library only. Talks only to 127.0.0.1. Installs
redis-server (Debian package) when missing. Prints a Markdown summary on
stdout (progress goes to stderr). Exit status 1 when an accuracy run (any
topology) FAILs or a fairness target is MISSed, 2 when a run is INVALID
(calls without an answer, a gateway died, arrivals the provider cannot
attribute) or the Redis Cluster could not be formed.
"""

import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RELEASE_BINARY as BINARY, Gateway, LoopbackServer, QuietHandler, build_release  # noqa: E402
from benchlib import command_output, ensure_redis, git_version, leave_work, logger, redis_version, resp_command  # noqa: E402
from benchlib import RedisCluster, serve_in_thread, start_redis, stop, stop_server  # noqa: E402

PATH = "/open/product/get?itemId=652874751412"
ACCESS_KEY = "bench-quota-key"
TOLERANCE = 0.05
CALL_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
# Starting the cluster's nodes, `redis-cli --cluster create` and every node
# saying cluster_state:ok, all within this.
CLUSTER_START_TIMEOUT_S = 45.0
# The fairness runs' callers name their client in this header too; the
# gateway forwards it, so the provider attributes each arrival.
TAG_HEADER = "X-Bench-Client"
# A closed-loop caller refused at once pauses this long before it asks
# again, so that refusals do not turn into a busy loop on a 2-core box.
FAST_REFUSAL_S = 0.010

log = logger("quota:")


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    def __init__(self):
        super().__init__(ProviderHandler, seed=0)
        self.arrivals = []  # time.monotonic() of every request
        self.tagged = []  # (time.monotonic(), the caller's TAG_HEADER or None)

    def snapshot(self):
        with self.lock:
            return sorted(self.arrivals)

    def tagged_snapshot(self):
        with self.lock:
            return sorted(self.tagged, key=lambda a: a[0])

    def clear(self):
        with self.lock:
            self.arrivals = []
            self.tagged = []


class ProviderHandler(QuietHandler):
    # Headers and body go out in two writes: without TCP_NODELAY the body
    # waits for the gateway's delayed ACK (~40 ms on Linux) on every call.
    disable_nagle_algorithm = True

    def serve(self):
        now = time.monotonic()
        tag = self.headers.get(TAG_HEADER)
        with self.server.lock:
            self.server.arrivals.append(now)
            self.server.tagged.append((now, tag))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"requestId": uuid.uuid4().hex, "code": 200,
                           "msg": "ok", "data": {}}).encode()
        self.answer_json(200, body)


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------

def redis_time_offset_us(port):
    """Redis TIME minus local wall clock (midpoint of the round trip), in µs."""
    best = None
    for _ in range(5):
        t0 = time.time()
        reply = resp_command(port, "TIME")
        t1 = time.time()
        parts = [p for p in reply.split(b"\r\n") if p and p[:1] not in b"*$"]
        redis_us = int(parts[0]) * 1_000_000 + int(parts[1])
        local_us = (t0 + t1) / 2 * 1e6
        rtt = t1 - t0
        if best is None or rtt < best[0]:
            best = (rtt, redis_us - local_us)
    return best[1], best[0] * 1e6


# --------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------

def quota_gateway(name, work, config_toml, upstream):
    """One replica, started and ready; all have the same AccessKey (one
    shared quota)."""
    return Gateway(name, BINARY, work, config_toml, PANDAGATE_UPSTREAM=upstream,
                   PANDAPON_ACCESS_KEY=ACCESS_KEY, PANDAPON_ACCESS_SECRET="bench-quota-secret")


def fallbacks_in(gateway):
    """Lines of the gateway's diagnostics saying it fell back (Redis away)."""
    return sum(1 for d in gateway.log_events("gateway.err") if "falling back" in str(d.get("message", "")))


class Topology:
    """Where the gateways keep the quota: one redis-server (`standalone`)
    or a Redis Cluster (`cluster`, a benchlib.RedisCluster)."""

    def __init__(self, name, ports, cluster=None):
        self.name = name
        self.ports = ports
        self.cluster = cluster

    @classmethod
    def standalone(cls, port):
        return cls("standalone", [port])

    @classmethod
    def of_cluster(cls, cluster):
        return cls("cluster", list(cluster.ports), cluster)

    def toml_lines(self, prefix):
        """[rate_limit]'s Redis lines; with a cluster, `redis_url` must not be set."""
        if self.cluster is None:
            return [f'redis_url = "redis://127.0.0.1:{self.ports[0]}"',
                    f'redis_key_prefix = "{prefix}"']
        urls = ", ".join(f'"{u}"' for u in self.cluster.urls())
        return ['redis_mode = "cluster"', f"redis_urls = [{urls}]",
                f'redis_key_prefix = "{prefix}"']

    def describe(self):
        if self.cluster is None:
            return f"standalone Redis (127.0.0.1:{self.ports[0]})"
        return (f"Redis Cluster of {len(self.ports)} masters, no replicas (127.0.0.1:"
                + ", ".join(map(str, self.ports)) + ")")

    def script_calls(self):
        """{port: EVALSHA + EVAL calls so far} per node (INFO commandstats)."""
        out = {}
        for port in self.ports:
            stats = redis_commandstats(port)
            out[port] = stats.get("evalsha", 0) + stats.get("eval", 0)
        return out

    def placement(self, prefix, scripts_before):
        """Per cluster node: its slots, its key count, the keys named
        `prefix`:* (with their slots) and the scripts it ran since
        `scripts_before`; None for a standalone Redis."""
        if self.cluster is None:
            return None
        slots = self.cluster.slots()
        scripts = self.script_calls()
        return [{"port": port, "slots": slots.get(port, "?"), "dbsize": self.cluster.dbsize(port),
                 "keys": self.cluster.keys(port, f"{prefix}:*"),
                 "scripts": scripts[port] - scripts_before.get(port, 0)}
                for port in self.ports]


def gateway_toml(rps, burst, backend, redis=None, prefix="pandagate"):
    """`redis`: the Topology of `backend = "redis"`."""
    lines = ["[rate_limit]",
             f"requests_per_second = {rps}",
             f"burst = {burst}",
             "max_wait_ms = 0",
             f'backend = "{backend}"']
    if backend == "redis":
        lines += redis.toml_lines(prefix)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

class Client:
    """One keep-alive connection; reconnects after an error. `headers` go
    with every call (a client's bearer token, its bench tag)."""

    def __init__(self, port, headers=None):
        self.port = port
        self.headers = dict(headers or {})
        self.conn = None

    def call(self):
        """Returns (status or None, latency in seconds, error or None)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                   timeout=CALL_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", PATH, headers=self.headers)
            resp = self.conn.getresponse()
            resp.read()
            status = resp.status
            if resp.will_close:
                self.close()
            return status, time.perf_counter() - t0, None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return None, time.perf_counter() - t0, type(e).__name__

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def paced_sender(port, first, period, end, stop, results, headers=None):
    """Sends at first, first + period, ... until `end` (all time.monotonic()),
    never skipping a slot: when late it sends at once and records the lag."""
    client = Client(port, headers)
    k = 0
    try:
        while not stop.is_set():
            scheduled = first + k * period
            if scheduled >= end:
                break
            delay = scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            status, latency, error = client.call()
            results.append((scheduled, sent, status, latency, error))
            k += 1
    finally:
        client.close()


# --------------------------------------------------------------------------
# Analysis helpers
# --------------------------------------------------------------------------

def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-p * len(sorted_values) // 100)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def bins_from(times, start, n):
    counts = [0] * n
    for t in times:
        i = int((t - start) // 1.0)
        if 0 <= i < n:
            counts[i] += 1
    return counts


def max_window(times, width=1.0):
    """Most arrivals in any window [t, t + width) starting at an arrival."""
    best, best_at, j = 0, None, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        if i - j + 1 > best:
            best, best_at = i - j + 1, times[j]
    return best, best_at


def fmt_pct(x):
    return f"{x:+.1f} %"


# --------------------------------------------------------------------------
# Accuracy run
# --------------------------------------------------------------------------

def accuracy_run(args, work, provider, topo):
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    toml = gateway_toml(args.quota, args.burst, "redis", topo, prefix="accuracy")
    # Redis TIME is asked of the first node (one host: one clock).
    time_port = topo.ports[0]
    gateways = []
    try:
        for i in range(args.replicas):
            name = f"replica{i}" if topo.cluster is None else f"{topo.name}-replica{i}"
            gateways.append(quota_gateway(name, work, toml, upstream))
        log(f"{len(gateways)} replicas ready on ports", [g.port for g in gateways])

        offered = 3 * args.quota
        n_threads = args.replicas * args.threads_per_replica
        period = n_threads / offered  # per thread

        # Warm-up: one call per connection-to-be, so that the gateways' Redis
        # connections, the Lua script and the upstream pools exist; then a
        # quiet second so the bucket is full (burst) again when the run starts.
        for g in gateways:
            c = Client(g.port)
            for _ in range(2):
                c.call()
            c.close()
        time.sleep(1.0)
        provider.clear()
        warmup_lines = [len(g.access_log()) for g in gateways]
        offset_before = redis_time_offset_us(time_port)
        scripts_before = topo.script_calls() if topo.cluster is not None else {}

        stop = threading.Event()
        results = [[] for _ in range(n_threads)]
        threads = []
        start = time.monotonic() + 0.2
        end = start + args.seconds
        for t in range(n_threads):
            g = gateways[t % args.replicas]
            first = start + t / offered  # threads interleave: one even stream
            th = threading.Thread(target=paced_sender, daemon=True,
                                  args=(g.port, first, period, end, stop, results[t]))
            threads.append(th)
            th.start()
        log(f"offering {offered}/s for {args.seconds} s over {n_threads} threads")
        for th in threads:
            th.join(timeout=max(0.0, end + CALL_TIMEOUT_S + 5 - time.monotonic()))
        stop.set()
        for th in threads:
            th.join(timeout=CALL_TIMEOUT_S + 1)
        hung = sum(th.is_alive() for th in threads)
        time.sleep(0.3)  # let the last forwarded calls land
        offset_after = redis_time_offset_us(time_port)
        arrivals = provider.snapshot()
        died = [g.name for g in gateways if not g.alive()]
    finally:
        for g in gateways:
            g.stop(STOP_TIMEOUT_S)
    placement = topo.placement("accuracy", scripts_before)

    # Client side
    calls = [r for rs in results for r in rs]
    statuses = Counter(r[2] if r[2] is not None else f"error:{r[4]}" for r in calls)
    lags = sorted(r[1] - r[0] for r in calls)
    sends = sorted(r[1] for r in calls)
    achieved = (len(calls) / (sends[-1] - sends[0])) if len(sends) > 1 else 0.0
    late_10ms = sum(1 for x in lags if x > 0.010)
    per_replica = []
    for i in range(args.replicas):
        rs = [r for t, r_list in enumerate(results) if t % args.replicas == i
              for r in r_list]
        c = Counter(r[2] for r in rs)
        per_replica.append((len(rs), c.get(200, 0), c.get(429, 0)))
    ok_sends = sorted(r[1] for r in calls if r[2] == 200)

    # Gateway side (access logs)
    gw_status = Counter()
    gw_errors = Counter()
    fallbacks = 0
    for g, skip in zip(gateways, warmup_lines):
        for e in g.access_log()[skip:]:
            gw_status[e.get("status")] += 1
            if e.get("error"):
                gw_errors[e["error"]] += 1
        fallbacks += fallbacks_in(g)

    # Provider side: bins aligned on the start of the offered load (every
    # bin is full: the load covers [start, end) exactly).
    bins = bins_from(arrivals, start, args.seconds)
    ok_bins = bins_from(ok_sends, start, args.seconds)
    before = sum(1 for t in arrivals if t < start)
    after = sum(1 for t in arrivals if t >= end)
    # Alternative binning, on whole seconds of the monotonic clock; the
    # partial first and last bins are dropped.
    in_run = [t for t in arrivals if start <= t < end]
    clock_bins = []
    if in_run:
        first_full = int(start) + 1
        last_full = int(end) - 1  # bins [s, s + 1) with s + 1 <= end
        clock_bins = bins_from(in_run, first_full, max(0, last_full - first_full + 1))
    win, win_at = max_window(in_run)
    # Stalls: the longest silence at the provider, and the latest send.
    gaps = [(b - a, a) for a, b in zip(in_run, in_run[1:])]
    gap, gap_at = max(gaps) if gaps else (0.0, start)
    worst_lag = max(calls, key=lambda r: r[1] - r[0]) if calls else None
    # The same, over windows that start one second in (the burst spent).
    steady_win, _ = max_window([t for t in in_run if t >= start + 1.0])

    def deviation(counts):
        if not counts:
            return float("nan"), False
        dev = max(abs(c - args.quota) for c in counts) / args.quota
        return dev, all(abs(c - args.quota) <= TOLERANCE * args.quota for c in counts)

    dev, ok = deviation(bins)
    steady_dev, steady_ok = deviation(bins[1:])
    clock_dev, clock_ok = deviation(clock_bins)
    return {
        "offered": offered, "n_threads": n_threads, "calls": len(calls), "died": died,
        "errors": sum(1 for r in calls if r[2] is None),
        "achieved": achieved, "lag_p50_ms": percentile(lags, 50) * 1e3,
        "lag_p99_ms": percentile(lags, 99) * 1e3, "lag_max_ms": (lags[-1] if lags else 0) * 1e3,
        "late_10ms": late_10ms, "hung": hung,
        "statuses": statuses, "per_replica": per_replica,
        "gw_status": gw_status, "gw_errors": gw_errors, "fallbacks": fallbacks,
        "bins": bins, "ok_bins": ok_bins, "before": before, "after": after,
        "total_arrivals": len(in_run),
        "mean": statistics.fmean(bins) if bins else float("nan"),
        "min": min(bins) if bins else 0, "max": max(bins) if bins else 0,
        "dev": dev, "pass": ok, "steady_dev": steady_dev, "steady_ok": steady_ok,
        "clock_bins": clock_bins, "clock_dev": clock_dev, "clock_ok": clock_ok,
        "window_max": win, "steady_window_max": steady_win,
        "gap_ms": gap * 1e3, "gap_at": gap_at - start,
        "worst_lag_at": (worst_lag[0] - start) if worst_lag else 0.0, "window_at": (win_at - start) if win_at is not None else None,
        "offset_before": offset_before, "offset_after": offset_after,
        "topology": topo, "time_port": time_port, "placement": placement,
    }


# --------------------------------------------------------------------------
# Cost run
# --------------------------------------------------------------------------

def sequential(port, warmup_s, seconds):
    client = Client(port)
    lat = []
    errors = Counter()
    try:
        t_end = time.monotonic() + warmup_s
        while time.monotonic() < t_end:
            client.call()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            status, latency, error = client.call()
            if status == 200:
                lat.append(latency)
            else:
                errors[status if status is not None else error] += 1
    finally:
        client.close()
    lat.sort()
    return {"n": len(lat), "errors": errors,
            "p50": percentile(lat, 50) * 1e6, "p90": percentile(lat, 90) * 1e6,
            "p99": percentile(lat, 99) * 1e6}


def cost_labels(topologies):
    """The cost run's gateways: `local`, then one per topology (`redis` when
    the only one is standalone, as the report has always called it)."""
    if [t.name for t in topologies] == ["standalone"]:
        return ["local", "redis"]
    return ["local"] + [t.name for t in topologies]


def cost_run(args, work, provider, topologies):
    """One gateway with the local backend and one per topology, measured in
    the same rounds; the order turns by one gateway each round (with two:
    alternates), so none is always first. Returns the rounds ({label:
    figures}), the fallback switches each Redis gateway logged, and each
    cluster's key placement afterwards ({label: placement})."""
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    rps = 100000
    rounds = []
    started = []
    labels = cost_labels(topologies)
    scripts_before = {t.name: t.script_calls() for t in topologies if t.cluster is not None}
    try:
        started.append(quota_gateway("cost-local", work, gateway_toml(rps, 1000, "local"), upstream))
        for label, topo in zip(labels[1:], topologies):
            started.append(quota_gateway(f"cost-{label}", work,
                                         gateway_toml(rps, 1000, "redis", topo, prefix="cost"), upstream))
        named = list(zip(labels, started))
        for i in range(args.cost_repeats):
            turn = i % len(named)
            order = named[turn:] + named[:turn]
            r = {}
            for name, g in order:
                log(f"cost round {i + 1}/{args.cost_repeats}: {name}")
                r[name] = sequential(g.port, 1.0, args.cost_seconds)
            rounds.append(r)
    finally:
        for g in started:
            g.stop(STOP_TIMEOUT_S)
    fallbacks = {label: fallbacks_in(g) for label, g in zip(labels[1:], started[1:])}
    placements = {t.name: t.placement("cost", scripts_before[t.name])
                  for t in topologies if t.cluster is not None}
    return rounds, fallbacks, placements


# --------------------------------------------------------------------------
# Fairness: one quota shared by weight among clients
# --------------------------------------------------------------------------

FAIR_TOLERANCE = 0.10  # each client's rate within 10 % of its fair share
UTILISATION_MIN = 0.95  # of quota x seconds
WINDOW_MAX = 1.05  # busiest 1 s window at most quota x this


def write_tokens(work, names):
    """One token file per client (random hex); returns {name: (path, token)}."""
    d = work / "tokens"
    d.mkdir(exist_ok=True)
    out = {}
    for name in names:
        token = uuid.uuid4().hex + uuid.uuid4().hex
        path = d / name
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
        out[name] = (path, token)
    return out


def shared_toml(rps, burst, max_wait_ms, backend, clients, tokens, redis_port=None, prefix="pandagate"):
    """[rate_limit] with waiting, and one [[clients]] entry per (name, share)."""
    lines = ["[rate_limit]",
             f"requests_per_second = {rps}",
             f"burst = {burst}",
             f"max_wait_ms = {max_wait_ms}",
             f'backend = "{backend}"']
    if backend == "redis":
        lines += [f'redis_url = "redis://127.0.0.1:{redis_port}"',
                  f'redis_key_prefix = "{prefix}"']
    for name, share in clients:
        lines += ["", "[[clients]]",
                  f'name = "{name}"',
                  f'token_file = "{tokens[name][0]}"',
                  'profiles = ["default"]',
                  f"quota_share = {share}"]
    return "\n".join(lines) + "\n"


def client_headers(tokens, name):
    return {"Authorization": f"Bearer {tokens[name][1]}", TAG_HEADER: name}


def closed_loop(port, headers, start, end, stop, results):
    """From `start` to `end` (time.monotonic()): one call after the other on
    one keep-alive connection. A refusal that came at once (< FAST_REFUSAL_S)
    or a failed call is followed by a short pause; a call that waited is not.
    Records (sent, status, latency, error)."""
    client = Client(port, headers)
    try:
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        while not stop.is_set():
            sent = time.monotonic()
            if sent >= end:
                break
            status, latency, error = client.call()
            results.append((sent, status, latency, error))
            if status is None:
                time.sleep(0.1)
            elif status != 200 and latency < FAST_REFUSAL_S:
                time.sleep(FAST_REFUSAL_S)
    finally:
        client.close()


def join_all(threads, until):
    """Joins the threads by `until` (time.monotonic()); returns how many hung."""
    for th in threads:
        th.join(timeout=max(0.0, until - time.monotonic()))
    return sum(th.is_alive() for th in threads)


def cpu_seconds(pid):
    """utime + stime of a process, in seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_commandstats(port, timeout=2.0):
    """{command: calls} from INFO commandstats (reads the whole bulk reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        deadline = time.monotonic() + timeout
        need = None
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if need is None and b"\r\n" in data:
                head, _, _ = data.partition(b"\r\n")
                if not head.startswith(b"$"):
                    raise RuntimeError(f"INFO commandstats: {data[:200]!r}")
                need = len(head) + 2 + int(head[1:]) + 2
            if need is not None and len(data) >= need:
                break
    out = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
            out[name] = int(fields.get("calls", 0))
    return out


def count_between(times, a, b):
    return sum(1 for t in times if a <= t < b)


def jain(xs):
    xs = [x for x in xs if x == x]
    if not xs or not any(xs):
        return float("nan")
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def window_shares(quota, windows_clients, shares):
    """{name: fair rate} for the clients asking in a window."""
    total = sum(shares[n] for n in windows_clients)
    return {n: quota * shares[n] / total for n in windows_clients}


def calls_summary(rows):
    """rows of (sent, status, latency, error): counts and latency figures."""
    statuses = Counter(r[1] if r[1] is not None else f"error:{r[3]}" for r in rows)
    lat_all = sorted(r[2] for r in rows)
    lat_ok = sorted(r[2] for r in rows if r[1] == 200)
    lat_refused = sorted(r[2] for r in rows if r[1] == 429)
    return {
        "calls": len(rows), "ok": statuses.get(200, 0), "refused": statuses.get(429, 0),
        "errors": sum(1 for r in rows if r[1] is None), "statuses": statuses,
        "p50_ms": percentile(lat_all, 50) * 1e3, "p95_ms": percentile(lat_all, 95) * 1e3,
        "ok_p50_ms": percentile(lat_ok, 50) * 1e3, "ok_p95_ms": percentile(lat_ok, 95) * 1e3,
        "refused_p50_ms": percentile(lat_refused, 50) * 1e3,
        "refused_max_ms": (lat_refused[-1] * 1e3) if lat_refused else float("nan"),
        "refused_min_ms": (lat_refused[0] * 1e3) if lat_refused else float("nan"),
        "refused_fast": sum(1 for x in lat_refused if x < FAST_REFUSAL_S),
    }


def access_by_client(gateways, skips):
    """{(client, status): count} over the gateways' access logs, past `skips` lines."""
    out = Counter()
    for g, skip in zip(gateways, skips):
        for e in g.access_log()[skip:]:
            out[(e.get("client"), e.get("status"))] += 1
    return out


def fairness_run(args, work, provider, redis_port):
    """Two replicas on one Redis; clients A, B, C (shares 3 : 1 : 1), C idle
    for the first half; closed-loop callers, each client's split over both
    replicas."""
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    q, T = args.fair_quota, args.fair_seconds
    spec = [("A", 3, 0.0), ("B", 1, 0.0), ("C", 1, T / 2)]
    shares = {n: s for n, s, _ in spec}
    tokens = write_tokens(work, shares)
    toml = shared_toml(q, args.fair_burst, args.fair_max_wait_ms, "redis",
                       [(n, s) for n, s, _ in spec], tokens, redis_port, prefix="fairness")
    gateways = []
    try:
        for i in range(args.fair_replicas):
            gateways.append(quota_gateway(f"fair{i}", work, toml, upstream))
        log(f"fairness: {len(gateways)} replicas ready on ports", [g.port for g in gateways])
        # Warm-up (Redis connection, Lua script, upstream pool) by A and B,
        # then a quiet spell past the asking window so nobody is asking.
        for g in gateways:
            for name in ("A", "B"):
                c = Client(g.port, client_headers(tokens, name))
                for _ in range(2):
                    status, _, error = c.call()
                    if status != 200:
                        raise RuntimeError(f"fairness warm-up on {g.name} as {name}: {status} {error}")
                c.close()
        time.sleep(1.5)
        provider.clear()
        skips = [len(g.access_log()) for g in gateways]
        cpu_before = [cpu_seconds(g.pid) for g in gateways]
        redis_before = redis_commandstats(redis_port)

        stop = threading.Event()
        start = time.monotonic() + 0.3
        half, end = start + T / 2, start + T
        results = {n: [] for n in shares}
        threads = []
        for name, _, offset in spec:
            for g in gateways:
                for _ in range(args.fair_callers):
                    rows = []
                    results[name].append(rows)
                    th = threading.Thread(target=closed_loop, daemon=True,
                                          args=(g.port, client_headers(tokens, name),
                                                start + offset, end, stop, rows))
                    threads.append(th)
                    th.start()
        log(f"fairness: {len(threads)} closed-loop callers for {T} s (C from {T / 2:g} s)")
        time.sleep(max(0.0, half - time.monotonic()))
        redis_half = redis_commandstats(redis_port)
        half_taken = time.monotonic()
        hung = join_all(threads, end + args.fair_max_wait_ms / 1000 + CALL_TIMEOUT_S + 5)
        stop.set()
        hung = join_all(threads, time.monotonic() + CALL_TIMEOUT_S + 1)
        time.sleep(0.3)
        redis_after = redis_commandstats(redis_port)
        cpu_after = [cpu_seconds(g.pid) for g in gateways]
        tagged = provider.tagged_snapshot()
        died = [g.name for g in gateways if not g.alive()]
    finally:
        for g in gateways:
            g.stop(STOP_TIMEOUT_S)

    times = [t for t, _ in tagged]
    by_tag = {n: [t for t, tag in tagged if tag == n] for n in shares}
    untagged = sum(1 for _, tag in tagged if tag not in shares)
    settle = 1.0
    phases = [
        ("first half (A, B)", start, half, ["A", "B"]),
        (f"second half from {settle:g} s after C starts (A, B, C)", half + settle, end, ["A", "B", "C"]),
    ]
    phase_rows = []
    for label, a, b, asking in phases:
        fair = window_shares(q, asking, shares)
        rows = []
        for n in asking:
            rate = count_between(by_tag[n], a, b) / (b - a)
            rows.append((n, rate, fair[n], rate / fair[n] - 1,
                         abs(rate - fair[n]) <= FAIR_TOLERANCE * fair[n]))
        idle = {n: count_between(by_tag[n], a, b) for n in shares if n not in asking}
        util = count_between(times, a, b) / (q * (b - a))
        phase_rows.append({"label": label, "from": a - start, "to": b - start, "rows": rows,
                           "jain": jain([r[1] / r[2] for r in rows]), "util": util, "idle": idle})
    # C's first second, for the record.
    c_first = {n: count_between(by_tag[n], half, half + settle) for n in shares}
    util_first = count_between(times, start, half) / (q * (half - start))
    util_all = count_between(times, start, end) / (q * T)
    win, win_at = max_window(times)
    bins = {n: bins_from(by_tag[n], start, int(T)) for n in shares}
    after = count_between(times, end, float("inf"))
    granted = len(times)
    evalsha = redis_after.get("evalsha", 0) - redis_before.get("evalsha", 0)
    # Per half: EVALSHA between the snapshots, over the calls granted meanwhile.
    evalsha_halves = []
    for (a, b), (x, y) in (((float("-inf"), half_taken), (redis_before, redis_half)),
                           ((half_taken, float("inf")), (redis_half, redis_after))):
        n = count_between(times, a, b)
        evalsha_halves.append((y.get("evalsha", 0) - x.get("evalsha", 0), n))
    # The spacing of grants: with burst 1 every grant later than its slot
    # pushes the schedule back by that much.
    steady = [t for t in times if start + 1 <= t < end]
    gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
    redis_deltas = {k: redis_after.get(k, 0) - redis_before.get(k, 0)
                    for k in set(redis_after) | set(redis_before)}
    redis_deltas = {k: v for k, v in redis_deltas.items() if v and k not in ("info",)}
    cpu = None
    if all(x is not None for x in cpu_before + cpu_after):
        cpu = sum(b - a for a, b in zip(cpu_before, cpu_after))
    clients = {n: calls_summary([r for rows in results[n] for r in rows]) for n in shares}
    logs = access_by_client(gateways, skips)
    handled = sum(logs.values())
    targets = []
    for ph in phase_rows:
        for n, rate, fair, dev, ok in ph["rows"]:
            targets.append((f"{ph['label']}: {n} {rate:.1f}/s vs fair {fair:.1f}/s "
                            f"({dev * 100:+.1f} %, within ±{FAIR_TOLERANCE * 100:.0f} %)", ok))
    targets.append((f"first half utilisation {util_first * 100:.1f} % ≥ {UTILISATION_MIN * 100:.0f} % "
                    "(C's share used by A and B while C is idle)", util_first >= UTILISATION_MIN))
    targets.append((f"overall utilisation {util_all * 100:.1f} % ≥ {UTILISATION_MIN * 100:.0f} %",
                    util_all >= UTILISATION_MIN))
    targets.append((f"busiest 1 s window {win} ≤ {q * WINDOW_MAX:.0f} (quota + 5 %)",
                    win <= q * WINDOW_MAX))
    errors = sum(c["errors"] for c in clients.values())
    return {
        "spec": spec, "phases": phase_rows, "c_first": c_first, "util_first": util_first,
        "util_all": util_all, "window_max": win,
        "window_at": (win_at - start) if win_at is not None else None,
        "bins": bins, "after": after, "granted": granted, "untagged": untagged,
        "evalsha": evalsha, "evalsha_halves": evalsha_halves, "redis_deltas": redis_deltas,
        "gap_p50_ms": percentile(gaps, 50) * 1e3, "gap_mean_ms": (statistics.fmean(gaps) * 1e3) if gaps else float("nan"), "cpu": cpu, "handled": handled,
        "clients": clients, "logs": logs, "targets": targets, "errors": errors,
        "died": died, "hung": hung, "fallbacks": sum(fallbacks_in(g) for g in gateways),
        "n_threads": len(threads),
    }


def single_run(args, work, provider):
    """One gateway (local backend): checkout (share 3) paced open-loop,
    batch (share 1) flooding closed-loop; then batch alone."""
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    q, S, alone = args.single_quota, args.single_seconds, args.single_alone_seconds
    rate = args.checkout_rate
    shares = {"checkout": 3, "batch": 1}
    tokens = write_tokens(work, shares)
    toml = shared_toml(q, args.single_burst, args.single_max_wait_ms, "local",
                       list(shares.items()), tokens)
    g = None
    try:
        g = quota_gateway("single", work, toml, upstream)
        log(f"single gateway ready on port {g.port}")
        for name in shares:
            c = Client(g.port, client_headers(tokens, name))
            for _ in range(2):
                status, _, error = c.call()
                if status != 200:
                    raise RuntimeError(f"single warm-up as {name}: {status} {error}")
            c.close()
        time.sleep(1.5)
        provider.clear()
        skip = len(g.access_log())
        cpu_before = cpu_seconds(g.pid)

        stop = threading.Event()
        start = time.monotonic() + 0.3
        end1, end2 = start + S, start + S + alone
        # Open loop: enough threads that each call goes on its own schedule
        # even when the one before it on the thread waited max_wait_ms.
        n_paced = max(1, int(-(-rate * (args.single_max_wait_ms / 1000 + 1.5) // 1)))
        period = n_paced / rate
        paced = [[] for _ in range(n_paced)]
        threads = []
        for k in range(n_paced):
            th = threading.Thread(target=paced_sender, daemon=True,
                                  args=(g.port, start + k / rate, period, end1, stop, paced[k],
                                        client_headers(tokens, "checkout")))
            threads.append(th)
        flood = [[] for _ in range(args.batch_callers)]
        for k in range(args.batch_callers):
            th = threading.Thread(target=closed_loop, daemon=True,
                                  args=(g.port, client_headers(tokens, "batch"), start, end2,
                                        stop, flood[k]))
            threads.append(th)
        for th in threads:
            th.start()
        log(f"single: checkout {rate}/s over {n_paced} paced threads for {S} s, batch "
            f"{args.batch_callers} callers for {S + alone} s")
        hung = join_all(threads, end2 + args.single_max_wait_ms / 1000 + CALL_TIMEOUT_S + 5)
        stop.set()
        hung = join_all(threads, time.monotonic() + CALL_TIMEOUT_S + 1)
        time.sleep(0.3)
        cpu_after = cpu_seconds(g.pid)
        tagged = provider.tagged_snapshot()
        died = [] if g.alive() else [g.name]
    finally:
        if g is not None:
            g.stop(STOP_TIMEOUT_S)

    times = [t for t, _ in tagged]
    by_tag = {n: [t for t, tag in tagged if tag == n] for n in shares}
    co_rows = [(r[1], r[2], r[3], r[4]) for rs in paced for r in rs]  # (sent, status, latency, error)
    lags = sorted(r[1] - r[0] for rs in paced for r in rs)
    checkout = calls_summary(co_rows)
    batch = calls_summary([r for rs in flood for r in rs])
    settle = 1.0
    batch_rate = count_between(by_tag["batch"], start, end1) / S
    checkout_rate = count_between(by_tag["checkout"], start, end1) / S
    util1 = count_between(times, start, end1) / (q * S)
    a2 = end1 + settle
    alone_rate = count_between(by_tag["batch"], a2, end2) / (end2 - a2)
    util2 = count_between(times, a2, end2) / (q * (end2 - a2))
    win, _ = max_window(times)
    steady = [t for t in times if start + 1 <= t < end1]
    gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
    answered = checkout["ok"] / checkout["calls"] if checkout["calls"] else 0.0
    logs = access_by_client([g], [skip])
    cpu = (cpu_after - cpu_before) if None not in (cpu_before, cpu_after) else None
    targets = [
        (f"checkout answered 200: {answered * 100:.1f} % of {checkout['calls']} ≥ 95 %", answered >= 0.95),
        (f"checkout p95 latency {checkout['p95_ms']:.0f} ms < 400 ms", checkout["p95_ms"] < 400),
        (f"batch alone (from {settle:g} s after checkout stops): utilisation {util2 * 100:.1f} % "
         f"≥ {UTILISATION_MIN * 100:.0f} %", util2 >= UTILISATION_MIN),
    ]
    return {
        "n_paced": n_paced, "checkout": checkout, "batch": batch, "lag_p99_ms": percentile(lags, 99) * 1e3,
        "lag_max_ms": (lags[-1] * 1e3) if lags else 0.0, "batch_rate": batch_rate,
        "checkout_rate": checkout_rate, "util1": util1, "alone_rate": alone_rate, "util2": util2,
        "alone_window": end2 - a2, "window_max": win, "gap_p50_ms": percentile(gaps, 50) * 1e3,
        "gap_mean_ms": (statistics.fmean(gaps) * 1e3) if gaps else float("nan"), "granted": len(times),
        "untagged": sum(1 for _, tag in tagged if tag not in shares),
        "bins": {n: bins_from(by_tag[n], start, int(S + alone)) for n in shares},
        "logs": logs, "cpu": cpu, "handled": sum(logs.values()), "targets": targets,
        "errors": checkout["errors"] + batch["errors"], "died": died, "hung": hung,
    }


def fairness_verdict(fair, single):
    runs = [r for r in (fair, single) if r is not None]
    if any(r["errors"] or r["died"] or r["hung"] or r["untagged"] for r in runs):
        return "INVALID"
    return "PASS" if all(ok for r in runs for _, ok in r["targets"]) else "MISS"


def mark(ok):
    return "PASS" if ok else "MISS"


def fairness_report(args, fair, single):
    out = []
    w = out.append
    if fair is not None:
        q = args.fair_quota
        w(f"## Fairness: {args.fair_replicas} replicas on one Redis, quota {q}/s, burst {args.fair_burst}, "
          f"max_wait_ms {args.fair_max_wait_ms}, clients A : B : C = 3 : 1 : 1")
        w("")
        w(f"- {args.fair_callers} closed-loop callers per client per replica ({fair['n_threads']} in all), "
          f"each client's calls split evenly over the replicas; A and B for {args.fair_seconds} s, "
          f"C only in the second half; every call carries its client's bearer token")
        w("- rates counted at the provider (each arrival carries its client in "
          f"`{TAG_HEADER}`, forwarded by the gateway)"
          + (f"; {fair['untagged']} arrivals without it" if fair["untagged"] else ""))
        for ph in fair["phases"]:
            w("")
            w(f"**{ph['label']}** ({ph['from']:.0f}–{ph['to']:.0f} s):")
            w("")
            w("| client | share | granted/s | fair/s | deviation | rate / fair |")
            w("|---|---:|---:|---:|---:|---:|")
            shares = {n: s for n, s, _ in fair["spec"]}
            for n, rate, fr, dev, _ in ph["rows"]:
                w(f"| {n} | {shares[n]} | {rate:.2f} | {fr:.2f} | {fmt_pct(dev * 100)} | {rate / fr:.3f} |")
            w("")
            w(f"- Jain's index over rate/fair: {ph['jain']:.4f}; utilisation {ph['util'] * 100:.1f} %"
              + "".join(f"; {n} (idle) granted {c}" for n, c in ph["idle"].items()))
        w("")
        w("- granted in C's first second: "
          + ", ".join(f"{n} {c}" for n, c in fair["c_first"].items()))
        w(f"- utilisation: first half {fair['util_first'] * 100:.1f} %, whole run {fair['util_all'] * 100:.1f} % "
          f"({fair['granted']} provider calls, {fair['after']} of them after the last send, "
          f"while the last waiting calls were served)")
        at = f" (from {fair['window_at']:.3f} s)" if fair["window_at"] is not None else ""
        w(f"- busiest 1 s window at the provider: {fair['window_max']}{at}; "
          f"quota + 5 % = {q * WINDOW_MAX:.0f}")
        w("")
        w("Provider arrivals per client per 1-second bin:")
        w("")
        names = list(fair["bins"])
        w("| second | " + " | ".join(names) + " | all |")
        w("|---:|" + "---:|" * (len(names) + 1))
        for i in range(len(fair["bins"][names[0]])):
            row = [fair["bins"][n][i] for n in names]
            w(f"| {i + 1} | " + " | ".join(str(x) for x in row) + f" | {sum(row)} |")
        w("")
        w("| client | calls | 200 | 429 | 429 at once | p50 all (ms) | p50 200 (ms) | 429 min / p50 / max (ms) | access log 200 / 429 |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, c in fair["clients"].items():
            w(f"| {n} | {c['calls']} | {c['ok']} | {c['refused']} | {c['refused_fast']} | {c['p50_ms']:.0f} | "
              f"{c['ok_p50_ms']:.0f} | {c['refused_min_ms']:.0f} / {c['refused_p50_ms']:.0f} / {c['refused_max_ms']:.0f} | "
              f"{fair['logs'].get((n, 200), 0)} / {fair['logs'].get((n, 429), 0)} |")
        other = {k: v for k, v in fair["logs"].items() if k[1] not in (200, 429) or k[0] not in fair["clients"]}
        if other:
            w(f"- other access-log lines: {dict(other)}")
        w("")
        per = fair["evalsha"] / fair["granted"] if fair["granted"] else float("nan")
        w(f"- Redis: {fair['evalsha']} EVALSHA for {fair['granted']} granted calls = "
          f"**{per:.2f} per granted call** (all commands in the run: "
          + ", ".join(f"{k} {v}" for k, v in sorted(fair["redis_deltas"].items())) + ")")
        (e1, n1), (e2, n2) = fair["evalsha_halves"]
        w(f"- EVALSHA per granted call by half: first {e1}/{n1} = {e1 / n1 if n1 else float('nan'):.2f}, "
          f"second {e2}/{n2} = {e2 / n2 if n2 else float('nan'):.2f}")
        w(f"- spacing of consecutive provider arrivals (from 1 s in): median {fair['gap_p50_ms']:.2f} ms, "
          f"mean {fair['gap_mean_ms']:.2f} ms; the quota's interval is {1000 / q:.2f} ms")
        if fair["cpu"] is not None and fair["handled"]:
            w(f"- gateway CPU (both replicas, utime + stime): {fair['cpu']:.2f} s = "
              f"{fair['cpu'] / fair['granted'] * 1e3:.2f} ms per granted call, "
              f"{fair['cpu'] / fair['handled'] * 1e3:.2f} ms per call answered ({fair['handled']})")
        w(f"- Redis fallback switches logged: {fair['fallbacks']}"
          + (f"; client errors (no answer): {fair['errors']}" if fair["errors"] else "")
          + (f"; gateways that died: {fair['died']}" if fair["died"] else "")
          + (f"; callers that did not finish: {fair['hung']}" if fair["hung"] else ""))
        w("")
        w("Targets:")
        w("")
        for text, ok in fair["targets"]:
            w(f"- {mark(ok)}: {text}")
        w("")
    if single is not None:
        s = single
        q = args.single_quota
        w(f"## One gateway (local), quota {q}/s, burst {args.single_burst}, max_wait_ms "
          f"{args.single_max_wait_ms}: checkout (share 3) and batch (share 1)")
        w("")
        w(f"- checkout: {args.checkout_rate}/s paced open-loop for {args.single_seconds} s over "
          f"{s['n_paced']} threads (each call on its own schedule; send lag p99 "
          f"{s['lag_p99_ms']:.1f} ms, max {s['lag_max_ms']:.1f} ms); batch: {args.batch_callers} "
          f"closed-loop callers for {args.single_seconds} s, then {args.single_alone_seconds} s alone")
        co, b = s["checkout"], s["batch"]
        w(f"- checkout: {co['calls']} calls, {co['ok']} answered 200 "
          f"({co['ok'] / co['calls'] * 100 if co['calls'] else 0:.1f} %), 429: {co['refused']}; latency "
          f"p50 {co['p50_ms']:.0f} ms, p95 {co['p95_ms']:.0f} ms (200s only: p50 {co['ok_p50_ms']:.0f}, "
          f"p95 {co['ok_p95_ms']:.0f}); at the provider {s['checkout_rate']:.2f}/s")
        w(f"- batch while checkout asks: {s['batch_rate']:.2f}/s at the provider (fair 5/s, plus what "
          f"checkout leaves); batch calls {b['calls']}, 200: {b['ok']}, 429: {b['refused']} "
          f"({b['refused_fast']} at once), its 429s after min {b['refused_min_ms']:.0f} / p50 "
          f"{b['refused_p50_ms']:.0f} / max {b['refused_max_ms']:.0f} ms")
        w(f"- utilisation while both ask: {s['util1'] * 100:.1f} %; batch alone: {s['alone_rate']:.2f}/s "
          f"over {s['alone_window']:.1f} s = {s['util2'] * 100:.1f} %")
        w(f"- busiest 1 s window at the provider: {s['window_max']} (quota {q}); spacing of consecutive "
          f"arrivals while both ask: median {s['gap_p50_ms']:.2f} ms, mean {s['gap_mean_ms']:.2f} ms "
          f"(interval {1000 / q:.2f} ms)")
        w("- access log (client, status): "
          + ", ".join(f"{c} {st}: {v}" for (c, st), v in sorted(s["logs"].items(), key=str)))
        if s["cpu"] is not None and s["granted"]:
            w(f"- gateway CPU: {s['cpu']:.2f} s = {s['cpu'] / s['granted'] * 1e3:.2f} ms per granted call")
        if s["errors"] or s["died"] or s["hung"] or s["untagged"]:
            w(f"- INVALID: errors {s['errors']}, died {s['died']}, hung {s['hung']}, untagged {s['untagged']}")
        w("")
        w("Provider arrivals per client per 1-second bin (checkout stops after "
          f"{args.single_seconds} s): checkout {s['bins']['checkout']}; batch {s['bins']['batch']}")
        w("")
        w("Targets:")
        w("")
        for text, ok in s["targets"]:
            w(f"- {mark(ok)}: {text}")
        w("")
    w(f"**Fairness: {fairness_verdict(fair, single)}**")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def header(argv, started, topologies=()):
    """`topologies`: the Redis of the accuracy and cost runs, named in the
    header unless it is the default (one standalone Redis)."""
    out = []
    w = out.append
    w("# pandagate shared quota (Redis) benchmark")
    w("")
    w(f"- command: `{' '.join(shlex.quote(a) for a in ['python3', 'bench/quota.py'] + argv)}`")
    w(f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}")
    w(f"- nproc: {os.cpu_count()} (`nproc` = {nproc()}); load average at end: "
      + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    w(f"- redis-server: {redis_version()}")
    if [t.name for t in topologies] not in ([], ["standalone"]):
        for t in topologies:
            w(f"- {t.name}: {t.describe()}"
              + ("; `--cluster-node-timeout 2000`, made one cluster by `redis-cli --cluster create`"
                 if t.cluster is not None else ""))
    w(f"- binary: {BINARY} ({git_version()})")
    w("")
    return "\n".join(out)


def report(args, accs, cost, default_topology):
    """`accs`: one accuracy result per topology; `cost`: (rounds, fallbacks,
    placements) of cost_run. `default_topology`: one standalone Redis, the
    report worded as it always was."""
    rounds, fallbacks, placements = cost
    parts = [accuracy_section(args, acc, default_topology) for acc in accs]
    parts.append(cost_section(args, rounds, fallbacks, placements))
    return "\n\n".join(parts)


def accuracy_section(args, acc, default_topology):
    out = []
    w = out.append
    q = args.quota
    topo = acc["topology"]
    on = "" if default_topology else f" on {topo.describe()}"
    w(f"## Accuracy{on}: {args.replicas} replicas, quota {q}/s, burst {args.burst}, max_wait_ms 0")
    w("")
    w(f"- offered: {acc['offered']}/s target over {acc['n_threads']} paced threads "
      f"({args.threads_per_replica} per replica, one keep-alive connection each) for "
      f"{args.seconds} s; achieved {acc['achieved']:.1f}/s ({acc['calls']} calls)")
    w(f"- send lag behind schedule: p50 {acc['lag_p50_ms']:.2f} ms, p99 {acc['lag_p99_ms']:.2f} ms, "
      f"max {acc['lag_max_ms']:.1f} ms (slot {acc['worst_lag_at']:.3f} s into the run); "
      f"{acc['late_10ms']} sends more than 10 ms late"
      + (f"; {acc['hung']} sender threads did not finish" if acc["hung"] else ""))
    st = acc["statuses"]
    others = {k: v for k, v in st.items() if k not in (200, 429)}
    w(f"- answers seen by the clients: 200: {st.get(200, 0)}, 429: {st.get(429, 0)}"
      + (f", other: {dict(others)}" if others else ""))
    w("- per replica (calls / 200 / 429): "
      + ", ".join(f"#{i}: {n} / {a} / {b}" for i, (n, a, b) in enumerate(acc["per_replica"])))
    gs = acc["gw_status"]
    w(f"- gateways' access logs: 200: {gs.get(200, 0)}, 429: {gs.get(429, 0)}"
      + (f", other: {dict((k, v) for k, v in gs.items() if k not in (200, 429))}"
         if any(k not in (200, 429) for k in gs) else "")
      + f"; Redis fallback switches logged: {acc['fallbacks']}")
    node = "" if topo.cluster is None else f" (node {acc['time_port']})"
    w(f"- Redis TIME{node} minus local clock: {acc['offset_before'][0]:+.0f} µs before, "
      f"{acc['offset_after'][0]:+.0f} µs after (same host)")
    w("")
    w("Provider arrivals per 1-second bin, bins aligned on the start of the offered load "
      "(all full; arrivals after the last scheduled send are listed apart):")
    w("")
    w("| second | provider arrivals | deviation | 200s by send time |")
    w("|---:|---:|---:|---:|")
    for i, (c, ok) in enumerate(zip(acc["bins"], acc["ok_bins"])):
        w(f"| {i + 1} | {c} | {fmt_pct((c - q) / q * 100)} | {ok} |")
    w("")
    w(f"- arrivals before the first bin (warm-up excluded): {acc['before']}; "
      f"after the last bin: {acc['after']}")
    w(f"- mean {acc['mean']:.1f}/s, min {acc['min']}, max {acc['max']}; "
      f"largest deviation from {q}/s: {acc['dev'] * 100:.1f} %")
    w(f"- without the first bin (burst): largest deviation {acc['steady_dev'] * 100:.1f} % "
      f"({'within' if acc['steady_ok'] else 'NOT within'} 5 %)")
    if acc["clock_bins"]:
        w(f"- bins on whole clock seconds, partial first/last dropped: {acc['clock_bins']}; "
          f"largest deviation {acc['clock_dev'] * 100:.1f} %")
    if acc["window_at"] is not None:
        w(f"- most arrivals in any sliding 1 s window: {acc['window_max']} "
          f"(window starting {acc['window_at']:.3f} s into the run); "
          f"in windows starting after the first second: {acc['steady_window_max']}")
    w(f"- longest silence at the provider: {acc['gap_ms']:.1f} ms (from {acc['gap_at']:.3f} s; "
      f"the quota's interval is {1000 / q:.1f} ms)")
    if acc["placement"] is not None:
        w("")
        out.extend(placement_lines("the accuracy run", "accuracy", acc["placement"],
                                   gs.get(200, 0) + gs.get(429, 0)))
    w("")
    label = "" if default_topology else f" ({topo.name})"
    w(f"**Accuracy{label}: {verdict(acc)}** (every full bin within 5 % of {q}/s)")
    if acc["errors"] or acc["died"]:
        w("")
        w(f"INVALID: {acc['errors']} calls got no answer; gateways that died: "
          f"{acc['died'] or 'none'}. The bins above do not measure a shared quota.")
    return "\n".join(out)


def placement_lines(run, prefix, nodes, decisions=None):
    """Markdown: where a cluster holds the `prefix`:* keys and which nodes
    ran the scripts during `run`."""
    out = [f"Where the Redis Cluster holds the quota after {run} (`KEYS {prefix}:*` and "
           "`CLUSTER KEYSLOT` per node; scripts: EVALSHA + EVAL calls in INFO commandstats "
           "during the run):", "",
           "| node | slots | keys on the node (DBSIZE) | this run's keys (slot) | scripts run |",
           "|---:|---|---:|---|---:|"]
    for n in nodes:
        keys = ", ".join(f"`{k}` ({slot})" for k, slot in sorted(n["keys"].items())) or "none"
        out.append(f"| {n['port']} | {n['slots']} | {n['dbsize']} | {keys} | {n['scripts']} |")
    holding = [n for n in nodes if n["keys"]]
    running = [n for n in nodes if n["scripts"]]
    slots = sorted({slot for n in nodes for slot in n["keys"].values()})
    one = len(holding) == 1 and [n["port"] for n in running] == [holding[0]["port"]]
    out.append("")
    if one:
        out.append(f"- one node: all {len(holding[0]['keys'])} keys (slot "
                   + ", ".join(map(str, slots)) + f") and all {holding[0]['scripts']} scripts on "
                   f"node {holding[0]['port']}; the other nodes ran none"
                   + (f" ({decisions} calls decided)" if decisions is not None else ""))
    else:
        out.append(f"- NOT one node: keys on {[n['port'] for n in holding]}, scripts on "
                   f"{[(n['port'], n['scripts']) for n in running]}")
    return out


def cost_section(args, rounds, fallbacks, placements):
    """The cost table: local first, then each Redis gateway (one: the
    report as it always was, `redis` and plain Δ columns)."""
    out = []
    w = out.append
    labels = list(rounds[0])
    labels = ["local"] + [x for x in labels if x != "local"]
    remote = labels[1:]
    single = len(remote) == 1
    w(f"## Cost of the Redis decision: one sequential client, {args.cost_seconds} s per "
      f"measurement after 1 s warm-up, {len(rounds)} rounds")
    w("")
    if not single:
        w("The gateways are measured one after the other in each round, the order turning "
          "by one each round: " + ", ".join(f"`{x}`" for x in labels) + ".")
        w("")
    cols = [f"{x} p{p}" for x in labels for p in (50, 90, 99)]
    deltas = [(f"Δp{p}" if single else f"Δp{p} {x}") for x in remote for p in (50, 99)]
    w("| round | " + " | ".join(cols + deltas) + f" | calls {'/'.join(labels)} |")
    w("|---:|" + "---:|" * (len(cols) + len(deltas) + 1))
    fig = {}
    for i, r in enumerate(rounds):
        row = {}
        for x in labels:
            for p in (50, 90, 99):
                row[(x, p)] = r[x][f"p{p}"]
        for x in remote:
            for p in (50, 99):
                row[("Δ", x, p)] = r[x][f"p{p}"] - r["local"][f"p{p}"]
        for k, v in row.items():
            fig.setdefault(k, []).append(v)
        cells = [f"{row[(x, p)]:.0f}" for x in labels for p in (50, 90, 99)]
        cells += [f"{row[('Δ', x, p)]:+.0f}" for x in remote for p in (50, 99)]
        w(f"| {i + 1} | " + " | ".join(cells) + " | " + "/".join(str(r[x]["n"]) for x in labels) + " |")
    med = {k: statistics.median(v) for k, v in fig.items()}
    cells = [f"**{med[(x, p)]:.0f}**" for x in labels for p in (50, 90, 99)]
    cells += [f"**{med[('Δ', x, p)]:+.0f}**" for x in remote for p in (50, 99)]
    w("| **median** | " + " | ".join(cells) + " | |")
    w("")
    w("All figures in microseconds, client-observed (request written to response read).")
    errs = Counter()
    for r in rounds:
        for name in labels:
            for k, v in r[name]["errors"].items():
                errs[f"{name}:{k}"] += v
    switches = (fallbacks[remote[0]] if single
                else ", ".join(f"{x} {fallbacks[x]}" for x in remote))
    w(f"Non-200 answers during cost runs: {dict(errs) if errs else 'none'}; "
      f"Redis fallback switches logged: {switches}.")
    for x in remote:
        w(f"Difference of the medians ({x} − local): {med[(x, 50)] - med[('local', 50)]:+.0f} µs at p50, "
          f"{med[(x, 99)] - med[('local', 99)]:+.0f} µs at p99.")
    if "standalone" in remote and "cluster" in remote:
        over = {p: [r["cluster"][f"p{p}"] - r["standalone"][f"p{p}"] for r in rounds] for p in (50, 90, 99)}
        w("Cluster − standalone, per round: "
          + "; ".join(f"p{p} " + ", ".join(f"{v:+.0f}" for v in vs) for p, vs in over.items())
          + " (medians " + ", ".join(f"p{p} {statistics.median(vs):+.0f}" for p, vs in over.items())
          + " µs).")
    if errs:
        w("")
        w("WARNING: some cost-run calls failed; the figures above may be meaningless.")
    for x, nodes in placements.items():
        w("")
        out.extend(placement_lines(f"the cost run's `cost-{x}` gateway", "cost", nodes))
    w("")
    if single:
        what = "Redis Cluster" if remote[0] == "cluster" else "Redis"
        w(f"**{what} decision adds (median of {len(rounds)}): {med[('Δ', remote[0], 50)]:+.0f} µs at p50, "
          f"{med[('Δ', remote[0], 99)]:+.0f} µs at p99.**")
    else:
        w("**Added over local (median of " + f"{len(rounds)}): "
          + "; ".join(f"{x} {med[('Δ', x, 50)]:+.0f} µs at p50, {med[('Δ', x, 99)]:+.0f} µs at p99"
                      for x in remote) + ".**")
    return "\n".join(out)


def verdict(acc):
    if acc["errors"] or acc["died"]:
        return "INVALID"
    return "PASS" if acc["pass"] else "FAIL"


def nproc():
    return command_output("nproc")


# --------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all PASS; 1 an accuracy run (any topology) FAILed or a fairness "
               "target MISSed; 2 a run was INVALID or the Redis Cluster could not be formed. "
               "The Markdown summary goes to stdout, progress to stderr.")
    p.add_argument("--scenario", choices=("all", "accuracy", "fairness"), default="all",
                   help="accuracy: the accuracy and cost runs; fairness: the fairness run and the "
                        "single-gateway case; all: both (default)")
    p.add_argument("--quota", type=int, default=100, help="requests per second (default 100)")
    p.add_argument("--seconds", type=int, default=10, help="accuracy run length (default 10)")
    p.add_argument("--replicas", type=int, default=3, help="gateway replicas (default 3)")
    p.add_argument("--burst", type=int, default=5, help="rate_limit.burst (default 5)")
    p.add_argument("--threads-per-replica", type=int, default=4,
                   help="paced sender threads per replica (default 4)")
    p.add_argument("--cost-seconds", type=float, default=5.0,
                   help="measured seconds per cost measurement (default 5)")
    p.add_argument("--cost-repeats", type=int, default=3, help="cost rounds (default 3)")
    p.add_argument("--topology", choices=("standalone", "cluster", "both"), default="standalone",
                   help="Redis of the accuracy and cost runs: one redis-server (default), a Redis "
                        "Cluster of 3 masters started by the script (redis_mode = \"cluster\"), or "
                        "both: the accuracy run on each, and local, standalone and cluster gateways "
                        "in the same cost rounds (the fairness run stays on one redis-server)")
    f = p.add_argument_group("fairness run (replicas on one Redis, clients A : B : C = 3 : 1 : 1)")
    f.add_argument("--fair-quota", type=int, default=60, help="requests per second (default 60)")
    f.add_argument("--fair-burst", type=int, default=1, help="rate_limit.burst (default 1)")
    f.add_argument("--fair-max-wait-ms", type=int, default=1000, help="max_wait_ms (default 1000)")
    f.add_argument("--fair-seconds", type=int, default=20,
                   help="run length; C asks in the second half (default 20)")
    f.add_argument("--fair-replicas", type=int, default=2, help="gateway replicas (default 2)")
    f.add_argument("--fair-callers", type=int, default=6,
                   help="closed-loop callers per client per replica (default 6)")
    g = p.add_argument_group("single-gateway case (local backend, checkout 3 : batch 1)")
    g.add_argument("--single-quota", type=int, default=20, help="requests per second (default 20)")
    g.add_argument("--single-burst", type=int, default=1, help="rate_limit.burst (default 1)")
    g.add_argument("--single-max-wait-ms", type=int, default=1500, help="max_wait_ms (default 1500)")
    g.add_argument("--single-seconds", type=int, default=20,
                   help="checkout and batch together (default 20)")
    g.add_argument("--single-alone-seconds", type=int, default=6,
                   help="then batch alone; the first second is not measured (default 6)")
    g.add_argument("--checkout-rate", type=float, default=10.0,
                   help="checkout's paced calls per second (default 10)")
    g.add_argument("--batch-callers", type=int, default=24,
                   help="batch's closed-loop callers (default 24)")
    p.add_argument("--no-build", action="store_true", help="skip cargo build --release")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (configs, access logs, stderr) for inspection")
    args = p.parse_args(argv)
    if min(args.quota, args.seconds, args.replicas, args.burst,
           args.threads_per_replica, args.cost_repeats) < 1 or args.seconds < 2:
        p.error("quota, replicas, burst, threads and repeats must be >= 1; seconds >= 2")
    if min(args.fair_quota, args.fair_burst, args.fair_replicas, args.fair_callers,
           args.single_quota, args.single_burst, args.batch_callers) < 1 \
            or args.fair_seconds < 4 or args.single_seconds < 2 or args.single_alone_seconds < 2 \
            or args.checkout_rate <= 0 or min(args.fair_max_wait_ms, args.single_max_wait_ms) < 0:
        p.error("fairness options: counts and quotas >= 1, --fair-seconds >= 4, "
                "--single-seconds and --single-alone-seconds >= 2, --checkout-rate > 0")
    run_accuracy = args.scenario in ("all", "accuracy")
    run_fairness = args.scenario in ("all", "fairness")

    started = datetime.now(timezone.utc)
    # A SIGTERM/SIGHUP ends the run through the finally blocks below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))

    if not args.no_build:
        build_release(log)
    if not BINARY.exists():
        sys.exit(f"quota: {BINARY} missing (build it, or drop --no-build)")
    ensure_redis(log)

    work = Path(tempfile.mkdtemp(prefix="pandagate-quota-"))
    redis_proc = None
    cluster = None
    provider = None
    provider_thread = None
    try:
        topologies = []
        if run_fairness or args.topology in ("standalone", "both"):
            redis_proc, redis_port = start_redis(work)
            log(f"redis-server on 127.0.0.1:{redis_port}")
            if args.topology in ("standalone", "both"):
                topologies.append(Topology.standalone(redis_port))
        if run_accuracy and args.topology in ("cluster", "both"):
            cluster = RedisCluster(work, masters=3)
            try:
                cluster.start(timeout=CLUSTER_START_TIMEOUT_S)
            except RuntimeError as e:
                log(f"the Redis Cluster could not be formed: {e}")
                return 2
            log("Redis Cluster on 127.0.0.1:" + ", ".join(map(str, cluster.ports)))
            topologies.append(Topology.of_cluster(cluster))
        provider = Provider()
        provider_thread = serve_in_thread(provider, 0.1)
        log(f"fake provider on 127.0.0.1:{provider.server_address[1]}")

        sections = []
        status = 0
        if run_accuracy:
            accs = []
            for topo in topologies:
                acc = accuracy_run(args, work, provider, topo)
                log(f"accuracy ({topo.name}):", verdict(acc), acc["bins"])
                accs.append(acc)
            cost = cost_run(args, work, provider, topologies)
            sections.append(report(args, accs, cost, args.topology == "standalone"))
            for acc in accs:
                status = max(status, {"PASS": 0, "FAIL": 1}.get(verdict(acc), 2))
        if run_fairness:
            fair = fairness_run(args, work, provider, redis_port)
            log("fairness:", [(t, ok) for t, ok in fair["targets"]])
            single = single_run(args, work, provider)
            log("single:", [(t, ok) for t, ok in single["targets"]])
            sections.append(fairness_report(args, fair, single))
            status = max(status, {"PASS": 0, "MISS": 1}.get(fairness_verdict(fair, single), 2))
        print(header(argv, started, topologies if run_accuracy else ()) + "\n"
              + "\n\n".join(sections), flush=True)
        return status
    finally:
        stop_server(provider, provider_thread)
        stop(redis_proc, grace=STOP_TIMEOUT_S)
        if cluster is not None:
            cluster.stop(grace=STOP_TIMEOUT_S)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
