#!/usr/bin/env python3
"""Idempotency keys: each order create reaches the provider once, and what a key costs.

Part 1, exactly once across two replicas: the script starts a redis-server
(free port, no persistence), a fake provider and two pandagate replicas
sharing that Redis (`[idempotency] store = "redis"`). The provider counts
the `POST /alibaba/order/create` requests it receives per business
operation (`outOrderId` in the JSON body: the gateway strips the
Idempotency-Key header before forwarding). Per request, a seeded draw (from
the seed, the op id and the receipt number) decides: 10 % are read in full
and then the connection is dropped without an answer, 20 % are answered 200
after `--slow-delay` (1.5 s, longer than the callers' timeout), the rest are
answered 200 at once with `{"requestId":..,"code":200,"msg":"success",
"data":{"orderId":..}}`.

C caller threads (`--concurrency`, 50) make N order creates (`--ops`, 1000),
each with `Idempotency-Key: <op id>` and the same body on every send. An op
is sent at most `--sends` times (3), alternating between the replicas: a
send that times out (`--caller-timeout`, 1.0 s), fails on the connection,
or is answered 409 `idempotency_in_progress` (after waiting its
Retry-After, at most 5 s) is followed by another send. Each op's final
answer is recorded by kind (`200 new`, `200 replayed` — header
`idempotent-replayed: true` —, `409 in_progress`, `502`, `502 replayed`,
`504`, `timeout`, ...). After the load the script waits `--settle` (3 s)
for the gateways to finish, then (unless `--no-probe`) sends every op once
more, same key and body, to the replica that did not give its final
answer: the replay probe. It reports how many ops reached the provider and
how often (counted after the probe), the answers, the sends, the probe's
answers and the replicas' access logs (`idempotency` field) and
`pandagate_idempotency_*` metrics. Checks: every op id that reached the
provider reached it exactly once; every 200 a caller got carries the
orderId the provider gave that op; each probe answer is a replay
(`idempotent-replayed: true`) of the op's final answer, same status and
same body bytes (ops whose caller ended on a timeout or a 409 excepted).
For an op received twice, the report lists what the provider saw and each
replica's access-log line for each send (by `x-request-id`, `<op>.s<n>`).

Part 2, added latency of a keyed call: one gateway at a time, a provider
that answers at once, no faults; `--latency-calls` (2000) POSTs without a
key and as many with a fresh key each, after a warm-up, interleaved in
blocks of 100, on persistent `http.client` connections (`--latency-threads`
threads, default 1: sequential), for `store = "local"` (a temp dir) and
`store = "redis"`; p50/p99 of each and keyed − unkeyed.

    python3 bench/idempotency.py [--binary target/release/pandagate] [--ops 1000]
        [--concurrency 50] [--sends 3] [--caller-timeout 1.0] [--seed N]
        [--latency-calls 2000] [--latency-threads 1] [--slow-delay 1.5] [--settle 3]
        [--no-probe] [--keep]

Python 3.11 standard library only. Talks only to 127.0.0.1; every server it
starts is on a free port and is stopped by its own pid. Installs
redis-server (Debian package) when missing. Prints a Markdown summary on
stdout (progress on stderr). Exit 1 when a check fails, 2 when the run is
INVALID (a gateway died, ops not sent in --max-seconds).
"""

import argparse
import hashlib
import http.client
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import binary_option, git_version, hist, leave_work, logger, ms, pct, prebuilt_binary  # noqa: E402
from benchlib import Gateway, LoopbackServer, QuietHandler, quantile, run_pool, scrape_metrics, stop  # noqa: E402
from benchlib import ensure_redis, redis_version, resp_command, serve_in_thread, start_redis, stop_server  # noqa: E402

WRITE_PATH = "/alibaba/order/create"
RESET_SHARE = 0.10
SLOW_SHARE = 0.20
MAX_RETRY_AFTER_S = 5.0
LATENCY_BLOCK = 100


