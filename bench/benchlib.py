"""Small helpers shared by the Python benchmark scripts in bench/."""

import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on a free 127.0.0.1 port, with a seeded random
    generator and a lock for the subclass's records."""

    daemon_threads = True
    request_queue_size = 512

    def __init__(self, handler, seed):
        super().__init__(("127.0.0.1", 0), handler)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fake_errors = Counter()  # exception name -> count, for the report

    def handle_error(self, request, client_address):
        # The gateway dropping a connection it gave up on is expected;
        # anything else is a bug in the fake, counted in the report.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            with self.lock:
                self.fake_errors[type(sys.exc_info()[1]).__name__] += 1


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no request log; GET and POST both go to
    `self.serve()`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def answer_json(self, status, payload):
        """Sends `payload` (bytes) as a JSON answer; a caller that has gone
        (the gateway gave up on the attempt) just closes the connection."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def reset(self):
        """Drops the connection with an RST and no response, the request
        having been read in full."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        self.wfile = io.BytesIO()  # the server still flushes it after this returns
        self.connection.close()


def stop(proc, grace=25):
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def git_version():
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty=+uncommitted changes"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10)
        return f"git {r.stdout.strip() or '?'}"
    except (OSError, subprocess.SubprocessError):
        return "git ?"


def quantile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def pct(part, whole):
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


def hist(counter):
    if not counter:
        return "none"
    return ", ".join(f"`{k}`: {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def start_gateway(binary, work, config_text, **env_extra):
    """Starts `binary run` with `config_text` as its config, JSON logs, the
    access log in work/access.log and diagnostics in work/gateway.err, both
    listeners on free loopback ports. Waits for "gateway ready"; returns the
    process and {"gateway": port, "admin": port, "control": port}. An `env_extra` value of
    None removes that variable from the gateway's environment."""
    config = work / "pandagate.toml"
    config.write_text(config_text)
    env = dict(os.environ,
               PANDAPON_ACCESS_KEY="bench-key",
               PANDAPON_ACCESS_SECRET="bench-secret",
               PANDAGATE_LISTEN="127.0.0.1:0",
               PANDAGATE_ADMIN_LISTEN="127.0.0.1:0",
               PANDAGATE_CONTROL_LISTEN="127.0.0.1:0",
               PANDAGATE_LOG_FORMAT="json")
    env.pop("RUST_LOG", None)
    env.pop("PANDAPON_ACCESS_SECRET_FILE", None)
    env.update(env_extra)
    for name in [k for k, v in env.items() if v is None]:
        del env[name]
    errors = work / "gateway.err"
    with open(work / "access.log", "wb") as out, open(errors, "wb") as err:
        proc = subprocess.Popen([str(binary), "--config", str(config), "run"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ports, ready = {}, False
        for line in errors.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            msg = event.get("message")
            if msg in ("gateway listening", "admin listening", "control listening"):
                ports[msg.split()[0]] = int(str(event.get("addr")).rsplit(":", 1)[1])
            elif msg == "gateway ready":
                ready = True
        if ready and "gateway" in ports and "admin" in ports:
            return proc, ports
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc, grace=5)
    raise RuntimeError("gateway did not start:\n" + errors.read_text(errors="replace"))


def run_pool(port, items, concurrency, max_seconds, timeout, send, failed):
    """Sends `items` to 127.0.0.1:`port` from `concurrency` threads, each with
    one keep-alive connection, until done or `max_seconds` passed.
    `send(conn, item)` makes one call and returns (result, close_connection);
    a call that raises gets `failed(item, seconds, error_name)` instead.
    Returns the results in item order; None for items never sent."""
    import http.client

    results = [None] * len(items)
    next_index = iter(range(len(items)))
    index_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker():
        conn = None
        while time.monotonic() < deadline:
            with index_lock:
                i = next(next_index, None)
            if i is None:
                break
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            started = time.perf_counter()
            try:
                results[i], close = send(conn, items[i])
            except (OSError, http.client.HTTPException) as e:
                results[i], close = failed(items[i], time.perf_counter() - started, type(e).__name__), True
            if close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + timeout + 5)
    return results
