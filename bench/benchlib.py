"""The harness the Python benchmark scripts in bench/ share: building and
starting the gateway, fake providers on loopback, scraping /metrics, reading
the gateway's logs, memory from /proc, redis-server and PostgreSQL servers
of a run's own, and small report helpers. Python 3.11 standard library only;
everything it starts listens on 127.0.0.1 only."""

import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE_BINARY = ROOT / "target" / "release" / "pandagate"


def logger(prefix=None):
    """A progress printer to stderr, each line led by `prefix` when given."""
    lead = (prefix,) if prefix else ()

    def log(*a):
        print(*lead, *a, file=sys.stderr, flush=True)
    return log


log = logger()


# --------------------------------------------------------------------------
# Processes, ports, files
# --------------------------------------------------------------------------

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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def linger_zero(sock):
    """Makes the socket's close send an RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def write_atomically(path, text):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def leave_work(work, keep, log=log):
    """Removes a run's work directory, or says where it was kept."""
    if keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def command_output(*args):
    """A command's stdout, stripped; "?" when it cannot be run."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def git_version():
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty=+uncommitted changes"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10)
        return f"git {r.stdout.strip() or '?'}"
    except (OSError, subprocess.SubprocessError):
        return "git ?"


def apt_install(package, present, what=None, log=log):
    """Installs the Debian package `package` unless `present()` says it is
    there already."""
    if present():
        return
    log(f"{what or package} missing: installing the Debian package {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env,
                   check=True, timeout=600, stdout=subprocess.DEVNULL)


def memory_kib(pid, name="status"):
    """The `Field: N kB` lines of /proc/PID/NAME as {field: N}: VmRSS, VmHWM
    ... from status, Pss ... from smaps_rollup; {} when the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                field, sep, rest = line.partition(":")
                parts = rest.split()
                if sep and len(parts) == 2 and parts[1] == "kB":
                    out[field] = int(parts[0])
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------

def binary_option(parser):
    """--binary: a pandagate binary built beforehand (the script builds none)."""
    parser.add_argument("--binary", default=str(RELEASE_BINARY),
                        help="pandagate binary (default target/release/pandagate; not built here)")


def prebuilt_binary(path, script):
    """`path` resolved; exits saying how to build it when it is not there."""
    binary = Path(path).resolve()
    if not binary.exists():
        sys.exit(f"{script}: {binary} missing (build it: cargo build --release)")
    return binary


def build_release(log=log):
    """cargo build --release of this work tree; returns target/release/pandagate."""
    command = ["cargo", "build", "--release", "-q"]
    log(f"building: {' '.join(command)}")
    subprocess.run(command, cwd=ROOT, check=True, timeout=3600)
    return RELEASE_BINARY


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


class Gateway:
    """One pandagate process in a directory of its own under `work` (config,
    access.log, gateway.err), started with start_gateway (`env_extra` as
    there). `metrics` is for the caller to keep a scrape in."""

    def __init__(self, name, binary, work, toml, **env_extra):
        self.name = name
        self.dir = work / name
        self.dir.mkdir()
        self.proc, ports = start_gateway(binary, self.dir, toml, **env_extra)
        self.pid = self.proc.pid
        self.port = ports["gateway"]
        self.admin_port = ports["admin"]
        self.metrics = {}

    def alive(self):
        return self.proc.poll() is None

    def stop(self, grace=25):
        stop(self.proc, grace)

    def log_events(self, name):
        """The JSON objects of the file `name` in its directory."""
        return read_events(self.dir / name)

    def access_log(self):
        return [e for e in self.log_events("access.log") if e.get("event", "access") == "access"]


def read_json_lines(path):
    """The JSON objects of a log file, and its other non-blank lines."""
    events = []
    other = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                other.append(line)
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, other


def read_events(path):
    """The JSON objects of a log file; none when it cannot be read."""
    try:
        return read_json_lines(path)[0]
    except OSError:
        return []


def event_time(event):
    """A log line's timestamp as seconds since the epoch, or None."""
    ts = event.get("timestamp") or event.get("ts")
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def http_get(port, path, timeout=5):
    """(status, body) of GET `path` on 127.0.0.1:`port`, a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def parse_metrics(text, prefixes=("pandagate_",), numbers=True):
    """{series with labels: value} of the exposition lines whose name starts
    with one of `prefixes`; values as floats (a line whose value is not a
    number left out) or, numbers=False, as written."""
    out = {}
    for line in text.splitlines():
        if line.startswith(tuple(prefixes)):
            name, _, value = line.rpartition(" ")
            if numbers:
                try:
                    value = float(value)
                except ValueError:
                    continue
            out[name] = value
    return out


def scrape_metrics(admin_port, *prefixes, numbers=True, timeout=5):
    """parse_metrics of GET /metrics on the admin port (every pandagate_
    series unless `prefixes` say which); {} when it does not answer 200."""
    try:
        status, body = http_get(admin_port, "/metrics", timeout)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    return parse_metrics(body.decode(errors="replace"), prefixes or ("pandagate_",), numbers)


# --------------------------------------------------------------------------
# Fake providers and subscribers
# --------------------------------------------------------------------------

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


def serve_in_thread(server, poll_interval=0.5):
    """Runs `server.serve_forever` in a daemon thread; returns the thread."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval},
                              daemon=True)
    thread.start()
    return thread