log = logger("idempotency:")


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    """Records every order create: op id -> [(monotonic time, outcome,
    x-request-id, orderId answered)]. The outcome of receipt n of op X is a
    draw from Random(f"{seed}:{X}:{n}"), so a run is reproducible per op
    whatever the arrival order."""

    def __init__(self, seed, reset_share, slow_share, slow_s):
        super().__init__(ProviderHandler, seed)
        self.seed = seed
        self.reset_share = reset_share
        self.slow_share = slow_share
        self.slow_s = slow_s
        self.receipts = defaultdict(list)
        self.unparseable = 0
        self.other_paths = Counter()
        self.with_key_header = 0  # creates that arrived still carrying Idempotency-Key

    def draw(self, op, x_request_id):
        with self.lock:
            n = len(self.receipts[op])
            r = random.Random(f"{self.seed}:{op}:{n}").random()
            if r < self.reset_share:
                outcome = "reset"
            elif r < self.reset_share + self.slow_share:
                outcome = "slow"
            else:
                outcome = "ok"
            order_id = f"PO-{op}-r{n}"
            self.receipts[op].append((time.monotonic(), outcome, x_request_id, order_id))
            return outcome, order_id

    def snapshot(self):
        with self.lock:
            return {op: list(v) for op, v in self.receipts.items()}


class ProviderHandler(QuietHandler):
    # Headers and body go out in two writes: without TCP_NODELAY the body
    # waits for the gateway's delayed ACK (~40 ms) (see bench/quota.py).
    disable_nagle_algorithm = True

    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path != WRITE_PATH:
            with self.server.lock:
                self.server.other_paths[path] += 1
            self.answer_json(404, b'{"code":404,"msg":"not found","data":null}')
            return
        try:
            op = json.loads(body)["outOrderId"]
        except (ValueError, KeyError, TypeError):
            with self.server.lock:
                self.server.unparseable += 1
            self.answer_json(400, b'{"code":400,"msg":"bad body","data":null}')
            return
        if self.headers.get("Idempotency-Key") is not None:
            with self.server.lock:
                self.server.with_key_header += 1
        outcome, order_id = self.server.draw(op, self.headers.get("x-request-id"))
        if outcome == "reset":
            self.reset()
            return
        if outcome == "slow":
            time.sleep(self.server.slow_s)
        payload = json.dumps({"requestId": uuid.uuid4().hex, "code": 200, "msg": "success",
                              "data": {"orderId": order_id}}).encode()
        self.answer_json(200, payload)


def start_provider(seed, reset_share, slow_share, slow_s):
    provider = Provider(seed, reset_share, slow_share, slow_s)
    return provider, serve_in_thread(provider, 0.1)


# --------------------------------------------------------------------------
# Gateways
# --------------------------------------------------------------------------

