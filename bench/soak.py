#!/usr/bin/env python3
"""Soak under chaos: every call answered, no write sent twice, memory flat.

Runs pandagate for --seconds (default 600 = 10 minutes) in front of a fake
PandaPon provider on 127.0.0.1 that verifies every signature and injects
faults: 503 answers, connections reset after the request was read, answers
slower than the gateway's attempt timeouts, and outages of several seconds
(listener closed so connections are refused; every request reset; every
request answered 503). C caller threads send a paced mix of reads (product
get, keyword search, order detail) and writes (1688 order create, Taobao
order create; each with a unique clientOrderId in its body). Midway the
secret file named by PANDAPON_ACCESS_SECRET_FILE is rewritten (the provider
accepts the old and the new secret for a short overlap, then only the new
one) and the config file is changed and SIGHUP sent. The gateway's RSS is
sampled every second.

    python3 bench/soak.py [--seconds 600] [--concurrency 24] [--rate 100] [--binary PATH]

Checks (exit 1 when one fails): every call answered (no connection error or
timeout between caller and gateway); no write received twice or more by the
provider; every non-success answer attributable to a fault the provider
injected (per call: the provider logs each attempt by x-request-id; connect
failures and circuit-open answers by the outage windows and the gateway's
circuit transitions); no signature that matches neither valid secret, no
reused nonce; the secret rotation and the config reload both taken; the
gateway alive until the end, no ERROR line, exit 0 on SIGTERM; RSS at the
end (median of the last 5 % of the run) within 10 % of RSS after warm-up
(median of the 5 % of the run that follows the warm-up, which is the first
10 % of the run unless --warmup says otherwise).

A Markdown section with the figures is appended to bench/soak.md (--output;
--no-record to skip). Python 3.11 standard library only. Talks only to
127.0.0.1; every server it starts is stopped; every loop is bounded.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, RELEASE_BINARY, git_version, hist, pct, stop  # noqa: E402
from benchlib import LoopbackServer, QuietHandler, build_release, event_time, memory_kib  # noqa: E402
from benchlib import read_json_lines, run_pool, scrape_metrics, start_gateway, write_atomically  # noqa: E402

ACCESS_KEY = "bench-key"  # benchlib.start_gateway sets PANDAPON_ACCESS_KEY to this

# Route mix: (weight, class, method, path). Classes as in src/routes.rs.
MIX = [
    (0.30, "read", "GET", "/open/product/get"),
    (0.25, "read", "POST", "/alibaba/product/keywords/query"),
    (0.15, "read", "POST", "/alibaba/order/detail"),
    (0.20, "write", "POST", "/alibaba/order/create"),
    (0.10, "write", "POST", "/open/order"),
]
CLASS_OF = {path: cls for _, cls, _, path in MIX}

# Gateway timeouts (ms). The reload changes only upstream.request_timeout_ms,
# the one attempt a write gets; its 504 envelope names the value in force.
READ_ATTEMPT_MS = 800
WRITE_TIMEOUT_MS = 2000
WRITE_TIMEOUT_AFTER_RELOAD_MS = 2500
OPEN_MS = 5000
SECRET_POLL_MS = 200
SLOW_HOLD_S = 3.5  # "slow" fault: longer than every attempt timeout above
ROTATION_OVERLAP_S = 3.0  # provider accepts old and new secret this long after the file changes

# Share of requests (outside outages) failed at random, by kind.
FAULT_SHARES = {"503": 0.04, "reset": 0.04, "slow": 0.02}
OUTAGE_MODES = ["refuse", "reset", "503", "refuse"]
OUTAGE_AT = [0.15, 0.30, 0.65, 0.78]  # fractions of the run; rotation at 0.45, reload at 0.55
ROTATE_AT, RELOAD_AT = 0.45, 0.55
RESET_FAULTS = {"reset", "outage_reset", "outage_refuse"}
ANSWER_503_FAULTS = {"503", "outage_503"}


def gateway_toml(write_timeout_ms):
    return f"""\
# bench/soak.py
[server]
secret_poll_ms = {SECRET_POLL_MS}

[upstream]
connect_timeout_ms = 1000
request_timeout_ms = {write_timeout_ms}

[retry]
read_attempt_timeout_ms = {READ_ATTEMPT_MS}