def stop_server(server, thread=None):
    """Stops a server started with serve_in_thread and closes its socket."""
    if thread is not None:
        server.shutdown()
        thread.join(timeout=5)
    if server is not None:
        server.server_close()


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
        (the gateway gave up on the attempt) just closes the connection.
        Returns whether it was written."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return True
        except OSError:
            self.close_connection = True
            return False

    def reset(self):
        """Drops the connection with an RST and no response, the request
        having been read in full."""
        self.close_connection = True
        linger_zero(self.connection)
        self.rfile.close()
        self.wfile.close()
        self.wfile = io.BytesIO()  # the server still flushes it after this returns
        self.connection.close()


# --------------------------------------------------------------------------
# Callers
# --------------------------------------------------------------------------

def run_pool(port, items, concurrency, max_seconds, timeout, send, failed):
    """Sends `items` to 127.0.0.1:`port` from `concurrency` threads, each with
    one keep-alive connection, until done or `max_seconds` passed.
    `send(conn, item)` makes one call and returns (result, close_connection);
    a call that raises gets `failed(item, seconds, error_name)` instead.
    Returns the results in item order; None for items never sent."""
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


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------

def ensure_redis(log=log):
    apt_install("redis-server", lambda: shutil.which("redis-server"), log=log)


def redis_version():
    return command_output("redis-server", "--version")


