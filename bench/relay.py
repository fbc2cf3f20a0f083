#!/usr/bin/env python3
"""A delaying TCP relay on 127.0.0.1: a network round trip where there is none.

There is no `tc netem` on these machines, so the benchmarks that need a real
round-trip time put this relay between a proxy and its upstream. It accepts
on 127.0.0.1:PORT, opens a connection to TARGET for each connection it
accepts, and forwards every chunk it reads, in either direction, DELAY ms
after it read it: one-way delay DELAY, round trip 2 x DELAY.

- Order is kept: each direction of each connection has its own queue of
  (due time, chunk); a chunk is written when it is due and everything read
  before it has been written. The two directions are independent: a chunk
  waiting in one never holds up the other.
- End of stream and resets travel with the same delay: a FIN read from one
  side is passed on (shutdown(SHUT_WR)) DELAY ms later, behind the data
  before it; a reset (ECONNRESET on a read, or EPIPE/ECONNRESET writing to a
  side that went away) is passed on DELAY ms later as a reset (SO_LINGER 0).
- The TCP handshake pays its round trip too (unless --no-connect-rtt): the
  kernel completes the client's connect() at once, so the first bytes
  towards TARGET leave no earlier than accept + 2 x DELAY and arrive DELAY
  later, as they would after a SYN / SYN-ACK over the emulated path. TLS
  handshakes pay their round trips like any other bytes.
- One thread, a selector loop; a chunk is written within about 0.1 ms of
  its due time (select waits to 1.5 ms before it, a short sleep does the
  rest).

    bench/relay.py --target PORT|HOST:PORT [--port 0] [--delay-ms 20]
                   [--port-file FILE] [--log FILE] [--no-connect-rtt]

--port 0 (default) takes a free port; the port is printed on stdout
("relay 127.0.0.1:PORT -> TARGET, delay D ms") and written to --port-file
once listening. --log FILE gets one line per connection when it ends:
`id accept_time end_time bytes_up bytes_down how` (how: eof, reset,
refused, stopped). SIGTERM or SIGINT stops it (open connections are cut
with a reset), after writing a last line to stderr with the totals.
Python 3 standard library only; listens and connects on 127.0.0.1 only.
"""

import argparse
import collections
import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import sys
import time

# No __pycache__ in the work tree (it would mark the commit dirty in reports).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import linger_zero, write_atomically  # noqa: E402

EOF = object()
RST = object()
CHUNK = 65536
# select() wakes up this long before a chunk is due; a sleep covers the
# rest, so that the millisecond rounding of epoll's timeout does not add up
# to 1 ms to every chunk.
SPIN = 0.0015


class Direction:
    """One way of one relayed connection: read from src, write to dst."""

    __slots__ = ("pair", "src", "dst", "queue", "pending", "reading", "done", "name", "bytes")

    def __init__(self, pair, src, dst, name):
        self.pair = pair
        self.src = src
        self.dst = dst
        self.queue = collections.deque()  # (due, bytes | EOF | RST)
        self.pending = b""  # part of a chunk the kernel did not take yet
        self.reading = True
        self.done = False  # EOF passed on
        self.name = name
        self.bytes = 0


class Pair:
    __slots__ = ("id", "client", "server", "up", "down", "accepted", "not_before", "closed", "how")

    def __init__(self, ident, client, server, accepted, not_before):
        self.id = ident
        self.client = client
        self.server = server
        self.up = Direction(self, client, server, "up")
        self.down = Direction(self, server, client, "down")
        self.accepted = accepted
        self.not_before = not_before  # first bytes up may not leave before this
        self.closed = False
        self.how = "eof"