def gateway_toml(store, request_timeout_ms, redis_port=None, path=None):
    lines = ["[upstream]",
             f"request_timeout_ms = {request_timeout_ms}",
             "",
             "[retry]",
             f"deadline_ms = {request_timeout_ms + 1000}",
             "",
             "[idempotency]",
             f'store = "{store}"']
    if store == "redis":
        lines.append(f'redis_url = "redis://127.0.0.1:{redis_port}"')
    else:
        lines.append(f'path = "{path}"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Callers (part 1)
# --------------------------------------------------------------------------

def op_body(op, i):
    return json.dumps({"outOrderId": op, "offerId": 620201234567 + i, "quantity": 1,
                       "address": {"fullName": "Bench", "mobile": "13800000000"}})


def send_once(conn, op, send_no, body):
    """One send; returns (status, replayed, error kind, retry_after,
    (orderId, SHA-256 of the body), close)."""
    conn.request("POST", WRITE_PATH, body=body, headers={
        "Content-Type": "application/json",
        "Idempotency-Key": op,
        "x-request-id": f"{op}.s{send_no}" if isinstance(send_no, int) else f"{op}.{send_no}",
    })
    resp = conn.getresponse()
    data = resp.read()
    replayed = (resp.getheader("idempotent-replayed") or "").strip().lower() == "true"
    retry_after = resp.getheader("Retry-After")
    error = order_id = None
    try:
        payload = json.loads(data)
        if isinstance(payload, dict):
            error = payload.get("error")
            if isinstance(payload.get("data"), dict):
                order_id = payload["data"].get("orderId")
    except ValueError:
        error = "<not json>"
    return resp.status, replayed, error, retry_after, (order_id, hashlib.sha256(data).hexdigest()), resp.will_close


def kind_of(send):
    status, replayed, error = send["status"], send["replayed"], send["error"]
    if status is None:
        return "timeout" if send["exc"] in ("TimeoutError", "timeout") else f"error {send['exc']}"
    if status == 200:
        return "200 replayed" if replayed else "200 new"
    if status == 409 and error == "idempotency_in_progress":
        return "409 in_progress"
    if status in (502, 504):
        return f"{status} replayed" if replayed else str(status)
    return f"{status}{' replayed' if replayed else ''} {error or '-'}"


def run_ops(ports, ops, args):
    """Sends every op (at most args.sends times each) from args.concurrency
    threads, each with one keep-alive connection per replica, until done or
    args.max_seconds passed. Returns per op the list of its sends (None for
    ops never started)."""
    results = [None] * len(ops)
    next_index = iter(range(len(ops)))
    index_lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def worker():
        conns = [None] * len(ports)
        try:
            while time.monotonic() < deadline:
                with index_lock:
                    i = next(next_index, None)
                if i is None:
                    break
                op = ops[i]
                body = op_body(op, i)
                sends = []
                for k in range(args.sends):
                    replica = (i + k) % len(ports)
                    if conns[replica] is None:
                        conns[replica] = http.client.HTTPConnection(
                            "127.0.0.1", ports[replica], timeout=args.caller_timeout)
                    started = time.monotonic()
                    send = {"replica": replica, "t": started, "status": None, "replayed": False,
                            "error": None, "exc": None, "order_id": None, "body_sha": None}
                    close = False
                    try:
                        (send["status"], send["replayed"], send["error"], retry_after,
                         (send["order_id"], send["body_sha"]), close) = send_once(conns[replica], op, k + 1, body)
                    except (OSError, http.client.HTTPException) as e:
                        send["exc"] = type(e).__name__
                        retry_after, close = None, True
                    send["seconds"] = time.monotonic() - started
                    send["retry_after"] = retry_after
                    sends.append(send)
                    if close:
                        conns[replica].close()
                        conns[replica] = None
                    if send["status"] is None:
                        continue  # outcome unknown to the caller: send again
                    if send["status"] == 409 and send["error"] == "idempotency_in_progress":
                        if k + 1 < args.sends:
                            try:
                                wait = float(retry_after) if retry_after is not None else 1.0
                            except ValueError:
                                wait = 1.0
                            time.sleep(min(MAX_RETRY_AFTER_S, max(0.0, wait)))
                        continue
                    break
                results[i] = sends
        finally:
            for c in conns:
                if c is not None:
                    c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    per_op_bound = args.sends * (args.caller_timeout + MAX_RETRY_AFTER_S) + 5
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + per_op_bound)
    return results, sum(t.is_alive() for t in threads)


def probe_ops(ports, ops, results, args):
    """After the settle: each op that got an answer is sent once more, with
    the same key and body, to the replica that did not give its final
    answer. Returns {op: send dict}."""
    by_replica = defaultdict(list)
    for i, (op, sends) in enumerate(zip(ops, results)):
        if sends:
            by_replica[1 - sends[-1]["replica"] % 2].append((i, op))

    def send(conn, item):
        i, op = item
        body = op_body(op, i)
        started = time.monotonic()
        status, replayed, error, _, (order_id, body_sha), close = send_once(conn, op, "probe", body)
        return (op, {"t": started, "status": status, "replayed": replayed, "error": error, "exc": None,
                     "order_id": order_id, "body_sha": body_sha,
                     "seconds": time.monotonic() - started}), close

    def failed(item, seconds, error):
        return (item[1], {"t": time.monotonic() - seconds, "status": None, "replayed": False,
                          "error": None, "exc": error,
                          "order_id": None, "body_sha": None, "seconds": seconds})

    out = {}
    for replica, items in by_replica.items():
        for res in run_pool(ports[replica], items, args.concurrency, args.max_seconds,
                            args.caller_timeout, send, failed):
            if res is not None:
                res[1]["replica"] = replica
                out[res[0]] = res[1]
    return out