[circuit_breaker]
open_ms = {OPEN_MS}
"""


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    """Verifies signatures, injects faults, logs every request it reads:
    (wall time, x-request-id, path, clientOrderId, fault, signature verdict)."""

    def __init__(self, seed, secret):
        super().__init__(Handler, seed)
        self.port = self.server_address[1]
        self.valid = {"old": secret}      # name -> secret currently accepted
        self.known = {"old": secret}      # every secret ever used
        self.outage = None                # None or "refuse" / "reset" / "503"
        self.log = []                     # (t, xrid, path, order_id, fault, sig)
        self.by_xrid = defaultdict(list)  # xrid -> [fault, ...] in arrival order
        self.order_ids = Counter()        # clientOrderId -> times received
        self.nonces = set()
        self.sigs = Counter()             # signature verdict -> count
        self.serving = None

    # listener: closed during "refuse" outages so that connects are refused
    def start_serving(self):
        self.serving = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.serving.start()

    def close_listener(self):
        self.shutdown()
        self.serving.join(timeout=5)
        self.socket.close()

    def reopen_listener(self):
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.listen(self.request_queue_size)
        self.socket = s
        self.start_serving()

    def rotate(self, new_secret):
        with self.lock:
            self.valid = {"old": self.known["old"], "new": new_secret}
            self.known["new"] = new_secret

    def end_overlap(self):
        with self.lock:
            self.valid = {"new": self.known["new"]}

    def verify(self, headers, now):
        ak, ts = headers.get("access-key"), headers.get("timestamp")
        nonce, sig = headers.get("nonce-str") or "", headers.get("signature")
        if ak != ACCESS_KEY:
            return "bad_access_key"
        try:
            if abs(now * 1000 - int(ts)) > 600_000:
                return "bad_timestamp"
        except (TypeError, ValueError):
            return "bad_timestamp"
        if len(nonce) != 32 or not nonce.isascii() or not nonce.isalnum():
            return "bad_nonce"
        if nonce in self.nonces:
            return "nonce_reused"
        self.nonces.add(nonce)
        for name, secret in self.valid.items():
            if hashlib.md5((ak + ts + nonce + secret).encode()).hexdigest().upper() == sig:
                return name
        for name, secret in self.known.items():
            if hashlib.md5((ak + ts + nonce + secret).encode()).hexdigest().upper() == sig:
                return f"{name}_not_accepted"
        return "matches_no_secret"

    def admit(self, headers, path, order_id):
        """Decides the request's fate and logs it. Returns (fault, sig)."""
        now = time.time()
        with self.lock:
            sig = self.verify(headers, now)
            if order_id is not None:
                self.order_ids[order_id] += 1
            if sig not in ("old", "new"):
                fault = "none"  # answered with a signature error
            elif self.outage is not None:
                fault = "outage_" + self.outage
            else:
                r, fault = self.rng.random(), "none"
                for kind, share in FAULT_SHARES.items():
                    if r < share:
                        fault = kind
                        break
                    r -= share
            xrid = headers.get("x-request-id")
            self.log.append((now, xrid, path, order_id, fault, sig))
            self.by_xrid[xrid].append(fault)
            self.sigs[sig] += 1
            return fault, sig


class Handler(QuietHandler):
    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        order_id = None
        if CLASS_OF.get(path) == "write":
            try:
                order_id = json.loads(body).get("clientOrderId")
            except (ValueError, AttributeError):
                order_id = "<unparseable body>"
        fault, sig = self.server.admit(self.headers, path, order_id)
        if fault in RESET_FAULTS:
            self.reset()
            return
        if fault == "slow":
            time.sleep(SLOW_HOLD_S)
        if sig not in ("old", "new"):
            status, code, msg = 200, 40001, f"signature rejected: {sig}"
        elif fault in ANSWER_503_FAULTS:
            status, code, msg = 503, 503, "service unavailable"
        else:
            status, code, msg = 200, 200, "成功"
        payload = json.dumps({"requestId": uuid.uuid4().hex, "code": code, "msg": msg,
                              "data": {"path": path}}).encode()
        self.answer_json(status, payload)


# --------------------------------------------------------------------------
# Gateway helpers
# --------------------------------------------------------------------------

def metric_sum(metrics, name):
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


# --------------------------------------------------------------------------
# Callers
# --------------------------------------------------------------------------

def plan_calls(n, rate, run_id, seed):
    rng = random.Random(seed)
    weights = [w for w, *_ in MIX]
    plan = []
    for i in range(n):
        _, cls, method, path = rng.choices(MIX, weights)[0]
        xrid = f"soak-{run_id}-{i:07d}"
        order_id = None
        if path == "/open/product/get":
            target, body = f"{path}?itemId={rng.randrange(10**11, 10**12)}", None
        elif path == "/alibaba/product/keywords/query":
            target = path
            body = json.dumps({"keyword": rng.choice(["cup", "lamp", "desk", "pen"]), "page": 1, "pageSize": 20})
        elif path == "/alibaba/order/detail":
            target, body = path, json.dumps({"orderId": str(rng.randrange(10**15, 10**16))})
        else:
            order_id = f"{run_id}-w{i:07d}"
            target = path
            body = json.dumps({"clientOrderId": order_id, "offerId": rng.randrange(10**9), "quantity": 1})
        plan.append({"i": i, "due": i / rate, "class": cls, "method": method, "path": path,
                     "target": target, "body": body, "xrid": xrid, "order_id": order_id})
    return plan