class Relay:
    def __init__(self, target, delay, connect_rtt, log_path):
        self.target = target
        self.delay = delay
        self.connect_rtt = connect_rtt
        self.sel = selectors.DefaultSelector()
        self.pairs = set()
        self.next_id = 0
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.totals = collections.Counter()
        self.listener = None
        # (due, seq, direction) for every chunk, EOF or reset queued: when
        # to look at which direction next.
        self.timers = []
        self.seq = itertools.count()

    # ---------------------------------------------------------------- sockets

    def listen(self, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1024)
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, None)
        self.listener = s
        return s.getsockname()[1]

    def mask(self, sock, pair):
        """What to wait for on `sock`: reading while its inbound direction
        reads, writing while its outbound direction has bytes the kernel
        did not take."""
        inbound = pair.up if sock is pair.client else pair.down
        outbound = pair.down if sock is pair.client else pair.up
        m = 0
        if inbound.reading:
            m |= selectors.EVENT_READ
        if outbound.pending:
            m |= selectors.EVENT_WRITE
        return m

    def update(self, sock, pair):
        if pair.closed:
            return
        m = self.mask(sock, pair)
        try:
            key = self.sel.get_key(sock)
        except KeyError:
            key = None
        if m == 0:
            if key is not None:
                self.sel.unregister(sock)
        elif key is None:
            self.sel.register(sock, m, pair)
        elif key.events != m:
            self.sel.modify(sock, m, pair)

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    print(f"relay: accept: {e}", file=sys.stderr, flush=True)
                    return
                raise
            now = time.monotonic()
            self.next_id += 1
            self.totals["accepted"] += 1
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                # Loopback: the connect completes (or is refused) at once.
                server.settimeout(5)
                server.connect(self.target)
            except OSError:
                self.totals["refused"] += 1
                server.close()
                abort(client)
                self.write_log(self.next_id, now, 0, 0, "refused")
                continue
            client.setblocking(False)
            server.setblocking(False)
            not_before = now + 2 * self.delay if self.connect_rtt else now
            pair = Pair(self.next_id, client, server, now, not_before)
            self.pairs.add(pair)
            self.update(client, pair)
            self.update(server, pair)

    # ---------------------------------------------------------------- data

    def read(self, d):
        try:
            data = d.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # A reset: stop reading this way, pass it on after the delay.
            data = None
        now = time.monotonic()
        due = now + self.delay
        if d is d.pair.up:
            due = max(now, d.pair.not_before) + self.delay
        if data:
            d.bytes += len(data)
            self.enqueue(d, due, data)
            return
        d.reading = False
        self.enqueue(d, due, EOF if data == b"" else RST)
        self.update(d.src, d.pair)

    def enqueue(self, d, due, item):
        d.queue.append((due, item))
        heapq.heappush(self.timers, (due, next(self.seq), d))

    def flush(self, d, now):
        """Writes what is due on `d`, in order; stops at the first chunk not
        yet due or not taken whole by the kernel."""
        pair = d.pair
        while not pair.closed:
            if d.pending:
                try:
                    n = d.dst.send(d.pending)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self.broken(d, now)
                    return
                d.pending = d.pending[n:]
                if d.pending:
                    self.update(d.dst, pair)
                    return
                self.update(d.dst, pair)
            if not d.queue or d.queue[0][0] > now:
                return
            _, item = d.queue.popleft()
            if item is EOF:
                try:
                    d.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                d.done = True
                if pair.up.done and pair.down.done:
                    self.close(pair, "eof")
                return
            if item is RST:
                self.close(pair, "reset", reset=True)
                return
            d.pending = item

    def broken(self, d, now):
        """Writing to d.dst failed: that side reset the connection. Nothing
        more goes that way; the reset reaches the other side after the delay."""
        d.queue.clear()
        d.pending = b""
        other = d.pair.down if d is d.pair.up else d.pair.up
        other.reading = False
        self.enqueue(other, now + self.delay, RST)
        d.done = True
        self.update(d.src, d.pair)
        self.update(d.dst, d.pair)

    def close(self, pair, how, reset=False):
        if pair.closed:
            return
        pair.closed = True
        pair.how = how
        for s in (pair.client, pair.server):
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            if reset:
                abort(s)
            else:
                s.close()
        self.pairs.discard(pair)
        self.totals[how] += 1
        self.totals["bytes_up"] += pair.up.bytes
        self.totals["bytes_down"] += pair.down.bytes
        self.write_log(pair.id, pair.accepted, pair.up.bytes, pair.down.bytes, how)

    def write_log(self, ident, accepted, up, down, how):
        if self.log:
            self.log.write(f"{ident} {accepted:.6f} {time.monotonic():.6f} {up} {down} {how}\n")

    # ---------------------------------------------------------------- loop

    def next_due(self):
        """The earliest due time still waiting, dropping timers of closed
        connections and of directions already written (or waiting for the
        kernel to take their bytes: a write-ready event resumes those)."""
        while self.timers:
            due, _, d = self.timers[0]
            if d.pair.closed or d.pending or not d.queue or d.queue[0][0] > due:
                heapq.heappop(self.timers)
                continue
            return due
        return None

    def run(self):
        while True:
            due = self.next_due()
            now = time.monotonic()
            timeout = None if due is None else max(0.0, due - now - SPIN)
            for key, events in self.sel.select(timeout):
                if key.data is None:
                    self.accept()
                    continue
                pair = key.data
                if pair.closed:
                    continue
                sock = key.fileobj
                if events & selectors.EVENT_READ:
                    d = pair.up if sock is pair.client else pair.down
                    if d.reading:
                        self.read(d)
                if events & selectors.EVENT_WRITE and not pair.closed:
                    d = pair.down if sock is pair.client else pair.up
                    self.flush(d, time.monotonic())
            due = self.next_due()
            if due is None:
                continue
            wait = due - time.monotonic()
            if wait > SPIN:
                continue
            if wait > 0:
                time.sleep(wait)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, d = heapq.heappop(self.timers)
                if not d.pair.closed and not d.pending:
                    self.flush(d, now)

    def stop(self):
        for pair in list(self.pairs):
            self.close(pair, "stopped", reset=True)
        if self.listener is not None:
            self.listener.close()
        t = self.totals
        print(f"relay: {t['accepted']} connections ({t['eof']} ended, {t['reset']} reset, "
              f"{t['refused']} refused, {t['stopped']} cut at stop); "
              f"{t['bytes_up']} bytes up, {t['bytes_down']} down", file=sys.stderr, flush=True)
        if self.log:
            self.log.close()


def abort(sock):
    """Closes with a reset (SO_LINGER 0) instead of a FIN."""
    try:
        linger_zero(sock)
    except OSError:
        pass
    sock.close()


def parse_target(text):
    host, _, port = text.rpartition(":")
    host = host or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost"):
        raise argparse.ArgumentTypeError("the relay only connects to 127.0.0.1")
    return ("127.0.0.1", int(port))


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, type=parse_target, help="PORT or 127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (default 20)")
    p.add_argument("--port-file", help="write the port there once listening")
    p.add_argument("--log", help="append a line per connection there when it ends")
    p.add_argument("--no-connect-rtt", action="store_true",
                   help="do not make the first bytes wait for the TCP handshake's round trip")
    args = p.parse_args(argv)
    if args.delay_ms < 0:
        p.error("--delay-ms must be >= 0")
    relay = Relay(args.target, args.delay_ms / 1000.0, not args.no_connect_rtt, args.log)

    def on_signal(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = relay.listen(args.port)
    print(f"relay 127.0.0.1:{port} -> {args.target[0]}:{args.target[1]}, delay {args.delay_ms:g} ms",
          flush=True)
    if args.port_file:
        write_atomically(args.port_file, f"{port}\n")
    try:
        relay.run()
    finally:
        relay.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