def exactly_once_part(args, binary, work, redis_port, run_id):
    provider, provider_thread = start_provider(args.seed, RESET_SHARE, SLOW_SHARE, args.slow_delay)
    gateways = []
    try:
        toml = gateway_toml("redis", args.request_timeout_ms, redis_port=redis_port)
        for i in range(2):
            gateways.append(Gateway(f"replica{i}", binary, work, toml,
                                    PANDAGATE_UPSTREAM=f"http://127.0.0.1:{provider.server_address[1]}"))
        log("replicas on ports", [g.port for g in gateways], "provider on", provider.server_address[1])
        ops = [f"op-{args.seed}-{i:06d}" for i in range(args.ops)]  # same seed, same draws
        log(f"sending {args.ops} ops, concurrency {args.concurrency}, at most {args.sends} sends each")
        t0 = time.monotonic()
        results, hung = run_ops([g.port for g in gateways], ops, args)
        load_s = time.monotonic() - t0
        t_end = time.monotonic()
        log(f"load done in {load_s:.1f} s; settling {args.settle:g} s")
        time.sleep(args.settle)
        late = sum(1 for rs in provider.snapshot().values() for r in rs if r[0] > t_end)
        probes = {}
        if not args.no_probe:
            log("replay probe: every op once more, to the other replica")
            probes = probe_ops([g.port for g in gateways], ops, results, args)
            time.sleep(0.5)
        receipts = provider.snapshot()
        probe_receipts = sum(1 for rs in receipts.values() for r in rs if str(r[2]).endswith(".probe"))
        dbsize = None
        try:
            reply = resp_command(redis_port, "DBSIZE")
            dbsize = int(reply.strip().lstrip(b":"))
        except (OSError, ValueError):
            pass
        died = [g.name for g in gateways if not g.alive()]
        for g in gateways:
            g.metrics = scrape_metrics(g.admin_port, "pandagate_idempotency", numbers=False)
    finally:
        for g in gateways:
            g.stop()
        stop_server(provider, provider_thread)
    return {
        "ops": ops, "results": results, "hung": hung, "probes": probes, "t0": t0,
        "probe_receipts": probe_receipts, "load_s": load_s, "receipts": receipts,
        "late": late, "dbsize": dbsize, "died": died, "gateways": gateways,
        "fake_errors": dict(provider.fake_errors), "unparseable": provider.unparseable,
        "other_paths": dict(provider.other_paths), "with_key_header": provider.with_key_header,
    }


def analyse_exactly_once(args, r):
    ops, results, receipts = r["ops"], r["results"], r["receipts"]
    finals = Counter()
    all_kinds = Counter()
    sends_total = 0
    sends_per_op = Counter()
    never_started = 0
    wrong_order_id = []   # (op, kind, orderId got, provider's orderIds)
    for op, sends in zip(ops, results):
        if not sends:
            never_started += 1
            continue
        sends_total += len(sends)
        sends_per_op[len(sends)] += 1
        for s in sends:
            all_kinds[kind_of(s)] += 1
        final = sends[-1]
        finals[kind_of(final)] += 1
        for s in sends:
            if s["status"] == 200:
                given = [x[3] for x in receipts.get(op, []) if x[1] != "reset"]
                if s["order_id"] not in given:
                    wrong_order_id.append((op, kind_of(s), s["order_id"], given))
    retry_after_409 = Counter(s["retry_after"] for sends in results if sends for s in sends
                              if s["status"] == 409)
    per_op = Counter(len(v) for v in receipts.values())
    reached = len(receipts)
    dupes = sorted(op for op, v in receipts.items() if len(v) > 1)
    foreign = sorted(set(receipts) - set(ops))
    outcomes = Counter(x[1] for v in receipts.values() for x in v)
    first_outcome = Counter(v[0][1] for v in receipts.values())
    final_by_first = defaultdict(Counter)
    for op, sends in zip(ops, results):
        if sends and op in receipts:
            final_by_first[receipts[op][0][1]][kind_of(sends[-1])] += 1
    probe_kinds = Counter()
    probe_by_final = defaultdict(Counter)
    probe_differs = []  # (op, final kind, probe kind, final orderId, probe orderId)
    for op, sends in zip(ops, results):
        pr = r["probes"].get(op)
        if not sends or pr is None:
            continue
        final = sends[-1]
        fk, pk = kind_of(final), kind_of(pr)
        probe_kinds[pk] += 1
        probe_by_final[fk][pk] += 1
        if final["status"] is None or final["status"] == 409:
            continue  # the caller never learned the answer: nothing to compare with
        if not pr["replayed"] or pr["status"] != final["status"] or pr["body_sha"] != final["body_sha"]:
            probe_differs.append((op, fk, pk, final["order_id"], pr["order_id"]))
    return {
        "retry_after_409": retry_after_409, "probe_kinds": probe_kinds, "probe_by_final": probe_by_final, "probe_differs": probe_differs,
        "finals": finals, "all_kinds": all_kinds, "sends_total": sends_total,
        "sends_per_op": sends_per_op, "never_started": never_started,
        "wrong_order_id": wrong_order_id, "per_op": per_op, "reached": reached,
        "dupes": dupes, "foreign": foreign, "outcomes": outcomes, "first_outcome": first_outcome,
        "final_by_first": final_by_first,
        "not_reached": sorted(op for op, s in zip(ops, results) if s and op not in receipts),
    }