def run_callers(port, plan, concurrency, seconds, t0):
    started = [None] * len(plan)

    def send(conn, call):
        delay = t0 + call["due"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        headers = {"x-request-id": call["xrid"]}
        if call["body"] is not None:
            headers["Content-Type"] = "application/json"
        started[call["i"]] = time.time()
        conn.request(call["method"], call["target"], body=call["body"], headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        ended = time.time()
        try:
            env = json.loads(data)
        except ValueError:
            env = {}
        if not isinstance(env, dict):
            env = {}
        return ({"status": resp.status, "code": env.get("code"), "source": env.get("source"),
                 "msg": env.get("msg"), "start": started[call["i"]], "end": ended, "error": None},
                resp.will_close)

    def failed(call, seconds_, error):
        now = time.time()
        return {"status": None, "code": None, "source": None, "msg": None,
                "start": started[call["i"]] or now - seconds_, "end": now, "error": error}

    # Per-call client timeout 60 s: far above the gateway's longest call
    # (3 attempts within its 30 s deadline).
    return run_pool(port, plan, concurrency, seconds, 60, send, failed)


# --------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------

GATEWAY_MSG_KIND = [
    ("upstream unreachable", "upstream_connect"),
    ("upstream connection failed", "upstream_failed"),
    ("upstream did not answer within", "upstream_timeout"),
    ("upstream circuit open", "circuit_open"),
]


def gateway_kind(result, access):
    if access and access.get("error"):
        return access["error"]
    msg = result.get("msg") or ""
    for prefix, kind in GATEWAY_MSG_KIND:
        if msg.startswith(prefix):
            return kind
    return "gateway_other"


def overlaps(a0, a1, b0, b1):
    return a0 <= b1 and b0 <= a1


class Attributor:
    def __init__(self, provider, outages, circuit_periods, slack):
        self.provider = provider
        self.outages = outages  # [(start, end, mode)] wall times
        self.refuse = [(s, e) for s, e, m in outages if m == "refuse"]
        self.periods = circuit_periods  # [(open, close, attributable, why)]
        self.slack = slack

    def in_refuse(self, t0, t1):
        return any(overlaps(t0, t1, s - 0.5, e + 0.5) for s, e in self.refuse)

    def attribute(self, call, r, access):
        """Returns (category, attributable)."""
        if r["status"] == 200 and r["code"] == 200 and r["source"] is None:
            return "success", True
        faults = self.provider.by_xrid.get(call["xrid"], [])
        last = faults[-1] if faults else None
        if r["source"] != "pandagate":
            if r["status"] == 503 and last in ANSWER_503_FAULTS:
                return f"provider 503 ({last})", True
            return f"provider {r['status']} code {r['code']} (last attempt fault {last})", False
        kind = gateway_kind(r, access)
        if kind == "upstream_failed":
            if last in RESET_FAULTS:
                return f"502 upstream_failed ({last})", True
            if self.in_refuse(r["start"], r["end"]):
                return "502 upstream_failed (listener closed: outage_refuse)", True
            return f"502 upstream_failed (last attempt fault {last})", False
        if kind == "upstream_timeout":
            if last == "slow":
                return "504 upstream_timeout (slow)", True
            return f"504 upstream_timeout (last attempt fault {last})", False
        if kind == "upstream_connect":
            if self.in_refuse(r["start"], r["end"]):
                return "502 upstream_connect (outage_refuse)", True
            return "502 upstream_connect (no refuse outage)", False
        if kind == "circuit_open":
            for t_open, t_close, ok, why in self.periods:
                if overlaps(r["start"], r["end"], t_open - 0.2, t_close + 0.2):
                    if ok:
                        return f"503 circuit_open ({why})", True
            return "503 circuit_open (no attributable open circuit)", False
        return f"{r['status']} {kind}", False


def circuit_periods(events, provider, outages, end_time, max_attempt_s):
    """Open periods [(t_open, t_close, attributable, why)] from the gateway's
    circuit transitions, each opening judged against the injected faults."""
    transitions = []
    for e in events:
        msg = str(e.get("message", ""))
        if msg.startswith("circuit "):
            t = event_time(e)
            if t is not None:
                transitions.append((t, msg))
    transitions.sort()
    with provider.lock:
        fault_times = [t for t, _, _, _, f, _ in provider.log if f != "none"]
        last20 = [(t, f) for t, _, _, _, f, _ in provider.log]

    def judge(t):
        for s, e, mode in outages:
            if s - 0.2 <= t <= e + max_attempt_s + 1.0:
                return True, f"outage_{mode}"
        # a probe (or 20 attempts in a row) failed on random injected faults
        if any(t - max_attempt_s - 1.5 <= ft <= t for ft in fault_times):
            before = [f for ft, f in last20 if ft <= t][-20:]
            if before and before[-1] != "none":
                return True, "random faults"
        return False, "no injected fault before it"

    periods = []
    current = None
    for t, msg in transitions:
        if msg.startswith("circuit open"):
            ok, why = judge(t)
            if current is None:
                current = [t, ok, why]
            else:  # open again after a failed probe: the period goes on
                current[1] = current[1] and ok
                if not ok:
                    current[2] = why
        elif msg.startswith("circuit closed") and current is not None:
            periods.append((current[0], t, current[1], current[2]))
            current = None
    if current is not None:
        periods.append((current[0], end_time, current[1], current[2]))
    return periods, transitions


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def mib(kib):
    return kib / 1024.0


def analyse(a):
    """a: dict of everything gathered. Returns (markdown, ok)."""
    args, plan, results, provider = a["args"], a["plan"], a["results"], a["provider"]
    t0w = a["t0_wall"]
    sent = [(c, r) for c, r in zip(plan, results) if r is not None]
    answered = [(c, r) for c, r in sent if r["status"] is not None]
    unanswered = [(c, r) for c, r in sent if r["status"] is None]
    n_reads = sum(1 for c, _ in sent if c["class"] == "read")
    n_writes = len(sent) - n_reads

    access_by_xrid = defaultdict(list)
    for e in a["access"]:
        access_by_xrid[e.get("x_request_id")].append(e)
    ours = {c["xrid"] for c, _ in sent}
    log_missing = sum(1 for x in ours if not access_by_xrid.get(x))
    log_repeated = sum(1 for x in ours if len(access_by_xrid.get(x, [])) > 1)
    foreign_lines = sum(len(v) for k, v in access_by_xrid.items() if k not in ours)

    periods, transitions = circuit_periods(a["events"], provider, a["outages_wall"], a["end_wall"],
                                           WRITE_TIMEOUT_AFTER_RELOAD_MS / 1000)
    attr = Attributor(provider, a["outages_wall"], periods, 0.5)
    categories = Counter()
    unattributed = []
    for c, r in answered:
        acc = (access_by_xrid.get(c["xrid"]) or [None])[0]
        cat, ok = attr.attribute(c, r, acc)
        categories[(c["class"], cat)] += 1
        if not ok:
            unattributed.append((c, r, cat, acc))

    status_by_class = {k: Counter() for k in ("read", "write")}
    for c, r in answered:
        label = str(r["status"]) + (" (gateway)" if r["source"] == "pandagate" else "")
        if r["status"] == 200 and r["code"] != 200:
            label = f"200 code {r['code']}"
        status_by_class[c["class"]][label] += 1

    with provider.lock:
        plog = list(provider.log)
        order_ids = Counter(provider.order_ids)
        sigs = Counter(provider.sigs)
        fake_errors = Counter(provider.fake_errors)
    faults = Counter(f for *_, f, _ in plog if f != "none")
    received = Counter(CLASS_OF.get(p, "other") for _, _, p, _, _, _ in plog)
    no_xrid = sum(1 for _, x, *_ in plog if not x)
    dupes = {k: v for k, v in order_ids.items() if v >= 2}
    write_calls = [(c, r) for c, r in sent if c["class"] == "write"]
    ok_writes = [c for c, r in write_calls if r["status"] == 200 and r["code"] == 200]
    ok_not_received = sum(1 for c in ok_writes if order_ids.get(c["order_id"], 0) == 0)
    never_received = Counter()
    for c, r in write_calls:
        if order_ids.get(c["order_id"], 0) == 0:
            acc = (access_by_xrid.get(c["xrid"]) or [None])[0]
            never_received[gateway_kind(r, acc) if r["source"] == "pandagate" else str(r["status"])] += 1
    bad_sigs = {k: v for k, v in sigs.items() if k not in ("old", "new")}

    attempts = [e.get("attempts") or 0 for x in ours for e in access_by_xrid.get(x, [])]
    retries = sum(max(0, n - 1) for n in attempts)
    reasons = Counter(rr for x in ours for e in access_by_xrid.get(x, []) for rr in e.get("retry_reasons") or [])
    skipped = Counter(e.get("retry_skipped") for x in ours for e in access_by_xrid.get(x, [])
                      if e.get("retry_skipped"))
    m = a["metrics"]

    # RSS
    samples = a["rss"]  # (seconds since t0, kib)
    S = a["elapsed_load"]
    warm = a["warmup"]
    win = max(3.0, 0.05 * args.seconds)
    base = [k for t, k in samples if warm <= t < warm + win]
    tail = [k for t, k in samples if t >= S - win]
    rss_base = statistics.median(base) if base else None
    rss_end = statistics.median(tail) if tail else None
    rss_ratio = rss_end / rss_base if rss_base and rss_end else None
    rss_peak = max((k for _, k in samples), default=None)
    post = [(t, k) for t, k in samples if t >= warm]
    slope = None
    if len(post) >= 3:
        mt = statistics.fmean(t for t, _ in post)
        mk = statistics.fmean(k for _, k in post)
        den = sum((t - mt) ** 2 for t, _ in post)
        if den:
            slope = sum((t - mt) * (k - mk) for t, k in post) / den * 60 / 1024  # MiB per minute

    # gateway diagnostics
    levels = Counter((str(e.get("level", "")).upper(), str(e.get("message", ""))) for e in a["events"])
    errors = {k: v for k, v in levels.items() if k[0] == "ERROR"}
    warns = {k[1]: v for k, v in levels.items() if k[0] == "WARN"}
    panics = [line for line in a["stderr_other"] if "panick" in line]

    # reload / rotation
    rot, rel = a["rotation"], a["reload"]
    write_504 = Counter()
    stale_timeout_after_reload = 0
    for c, r in write_calls:
        msg = r["msg"] or ""
        mt_ = re.match(r"upstream did not answer within (\d+) ms", msg)
        if r["source"] == "pandagate" and mt_:
            when = "after" if rel.get("taken_wall") and r["start"] > rel["taken_wall"] else "before"
            write_504[(when, int(mt_.group(1)))] += 1
            if when == "after" and int(mt_.group(1)) != WRITE_TIMEOUT_AFTER_RELOAD_MS:
                stale_timeout_after_reload += 1
    reload_taken = (rel.get("metric") == 1 and rel.get("taken_wall") is not None
                    and stale_timeout_after_reload == 0)
    rotation_taken = (rot.get("metric") == 1 and rot.get("taken_wall") is not None
                      and sigs.get("new", 0) > 0 and metric_sum(m, "pandagate_secret_reload_failures_total") == 0)

    checks = [
        ("every call answered (no connection error or timeout against the gateway)", not unanswered,
         f"{len(answered)} of {len(sent)} answered"
         + (f"; unanswered: {hist(Counter(r['error'] for _, r in unanswered))}" if unanswered else "")),
        ("every planned call sent", len(sent) == len(plan), f"{len(sent)} of {len(plan)}"),
        ("no write received twice or more by the provider", not dupes, f"{len(dupes)}"
         + (f" (e.g. {list(dupes.items())[:3]})" if dupes else "")),
        ("every write answered 200 reached the provider", ok_not_received == 0, f"{ok_not_received} did not"),
        ("every error answer attributable to an injected fault", not unattributed,
         f"{len(unattributed)} not attributable"),
        ("no signature matching neither valid secret, no reused nonce, no bad header", not bad_sigs,
         hist(bad_sigs) if bad_sigs else "0"),
        ("secret rotation taken (one secret reload, new secret seen, no reload failure)", rotation_taken,
         f"reloads metric {rot.get('metric')}, after {rot.get('taken_after_s')} s"),
        ("config reload taken (pandagate_config_reloads_total 1, new write timeout in force)", reload_taken,
         f"reloads metric {rel.get('metric')}, after {rel.get('taken_after_s')} s; "
         f"write 504s with the old timeout after it: {stale_timeout_after_reload}"),
        ("one access-log line per call", log_missing == 0 and log_repeated == 0,
         f"missing {log_missing}, repeated {log_repeated}"),
        ("gateway alive to the end, exit 0 on SIGTERM, no ERROR line, no panic",
         a["alive_at_end"] and a["exit_code"] == 0 and not errors and not panics,
         f"alive {a['alive_at_end']}, exit {a['exit_code']}, ERROR lines {sum(errors.values())}, panics {len(panics)}"),
        ("RSS at the end within 10 % of RSS after warm-up", rss_ratio is not None and 0.9 <= rss_ratio <= 1.1,
         f"{mib(rss_base or 0):.1f} -> {mib(rss_end or 0):.1f} MiB"
         + (f" ({(rss_ratio - 1) * 100:+.1f} %)" if rss_ratio else "")),
        ("the fake provider raised no error of its own", not fake_errors, hist(fake_errors) if fake_errors else "0"),
    ]
    ok = all(c[1] for c in checks)

    out = []
    p = out.append
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    p(f"## Soak run — {now}, {a['version']}")
    p("")
    p(f"- command: `{a['command']}`")
    p(f"- machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), load average before start "
      f"{a['loadavg']}; binary `{a['binary']}`")
    p(f"- duration: {args.seconds:g} s planned, load phase {S:.1f} s; {args.concurrency} callers paced at "
      f"{args.rate:g} calls/s; seed {a['seed']}; warm-up = first {warm:g} s; RSS windows {win:g} s")
    p(f"- gateway config: secret_poll_ms {SECRET_POLL_MS}, connect_timeout_ms 1000, request_timeout_ms "
      f"{WRITE_TIMEOUT_MS} (→ {WRITE_TIMEOUT_AFTER_RELOAD_MS} by the reload), read_attempt_timeout_ms "
      f"{READ_ATTEMPT_MS}, circuit_breaker.open_ms {OPEN_MS}; everything else default (3 attempts, 30 s deadline, "
      f"budget 20 % + 5/s, breaker at 20 failures); secret from PANDAPON_ACCESS_SECRET_FILE")
    p(f"- provider: random faults per request {', '.join(f'{k} {v:.0%}' for k, v in FAULT_SHARES.items())}; "
      f"slow = held {SLOW_HOLD_S:g} s; outages: "
      + ", ".join(f"{m} {s - t0w:.0f}–{e - t0w:.0f} s" for s, e, m in a["outages_wall"]))
    p(f"- rotation: file rewritten at {rot.get('at_s', float('nan')):.1f} s, taken by the gateway "
      f"{rot.get('taken_after_s')} s later, old secret accepted until {rot.get('overlap_end_s', float('nan')):.1f} s; "
      f"SIGHUP at {rel.get('at_s', float('nan')):.1f} s, taken {rel.get('taken_after_s')} s later")
    p("")
    p("| | |")
    p("|---|---|")
    p(f"| calls sent / answered | {len(sent)} / {len(answered)} (reads {n_reads}, writes {n_writes}) |")
    for cls in ("read", "write"):
        okc = status_by_class[cls].get("200", 0)
        total = sum(status_by_class[cls].values())
        p(f"| {cls} answers by status | {hist(status_by_class[cls])} — success {pct(okc, total)} |")
    p(f"| provider requests received | {len(plog)} (read {received['read']}, write {received['write']}"
      + (f", other {received['other']}" if received.get("other") else "") + f"); without x-request-id: {no_xrid} |")
    p(f"| faults injected (per request received) | {hist(faults)}; plus connections refused during "
      f"{len(attr.refuse)} refuse outages |")
    p(f"| retries (access log) | {retries} ({pct(retries, len(sent))} of calls); reasons: {hist(reasons)} |")
    p(f"| retry_skipped (access log) | {hist(skipped)} |")
    p(f"| gateway metrics | retries_total {metric_sum(m, 'pandagate_retries_total'):.0f}, "
      f"budget refused {metric_sum(m, 'pandagate_retries_budget_refused_total'):.0f}, "
      f"attempts {metric_sum(m, 'pandagate_upstream_attempts_total'):.0f}, "
      f"calls {metric_sum(m, 'pandagate_calls_total'):.0f}, "
      f"secret reloads {metric_sum(m, 'pandagate_secret_reloads_total'):.0f}, "
      f"config reloads {metric_sum(m, 'pandagate_config_reloads_total'):.0f} |")
    p(f"| **writes received twice or more** | **{len(dupes)}** |")
    p(f"| writes never received by the provider (by answer) | {sum(never_received.values())}: {hist(never_received)} |")
    p(f"| signatures at the provider | {hist(sigs)} |")
    p(f"| write 504s by the timeout they name (before/after the reload) | "
      f"{', '.join(f'{w} {ms} ms: {n}' for (w, ms), n in sorted(write_504.items())) or 'none'} |")
    p(f"| circuit transitions | {len(transitions)}: "
      + ", ".join(f"{t - t0w:.1f} s {msg.split(':')[0]}" for t, msg in transitions[:24])
      + (" …" if len(transitions) > 24 else "") + " |")
    p(f"| gateway WARN lines | {hist(warns)} |")
    p(f"| access-log lines not from our calls | {foreign_lines} |")
    p(f"| RSS after warm-up / at the end / peak | {mib(rss_base or 0):.1f} / {mib(rss_end or 0):.1f} / "
      f"{mib(rss_peak or 0):.1f} MiB; trend after warm-up "
      + (f"{slope:+.3f} MiB/min" if slope is not None else "n/a") + " |")
    p("")
    p("Answers by attribution:")
    p("")
    p("| class | answer (attributed to) | calls |")
    p("|---|---|---:|")
    for (cls, cat), n in sorted(categories.items(), key=lambda kv: (kv[0][0], -kv[1])):
        p(f"| {cls} | {cat} | {n} |")
    if unattributed:
        p("")
        p(f"Not attributable ({len(unattributed)}; first 10):")
        p("")
        for c, r, cat, acc in unattributed[:10]:
            p(f"- `{c['xrid']}` {c['method']} {c['path']} at {r['start'] - t0w:.2f}–{r['end'] - t0w:.2f} s: "
              f"{cat}; provider saw {provider.by_xrid.get(c['xrid'], [])}; access log "
              f"`{json.dumps({k: acc.get(k) for k in ('status', 'attempts', 'retry_reasons', 'retry_skipped', 'error')}) if acc else None}`")
    p("")
    step = max(1, round(S / 20))
    p(f"RSS samples (every {step} s; W = warm-up, O = outage, R = rotation/reload):")
    p("")
    p("| t (s) | RSS (MiB) | phase |")
    p("|---:|---:|---|")
    marks = {}
    for s, e, mode in a["outages_wall"]:
        marks[(s - t0w, e - t0w)] = f"O {mode}"
    next_t = 0.0
    for t, k in samples:
        if t + 1e-6 < next_t and t < S - 1:
            continue
        next_t = t + step
        phase = "W" if t < warm else ""
        for (s, e), label in marks.items():
            if s <= t <= e:
                phase = label
        if abs(t - rot.get("at_s", -99)) < step / 2 or abs(t - rel.get("at_s", -99)) < step / 2:
            phase = (phase + " R").strip()
        p(f"| {t:.0f} | {mib(k):.1f} | {phase} |")
    p("")
    p("Checks:")
    p("")
    for name, passed, detail in checks:
        p(f"- {'PASS' if passed else '**FAIL**'}: {name} — {detail}")
    p("")
    p(f"**Verdict: {'PASS' if ok else 'FAIL'}**")
    return "\n".join(out), ok


HEADER = """\
# bench/soak.py: soak under chaos

Issue 8's requirement: the gateway runs for 10 minutes against a fake
provider that injects 503s, resets, slow answers and outages, with mixed
reads and writes, a secret rotation and a config reload in the middle; every
call answered, 0 writes duplicated at the provider, memory flat (RSS at the
end within 10 % of RSS after warm-up), no error beyond the injected ones.

How the script does it (details in its docstring):

- **Fake provider** (Python, 127.0.0.1, free port): checks `access-key`,
  the 600 s timestamp window, the 32-character nonce and its reuse, and the
  signature `UPPER(hex(MD5(access-key + timestamp + nonce-str + secret)))`
  against the secret(s) valid at that moment; a request that fails any of
  these is answered `code 40001` and counted. Outside outages it fails a
  share of requests at random: `503` (4 %), `reset` (4 %: request read, then
  RST, no answer), `slow` (2 %: held 3.5 s, longer than every attempt
  timeout). Four outages (at 15, 30, 65 and 78 % of the run, 1 % of it
  long, 4 to 8 s): `refuse` (listener closed: connects refused; requests on
  kept-alive connections reset), `reset` (every request reset), `503`
  (every request answered 503). Every request read is logged with its
  `x-request-id` (which the gateway forwards), its fault and its signature
  verdict; every write's `clientOrderId` is counted.
- **Callers**: C threads with keep-alive connections, paced to a fixed rate;
  70 % reads (`GET /open/product/get`, `POST /alibaba/product/keywords/query`,
  `POST /alibaba/order/detail`), 30 % writes (`POST /alibaba/order/create`,
  `POST /open/order`, each with a unique `clientOrderId`). Each call has its
  own `x-request-id`. The callers never retry.
- **Midway**: at 45 % the provider starts accepting the new secret beside the
  old one and the secret file is replaced atomically; 3 s later the old
  secret is refused. At 55 % the config file's
  `upstream.request_timeout_ms` goes from 2000 to 2500 and the gateway gets
  SIGHUP; the reload is confirmed by `pandagate_config_reloads_total` and by
  the 504 envelopes of later writes naming 2500 ms.
- **Attribution** of every answer other than HTTP 200 / code 200: a provider
  503 needs the provider's last attempt for that `x-request-id` to be an
  injected 503; a gateway `upstream_failed` 502 a reset (or a call spanning a
  listener close); `upstream_timeout` 504 a slow answer; `upstream_connect`
  502 a refuse outage during the call; `circuit_open` 503 an open circuit
  whose opening falls in an outage (or, for a reopening after a failed
  probe, right after an injected fault).
- **Memory**: VmRSS every second. Warm-up = the first 10 % of the run (60 s
  of the 10-minute run); *RSS after warm-up* = median of the samples in the
  next 5 % of the run; *RSS at the end* = median of the samples in the last
  5 % of the run.

"""


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600, help="length of the load phase (default 600)")
    ap.add_argument("--concurrency", type=int, default=24, help="caller threads (default 24)")
    ap.add_argument("--rate", type=float, default=100, help="calls per second, all callers together (default 100)")
    ap.add_argument("--outage-seconds", type=float, default=None,
                    help="length of each outage (default 1 %% of the run, within 4..8 s)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default 10 %% of the run)")
    ap.add_argument("--binary", default=None,
                    help="pandagate binary (default target/release/pandagate, built when missing)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--output", default=str(ROOT / "bench" / "soak.md"), help="Markdown file to append to")
    ap.add_argument("--no-record", action="store_true", help="print the section, do not write it")
    ap.add_argument("--keep", metavar="DIR", help="copy the access log, gateway stderr and provider log here")
    args = ap.parse_args()
    if args.seconds < 30 or args.concurrency < 1 or args.rate <= 0:
        ap.error("need --seconds >= 30, --concurrency >= 1, --rate > 0")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    warm = args.warmup if args.warmup is not None else 0.10 * args.seconds
    outage_s = args.outage_seconds if args.outage_seconds is not None else min(8.0, max(4.0, 0.01 * args.seconds))
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(shlex.quote(x) for x in ["python3"] + sys.argv)

    if args.binary:
        binary = Path(args.binary).resolve()
    else:
        binary = RELEASE_BINARY
        if not binary.exists():
            build_release()
    if not binary.exists():
        sys.exit(f"no binary at {binary}")

    run_id = uuid.uuid4().hex[:8]
    old_secret, new_secret = f"soak-old-{uuid.uuid4().hex}", f"soak-new-{uuid.uuid4().hex}"
    work = Path(tempfile.mkdtemp(prefix="pandagate-soak-"))
    secret_file = work / "secret"
    secret_file.write_text(old_secret + "\n")
    provider = gateway = None
    ok = False
    try:
        provider = Provider(seed + 1, old_secret)
        provider.start_serving()
        gateway, ports = start_gateway(
            binary, work, gateway_toml(WRITE_TIMEOUT_MS),
            PANDAGATE_UPSTREAM=f"http://127.0.0.1:{provider.port}",
            PANDAPON_ACCESS_SECRET=None,
            PANDAPON_ACCESS_SECRET_FILE=str(secret_file))
        config_path = work / "pandagate.toml"
        pid = gateway.pid

        n = int(args.seconds * args.rate)
        plan = plan_calls(n, args.rate, run_id, seed)
        print(f"soak: {args.seconds:g} s, {n} calls at {args.rate:g}/s from {args.concurrency} callers; "
              f"gateway pid {pid} on 127.0.0.1:{ports['gateway']}, provider on 127.0.0.1:{provider.port}; "
              f"work dir {work}", file=sys.stderr)

        t0 = time.monotonic()
        t0_wall = time.time()
        box = {}
        callers = threading.Thread(
            target=lambda: box.setdefault("results", run_callers(ports["gateway"], plan, args.concurrency,
                                                                 args.seconds, t0)),
            daemon=True)
        callers.start()

        # Timeline, run by this thread while the callers work.
        outages = [(f * args.seconds, f * args.seconds + outage_s, mode) for f, mode in zip(OUTAGE_AT, OUTAGE_MODES)]
        outages_wall = []
        pending = []  # (at seconds, name, payload)
        for s, e, mode in outages:
            pending.append((s, "outage_start", mode))
            pending.append((e, "outage_end", mode))
        pending.append((ROTATE_AT * args.seconds, "rotate", None))
        pending.append((RELOAD_AT * args.seconds, "reload", None))
        pending.sort(key=lambda x: x[0])
        rotation, reload_ = {}, {}
        rss = []
        next_sample = 0.0
        outage_started = None
        hard_stop = t0 + args.seconds + 120  # the callers' pool ends by itself well before
        while callers.is_alive() and time.monotonic() < hard_stop:
            now = time.monotonic() - t0
            while pending and pending[0][0] <= now:
                _, what, payload = pending.pop(0)
                if what == "outage_start":
                    outage_started = time.time()
                    with provider.lock:
                        provider.outage = payload
                    if payload == "refuse":
                        provider.close_listener()
                    print(f"soak: {now:6.1f} s outage ({payload}) starts", file=sys.stderr)
                elif what == "outage_end":
                    if payload == "refuse":
                        provider.reopen_listener()
                    with provider.lock:
                        provider.outage = None
                    outages_wall.append((outage_started, time.time(), payload))
                    print(f"soak: {now:6.1f} s outage ({payload}) ends", file=sys.stderr)
                elif what == "rotate":
                    provider.rotate(new_secret)
                    write_atomically(secret_file, new_secret + "\n")
                    rotation.update(at_s=time.monotonic() - t0, at_wall=time.time())
                    pending.append((rotation["at_s"] + ROTATION_OVERLAP_S, "overlap_end", None))
                    pending.sort(key=lambda x: x[0])
                    print(f"soak: {now:6.1f} s secret file rewritten", file=sys.stderr)
                elif what == "overlap_end":
                    provider.end_overlap()
                    rotation["overlap_end_s"] = time.monotonic() - t0
                    print(f"soak: {now:6.1f} s old secret no longer accepted", file=sys.stderr)
                elif what == "reload":
                    write_atomically(config_path, gateway_toml(WRITE_TIMEOUT_AFTER_RELOAD_MS))
                    reload_.update(at_s=time.monotonic() - t0, at_wall=time.time())
                    os.kill(pid, signal.SIGHUP)
                    print(f"soak: {now:6.1f} s SIGHUP sent", file=sys.stderr)
            # When were they taken? The admin metrics say.
            for box_, metric in ((rotation, "pandagate_secret_reloads_total"),
                                 (reload_, "pandagate_config_reloads_total")):
                if "at_wall" in box_ and "taken_wall" not in box_ and time.time() - box_["at_wall"] < 30:
                    if metric_sum(scrape_metrics(ports["admin"]), metric) >= 1:
                        box_["taken_wall"] = time.time()
                        box_["taken_after_s"] = round(box_["taken_wall"] - box_["at_wall"], 2)
            if now >= next_sample:
                k = memory_kib(pid).get("VmRSS")
                if k is not None:
                    rss.append((now, k))
                next_sample += 1.0
            time.sleep(0.05)
        callers.join(timeout=120)
        elapsed_load = time.monotonic() - t0
        end_wall = time.time()
        results = box.get("results") or [None] * len(plan)
        for s, mode in [(s, m) for s, _, m in outages if s > elapsed_load]:
            print(f"soak: outage ({mode}) at {s:.0f} s not reached", file=sys.stderr)
        if provider.outage is not None:  # the run ended inside an outage: end it
            if provider.outage == "refuse":
                provider.reopen_listener()
            outages_wall.append((outage_started, time.time(), provider.outage))
            provider.outage = None

        alive = gateway.poll() is None
        metrics = scrape_metrics(ports["admin"])
        rotation["metric"] = metric_sum(metrics, "pandagate_secret_reloads_total")
        reload_["metric"] = metric_sum(metrics, "pandagate_config_reloads_total")
        stop(gateway)
        exit_code = gateway.returncode

        access, _ = read_json_lines(work / "access.log")
        access = [e for e in access if e.get("event") == "access"]
        events, stderr_other = read_json_lines(work / "gateway.err")
        # stderr timestamps confirm when the gateway took the rotation and the reload
        for e in events:
            t = event_time(e)
            if e.get("message") == "secret reloaded from its file" and t and "event_wall" not in rotation:
                rotation["event_wall"] = t
            if e.get("message") == "config reloaded" and t and "event_wall" not in reload_:
                reload_["event_wall"] = t
        for box_ in (rotation, reload_):
            if "event_wall" in box_:  # more precise than the metric poll
                box_["taken_wall"] = box_["event_wall"]
                box_["taken_after_s"] = round(box_["event_wall"] - box_["at_wall"], 3)
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("access.log", "gateway.err", "pandagate.toml"):
                shutil.copy(work / name, keep / name)
            with provider.lock, open(keep / "provider.log", "w") as f:
                for t, xrid, path, order_id, fault, sig in provider.log:
                    f.write(json.dumps({"t": round(t - t0_wall, 4), "xrid": xrid, "path": path,
                                        "order_id": order_id, "fault": fault, "sig": sig}) + "\n")
            with open(keep / "calls.jsonl", "w") as f:
                for c, r in zip(plan, results):
                    if r is not None:
                        f.write(json.dumps({"xrid": c["xrid"], "path": c["path"], "class": c["class"],
                                            **{k: (round(v - t0_wall, 4) if k in ("start", "end") else v)
                                               for k, v in r.items()}}) + "\n")

        text, ok = analyse({
            "args": args, "plan": plan, "results": results, "provider": provider, "t0_wall": t0_wall,
            "end_wall": end_wall, "access": access, "events": events, "stderr_other": stderr_other,
            "outages_wall": outages_wall, "rotation": rotation, "reload": reload_, "metrics": metrics,
            "rss": rss, "elapsed_load": elapsed_load, "warmup": warm, "alive_at_end": alive,
            "exit_code": exit_code, "version": git_version(), "loadavg": loadavg, "command": command,
            "seed": seed, "binary": binary,
        })
        print(text)
        if not args.no_record:
            out = Path(args.output)
            with open(out, "a") as f:
                if out.stat().st_size == 0:
                    f.write(HEADER)
                f.write(text + "\n\n")
            print(f"\n(appended to {out})", file=sys.stderr)
    finally:
        stop(gateway)
        if provider is not None:
            if provider.serving is not None and provider.serving.is_alive():
                provider.shutdown()
            provider.server_close()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
