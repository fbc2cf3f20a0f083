#!/usr/bin/env python3
"""Read cache: the quota it saves on a Zipf workload, and stale answers in an outage.

A fake provider answers `GET /open/product/get?itemId=N` with a provider
envelope `{"requestId":..,"code":200,"msg":"success","data":{"itemId":N,..}}`
of about 1 KiB and records the arrival time and itemId of every request.
From `--seconds` into a run it is down for `--outage` seconds: every request
is answered 503 (`--outage-mode 503`) or read and then dropped with an RST
(`--outage-mode close`).

Load: a seeded Zipf draw (exponent `--zipf`, 1.1) over `--ids` product ids
(10 000; id 1 the most asked for), sent open-loop at `--rate` calls per
second (200) on a fixed schedule by `--workers` threads (32), each with one
persistent `http.client` connection per gateway; `--seconds` (60) of load,
then `--outage` (20) more at the same rate while the provider is down. The
same draws in the same order for every run. Each answer is classified by
status, its `x-pandagate-cache` header (`none` when absent) and its body
(envelope `code` 200 and the asked `itemId`, else a failure).

Beside the load, a probe thread makes sequential calls on one persistent
connection (`--probe-rate`, 15/s, until the outage) to the (first) gateway,
in turn: a hot id of its own (a hit while fresh), a new id (always a miss)
and a new id with `Cache-Control: no-store` (not cached: the same run's
reference), all outside the load's ids, so the client-observed latency of a
hit and of a miss can be set against the same calls in the no-cache run and
against uncached calls made at the same time. The provider counts the
probe's requests apart from the load's.

Runs, each against a new gateway (`benchlib.start_gateway`, the provider
restored first):
  1. `no cache`: a `[[routes]]` entry for /open/product/get without
     `cache_ttl_ms`;
  2. `cache`: the same entry with `cache_ttl_ms` (`--ttl-ms`, 30000) and
     `cache_stale_ms` (`--stale-ms`, 300000), `[cache] max_bytes` 64 MiB;
  3. `cache, redis` (`--redis auto|on|off`, default auto): `--replicas` (2)
     gateways sharing one redis-server this script starts (`[cache] backend
     = "redis"`), the load spread round-robin over them. In `auto` mode the
     run is reported as not measured when the binary refuses that config
     (a build before the shared cache).

Reported per run: provider requests during the load (per minute: the quota
spent) and during the outage, the hit ratio ((hit + coalesced) / all answers
of the load phase), answers by `x-pandagate-cache`, the outage's answers
(ok by header, errors) for ids that had a good answer before the outage and
for ids never fetched, the `pandagate_cache_*` metrics and the access logs'
`cache` field, latency (probe and load timings split by cache result), and
for the Redis run the hits served across replicas (a hit on a replica that
had not fetched that id from the provider itself within the TTL).

Checks (exit 1 when one fails): each cache run sends fewer provider requests
during the load than the no-cache run; with `--stale-ms` > 0, no call made
during the outage for an id that had a good answer before it gets an error;
no 200 answer carries another id's data.

    python3 bench/cache.py [--binary target/release/pandagate] [--ids 10000]
        [--zipf 1.1] [--rate 200] [--seconds 60] [--outage 20]
        [--outage-mode 503|close] [--ttl-ms 30000] [--stale-ms 300000]
        [--workers 32] [--probe-rate 15] [--seed 1] [--redis auto|on|off]
        [--replicas 2] [--keep]

Python 3.11 standard library only. Talks only to 127.0.0.1; every server it
starts is on a free port and is stopped by its own pid. Installs
redis-server (Debian package) when missing and the Redis run is wanted.
Prints a Markdown summary on stdout (progress on stderr). Exit 1 when a
check fails, 2 when the run is INVALID (a gateway died, calls not sent).
"""

import argparse
import bisect
import http.client
import itertools
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import binary_option, git_version, hist, leave_work, logger, ms, prebuilt_binary, quantile  # noqa: E402
from benchlib import Gateway, LoopbackServer, QuietHandler, scrape_metrics, serve_in_thread, stop  # noqa: E402
from benchlib import ensure_redis, redis_version, resp_command, start_redis, stop_server  # noqa: E402

READ_PATH = "/open/product/get"
PROBE_HOT_ID = 900_000_000          # the probe's own hot id
PROBE_FRESH_BASE = 900_000_001      # the probe's never-repeated ids start here
CALL_TIMEOUT_S = 15.0
BODY_TARGET_BYTES = 1024


log = logger("cache:")


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    """Answers product reads; records (monotonic time, itemId or None,
    outcome) for every request. `down` switches it to the outage answer."""

    def __init__(self, seed, outage_mode):
        super().__init__(ProviderHandler, seed)
        self.outage_mode = outage_mode
        self.down = False
        self.arrivals = []
        self.other_paths = Counter()

    def set_down(self, down):
        with self.lock:
            self.down = down

    def record(self, item_id):
        with self.lock:
            outcome = self.outage_mode if self.down else "ok"
            self.arrivals.append((time.monotonic(), item_id, outcome))
            return outcome

    def take(self):
        """The arrivals so far, and a fresh record for the next run."""
        with self.lock:
            out, self.arrivals = self.arrivals, []
            return out