def dupe_details(r, a, limit=10):
    """Markdown lines: for each op received more than once, what the
    provider saw and what each replica logged for that op's sends."""
    out = []
    logs = {g.name: g.access_log() for g in r["gateways"]}
    by_rid = defaultdict(list)
    for name, lines in logs.items():
        for e in lines:
            by_rid[str(e.get("x_request_id"))].append((name, e))
    t0 = r["t0"]
    results = dict(zip(r["ops"], r["results"]))
    for op in a["dupes"][:limit]:
        out.append(f"- `{op}`:")
        for t, outcome, rid, order_id in r["receipts"][op]:
            out.append(f"  - provider received at +{t - t0:.3f} s, x-request-id `{rid}`, "
                       f"drew `{outcome}`")
        sends = list(results.get(op) or [])
        if op in r["probes"]:
            sends.append(r["probes"][op])
        for k, s in enumerate(sends):
            rid = f"{op}.s{k + 1}" if k < len(results.get(op) or []) else f"{op}.probe"
            logged = "; ".join(
                f"{name}: status {e.get('status')}, idempotency `{json.dumps(e.get('idempotency'))}`, "
                f"error {e.get('error')}, upstream_status {e.get('upstream_status')}, "
                f"latency_ms {e.get('latency_ms')}"
                for name, e in by_rid.get(rid, [])) or "no access log line"
            out.append(f"  - send `{rid}` to replica{s['replica']} at +{s['t'] - t0:.3f} s: caller got "
                       f"`{kind_of(s)}` after {s['seconds']:.3f} s; {logged}")
    if len(a["dupes"]) > limit:
        out.append(f"- ... and {len(a['dupes']) - limit} more: "
                   + ", ".join(f"`{op}`" for op in a["dupes"][limit:limit + 40]))
    return out


# --------------------------------------------------------------------------
# Added latency (part 2)
# --------------------------------------------------------------------------