def resp_command(port, *args, timeout=2.0):
    """One RESP command on a fresh connection; returns the raw reply bytes."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = str(a).encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if args[0].upper() == "TIME" and data.count(b"\r\n") >= 5:
                break
            if args[0].upper() != "TIME" and data.endswith(b"\r\n"):
                break
        return data


def start_redis(work):
    """A redis-server of the run's own (free port, no persistence, log in
    work/redis.log); returns (process, port) once it answers PING."""
    port = free_port()
    out = open(work / "redis.log", "wb")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited: "
                               + (work / "redis.log").read_text(errors="replace")[-2000:])
        try:
            if resp_command(port, "PING", timeout=0.5).startswith(b"+PONG"):
                return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING in time")


def redis_cli(port, *args, timeout=20):
    """`redis-cli -h 127.0.0.1 -p PORT ARGS...`, bounded to `timeout` seconds;
    its stdout. Raises RuntimeError when it fails or answers an error."""
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *map(str, args)]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(command)}: no answer within {timeout} s") from None
    if r.returncode != 0 or r.stdout.startswith(("ERR", "(error)")):
        raise RuntimeError(f"{' '.join(command)}: {r.stdout.strip()} {r.stderr.strip()}")
    return r.stdout


def distinct_free_ports(n):
    """`n` different free loopback ports (free when asked, as free_port)."""
    ports = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class RedisCluster:
    """A Redis Cluster of the run's own: `masters` `redis-server
    --cluster-enabled yes` processes on free loopback ports (each bus on a
    free port of its own, `--cluster-node-timeout 2000`, no persistence,
    config files and logs in work/`name`), no replicas, made one cluster by
    `redis-cli --cluster create`. `start()` returns once every node says
    `cluster_state:ok`; `stop()` stops each process it started by its own
    handle (also after a failed start)."""

    def __init__(self, work, masters=3, name="cluster"):
        self.dir = Path(work) / name
        self.masters = masters
        self.procs = []
        self.ports = []
        self.bus_ports = []

    def start(self, timeout=30.0):
        self.dir.mkdir()
        ports = distinct_free_ports(2 * self.masters)
        self.ports, self.bus_ports = ports[:self.masters], ports[self.masters:]
        for i, (port, bus) in enumerate(zip(self.ports, self.bus_ports)):
            with open(self.dir / f"redis-{port}.log", "wb") as out:
                self.procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no",
                     "--cluster-enabled", "yes", "--cluster-port", str(bus),
                     "--cluster-config-file", str(self.dir / f"nodes-{i}.conf"),
                     "--cluster-node-timeout", "2000", "--dir", str(self.dir)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        for proc, port in zip(self.procs, self.ports):
            self._wait(deadline, f"node {port} answers PING",
                       lambda: resp_command(port, "PING", timeout=0.5).startswith(b"+PONG"))
        redis_cli(self.ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "0", "--cluster-yes", timeout=max(1.0, deadline - time.monotonic()))
        for port in self.ports:
            self._wait(deadline, f"node {port} says cluster_state:ok",
                       lambda: "cluster_state:ok" in redis_cli(port, "cluster", "info", timeout=2))
        return self

    def _wait(self, deadline, what, done):
        while True:
            dead = [p.args[2] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"redis-server on port(s) {', '.join(dead)} exited; logs in {self.dir}")
            try:
                if done():
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster: not in time: {what}")
            time.sleep(0.05)

    def urls(self):
        return [f"redis://127.0.0.1:{p}" for p in self.ports]

    def slots(self):
        """{port: "first-last ..."}: the slot ranges each master serves, as
        the first node's `CLUSTER NODES` says."""
        out = {}
        for line in redis_cli(self.ports[0], "cluster", "nodes", timeout=5).splitlines():
            f = line.split()
            if len(f) >= 8:
                port = int(f[1].split("@")[0].rsplit(":", 1)[1])
                out[port] = " ".join(f[8:])
        return out

    def keys(self, port, pattern="*"):
        """{key: slot} of the keys matching `pattern` on the node at `port`
        (KEYS: for the small key sets of a benchmark only)."""
        names = [k for k in redis_cli(port, "keys", pattern, timeout=5).splitlines() if k]
        return {k: int(redis_cli(port, "cluster", "keyslot", k, timeout=5).strip()) for k in names}

    def dbsize(self, port):
        return int(redis_cli(port, "dbsize", timeout=5).strip())

    def stop(self, grace=10):
        for proc in self.procs:
            stop(proc, grace)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "pandagate"
PG_DB = "pandagate"


def ensure_postgres(log=log):
    apt_install("postgresql", lambda: (PG_BIN / "postgres").exists(), what="PostgreSQL 15", log=log)
    if not (PG_BIN / "postgres").exists():
        sys.exit(f"{PG_BIN / 'postgres'} still missing after installing postgresql")


class Postgres:
    """A PostgreSQL server of its own for the run: a temp dir owned by the
    postgres user (the server refuses to run as root), trust auth for
    PG_USER, 127.0.0.1 and a free port only, the Unix socket in that dir,
    every other setting the default (fsync on)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pandagate-callbacks-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = None
        self.proc = None  # runuser (as root) or postgres itself
        self.stats_before, self.stats_after, self.errors = {}, {"tables": [], "db": None}, Counter()
        self.as_postgres = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]

    def start(self):
        init = subprocess.run(self.as_postgres + [str(PG_BIN / "initdb"), "-A", "trust", "-U", PG_USER,
                                                  "-D", str(self.data), "--no-sync"],
                              capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        self.port = free_port()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.as_postgres + [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                    "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited: " + self.log_tail())
            r = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                "-U", PG_USER, "-d", "postgres"],
                               timeout=10)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not accept connections within 30 s: " + self.log_tail())
            time.sleep(0.1)
        r = subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", PG_USER, PG_DB], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"createdb failed: {r.stderr.strip()}")

    @property
    def url(self):
        return f"postgres://{PG_USER}@127.0.0.1:{self.port}/{PG_DB}"

    def log_tail(self, n=2000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def postmaster_pid(self):
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def psql(self, sql, check=False, timeout=20):
        """Rows of `sql` (tab-separated fields) on a connection of psql's own
        (no statement timeout). When psql fails: None, or with `check` a
        RuntimeError (and a timeout raises)."""
        command = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
                   "-d", PG_DB, "-XAtF", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql]
        try:
            r = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            if check:
                raise
            return None
        if r.returncode != 0:
            if check:
                raise RuntimeError(f"psql failed: {r.stderr.strip()}")
            return None
        return [line.split("\t") for line in r.stdout.splitlines()]

    def version(self):
        rows = self.psql("show server_version")
        return rows[0][0] if rows else "?"

    def stats(self):
        """Schema-agnostic figures: per table inserts/updates/deletes/live
        rows, and the database's commits, rollbacks and deadlocks."""
        tables = self.psql("select relname, n_tup_ins, n_tup_upd, n_tup_del, n_live_tup "
                           "from pg_stat_user_tables order by relname") or []
        db = self.psql("select xact_commit, xact_rollback, deadlocks from pg_stat_database "
                       f"where datname = '{PG_DB}'")
        settings = self.psql("select name, setting from pg_settings where name in "
                             "('fsync', 'synchronous_commit', 'wal_sync_method')") or []
        return {"tables": tables, "db": db[0] if db else None, "settings": dict(settings)}

    def log_errors(self):
        """ERROR / FATAL / PANIC lines of the server log, by message."""
        out = Counter()
        for line in self.log_tail(n=10_000_000).splitlines():
            for level in ("ERROR:", "FATAL:", "PANIC:"):
                at = line.find(f" {level} ")
                if at >= 0:
                    out[f"{level} {line[at + len(level) + 2:].strip()[:90]}"] += 1
        return out

    def stop(self):
        """Fast shutdown: SIGINT to the postmaster (its pid is the first line
        of postmaster.pid; runuser does not pass signals on), then waits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.postmaster_pid()
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
            if pid is not None:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            elif sig == signal.SIGKILL:
                self.proc.kill()
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                log(f"postgres (pid {pid}) still running after {sig.name}")

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# Report helpers
# --------------------------------------------------------------------------

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


def ms(seconds):
    """Seconds as milliseconds with three decimals (text)."""
    return f"{seconds * 1000:.3f}"