def product_body(item_id):
    """A provider envelope of about BODY_TARGET_BYTES for `item_id`; the data
    is the same for an id every time, the requestId is new."""
    r = random.Random(item_id)
    data = {
        "itemId": item_id,
        "title": f"Bench product {item_id}",
        "shopName": f"shop-{r.randrange(1, 5000)}",
        "categoryId": r.randrange(50000000, 50099999),
        "price": f"{r.randrange(100, 99999) / 100:.2f}",
        "promotionPrice": f"{r.randrange(100, 99999) / 100:.2f}",
        "stock": r.randrange(0, 10000),
        "images": [f"https://img.example/{item_id}/{k}.jpg" for k in range(3)],
        "skus": [{"skuId": item_id * 10 + k, "price": f"{r.randrange(100, 9999) / 100:.2f}",
                  "stock": r.randrange(0, 500), "props": f"color:{k};size:{r.choice('SML')}"}
                 for k in range(3)],
        "description": "",
    }
    envelope = {"requestId": uuid.uuid4().hex, "code": 200, "msg": "success", "data": data}
    size = len(json.dumps(envelope, separators=(",", ":")).encode())
    data["description"] = "d" * max(0, BODY_TARGET_BYTES - size)
    return json.dumps(envelope, separators=(",", ":")).encode()


class ProviderHandler(QuietHandler):
    # Headers and body go out in two writes: without TCP_NODELAY the body
    # waits for the gateway's delayed ACK (~40 ms) (see bench/quota.py).
    disable_nagle_algorithm = True

    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = urlsplit(self.path)
        if parts.path != READ_PATH:
            with self.server.lock:
                self.server.other_paths[parts.path] += 1
            self.answer_json(404, b'{"code":404,"msg":"not found","data":null}')
            return
        try:
            item_id = int(parse_qs(parts.query)["itemId"][0])
        except (KeyError, ValueError, IndexError):
            item_id = None
        outcome = self.server.record(item_id)
        if outcome == "close":
            self.reset()
            return
        if outcome == "503":
            self.answer_json(503, b'{"code":503,"msg":"service unavailable","data":null}')
            return
        if item_id is None:
            self.answer_json(200, b'{"requestId":"-","code":400,"msg":"itemId missing","data":null}')
            return
        self.answer_json(200, product_body(item_id))


# --------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------

def gateway_toml(args, cached, redis_port=None, prefix=None):
    lines = ["[[routes]]", f'path = "{READ_PATH}"']
    if cached:
        lines.append(f"cache_ttl_ms = {args.ttl_ms}")
        if args.stale_ms:
            lines.append(f"cache_stale_ms = {args.stale_ms}")
        lines += ["", "[cache]", f"max_bytes = {args.max_bytes}"]
        if redis_port is not None:
            lines += ['backend = "redis"',
                      f'redis_url = "redis://127.0.0.1:{redis_port}"',
                      f'redis_key_prefix = "{prefix}"']
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

def zipf_draws(n_ids, s, count, seed):
    """`count` ids in 1..n_ids, P(k) proportional to k^-s, seeded."""
    cum = list(itertools.accumulate(k ** -s for k in range(1, n_ids + 1)))
    total = cum[-1]
    rng = random.Random(seed)
    return [min(n_ids, bisect.bisect_left(cum, rng.random() * total) + 1) for _ in range(count)]


