#!/usr/bin/env python3
"""Retry correctness under a flaky provider.

A fake provider on 127.0.0.1 fails a share of requests at random (503, a
connection dropped after the request was read, or an answer slower than the
gateway's attempt timeouts); C workers send N calls (70 % reads, 30 % order
creates) through pandagate. The script checks that every call is answered and
that no order create reached the provider twice, and reports how reads fared,
the extra load retries put on the provider, and the gateway's own account
(access log: retry_reasons, retry_skipped, attempts).

    python3 bench/retries.py [--calls 10000] [--concurrency 64] [--failure 0.30]

Python 3.11 standard library only. Talks only to 127.0.0.1. Exit 1 when a
call got no answer or an order create was received twice or more.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RELEASE_BINARY, build_release, event_time, git_version, hist, pct, quantile  # noqa: E402
from benchlib import LoopbackServer, QuietHandler, read_events, run_pool, serve_in_thread, stop, stop_server  # noqa: E402
from benchlib import start_gateway as benchlib_start_gateway  # noqa: E402

WRITE_PATH = "/alibaba/order/create"
HOLD_S = 1.5  # "timeout" outcome: longer than both attempt timeouts below
GATEWAY_TOML = """\
[upstream]
request_timeout_ms = 1000

[retry]
read_attempt_timeout_ms = 300
"""


# --------------------------------------------------------------------------
# Fake provider
# --------------------------------------------------------------------------

class Provider(LoopbackServer):
    def __init__(self, failure, seed):
        super().__init__(Handler, seed)
        self.failure = failure
        self.received = Counter()   # path class -> requests received
        self.drawn = Counter()      # (class, outcome) -> count
        self.order_ids = Counter()  # clientOrderId -> times received

    def draw(self, cls, order_id):
        with self.lock:
            self.received[cls] += 1
            if order_id is not None:
                self.order_ids[order_id] += 1
            r = self.rng.random()
            if r >= self.failure:
                outcome = "ok"
            else:
                outcome = ("503", "reset", "timeout")[min(2, int(r / self.failure * 3))]
            self.drawn[(cls, outcome)] += 1
            return outcome


class Handler(QuietHandler):
    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        cls = "write" if path == WRITE_PATH else "read"
        order_id = None
        if cls == "write":
            try:
                order_id = json.loads(body).get("clientOrderId")
            except ValueError:
                order_id = "<unparseable body>"
        outcome = self.server.draw(cls, order_id)
        if outcome == "reset":
            self.reset()
            return
        if outcome == "timeout":
            time.sleep(HOLD_S)
        status = 503 if outcome == "503" else 200
        envelope = {"requestId": uuid.uuid4().hex, "code": status,
                    "msg": "ok" if status == 200 else "service unavailable", "data": {}}
        payload = json.dumps(envelope).encode()
        self.answer_json(status, payload)


# --------------------------------------------------------------------------
# Gateway
# --------------------------------------------------------------------------

def start_gateway(binary, work, upstream_port):
    proc, ports = benchlib_start_gateway(
        binary, work, GATEWAY_TOML, PANDAGATE_UPSTREAM=f"http://127.0.0.1:{upstream_port}")
    return proc, ports["gateway"]


# --------------------------------------------------------------------------
# Callers
# --------------------------------------------------------------------------

def plan_calls(n, seed):
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        r = rng.random()
        if r < 0.35:
            plan.append(("read", "GET", f"/open/product/get?itemId={rng.randrange(10**11, 10**12)}", None))
        elif r < 0.70:
            body = json.dumps({"keyword": rng.choice(["cup", "lamp", "desk", "pen"]), "page": 1, "pageSize": 20})
            plan.append(("read", "POST", "/alibaba/product/keywords/query", body))
        else:
            body = json.dumps({"clientOrderId": str(uuid.uuid4()), "quantity": 1})
            plan.append(("write", "POST", WRITE_PATH, body))
    return plan


def run_calls(port, plan, concurrency, max_seconds):
    def send(conn, call):
        kind, method, target, body = call
        headers = {"Content-Type": "application/json"} if body is not None else {}
        started = time.monotonic()
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            code = json.loads(data).get("code")
        except (ValueError, AttributeError):
            code = None
        return (kind, resp.status, code, time.monotonic() - started, None), False

    def failed(call, seconds, error):
        return (call[0], None, None, seconds, error)

    return run_pool(port, plan, concurrency, max_seconds, 40, send, failed)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def report(args, plan, results, provider, log_lines, circuit_opens, wall):
    out = []
    p = out.append
    answered = [r for r in results if r is not None and r[1] is not None]
    unanswered = [r for r in results if r is None or r[1] is None]
    reads = [r for r in answered if r[0] == "read"]
    writes = [r for r in answered if r[0] == "write"]
    n_reads = sum(1 for c in plan if c[0] == "read")
    n_writes = len(plan) - n_reads
    read_ok = sum(1 for r in reads if r[1] == 200 and r[2] == 200)
    dupes = {k: v for k, v in provider.order_ids.items() if v >= 2}
    sent_ids = {json.loads(c[3])["clientOrderId"] for c in plan if c[0] == "write"}
    never = len(sent_ids - set(provider.order_ids))
    total_rx = sum(provider.received.values())

    p(f"## pandagate retries bench: {len(plan)} calls, concurrency {args.concurrency}, failure {args.failure:.2f}")
    p("")
    p(f"- command: `{' '.join(shlex.quote(a) for a in ['python3'] + sys.argv)}` (nproc {len(os.sched_getaffinity(0))})")
    built = " (binary not rebuilt: --no-build)" if args.no_build else ""
    p(f"- gateway: {git_version()}{built}, config: upstream.request_timeout_ms 1000, retry.read_attempt_timeout_ms 300, "
      f"other retry/breaker keys at defaults; provider holds 'timeout' requests {HOLD_S} s")
    p(f"- wall time: {wall:.1f} s, {len(plan) / wall:.0f} calls/s")
    p(f"- calls sent: {len(plan)}; answered: {len(answered)}; **no answer: {len(unanswered)}**"
      + (f" ({hist(Counter(r[4] if r else 'not sent' for r in unanswered))})" if unanswered else ""))
    p(f"- reads: {n_reads}; succeeded (HTTP 200, code 200): {read_ok} = **{pct(read_ok, n_reads)}**; "
      f"other answers: {hist(Counter(r[1] for r in reads if not (r[1] == 200 and r[2] == 200)))}")
    p(f"- writes: {n_writes}; HTTP 200: {sum(1 for r in writes if r[1] == 200)}; "
      f"other statuses: {hist(Counter(r[1] for r in writes if r[1] != 200))}")
    p(f"- **writes received twice or more by the provider: {len(dupes)}**"
      + (f" (e.g. {list(dupes.items())[:5]})" if dupes else "")
      + f"; writes never received: {never}")
    if provider.fake_errors:
        p(f"- unexpected errors in the fake provider: {hist(provider.fake_errors)}")
    p(f"- provider received: {total_rx} requests (read {provider.received['read']}, "
      f"write {provider.received['write']}); extra load from retries: "
      f"**{pct(total_rx - len(plan), len(plan))}** of calls")
    for kind in ("read", "write"):
        lat = [r[3] * 1000 for r in answered if r[0] == kind]
        p(f"- {kind} latency ms: p50 {quantile(lat, 0.5):.1f}, p90 {quantile(lat, 0.9):.1f}, "
          f"p99 {quantile(lat, 0.99):.1f}, max {max(lat, default=float('nan')):.1f}")
    p("")
    p("Injected by the fake provider (per request received):")
    p("")
    p("| class | ok | 503 | reset | timeout | failed share |")
    p("|---|---|---|---|---|---|")
    for cls in ("read", "write", "all"):
        c = Counter()
        for (k, o), v in provider.drawn.items():
            if cls in (k, "all"):
                c[o] += v
        total = sum(c.values())
        p(f"| {cls} | {c['ok']} | {c['503']} | {c['reset']} | {c['timeout']} | {pct(total - c['ok'], total)} |")
    p("")
    opens = ", ".join(f"+{t:.1f} s" for t in circuit_opens) or "never"
    p(f"Gateway access log ({len(log_lines)} lines for {len(plan)} calls). "
      f"Circuit opened {len(circuit_opens)} times ({opens}; the calls ended at +{wall:.1f} s); "
      f"calls refused by the open circuit: {sum(1 for e in log_lines if e.get('error') == 'circuit_open')}")
    p("")
    for cls in ("read", "write"):
        lines = [e for e in log_lines if e.get("class") == cls]
        reasons = Counter(r for e in lines for r in e.get("retry_reasons") or [])
        p(f"- {cls} ({len(lines)}): attempts {hist(Counter(e.get('attempts') for e in lines))}")
        p(f"  - retry_reasons: {hist(reasons)}")
        p(f"  - retry_skipped: {hist(Counter(e.get('retry_skipped') for e in lines if e.get('retry_skipped')))}")
        p(f"  - status: {hist(Counter(e.get('status') for e in lines))}; "
          f"error: {hist(Counter(e.get('error') for e in lines if e.get('error')))}")
    other = [e for e in log_lines if e.get("class") not in ("read", "write")]
    if other:
        p(f"- other classes: {hist(Counter(e.get('class') for e in other))}")
    ok = not unanswered and not dupes
    p("")
    p(f"**Result: {'PASS' if ok else 'FAIL'}** (every call answered, no order create received twice)")
    return "\n".join(out), ok


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--failure", type=float, default=0.30, help="share of provider requests that fail")
    ap.add_argument("--seed", type=int, default=None, help="seed for the call plan and the fake (default: random)")
    ap.add_argument("--max-seconds", type=float, default=600, help="stop sending calls after this long")
    ap.add_argument("--no-build", action="store_true", help="use target/release/pandagate as it is")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the access log and gateway stderr here")
    args = ap.parse_args()
    if not 0 <= args.failure <= 1 or args.calls < 1 or args.concurrency < 1:
        ap.error("need 0 <= --failure <= 1, --calls >= 1, --concurrency >= 1")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    if not args.no_build:
        build_release()
    binary = RELEASE_BINARY

    work = Path(tempfile.mkdtemp(prefix="pandagate-retries-"))
    provider = gateway = serving = None
    try:
        provider = Provider(args.failure, seed + 1)
        serving = serve_in_thread(provider, 0.2)
        gateway, port = start_gateway(binary, work, provider.server_address[1])

        plan = plan_calls(args.calls, seed)
        t0, t0_wall = time.monotonic(), time.time()
        results = run_calls(port, plan, args.concurrency, args.max_seconds)
        wall = time.monotonic() - t0

        stop(gateway)  # counts are final: the fake counts a request when it arrives
        log_lines = [e for e in read_events(work / "access.log") if e.get("event") == "access"]
        circuit_opens = []  # seconds since the first call, for each open/re-open
        for line in (work / "gateway.err").read_text(errors="replace").splitlines():
            if '"circuit open' in line:
                circuit_opens.append(event_time(json.loads(line)) - t0_wall)
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for name in ("access.log", "gateway.err"):
                shutil.copy(work / name, Path(args.keep_logs) / name)
        text, ok = report(args, plan, results, provider, log_lines, circuit_opens, wall)
        print(text)
        print(f"\n(seed {seed})")
        return 0 if ok else 1
    finally:
        stop(gateway)
        stop_server(provider, serving)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
