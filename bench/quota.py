#!/usr/bin/env python3
"""Shared quota through Redis: accuracy across replicas, and what it costs.

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

    python3 bench/quota.py [--quota 100] [--seconds 10] [--replicas 3] [--no-build]

Python 3.11 standard library only. Talks only to 127.0.0.1. Installs
redis-server (Debian package) when missing. Prints a Markdown summary on
stdout (progress goes to stderr). Exit status 1 when the accuracy run FAILs,
2 when it is INVALID (calls without an answer, a gateway died).
"""

import argparse
import http.client
import json
import os
import shlex
import signal
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
from benchlib import command_output, ensure_redis, leave_work, logger, redis_version, resp_command  # noqa: E402
from benchlib import serve_in_thread, start_redis, stop, stop_server  # noqa: E402

PATH = "/open/product/get?itemId=652874751412"
ACCESS_KEY = "bench-quota-key"
TOLERANCE = 0.05
CALL_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0

log = logger("quota:")


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    def __init__(self):
        super().__init__(ProviderHandler, seed=0)
        self.arrivals = []  # time.monotonic() of every request

    def snapshot(self):
        with self.lock:
            return sorted(self.arrivals)

    def clear(self):
        with self.lock:
            self.arrivals = []


class ProviderHandler(QuietHandler):
    # Headers and body go out in two writes: without TCP_NODELAY the body
    # waits for the gateway's delayed ACK (~40 ms on Linux) on every call.
    disable_nagle_algorithm = True

    def serve(self):
        now = time.monotonic()
        with self.server.lock:
            self.server.arrivals.append(now)
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


