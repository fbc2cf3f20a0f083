#!/usr/bin/env python3
"""Memory the gateway holds for request bodies that arrive slowly.

Reproduces the measurement of an unauthenticated memory attack on the push
path and on calls: bodies that declare ~1 MiB, send all but their last byte
and then stall, and the gateway's resident set before and after.

    python3 bench/body_memory.py [--binary PATH | --no-build]
        [--h2-connections 1,3] [--streams 100] [--slow 150]
        [--body-bytes 1048576] [--idle 1000] [--settle 3] [--config-extra TOML]

Scenarios, each against a fresh gateway (release build, default settings
but for a [callbacks] section on a temporary store):

* h2c-push-N: N h2c connections to the main listener, each opening
  --streams streams that POST --body-bytes to the push path with an
  `Authorization` shaped like a push's signature (64 hex digits) that signs
  nothing; each sends all but its last byte, as fast as flow control lets
  it, and never ends;
* http1-push: --slow HTTP/1.1 connections doing the same, one push each;
* http1-call: --slow HTTP/1.1 connections POSTing a call body of
  --body-bytes to /open/order (the provider is a dead address: nothing
  is forwarded before a body is in);
* idle-http1, idle-h2c: --idle connections that send nothing (HTTP/1),
  or the h2c preface and SETTINGS and nothing more: what a connection
  costs before any request.

For each: VmRSS of the gateway after a warm-up push, VmHWM (peak) and VmRSS
once every sender has sent what it could and --settle seconds passed, how
many requests were answered early (refused) and how many are still being
read, and the gateway's pandagate_body_budget_* series when it exports them.
The clients speak raw HTTP/1.1 and raw h2c frames (standard library only);
they talk only to 127.0.0.1. The gateway is stopped by its pid.

--config-extra adds lines to [server] (e.g. to compare budgets:
"max_buffered_body_bytes = 33554432"). --binary runs another build (the one
before the body budget, say) with the same clients: its config must then
hold no key it does not know.

Prints a Markdown table on stdout, progress on stderr.
"""

import argparse
import json
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RELEASE_BINARY, build_release, git_version, log, memory_kib, scrape_metrics  # noqa: E402
from benchlib import start_gateway, stop  # noqa: E402

FORGED = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
PUSH_PATH = "/callbacks/pandapon"


def memory_kb(pid):
    fields = memory_kib(pid)
    return fields["VmRSS"], fields["VmHWM"]


def metrics(admin_port):
    return scrape_metrics(admin_port, "pandagate_body_budget", "pandagate_callbacks_stored_total")


# ----------------------------------------------------------------- HTTP/1

def http1_slow(port, head, body_bytes, results, index, stop_event):
    """Sends `head` and all but the last byte of the body, then waits;
    records whether an answer came (its status line) before `stop_event`."""
    s = socket.create_connection(("127.0.0.1", port))
    results[index] = ("pending", 0)
    try:
        s.sendall(head)
        chunk = b"x" * 65536
        left = body_bytes - 1
        s.setblocking(False)
        answer = b""
        while not stop_event.is_set():
            readable, writable, _ = select.select([s], [s] if left else [], [], 0.1)
            if readable:
                data = s.recv(65536)
                if not data:
                    results[index] = ("closed", 0)
                    break
                answer += data
                if b"\r\n" in answer:
                    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
                    results[index] = ("answered", status)
                    break
            if writable and left:
                try:
                    left -= s.send(chunk[: min(left, len(chunk))])
                except (BlockingIOError, InterruptedError):
                    pass
                results[index] = ("pending", body_bytes - 1 - left)
    except OSError as e:
        results[index] = ("error", type(e).__name__)
    finally:
        stop_event.wait()
        s.close()