def one_call(conn, item_id, headers=None):
    """GET one product; returns (status, x-pandagate-cache or "none",
    outcome, close): outcome is "ok" (envelope code 200 and this itemId),
    "wrong id", "code X" or "not json"."""
    conn.request("GET", f"{READ_PATH}?itemId={item_id}", headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    header = resp.getheader("x-pandagate-cache") or "none"
    outcome = "not json"
    try:
        payload = json.loads(data)
        if isinstance(payload, dict):
            code = payload.get("code")
            got = payload.get("data", {}).get("itemId") if isinstance(payload.get("data"), dict) else None
            if code in (200, "200"):
                outcome = "ok" if got == item_id else "wrong id"
            else:
                outcome = f"code {code}"
    except ValueError:
        pass
    return resp.status, header, outcome, resp.will_close


def run_load(ports, ids, rate, start, workers, max_end):
    """Sends ids[i] at start + i / rate (open loop: a late worker sends at
    once and the lag is recorded) to ports[i % len(ports)]. Returns per call
    a dict, None for calls never sent (past max_end)."""
    results = [None] * len(ids)
    next_index = iter(range(len(ids)))
    index_lock = threading.Lock()

    def worker():
        conns = [None] * len(ports)
        try:
            while True:
                with index_lock:
                    i = next(next_index, None)
                if i is None:
                    return
                scheduled = start + i / rate
                delay = scheduled - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if time.monotonic() > max_end:
                    return
                replica = i % len(ports)
                if conns[replica] is None:
                    conns[replica] = http.client.HTTPConnection("127.0.0.1", ports[replica],
                                                                timeout=CALL_TIMEOUT_S)
                sent = time.monotonic()
                rec = {"id": ids[i], "replica": replica, "scheduled": scheduled, "sent": sent,
                       "status": None, "header": "none", "outcome": None, "exc": None}
                try:
                    rec["status"], rec["header"], rec["outcome"], close = one_call(conns[replica], ids[i])
                except (OSError, http.client.HTTPException) as e:
                    rec["exc"], close = type(e).__name__, True
                rec["done"] = time.monotonic()
                results[i] = rec
                if close:
                    conns[replica].close()
                    conns[replica] = None
        finally:
            for c in conns:
                if c is not None:
                    c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    return results, threads


def run_probe(port, rate, stop_at, out):
    """Sequential calls on one persistent connection at `rate` per second
    until `stop_at`, in turn the hot probe id, a new id and a new id with
    `Cache-Control: no-store`; appends
    (kind, header, status, outcome, seconds) to `out`."""
    conn = None
    period = 1.0 / rate
    nxt = time.monotonic()
    fresh = itertools.count(PROBE_FRESH_BASE)
    k = 0
    try:
        while time.monotonic() < stop_at:
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            nxt += period
            if time.monotonic() >= stop_at:
                break
            kind = ("hot", "fresh", "no-store")[k % 3]
            item_id = PROBE_HOT_ID if kind == "hot" else next(fresh)
            headers = {"Cache-Control": "no-store"} if kind == "no-store" else None
            k += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
            t0 = time.perf_counter()
            try:
                status, header, outcome, close = one_call(conn, item_id, headers)
            except (OSError, http.client.HTTPException) as e:
                status, header, outcome, close = None, "none", type(e).__name__, True
            out.append((kind, header, status, outcome, time.perf_counter() - t0))
            if close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


def one_run(name, args, binary, work, provider, ids, cached, redis_port=None, replicas=1):
    """One run: gateway(s) up, load + probe, outage, gateway(s) down.
    Returns the raw records, or {"refused": text} when a gateway would not
    start with this config."""
    provider.set_down(False)
    provider.take()
    prefix = f"bench-cache-{uuid.uuid4().hex[:8]}"
    toml = gateway_toml(args, cached, redis_port, prefix)
    gateways = []
    try:
        for r in range(replicas):
            try:
                gateways.append(Gateway(f"{name.replace(' ', '-').replace(',', '')}-{r}", binary, work, toml,
                                        PANDAGATE_UPSTREAM=f"http://127.0.0.1:{provider.server_address[1]}"))
            except RuntimeError as e:
                return {"refused": str(e), "toml": toml}
        ports = [g.port for g in gateways]
        log(f"run '{name}': gateway(s) on {ports}, admin {[g.admin_port for g in gateways]}")
        # Warm the connections (gateway -> provider pools, client code paths)
        # with ids outside the load's and the probe's.
        for r, port in enumerate(ports):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
            try:
                for k in range(5):
                    one_call(conn, 800_000_000 + 10 * r + k)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
        time.sleep(0.2)
        warmup_arrivals = len(provider.take())
        warm_access = [len(g.access_log()) for g in gateways]

        start = time.monotonic() + 0.5
        switch_at = start + args.seconds
        end = switch_at + args.outage
        results, threads = run_load(ports, ids, args.rate, start, args.workers,
                                    max_end=end + 5.0)
        probe_out = []
        probe_thread = None
        if args.probe_rate > 0:
            probe_thread = threading.Thread(target=run_probe, daemon=True,
                                            args=(ports[0], args.probe_rate, switch_at, probe_out))
            # The probe starts with the load.
            time.sleep(max(0.0, start - time.monotonic()))
            probe_thread.start()
        log(f"run '{name}': {args.rate}/s for {args.seconds} s, then {args.outage} s of outage")
        time.sleep(max(0.0, switch_at - time.monotonic()))
        metrics_before = [scrape_metrics(g.admin_port, "pandagate_cache") for g in gateways]
        provider.set_down(True)
        switched = time.monotonic()
        log(f"run '{name}': provider down ({args.outage_mode})")
        time.sleep(max(0.0, end - time.monotonic()))
        for t in threads:
            t.join(timeout=max(0.0, end + CALL_TIMEOUT_S + 10 - time.monotonic()))
        hung = sum(t.is_alive() for t in threads)
        if probe_thread is not None:
            probe_thread.join(timeout=CALL_TIMEOUT_S + 5)
        metrics_after = [scrape_metrics(g.admin_port, "pandagate_cache") for g in gateways]
        died = [g.name for g in gateways if not g.alive()]
        arrivals = provider.take()
        provider.set_down(False)
    finally:
        for g in gateways:
            g.stop()
    access = []
    diag = []
    for g, skip in zip(gateways, warm_access):
        access.append(g.access_log()[skip:])
        diag.append(g.log_events("gateway.err"))
    return {"name": name, "toml": toml, "results": results, "hung": hung, "died": died,
            "probe": probe_out, "start": start, "switch": switched, "end": end,
            "arrivals": arrivals, "warmup_arrivals": warmup_arrivals,
            "metrics_before": metrics_before, "metrics_after": metrics_after,
            "access": access, "diag": diag, "replicas": replicas, "cached": cached}


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------

def is_ok(rec):
    return rec is not None and rec["status"] == 200 and rec["outcome"] == "ok"


def err_kind(rec):
    if rec["status"] is None:
        return f"no answer ({rec['exc']})"
    if rec["status"] != 200:
        return f"{rec['status']} ({rec['header']})"
    return f"200 {rec['outcome']} ({rec['header']})"


def analyse(run, args):
    res = run["results"]
    sent = [r for r in res if r is not None]
    switch = run["switch"]
    # Load phase: answered before the provider went down; outage: sent after
    # it; the calls in between (sent before, answered after) are apart.
    load = [r for r in sent if r["done"] < switch]
    outage = [r for r in sent if r["sent"] >= switch]
    straddle = [r for r in sent if r["sent"] < switch <= r["done"]]
    a = {"sent": len(sent), "never_sent": sum(1 for r in res if r is None),
         "load_n": len(load), "outage_n": len(outage), "straddle_n": len(straddle),
         "straddle": Counter(r["header"] if is_ok(r) else err_kind(r) for r in straddle)}
    lags = sorted(r["sent"] - r["scheduled"] for r in sent)
    a["lag_p50"], a["lag_p99"] = quantile(lags, 0.5), quantile(lags, 0.99)
    a["lag_max"] = lags[-1] if lags else float("nan")
    a["late_10ms"] = sum(1 for x in lags if x > 0.010)

    # Provider side.
    arr = run["arrivals"]
    work_ids = args.ids
    a["prov_load"] = sum(1 for t, i, _ in arr if t < switch and i is not None and 1 <= i <= work_ids)
    a["prov_load_probe"] = sum(1 for t, i, _ in arr if t < switch and (i is None or i > work_ids))
    a["prov_outage"] = sum(1 for t, i, _ in arr if t >= switch and i is not None and 1 <= i <= work_ids)
    a["prov_outage_probe"] = sum(1 for t, i, _ in arr if t >= switch and (i is None or i > work_ids))
    a["per_min"] = a["prov_load"] / args.seconds * 60.0
    a["prov_ids"] = len({i for t, i, _ in arr if t < switch and i is not None and 1 <= i <= work_ids})
    nbins = (args.seconds + args.outage + 9) // 10
    bins = [0] * nbins
    for t, i, _ in arr:
        if i is None or not 1 <= i <= work_ids:
            continue
        b = int((t - run["start"]) // 10)
        if 0 <= b < nbins:
            bins[b] += 1
    a["bins"] = bins
    # The busiest single second of the load phase at the provider.
    per_s = Counter(int(t - run["start"]) for t, i, _ in arr
                    if t < switch and i is not None and 1 <= i <= work_ids)
    a["prov_max_s"] = max(per_s.values()) if per_s else 0

    # Load phase answers.
    a["load_headers"] = Counter(r["header"] for r in load)
    a["load_ok"] = sum(1 for r in load if is_ok(r))
    a["load_errors"] = Counter(err_kind(r) for r in load if not is_ok(r))
    hits = a["load_headers"].get("hit", 0) + a["load_headers"].get("coalesced", 0)
    a["hit_ratio"] = hits / len(load) if load else float("nan")
    a["distinct_ids"] = len({r["id"] for r in load})
    a["wrong_id"] = [(r["id"], r["header"]) for r in sent if r["status"] == 200 and r["outcome"] == "wrong id"]

    # Outage: ids with a good answer received before the provider went down.
    cached_before = {r["id"] for r in sent if is_ok(r) and r["done"] < switch}
    a["cached_before"] = len(cached_before)
    a["out_headers"] = Counter(r["header"] for r in outage)
    seen = [r for r in outage if r["id"] in cached_before]
    never = [r for r in outage if r["id"] not in cached_before]
    a["out_seen_n"], a["out_never_n"] = len(seen), len(never)
    a["out_seen_ok"] = Counter(r["header"] for r in seen if is_ok(r))
    a["out_seen_err"] = Counter(err_kind(r) for r in seen if not is_ok(r))
    a["out_seen_err_ids"] = sorted({r["id"] for r in seen if not is_ok(r)})
    a["out_never_ok"] = Counter(r["header"] for r in never if is_ok(r))
    a["out_never_err"] = Counter(err_kind(r) for r in never if not is_ok(r))
    a["out_ok"] = sum(1 for r in outage if is_ok(r))
    a["out_stale"] = sum(1 for r in outage if is_ok(r) and r["header"] == "stale")
    a["out_err"] = sum(1 for r in outage if not is_ok(r))
    a["out_lat_ok"] = sorted(r["done"] - r["sent"] for r in outage if is_ok(r))
    a["out_lat_err"] = sorted(r["done"] - r["sent"] for r in outage if not is_ok(r))
    # The first good answer an id got in the outage: how long after the switch.
    # Latency of the load phase's good answers, by cache result.
    by = defaultdict(list)
    for r in load:
        if is_ok(r):
            by[r["header"]].append(r["done"] - r["sent"])
    a["load_lat"] = {k: sorted(v) for k, v in by.items()}
    # Probe.
    pr = defaultdict(list)
    pbad = Counter()
    for kind, header, status, outcome, secs in run["probe"]:
        if status == 200 and outcome == "ok":
            pr[(kind, header)].append(secs)
        else:
            pbad[f"{kind} {status} {outcome} ({header})"] += 1
    a["probe"] = {k: sorted(v) for k, v in pr.items()}
    a["probe_bad"] = pbad

    # Across replicas: a hit on replica R for id X when R itself had no miss
    # (its own provider fetch) of X within the TTL before.
    if run["replicas"] > 1:
        own_fill = {}
        cross = 0
        hits_r = Counter()
        for r in sorted(load, key=lambda r: r["sent"]):
            if not is_ok(r):
                continue
            key = (r["replica"], r["id"])
            if r["header"] == "miss":
                own_fill[key] = r["done"]
            elif r["header"] in ("hit", "coalesced"):
                hits_r[r["replica"]] += 1
                last = own_fill.get(key)
                if last is None or r["sent"] - last > args.ttl_ms / 1000.0:
                    cross += 1
        a["cross_hits"] = cross
        # Misses that Redis could have answered: another replica's good
        # answer for that id had arrived (10 ms before this send, time for
        # the background write) within the TTL. Of these, those where this
        # replica had answered the id before (an expired copy in its memory,
        # which is looked at before Redis).
        fills = defaultdict(list)       # id -> [(done, replica)] of good misses
        seen_by = defaultdict(set)      # id -> replicas that answered it ok so far
        avoidable = avoidable_seen = 0
        for r in sorted(load, key=lambda r: r["sent"]):
            if not is_ok(r):
                continue
            if r["header"] == "miss":
                ttl = args.ttl_ms / 1000.0
                if any(rep != r["replica"] and r["sent"] - ttl < done <= r["sent"] - 0.010
                       for done, rep in fills[r["id"]]):
                    avoidable += 1
                    if r["replica"] in seen_by[r["id"]]:
                        avoidable_seen += 1
                fills[r["id"]].append((r["done"], r["replica"]))
            seen_by[r["id"]].add(r["replica"])
        a["avoidable"], a["avoidable_seen"] = avoidable, avoidable_seen
        a["hits_by_replica"] = hits_r
        a["headers_by_replica"] = {rep: Counter(r["header"] for r in load if r["replica"] == rep)
                                   for rep in range(run["replicas"])}

    # Gateway side.
    a["access_cache"] = Counter()
    a["access_status"] = Counter()
    for lines in run["access"]:
        for e in lines:
            a["access_cache"][str(e.get("cache"))] += 1
            a["access_status"][e.get("status")] += 1
    a["warn"] = Counter()
    for events in run["diag"]:
        for e in events:
            if str(e.get("level", "")).upper() in ("WARN", "ERROR"):
                a["warn"][e.get("message")] += 1
    a["metrics"] = sum_metrics(run["metrics_after"])
    a["metrics_load"] = sum_metrics(run["metrics_before"])
    return a


def sum_metrics(per_gateway):
    out = Counter()
    for m in per_gateway:
        for k, v in m.items():
            out[k] += v
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def lat_cell(values):
    if not values:
        return "– | – | 0"
    return f"{ms(quantile(values, 0.5))} | {ms(quantile(values, 0.99))} | {len(values)}"


def fmt_metrics(m):
    if not m:
        return "none scraped"
    return ", ".join(f"`{k}` {v:g}" for k, v in sorted(m.items()) if "_bucket" not in k)


def report(args, argv, started, binary, runs, analyses, redis_note):
    out = []
    w = out.append
    names = [r["name"] for r in runs]
    base = analyses[0]
    cache_runs = [(r, a) for r, a in zip(runs, analyses) if r["cached"]]

    # Checks.
    failures = []
    invalid = []
    for r, a in zip(runs, analyses):
        if r["died"]:
            invalid.append(f"{r['name']}: gateway(s) died: {', '.join(r['died'])}")
        if a["never_sent"]:
            invalid.append(f"{r['name']}: {a['never_sent']} calls never sent")
        if r["hung"]:
            invalid.append(f"{r['name']}: {r['hung']} load threads did not finish")
        if a["wrong_id"]:
            failures.append(f"{r['name']}: {len(a['wrong_id'])} answers carried another id's data")
    for r, a in cache_runs:
        if not a["prov_load"] < base["prov_load"]:
            failures.append(f"{r['name']}: provider requests during the load {a['prov_load']} "
                            f"not fewer than without the cache ({base['prov_load']})")
        if args.stale_ms > 0 and a["out_seen_err"]:
            failures.append(f"{r['name']}: {sum(a['out_seen_err'].values())} outage calls for ids cached "
                            f"before the outage got an error ({len(a['out_seen_err_ids'])} ids, e.g. "
                            f"{a['out_seen_err_ids'][:5]})")
    verdict = "INVALID" if invalid else ("FAIL" if failures else "PASS")

    w("# pandagate read cache: quota saved on a Zipf workload, stale answers in an outage")
    w("")
    w(f"- command: `{' '.join(shlex.quote(x) for x in ['python3', 'bench/cache.py'] + argv)}`")
    w(f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; script tree {git_version()}; binary `{binary}`")
    w(f"- nproc: {os.cpu_count()}; load average at start: {args.load_at_start}; at end: "
      + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if any(r["replicas"] > 1 for r in runs):
        w(f"- redis-server: {redis_version()}")
    w("")
    w(f"Workload: {args.rate} calls/s open-loop (`{args.workers}` threads, persistent connections) of "
      f"`GET {READ_PATH}?itemId=N`, N drawn Zipf(s = {args.zipf:g}) over {args.ids} ids (seed "
      f"{args.seed}; the same draws in every run), {args.seconds} s with the provider up, then "
      f"{args.outage} s with every provider request answered "
      + ("503" if args.outage_mode == "503" else "by a dropped connection (RST)")
      + f". Provider answers ~{BODY_TARGET_BYTES} B envelopes at once. Cache runs: "
      f"`cache_ttl_ms = {args.ttl_ms}`, `cache_stale_ms = {args.stale_ms}`, `max_bytes = {args.max_bytes}`; "
      f"other keys at their defaults (retries, budget, circuit breaker). Each run starts new gateway(s).")
    w("")
    w("| | " + " | ".join(names) + " |")
    w("|---|" + "---:|" * len(names))

    def row(label, f):
        w(f"| {label} | " + " | ".join(f(r, a) for r, a in zip(runs, analyses)) + " |")

    row("gateways", lambda r, a: str(r["replicas"]))
    row("calls: answered before the switch / sent after it / in flight across it",
        lambda r, a: f"{a['load_n']} / {a['outage_n']} / {a['straddle_n']}")
    row("send lag behind schedule p50 / p99 / max (ms)",
        lambda r, a: f"{ms(a['lag_p50'])} / {ms(a['lag_p99'])} / {a['lag_max'] * 1000:.1f}")
    row("distinct ids asked during the load", lambda r, a: str(a["distinct_ids"]))
    row("**provider requests during the load** (load ids; probe apart)",
        lambda r, a: f"**{a['prov_load']}** (+{a['prov_load_probe']} probe)")
    row("**provider requests per minute** (quota spent)", lambda r, a: f"**{a['per_min']:.0f}**")
    row("quota saved vs no cache",
        lambda r, a: "–" if a is base else f"{(1 - a['prov_load'] / base['prov_load']) * 100:.1f} %"
        if base["prov_load"] else "n/a")
    row("busiest second at the provider (load ids)", lambda r, a: str(a["prov_max_s"]))
    row("distinct ids the provider was asked for", lambda r, a: str(a["prov_ids"]))
    row("**hit ratio** (hit + coalesced) / all, load phase",
        lambda r, a: f"**{a['hit_ratio'] * 100:.2f} %**" if r["cached"] else "–")
    row("answers by `x-pandagate-cache`, load phase", lambda r, a: hist(a["load_headers"]))
    row("load-phase answers not ok", lambda r, a: hist(a["load_errors"]))
    row("calls in flight across the switch: answers", lambda r, a: hist(a["straddle"]))
    row("ids with a good answer before the outage", lambda r, a: str(a["cached_before"]))
    row("answers by `x-pandagate-cache`, outage", lambda r, a: hist(a["out_headers"]))
    row("**outage: served ok / of them stale / errors**",
        lambda r, a: f"**{a['out_ok']} / {a['out_stale']} / {a['out_err']}**")
    row("outage, ids cached before: calls / ok by header",
        lambda r, a: f"{a['out_seen_n']} / {hist(a['out_seen_ok'])}")
    row("**outage, ids cached before: errors**",
        lambda r, a: f"**{sum(a['out_seen_err'].values())}**"
        + (f" ({hist(a['out_seen_err'])})" if a["out_seen_err"] else ""))
    row("outage, ids never fetched: calls / ok / errors",
        lambda r, a: f"{a['out_never_n']} / {sum(a['out_never_ok'].values())} / "
        f"{sum(a['out_never_err'].values())}" + (f" ({hist(a['out_never_err'])})" if a["out_never_err"] else ""))
    row("outage latency p50 / p99 (ms): ok answers",
        lambda r, a: f"{ms(quantile(a['out_lat_ok'], 0.5))} / {ms(quantile(a['out_lat_ok'], 0.99))}"
        if a["out_lat_ok"] else "–")
    row("outage latency p50 / p99 (ms): errors",
        lambda r, a: f"{ms(quantile(a['out_lat_err'], 0.5))} / {ms(quantile(a['out_lat_err'], 0.99))}"
        if a["out_lat_err"] else "–")
    row("provider requests during the outage (load ids; probe apart)",
        lambda r, a: f"{a['prov_outage']} (+{a['prov_outage_probe']} probe)")
    row("access logs: `cache` field", lambda r, a: hist(a["access_cache"]))
    row("access logs: status", lambda r, a: hist(a["access_status"]))
    row("gateway warnings/errors logged", lambda r, a: hist(a["warn"]))
    w("")
    w("`pandagate_cache_*` at the end of the load phase and at the end of the run (summed over "
      "the run's gateways; the warm-up's 5 calls per gateway are in them):")
    w("")
    for r, a in zip(runs, analyses):
        w(f"- {r['name']}: load end: {fmt_metrics(a['metrics_load'])}; run end: {fmt_metrics(a['metrics'])}")
    w("")
    w("Provider requests for the load's ids per 10-second bin from the start of the load "
      f"(the outage starts at {args.seconds} s):")
    w("")
    w("| from s | " + " | ".join(names) + " |")
    w("|---:|" + "---:|" * len(names))
    for b in range(len(base["bins"])):
        mark = " (outage)" if b * 10 >= args.seconds else ""
        w(f"| {b * 10}{mark} | " + " | ".join(str(a["bins"][b]) for a in analyses) + " |")
    w("")

    # Latency.
    w("## Latency, client-observed (ms, request written to answer read)")
    w("")
    w(f"Probe: one thread, one persistent connection to the (first) gateway, {args.probe_rate} calls/s "
      "during the load phase, in turn its own hot id, a new id, and a new id with `Cache-Control: "
      "no-store` (all outside the load's ids), split by the answer's `x-pandagate-cache`:")
    w("")
    w("| run | probe call | `x-pandagate-cache` | p50 | p99 | n |")
    w("|---|---|---|---:|---:|---:|")
    for r, a in zip(runs, analyses):
        for (kind, header), v in sorted(a["probe"].items()):
            w(f"| {r['name']} | {kind} | {header} | {lat_cell(v)} |")
        if a["probe_bad"]:
            w(f"| {r['name']} | failed | {hist(a['probe_bad'])} | | | |")
    w("")
    base_probe = sorted(v for vals in base["probe"].values() for v in vals)
    base_load = sorted(v for vals in base["load_lat"].values() for v in vals)
    w("Added latency of a hit and of a miss: against the no-cache run (probe: all its calls; load: all "
      "its answers), and, for the probe, against its `no-store` calls of the same run (made at the same "
      "time, so drift of the shared machine between runs is not in it):")
    w("")
    w("| run | cache result | source (n) | p50 | **Δ p50 vs no-cache run** | Δ p50 vs no-store, same run "
      "| p99 | Δ p99 vs no-cache run | Δ p99 vs no-store, same run |")
    w("|---|---|---|---:|---:|---:|---:|---:|---:|")
    suspicious = []

    def delta(vals, ref, q):
        if not vals or not ref:
            return "–"
        return f"{(quantile(vals, q) - quantile(ref, q)) * 1000:+.3f}"

    for r, a in cache_runs:
        same_run = a["probe"].get(("no-store", "none"), [])
        for header in ("hit", "miss", "coalesced"):
            probe_vals = sorted(v for (kind, h), vals in a["probe"].items()
                                if h == header and kind != "no-store" for v in vals)
            for source, vals, ref, ref2 in (("probe", probe_vals, base_probe, same_run),
                                            ("load", a["load_lat"].get(header, []), base_load, [])):
                if not vals or not ref:
                    continue
                w(f"| {r['name']} | {header} | {source} ({len(vals)}) | {ms(quantile(vals, 0.5))} | "
                  f"**{delta(vals, ref, 0.5)}** | {delta(vals, ref2, 0.5)} | {ms(quantile(vals, 0.99))} | "
                  f"{delta(vals, ref, 0.99)} | {delta(vals, ref2, 0.99)} |")
        for (kind, header), vals in a["probe"].items():
            if kind == "no-store" and header != "none":
                suspicious.append(f"{r['name']}: {len(vals)} probe calls with `Cache-Control: no-store` "
                                  f"were answered with `x-pandagate-cache: {header}`")
        for source, get in (("probe", lambda h: sorted(v for (k, hh), vals in a["probe"].items()
                                                        if hh == h and k != "no-store" for v in vals)),
                            ("load", lambda h: a["load_lat"].get(h, []))):
            hit, miss = get("hit"), get("miss")
            if hit and miss and quantile(hit, 0.5) > quantile(miss, 0.5):
                suspicious.append(f"{r['name']}: a hit is slower than a miss at p50 ({source}: "
                                  f"{ms(quantile(hit, 0.5))} vs {ms(quantile(miss, 0.5))} ms)")
    for r, a in cache_runs:
        bare = Counter(err_kind(x) if not is_ok(x) else "ok" for x in r["results"]
                       if x is not None and x["header"] == "none")
        if bare:
            suspicious.append(f"{r['name']}: {sum(bare.values())} answers on the cached route carried no "
                              f"`x-pandagate-cache` header although no call sent `Cache-Control: no-store` "
                              f"({hist(bare)})")
    w("")
    w(f"No-cache reference: probe p50 {ms(quantile(base_probe, 0.5))} / p99 {ms(quantile(base_probe, 0.99))} "
      f"({len(base_probe)} calls); load p50 {ms(quantile(base_load, 0.5))} / p99 "
      f"{ms(quantile(base_load, 0.99))} ({len(base_load)} calls).")
    w("")
    w("Load-phase timings of the open-loop load itself, good answers by `x-pandagate-cache` "
      f"({args.workers} client threads in one Python process with the fake provider: the client's "
      "own scheduling is in these figures):")
    w("")
    w("| run | `x-pandagate-cache` | p50 | p99 | n |")
    w("|---|---|---:|---:|---:|")
    for r, a in zip(runs, analyses):
        for header, v in sorted(a["load_lat"].items()):
            w(f"| {r['name']} | {header} | {lat_cell(v)} |")
    w("")

    # Redis.
    w(f"## Shared cache over Redis ({args.replicas} replicas)")
    w("")
    redis_runs = [(r, a) for r, a in zip(runs, analyses) if r["replicas"] > 1]
    if redis_runs:
        for r, a in redis_runs:
            w(f"- load spread round-robin over {r['replicas']} replicas; answers by replica: "
              + "; ".join(f"#{rep}: {hist(c)}" for rep, c in a["headers_by_replica"].items()))
            w(f"- hits (hit + coalesced) by replica: {hist(a['hits_by_replica'])}")
            w(f"- **hits served across replicas** (a hit on a replica that had not itself fetched that "
              f"id from the provider within the TTL): **{a['cross_hits']}** of "
              f"{sum(a['hits_by_replica'].values())} hits")
            w(f"- Redis keys after the run (DBSIZE; entries expire at TTL + stale window): "
              f"{r.get('dbsize', '?')}")
            w(f"- misses while another replica's good answer for that id was younger than the TTL "
              f"(arrived at least 10 ms before the send, so Redis should have held it): "
              f"**{a['avoidable']}** of {a['load_headers'].get('miss', 0)} misses; of these, on a replica that "
              f"had answered that id before (an expired copy in its memory is looked at before Redis): "
              f"{a['avoidable_seen']}")
    else:
        w(f"Not measured: {redis_note}")
    w("")

    if suspicious:
        w("## Suspicious")
        w("")
        for s in suspicious:
            w(f"- {s}")
        w("")
    w("## Checks")
    w("")
    w("- with the cache the provider gets fewer requests during the load than without: "
      + ", ".join(f"{r['name']} {a['prov_load']} vs {base['prov_load']}" for r, a in cache_runs))
    if args.stale_ms > 0:
        w("- during the outage no id with a good answer before it gets an error: "
          + ", ".join(f"{r['name']} {sum(a['out_seen_err'].values())} errors" for r, a in cache_runs))
    else:
        w("- outage check skipped: `--stale-ms 0`")
    w("- no answer carries another id's data: "
      + ", ".join(f"{r['name']} {len(a['wrong_id'])}" for r, a in zip(runs, analyses)))
    for f in failures:
        w(f"- FAILED: {f}")
    for i in invalid:
        w(f"- INVALID: {i}")
    w("")
    w(f"**Result: {verdict}**")
    return "\n".join(out), verdict, suspicious


# --------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    binary_option(p)
    p.add_argument("--ids", type=int, default=10000, help="distinct product ids (default 10000)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s (default 1.1)")
    p.add_argument("--rate", type=float, default=200.0, help="calls per second (default 200)")
    p.add_argument("--seconds", type=int, default=60, help="load phase, provider up (default 60)")
    p.add_argument("--outage", type=int, default=20, help="outage phase, same rate (default 20)")
    p.add_argument("--outage-mode", choices=("503", "close"), default="503",
                   help="provider's answer in the outage: 503, or close (RST after reading)")
    p.add_argument("--ttl-ms", type=int, default=30000, help="cache_ttl_ms (default 30000)")
    p.add_argument("--stale-ms", type=int, default=300000, help="cache_stale_ms (default 300000)")
    p.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="[cache] max_bytes (default 64 MiB)")
    p.add_argument("--workers", type=int, default=32, help="load threads (default 32)")
    p.add_argument("--probe-rate", type=float, default=15.0,
                   help="sequential probe calls per second during the load, 0 for none (default 15)")
    p.add_argument("--seed", type=int, default=1, help="Zipf draw seed (default 1)")
    p.add_argument("--redis", choices=("auto", "on", "off"), default="auto",
                   help="the shared-cache run: auto (when the binary accepts [cache] backend = \"redis\"), "
                        "on (a refusal is INVALID), off")
    p.add_argument("--replicas", type=int, default=2, help="replicas in the Redis run (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if min(args.ids, args.workers, args.replicas, args.seconds) < 1 or args.rate <= 0 or args.outage < 0:
        p.error("--ids, --workers, --replicas, --seconds must be >= 1, --rate > 0, --outage >= 0")
    if args.ttl_ms < 1 or args.stale_ms < 0 or args.probe_rate < 0:
        p.error("--ttl-ms must be >= 1, --stale-ms and --probe-rate >= 0")
    binary = prebuilt_binary(args.binary, "cache")

    started = datetime.now(timezone.utc)
    args.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    total = int(args.rate * (args.seconds + args.outage))
    ids = zipf_draws(args.ids, args.zipf, total, args.seed)
    log(f"{total} calls drawn: {len(set(ids[:int(args.rate * args.seconds)]))} distinct ids in the load phase")
    work = Path(tempfile.mkdtemp(prefix="pandagate-cache-"))
    provider = provider_thread = None
    redis_proc = None
    runs = []
    redis_note = "`--redis off`"
    try:
        provider = Provider(args.seed, args.outage_mode)
        provider_thread = serve_in_thread(provider, 0.1)
        log(f"fake provider on 127.0.0.1:{provider.server_address[1]}")
        for name, cached in (("no cache", False), ("cache", True)):
            run = one_run(name, args, binary, work, provider, ids, cached)
            if "refused" in run:
                raise RuntimeError(f"run '{name}': gateway refused to start: {run['refused']}")
            runs.append(run)
        if args.redis != "off":
            ensure_redis(log)
            redis_proc, redis_port = start_redis(work)
            log(f"redis-server on 127.0.0.1:{redis_port}, pid {redis_proc.pid}")
            run = one_run("cache, redis", args, binary, work, provider, ids, True,
                          redis_port=redis_port, replicas=args.replicas)
            if "refused" in run:
                first = run["refused"].strip().splitlines()
                redis_note = ("this binary refuses `[cache] backend = \"redis\"` (a build without the "
                              "shared cache); it said: `" + (" ".join(first[1:3]) or first[0])[:300] + "`")
                log("redis run not measured:", redis_note)
                if args.redis == "on":
                    raise RuntimeError(f"--redis on: {run['refused']}")
            else:
                try:
                    run["dbsize"] = int(resp_command(redis_port, "DBSIZE").strip().lstrip(b":"))
                except (OSError, ValueError):
                    run["dbsize"] = None
                runs.append(run)
        analyses = [analyse(r, args) for r in runs]
        text, verdict, _ = report(args, argv, started, binary, runs, analyses, redis_note)
        print(text, flush=True)
        return {"PASS": 0, "FAIL": 1}.get(verdict, 2)
    finally:
        stop_server(provider, provider_thread)
        if redis_proc is not None:
            stop(redis_proc, grace=10)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