def gateway_toml(rps, burst, backend, redis_port=None, prefix="pandagate"):
    lines = ["[rate_limit]",
             f"requests_per_second = {rps}",
             f"burst = {burst}",
             "max_wait_ms = 0",
             f'backend = "{backend}"']
    if backend == "redis":
        lines += [f'redis_url = "redis://127.0.0.1:{redis_port}"',
                  f'redis_key_prefix = "{prefix}"']
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def call(self):
        """Returns (status or None, latency in seconds, error or None)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                   timeout=CALL_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", PATH)
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


def paced_sender(port, first, period, end, stop, results):
    """Sends at first, first + period, ... until `end` (all time.monotonic()),
    never skipping a slot: when late it sends at once and records the lag."""
    client = Client(port)
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

def accuracy_run(args, work, provider, redis_port):
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    toml = gateway_toml(args.quota, args.burst, "redis", redis_port, prefix="accuracy")
    gateways = []
    try:
        for i in range(args.replicas):
            gateways.append(quota_gateway(f"replica{i}", work, toml, upstream))
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
        offset_before = redis_time_offset_us(redis_port)

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
        offset_after = redis_time_offset_us(redis_port)
        arrivals = provider.snapshot()
        died = [g.name for g in gateways if not g.alive()]
    finally:
        for g in gateways:
            g.stop(STOP_TIMEOUT_S)

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


def cost_run(args, work, provider, redis_port):
    upstream = f"http://127.0.0.1:{provider.server_address[1]}"
    rps = 100000
    rounds = []
    started = []
    try:
        local = quota_gateway("cost-local", work, gateway_toml(rps, 1000, "local"), upstream)
        started.append(local)
        redis = quota_gateway("cost-redis", work,
                        gateway_toml(rps, 1000, "redis", redis_port, prefix="cost"), upstream)
        started.append(redis)
        for i in range(args.cost_repeats):
            order = [("local", local), ("redis", redis)]
            if i % 2:
                order.reverse()
            r = {}
            for name, g in order:
                log(f"cost round {i + 1}/{args.cost_repeats}: {name}")
                r[name] = sequential(g.port, 1.0, args.cost_seconds)
            rounds.append(r)
    finally:
        for g in started:
            g.stop(STOP_TIMEOUT_S)
    fallbacks = fallbacks_in(redis)
    return rounds, fallbacks


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def report(args, argv, acc, rounds, cost_fallbacks, started):
    out = []
    w = out.append
    q = args.quota
    w("# pandagate shared quota (Redis) benchmark")
    w("")
    w(f"- command: `{' '.join(shlex.quote(a) for a in ['python3', 'bench/quota.py'] + argv)}`")
    w(f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}")
    w(f"- nproc: {os.cpu_count()} (`nproc` = {nproc()}); load average at end: "
      + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    w(f"- redis-server: {redis_version()}")
    w("")
    w(f"## Accuracy: {args.replicas} replicas, quota {q}/s, burst {args.burst}, max_wait_ms 0")
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
    w(f"- Redis TIME minus local clock: {acc['offset_before'][0]:+.0f} µs before, "
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
    w("")
    w(f"**Accuracy: {verdict(acc)}** (every full bin within 5 % of {q}/s)")
    if acc["errors"] or acc["died"]:
        w("")
        w(f"INVALID: {acc['errors']} calls got no answer; gateways that died: "
          f"{acc['died'] or 'none'}. The bins above do not measure a shared quota.")
    w("")
    w(f"## Cost of the Redis decision: one sequential client, {args.cost_seconds} s per "
      f"measurement after 1 s warm-up, {len(rounds)} rounds")
    w("")
    w("| round | local p50 | local p90 | local p99 | redis p50 | redis p90 | redis p99 "
      "| Δp50 | Δp99 | calls local/redis |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    fig = {k: [] for k in ("lp50", "lp90", "lp99", "rp50", "rp90", "rp99", "d50", "d99")}
    for i, r in enumerate(rounds):
        lo, re_ = r["local"], r["redis"]
        row = {"lp50": lo["p50"], "lp90": lo["p90"], "lp99": lo["p99"],
               "rp50": re_["p50"], "rp90": re_["p90"], "rp99": re_["p99"],
               "d50": re_["p50"] - lo["p50"], "d99": re_["p99"] - lo["p99"]}
        for k, v in row.items():
            fig[k].append(v)
        w(f"| {i + 1} | {row['lp50']:.0f} | {row['lp90']:.0f} | {row['lp99']:.0f} | "
          f"{row['rp50']:.0f} | {row['rp90']:.0f} | {row['rp99']:.0f} | "
          f"{row['d50']:+.0f} | {row['d99']:+.0f} | {lo['n']}/{re_['n']} |")
    med = {k: statistics.median(v) for k, v in fig.items()}
    w(f"| **median** | **{med['lp50']:.0f}** | **{med['lp90']:.0f}** | **{med['lp99']:.0f}** | "
      f"**{med['rp50']:.0f}** | **{med['rp90']:.0f}** | **{med['rp99']:.0f}** | "
      f"**{med['d50']:+.0f}** | **{med['d99']:+.0f}** | |")
    w("")
    w("All figures in microseconds, client-observed (request written to response read).")
    errs = Counter()
    for r in rounds:
        for name in ("local", "redis"):
            for k, v in r[name]["errors"].items():
                errs[f"{name}:{k}"] += v
    w(f"Non-200 answers during cost runs: {dict(errs) if errs else 'none'}; "
      f"Redis fallback switches logged: {cost_fallbacks}.")
    w(f"Difference of the medians (redis − local): {med['rp50'] - med['lp50']:+.0f} µs at p50, "
      f"{med['rp99'] - med['lp99']:+.0f} µs at p99.")
    if errs:
        w("")
        w("WARNING: some cost-run calls failed; the figures above may be meaningless.")
    w("")
    w(f"**Redis decision adds (median of {len(rounds)}): {med['d50']:+.0f} µs at p50, "
      f"{med['d99']:+.0f} µs at p99.**")
    return "\n".join(out)


def verdict(acc):
    if acc["errors"] or acc["died"]:
        return "INVALID"
    return "PASS" if acc["pass"] else "FAIL"


def nproc():
    return command_output("nproc")


# --------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quota", type=int, default=100, help="requests per second (default 100)")
    p.add_argument("--seconds", type=int, default=10, help="accuracy run length (default 10)")
    p.add_argument("--replicas", type=int, default=3, help="gateway replicas (default 3)")
    p.add_argument("--burst", type=int, default=5, help="rate_limit.burst (default 5)")
    p.add_argument("--threads-per-replica", type=int, default=4,
                   help="paced sender threads per replica (default 4)")
    p.add_argument("--cost-seconds", type=float, default=5.0,
                   help="measured seconds per cost measurement (default 5)")
    p.add_argument("--cost-repeats", type=int, default=3, help="cost rounds (default 3)")
    p.add_argument("--no-build", action="store_true", help="skip cargo build --release")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (configs, access logs, stderr) for inspection")
    args = p.parse_args(argv)
    if min(args.quota, args.seconds, args.replicas, args.burst,
           args.threads_per_replica, args.cost_repeats) < 1 or args.seconds < 2:
        p.error("quota, replicas, burst, threads and repeats must be >= 1; seconds >= 2")

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
    provider = None
    provider_thread = None
    try:
        redis_proc, redis_port = start_redis(work)
        log(f"redis-server on 127.0.0.1:{redis_port}")
        provider = Provider()
        provider_thread = serve_in_thread(provider, 0.1)
        log(f"fake provider on 127.0.0.1:{provider.server_address[1]}")

        acc = accuracy_run(args, work, provider, redis_port)
        log("accuracy:", verdict(acc), acc["bins"])
        rounds, cost_fallbacks = cost_run(args, work, provider, redis_port)
        print(report(args, argv, acc, rounds, cost_fallbacks, started), flush=True)
        return {"PASS": 0, "FAIL": 1}.get(verdict(acc), 2)
    finally:
        stop_server(provider, provider_thread)
        stop(redis_proc, grace=STOP_TIMEOUT_S)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