def run_http1(port, path, headers, count, body_bytes, settle, measure):
    stop_event = threading.Event()
    results = [None] * count
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {body_bytes}\r\n\r\n").encode()
    threads = [threading.Thread(target=http1_slow, args=(port, head, body_bytes, results, i, stop_event), daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    # Until every connection was answered or is pending with nothing more
    # the gateway will take, then the settle time.
    # Until no pending connection sends more (the gateway takes no more of
    # them), then the settle time.
    last = None
    for _ in range(240):
        time.sleep(0.5)
        sent = sum(r[1] for r in results if r and r[0] == "pending")
        if sent == last and all(results):
            break
        last = sent
    time.sleep(settle)
    measured = measure()
    stop_event.set()
    for t in threads:
        t.join(timeout=5)
    return measured, results


# ------------------------------------------------------------------- h2c

def frame(kind, flags, stream, payload=b""):
    n = len(payload)
    return bytes([n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, kind, flags]) + stream.to_bytes(4, "big") + payload


def literal(index, value):
    """An HPACK literal header field without indexing, name from the static
    table, value not Huffman-coded."""
    value = value.encode()
    assert len(value) < 127
    name = bytes([index]) if index < 15 else bytes([0x0F, index - 15])
    return name + bytes([len(value)]) + value


def post_headers(path, body_bytes, authorization):
    block = bytes([0x83, 0x86])  # :method POST, :scheme http
    block += literal(4, path) + literal(1, "x")  # :path, :authority
    block += literal(28, str(body_bytes))  # content-length
    if authorization:
        block += literal(23, authorization)  # authorization
    return block


class H2Flood:
    """One h2c connection with `streams` POSTs, each sending all but the
    last byte of `body_bytes` as flow control allows."""

    def __init__(self, port, path, streams, body_bytes, authorization):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.out = bytearray(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0))
        self.buf = bytearray()
        self.conn_window = 65535
        self.initial_window = 65535
        self.windows = {}
        self.left = {}
        self.answered = set()
        self.reset = set()
        self.closed = False
        for i in range(streams):
            sid = 2 * i + 1
            self.out += frame(0x1, 0x4, sid, post_headers(path, body_bytes, authorization))
            self.windows[sid] = self.initial_window
            self.left[sid] = body_bytes - 1

    def pump(self, timeout):
        """Reads what the server sent and sends what the windows allow."""
        if self.closed:
            return False
        self.fill()
        r, w, _ = select.select([self.sock], [self.sock] if self.out else [], [], timeout)
        if r:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.closed = True
                return False
            if data:
                self.buf += data
                self.parse()
        if w and self.out:
            try:
                n = self.sock.send(self.out)
                del self.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.closed = True
                return False
        return True

    def fill(self):
        if len(self.out) > 256 * 1024:
            return
        for sid, left in self.left.items():
            if left <= 0 or sid in self.answered or sid in self.reset:
                continue
            n = min(left, 16384, self.windows[sid], self.conn_window)
            if n <= 0:
                continue
            self.out += frame(0x0, 0, sid, b"y" * n)
            self.left[sid] -= n
            self.windows[sid] -= n
            self.conn_window -= n

    def parse(self):
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9:9 + n])
            del self.buf[:9 + n]
            if kind == 0x4 and not flags & 1:
                for i in range(0, len(payload), 6):
                    ident = int.from_bytes(payload[i:i + 2], "big")
                    value = int.from_bytes(payload[i + 2:i + 6], "big")
                    if ident == 0x4:
                        delta = value - self.initial_window
                        self.initial_window = value
                        for s in self.windows:
                            self.windows[s] += delta
                self.out += frame(0x4, 1, 0)
            elif kind == 0x8:
                inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                elif sid in self.windows:
                    self.windows[sid] += inc
            elif kind == 0x1:
                self.answered.add(sid)
            elif kind == 0x3:
                self.reset.add(sid)
            elif kind == 0x6 and not flags & 1:
                self.out += frame(0x6, 1, 0, payload)
            elif kind == 0x7:
                self.closed = True


def run_h2(port, connections, streams, body_bytes, settle, measure):
    floods = [H2Flood(port, PUSH_PATH, streams, body_bytes, FORGED) for _ in range(connections)]
    sent_before = None
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for f in floods:
            f.pump(0.01)
        remaining = sum(left for f in floods for left in f.left.values())
        if remaining != sent_before:
            sent_before, quiet_since = remaining, time.monotonic()
        elif time.monotonic() - quiet_since > settle:
            break
    measured = measure()
    sent = sum((body_bytes - 1) - left for f in floods for left in f.left.values())
    answered = sum(len(f.answered) for f in floods)
    reset = sum(len(f.reset - f.answered) for f in floods)
    for f in floods:
        f.sock.close()
    return measured, sent, answered, reset


# ------------------------------------------------------------------ idle

def run_idle(port, count, h2, settle, measure):
    socks = []
    hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0) if h2 else b""
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if hello:
            s.sendall(hello)
        socks.append(s)
    time.sleep(settle)
    open_now = 0
    for s in socks:
        s.setblocking(False)
        try:
            open_now += s.recv(65536) != b""
        except BlockingIOError:
            open_now += 1
        except OSError:
            pass
    measured = measure()
    for s in socks:
        s.close()
    return measured, open_now


# ------------------------------------------------------------------ main

def config_text(store, extra):
    return (f"[server]\n{extra}\n\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\n"
            f"[callbacks]\nstore = \"{store}\"\n")