def timed_call(conn, op, keyed):
    body = json.dumps({"outOrderId": op, "offerId": 620201234567, "quantity": 1})
    headers = {"Content-Type": "application/json"}
    if keyed:
        headers["Idempotency-Key"] = op
    t0 = time.perf_counter()
    conn.request("POST", WRITE_PATH, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    seconds = time.perf_counter() - t0
    replayed = (resp.getheader("idempotent-replayed") or "").strip().lower() == "true"
    return resp.status, replayed, seconds, resp.will_close


def measure_latency(port, run_id, store, calls, warmup, threads, max_seconds):
    """Interleaved blocks (unkeyed, keyed, keyed, unkeyed, ...) on one
    persistent connection per thread. Returns {mode: [seconds]} and
    {mode: Counter of failures}."""
    lat = {"unkeyed": [], "keyed": []}
    bad = {"unkeyed": Counter(), "keyed": Counter()}
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    per_thread = -(-calls // threads)

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = {"unkeyed": [], "keyed": []}
        mine_bad = {"unkeyed": Counter(), "keyed": Counter()}
        try:
            def call(mode, n, record):
                nonlocal conn
                op = f"lat-{run_id}-{store}-{mode}-w{w}-{n}-{'r' if record else 'w'}"
                try:
                    status, replayed, seconds, close = timed_call(conn, op, mode == "keyed")
                except (OSError, http.client.HTTPException) as e:
                    mine_bad[mode][type(e).__name__] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    return
                if close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                if not record:
                    return
                if status == 200 and not replayed:
                    mine[mode].append(seconds)
                else:
                    mine_bad[mode][f"{status}{' replayed' if replayed else ''}"] += 1

            for n in range(warmup // threads):
                if time.monotonic() > deadline:
                    return
                call("unkeyed" if n % 2 else "keyed", n, False)
            done = {"unkeyed": 0, "keyed": 0}
            block = 0
            while (done["unkeyed"] < per_thread or done["keyed"] < per_thread) and time.monotonic() < deadline:
                order = ("unkeyed", "keyed") if block % 2 == 0 else ("keyed", "unkeyed")
                for mode in order:
                    for _ in range(min(LATENCY_BLOCK, per_thread - done[mode])):
                        call(mode, done[mode], True)
                        done[mode] += 1
                block += 1
        finally:
            conn.close()
            with lock:
                for mode in lat:
                    lat[mode].extend(mine[mode])
                    bad[mode].update(mine_bad[mode])

    ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 15)
    return lat, bad


def latency_part(args, binary, work, redis_port, run_id):
    provider, provider_thread = start_provider(args.seed, 0.0, 0.0, 0.0)
    out = {}
    try:
        for store in ("local", "redis"):
            store_dir = work / f"latency-{store}-store"
            store_dir.mkdir()
            toml = gateway_toml(store, args.request_timeout_ms, redis_port=redis_port, path=store_dir)
            g = Gateway(f"latency-{store}", binary, work, toml,
                        PANDAGATE_UPSTREAM=f"http://127.0.0.1:{provider.server_address[1]}")
            try:
                log(f"latency, store = {store}: {args.latency_calls} calls per mode, "
                    f"{args.latency_threads} thread(s)")
                lat, bad = measure_latency(g.port, run_id, store, args.latency_calls,
                                           args.latency_warmup, args.latency_threads, args.max_seconds)
                out[store] = {"lat": lat, "bad": bad, "died": not g.alive()}
            finally:
                g.stop()
            out[store]["idem"] = Counter(json.dumps(e.get("idempotency")) for e in g.access_log())
    finally:
        stop_server(provider, provider_thread)
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def report(args, argv, started, binary, r, a, lat):
    out = []
    w = out.append
    ok_once = not a["dupes"]
    ok_ids = not a["wrong_order_id"]
    ok_probe = not a["probe_differs"]
    invalid = []
    if r["died"]:
        invalid.append(f"gateway(s) died: {', '.join(r['died'])}")
    if a["never_started"]:
        invalid.append(f"{a['never_started']} ops never sent (--max-seconds)")
    if r["hung"]:
        invalid.append(f"{r['hung']} caller threads did not finish")
    verdict = "INVALID" if invalid else ("PASS" if ok_once and ok_ids and ok_probe else "FAIL")

    w("# pandagate idempotency keys: exactly once across replicas, and the cost of a key")
    w("")
    w(f"- command: `{' '.join(shlex.quote(x) for x in ['python3', 'bench/idempotency.py'] + argv)}`")
    w(f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; script tree {git_version()}; binary `{binary}`")
    w(f"- nproc: {os.cpu_count()}; load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    w(f"- redis-server: {redis_version()}")
    w("")
    w(f"## Part 1: {args.ops} order creates, 2 replicas sharing Redis (`store = \"redis\"`)")
    w("")
    w(f"Provider: per request, {RESET_SHARE:.0%} read then dropped without an answer (RST), "
      f"{SLOW_SHARE:.0%} answered 200 after {args.slow_delay:g} s, the rest 200 at once (seed {args.seed}). "
      f"Gateways: `upstream.request_timeout_ms = {args.request_timeout_ms}`, "
      f"`retry.deadline_ms = {args.request_timeout_ms + 1000}`, other keys at their defaults. "
      f"Callers: concurrency {args.concurrency}, caller timeout {args.caller_timeout:g} s, "
      f"at most {args.sends} sends per op alternating replicas; a timeout, a connection error or a "
      f"409 `idempotency_in_progress` (after its Retry-After) leads to the next send. "
      f"Load took {r['load_s']:.1f} s; then {args.settle:g} s of settling"
      + ("." if args.no_probe else ", then the replay probe (every op sent once more, same key and body, "
         "to the replica that did not give its final answer); the provider's counts are taken after it."))
    w("")
    per_op = a["per_op"]
    w("| | |")
    w("|---|---|")
    w(f"| ops sent / reached the provider at least once | {args.ops - a['never_started']} / "
      f"**{a['reached']}** ({pct(a['reached'], args.ops)}) |")
    w(f"| ops by creates received at the provider (1 / 2 / 3 / more) | **{per_op.get(1, 0)} / "
      f"{per_op.get(2, 0)} / {per_op.get(3, 0)} / {sum(v for k, v in per_op.items() if k > 3)}** |")
    w(f"| creates received in all | {sum(k * v for k, v in per_op.items())} "
      f"(first receipt drew: {hist(a['first_outcome'])}; all receipts: {hist(a['outcomes'])}) |")
    w(f"| ops sent but never received by the provider | {len(a['not_reached'])}"
      + (f" (e.g. {', '.join(a['not_reached'][:3])})" if a["not_reached"] else "") + " |")
    w(f"| receipts after the callers had finished (during the settle) / caused by the probe | "
      f"{r['late']} / {r['probe_receipts'] if not args.no_probe else 'n/a'} |")
    w(f"| callers' final answers | {hist(a['finals'])} |")
    w(f"| every send's answer | {hist(a['all_kinds'])} |")
    w(f"| Retry-After of the 409s | {hist(a['retry_after_409'])} |")
    w(f"| sends in all / per op | **{a['sends_total']}** / {hist(a['sends_per_op'])} (ops by sends; "
      f"probe not included) |")
    if not args.no_probe:
        w(f"| replay probe answers | {hist(a['probe_kinds'])} |")
        w(f"| probe answers not a replay of the op's final answer (status and body bytes) | "
          f"**{len(a['probe_differs'])}**"
          + (f" (e.g. {a['probe_differs'][:3]})" if a["probe_differs"] else "") + " |")
    w(f"| 200s whose orderId is not one the provider answered for that op | **{len(a['wrong_order_id'])}**"
      + (f" (e.g. {a['wrong_order_id'][:3]})" if a["wrong_order_id"] else "") + " |")
    w(f"| creates that reached the provider with an Idempotency-Key header (should be stripped) | "
      f"{r['with_key_header']} |")
    w(f"| Redis keys after the run (DBSIZE) | {r['dbsize'] if r['dbsize'] is not None else '?'} |")
    if r["fake_errors"] or r["unparseable"] or r["other_paths"] or a["foreign"]:
        w(f"| provider oddities | errors {r['fake_errors']}, unparseable bodies {r['unparseable']}, "
          f"other paths {r['other_paths']}, unknown op ids {len(a['foreign'])} |")
    w("")
    w("Final answer by what the provider drew on the op's first receipt:")
    w("")
    w("| first receipt | ops | final answers |")
    w("|---|---:|---|")
    for outcome in ("ok", "slow", "reset"):
        c = a["final_by_first"].get(outcome, Counter())
        w(f"| {outcome} | {sum(c.values())} | {hist(c)} |")
    w("")
    w("Replicas' access logs (`idempotency` field, status):")
    w("")
    for g in r["gateways"]:
        lines = g.access_log()
        diag = g.log_events("gateway.err")
        levels = Counter(str(e.get("level", "?")).upper() for e in diag)
        warn = Counter(e.get("message") for e in diag if str(e.get("level", "")).upper() in ("WARN", "ERROR"))
        w(f"- {g.name}: {len(lines)} lines; idempotency "
          f"{hist(Counter(json.dumps(e.get('idempotency')) for e in lines))}; status "
          f"{hist(Counter(e.get('status') for e in lines))}; error "
          f"{hist(Counter(e.get('error') for e in lines if e.get('error')))}; diagnostics by level "
          f"{hist(levels)}" + (f"; warnings/errors: {hist(warn)}" if warn else ""))
        if g.metrics:
            w(f"  - /metrics: " + ", ".join(f"`{k}` {v}" for k, v in g.metrics.items()))
    if a["dupes"]:
        w("")
        w(f"**Ops received more than once: {len(a['dupes'])}**")
        w("")
        out.extend(dupe_details(r, a))
    if a["finals"].get("409 in_progress"):
        w("")
        w(f"Note: {a['finals']['409 in_progress']} ops were still `409 in_progress` after "
          f"{args.sends} sends.")
    w("")
    w(f"**Part 1: {verdict}** (every op id that reached the provider reached it exactly once"
      f"{'' if ok_once else ' — NOT SO'}; every 200 carries the provider's orderId for its op"
      f"{'' if ok_ids else ' — NOT SO'}"
      + ("" if args.no_probe else f"; a later send of the op replays its final answer{'' if ok_probe else ' — NOT SO'}")
      + ")" + (f". INVALID: {'; '.join(invalid)}" if invalid else ""))
    w("")
    w(f"## Part 2: added latency of a keyed call (one gateway, provider answers at once, no faults)")
    w("")
    w(f"{args.latency_calls} calls without a key and {args.latency_calls} with a fresh "
      f"`Idempotency-Key` each, `POST {WRITE_PATH}`, after {args.latency_warmup} warm-up calls, "
      f"interleaved in blocks of {LATENCY_BLOCK}, {args.latency_threads} thread(s) with one persistent "
      f"connection each; client-observed milliseconds (request written to response read). "
      f"The local store is a temp dir on {fs_type(tempfile.gettempdir())} "
      f"(`{tempfile.gettempdir()}`); Redis is the same redis-server on loopback.")
    w("")
    w("| store | unkeyed p50 | unkeyed p99 | keyed p50 | keyed p99 | **Δ p50** | **Δ p99** | calls unkeyed/keyed | failures |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for store, res in lat.items():
        u, k = res["lat"]["unkeyed"], res["lat"]["keyed"]
        fails = {m: dict(c) for m, c in res["bad"].items() if c}
        w(f"| {store} | {ms(quantile(u, 0.5))} | {ms(quantile(u, 0.99))} | {ms(quantile(k, 0.5))} | "
          f"{ms(quantile(k, 0.99))} | **{(quantile(k, 0.5) - quantile(u, 0.5)) * 1000:+.3f}** | "
          f"**{(quantile(k, 0.99) - quantile(u, 0.99)) * 1000:+.3f}** | {len(u)}/{len(k)} | "
          f"{fails or 'none'}{'; gateway died' if res['died'] else ''} |")
    w("")
    for store, res in lat.items():
        w(f"- {store}: access log `idempotency` field {hist(res['idem'])}")
    if any(c for res in lat.values() for c in res["bad"].values()):
        w("")
        w("WARNING: some latency calls failed or were replayed; their figures may be meaningless.")
    w("")
    w(f"**Result: {verdict}**")
    return "\n".join(out), verdict


def fs_type(path):
    """Filesystem type of the mount holding `path` (from /proc/self/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    binary_option(p)
    p.add_argument("--ops", type=int, default=1000, help="order creates (default 1000)")
    p.add_argument("--concurrency", type=int, default=50, help="caller threads (default 50)")
    p.add_argument("--sends", type=int, default=3, help="most sends per op (default 3)")
    p.add_argument("--caller-timeout", type=float, default=1.0, help="seconds (default 1.0)")
    p.add_argument("--slow-delay", type=float, default=1.5,
                   help="seconds the provider holds a slow answer (default 1.5; > --caller-timeout)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds to wait after the load before counting (default 3)")
    p.add_argument("--seed", type=int, default=None, help="provider's fault draw (default: random)")
    p.add_argument("--latency-calls", type=int, default=2000, help="calls per mode and store (default 2000)")
    p.add_argument("--latency-warmup", type=int, default=200, help="warm-up calls per store (default 200)")
    p.add_argument("--latency-threads", type=int, default=1, help="latency threads (default 1)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on each load phase (default 300)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the replay probe (every op sent once more after the settle)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if min(args.ops, args.concurrency, args.sends, args.latency_calls, args.latency_threads) < 1:
        p.error("--ops, --concurrency, --sends, --latency-calls, --latency-threads must be >= 1")
    if not 0 < args.caller_timeout < args.slow_delay:
        p.error("need 0 < --caller-timeout < --slow-delay")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    # The gateway waits for slow answers; the callers give up earlier.
    args.request_timeout_ms = int(args.slow_delay * 1000) + 3000
    binary = prebuilt_binary(args.binary, "idempotency")

    started = datetime.now(timezone.utc)
    ensure_redis(log)
    work = Path(tempfile.mkdtemp(prefix="pandagate-idempotency-"))
    redis_proc = None
    try:
        redis_proc, redis_port = start_redis(work)
        log(f"redis-server on 127.0.0.1:{redis_port}, pid {redis_proc.pid}")
        run_id = uuid.uuid4().hex[:8]
        r = exactly_once_part(args, binary, work, redis_port, run_id)
        a = analyse_exactly_once(args, r)
        log(f"part 1: ops reached {a['reached']}, per op {dict(a['per_op'])}, finals {dict(a['finals'])}")
        lat = latency_part(args, binary, work, redis_port, run_id)
        text, verdict = report(args, argv, started, binary, r, a, lat)
        print(text, flush=True)
        return {"PASS": 0, "FAIL": 1}.get(verdict, 2)
    finally:
        if redis_proc is not None:
            stop(redis_proc, grace=10)
        leave_work(work, args.keep, log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