def warm_up(port):
    """One forged push: the receiver's code paths are in memory."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = b"{}"
    s.sendall(f"POST {PUSH_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {FORGED}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    while s.recv(65536):
        pass
    s.close()


def scenario(binary, name, extra, settle, run):
    with tempfile.TemporaryDirectory(prefix="pandagate-bodymem-") as work:
        work = Path(work)
        proc, ports = start_gateway(binary, work, config_text(work / "store", extra))
        try:
            warm_up(ports["gateway"])
            time.sleep(0.5)
            before, _ = memory_kb(proc.pid)
            log(f"{name}: VmRSS before {before} kB")

            def measure():
                """Memory, then the budget's series, with the bodies held."""
                rss, hwm = memory_kb(proc.pid)
                return {"rss": rss, "hwm": hwm, "metrics": metrics(ports["admin"])}

            row = run(ports["gateway"], measure)
            row["name"] = name
            row["before"] = before
            log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'metrics'})}")
            return row
        finally:
            stop(proc, grace=5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=None, help="pandagate binary to run (implies --no-build)")
    p.add_argument("--no-build", action="store_true", help="use target/release/pandagate as is")
    p.add_argument("--h2-connections", default="1,3")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--slow", type=int, default=150)
    p.add_argument("--body-bytes", type=int, default=1024 * 1024)
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--config-extra", default="")
    a = p.parse_args()

    binary = Path(a.binary) if a.binary else RELEASE_BINARY
    if not a.binary and not a.no_build:
        build_release()
    if not binary.exists():
        sys.exit(f"no binary at {binary}; run without --no-build")

    mib = 1024 * 1024
    rows = []
    for n in [int(x) for x in a.h2_connections.split(",") if x]:
        def h2(port, measure, n=n):
            measured, sent, answered, reset = run_h2(port, n, a.streams, a.body_bytes, a.settle, measure)
            return {"offered": n * a.streams * a.body_bytes, "sent": sent, **measured,
                    "answered": answered, "pending": n * a.streams - answered - reset, "reset": reset}
        rows.append(scenario(binary, f"h2c-push-{n}x{a.streams}", a.config_extra, a.settle, h2))

    for name, path, headers in [("http1-push", PUSH_PATH, f"Authorization: {FORGED}\r\n"),
                                ("http1-call", "/open/order", "")]:
        def h1(port, measure, path=path, headers=headers):
            measured, results = run_http1(port, path, headers, a.slow, a.body_bytes, a.settle, measure)
            answered = [r for r in results if r and r[0] == "answered"]
            pending = [r for r in results if r and r[0] == "pending"]
            return {"offered": a.slow * a.body_bytes, "sent": sum(r[1] for r in pending), **measured,
                    "answered": len(answered), "pending": len(pending),
                    "reset": a.slow - len(answered) - len(pending),
                    "statuses": sorted({r[1] for r in answered})}
        rows.append(scenario(binary, f"{name}-{a.slow}", a.config_extra, a.settle, h1))

    for name, h2 in [("idle-http1", False), ("idle-h2c", True)]:
        if not a.idle:
            break

        def idle(port, measure, h2=h2):
            measured, open_now = run_idle(port, a.idle, h2, a.settle, measure)
            return {"offered": 0, "sent": 0, **measured, "answered": 0, "pending": open_now, "reset": 0}
        rows.append(scenario(binary, f"{name}-{a.idle}", a.config_extra, a.settle, idle))

    print(f"# Request-body memory ({git_version()}, {binary})\n")
    print(f"Each body declares {a.body_bytes} bytes and sends all but its last byte; "
          f"`[server]` extra: `{a.config_extra or '(none)'}`. "
          "Still open: requests (connections, for the idle rows) not answered when measured.\n")
    print("| scenario | offered MiB | still open (MiB sent in all) | answered early | VmRSS before | VmHWM after | VmRSS after | growth | budget rejected | budget held |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        rejected = sum(v for k, v in m.items() if k.startswith("pandagate_body_budget_rejected_total"))
        held = m.get("pandagate_body_budget_held_bytes")
        print(f"| {r['name']} | {r['offered'] / mib:.0f} | {r['pending']} ({r['sent'] / mib:.1f}) | {r['answered']} "
              f"| {r['before'] / 1024:.1f} MiB | {r['hwm'] / 1024:.1f} MiB | {r['rss'] / 1024:.1f} MiB "
              f"| +{(r['hwm'] - r['before']) / 1024:.1f} MiB | {rejected:.0f} "
              f"| {'n/a' if held is None else f'{held / mib:.1f} MiB'} |")
    statuses = {r["name"]: r.get("statuses") for r in rows if r.get("statuses")}
    if statuses:
        print(f"\nHTTP/1 answers seen: {statuses}")


if __name__ == "__main__":
    main()
