#!/usr/bin/env python3
"""Operators' endpoints on a large shared store: how long a page of
`GET /callbacks` and a `POST /callbacks/replay?id=` take with 1 M deliveries.

    python3 bench/callbacks_pages.py [--rows 1000000] [--runs 9]
        [--statement-timeout-ms 500] [--binary PATH] [--no-replay-all] [--keep]

Starts a PostgreSQL 15 server of its own (as bench/callbacks.py does: temp
data dir, free port, 127.0.0.1 only, fsync on), one gateway with
`[callbacks] backend = "postgres"` on it (which creates the schema), then
loads --rows deliveries of one message in one `INSERT ... SELECT FROM
generate_series` (odd rows pending, not due for a day, so the delivery loop
stays idle; even rows dead letters; `first_at_ms` in ties of three) and runs
ANALYZE. Each run then times, over HTTP on the admin listener (listings)
and the control listener (replays):

- the first page of pending and of dead deliveries (`limit` 100, the default),
- a page of 100 after a cursor in the middle of each list, and a page of 1000,
- a replay by delivery id and one by key, each of a different dead letter
  each run.

Prints the median, min and max of --runs runs per operation as Markdown, and
for reference the execution time (EXPLAIN ANALYZE, without a statement
timeout) of the one statement that answered `GET /callbacks` before pages
existed (every pending row, and every dead row, which replay by id also
read). Unless --no-replay-all, ends with one `POST /callbacks/replay?all-dead=1`
of the --rows / 2 dead letters (in batches of 500), timed.

The gateway is the debug build (target/debug/pandagate) unless --binary says
otherwise: these figures are PostgreSQL's index scans; the gateway adds well
under a millisecond. Python 3.11 standard library only; talks only to
127.0.0.1; every process it starts is stopped by its own pid.
"""

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, Postgres, ensure_postgres, git_version, log, start_gateway, stop  # noqa: E402

MESSAGE = "6d1c0f5b7a3e9d2c4b8a1f0e6d5c4b3a2918f7e6d5c4b3a291807f6e5d4c3b2a"
BASE_MS = 1_700_000_000_000


def psql(pg, sql):
    """Rows of `sql` (tab-separated fields), on a connection without a
    statement timeout; raises when psql fails."""
    return pg.psql(sql, check=True, timeout=900)


def subscriber(i):
    return f"http://127.0.0.1:9/hooks/{i}"


def call(port, method, target):
    """(milliseconds, status, body) of one call on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.perf_counter()
        conn.request(method, target)
        r = conn.getresponse()
        body = r.read()
        return (time.perf_counter() - started) * 1000, r.status, body.decode(errors="replace")
    finally:
        conn.close()


def cursor_at(pg, i):
    """The listing cursor of delivery `i` (what a page ending there gives)."""
    rows = psql(pg, "SELECT first_at_ms || '-' || pandagate_delivery_id(message_id, subscriber) "
                    f"FROM pandagate_callback_deliveries WHERE message_id = '{MESSAGE}' "
                    f"AND subscriber = '{subscriber(i)}'")
    return rows[0][0]


def old_listing_ms(pg, dead):
    """Execution time of the statement `GET /callbacks` ran before pages."""
    rows = psql(pg, "EXPLAIN (ANALYZE, FORMAT TEXT) SELECT message_id, subscriber, attempts, "
                    "first_at_ms, next_at_ms, last_error, claim FROM pandagate_callback_deliveries "
                    f"WHERE dead = {str(dead).lower()} ORDER BY next_at_ms, message_id, subscriber")
    for (line,) in rows:
        if line.startswith("Execution Time:"):
            return float(line.split()[2])
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--statement-timeout-ms", type=int, default=500)
    p.add_argument("--binary", type=Path, default=ROOT / "target" / "debug" / "pandagate")
    p.add_argument("--no-replay-all", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs")
    args = p.parse_args()
    if not args.binary.exists():
        sys.exit(f"callbacks_pages: {args.binary} missing (cargo build, or --binary PATH)")
    ensure_postgres()
    pg = Postgres()
    work = Path(tempfile.mkdtemp(prefix="pandagate-callbacks-pages-"))
    gw = None
    try:
        pg.start()
        log(f"postgres {pg.version()} on port {pg.port}")
        config = ("[callbacks]\nbackend = \"postgres\"\n"
                  f"postgres_url = \"{pg.url}\"\n"
                  f"postgres_statement_timeout_ms = {args.statement_timeout_ms}\n"
                  "[[callbacks.subscribers]]\nurl = \"http://127.0.0.1:9/hooks/0\"\n")
        gw, ports = start_gateway(args.binary, work, config)
        admin = ports["admin"]
        control = ports["control"]
        later = int(time.time() * 1000) + 86_400_000
        started = time.monotonic()
        psql(pg, f"INSERT INTO pandagate_callback_messages VALUES ('{MESSAGE}', "
                 f"{int(time.time() * 1000)}, '{{}}'); "
                 "INSERT INTO pandagate_callback_deliveries "
                 "(message_id, subscriber, dead, attempts, first_at_ms, next_at_ms, last_error) "
                 f"SELECT '{MESSAGE}', 'http://127.0.0.1:9/hooks/' || i, i % 2 = 0, 3, "
                 f"{BASE_MS} + i / 3, {later}, 'HTTP 503' FROM generate_series(1, {args.rows}) i; "
                 "ANALYZE pandagate_callback_deliveries")
        load_s = time.monotonic() - started
        log(f"{args.rows} deliveries loaded in {load_s:.1f} s")
        mid = args.rows // 2
        after = {False: cursor_at(pg, mid | 1), True: cursor_at(pg, mid & ~1)}
        timings = {}

        def timed(name, method, target, want=200, check=None):
            # Listings are read on the admin listener, replays made on the
            # control listener.
            ms, status, body = call(admin if method == "GET" else control, method, target)
            if status != want or (check and check not in body):
                raise RuntimeError(f"{name}: {method} {target} answered {status}: {body[:300]}")
            timings.setdefault(name, []).append(ms)

        for run in range(args.runs):
            for dead in (False, True):
                flag = int(dead)
                which = "dead" if dead else "pending"
                timed(f"first page of {which} (limit 100)", "GET", f"/callbacks?dead={flag}",
                      check='"next":"')
                timed(f"page of {which} after a cursor mid-list", "GET",
                      f"/callbacks?dead={flag}&limit=100&after={after[dead]}", check='"next":"')
                timed(f"page of 1000 {which}", "GET", f"/callbacks?dead={flag}&limit=1000",
                      check='"next":"')
            by_id = 2 * (run + 1) * 1000
            by_key = by_id + 2
            row = psql(pg, f"SELECT pandagate_delivery_id('{MESSAGE}', '{subscriber(by_id)}')")
            timed("replay by delivery id", "POST", f"/callbacks/replay?id={row[0][0]}",
                  check='"replayed":1')
            key = quote(f"{MESSAGE}|{subscriber(by_key)}", safe="")
            timed("replay by key", "POST", f"/callbacks/replay?id={key}", check='"replayed":1')
        old = {dead: old_listing_ms(pg, dead) for dead in (False, True)}
        replay_all = None
        if not args.no_replay_all:
            ms, status, body = call(control, "POST", "/callbacks/replay?all-dead=1")
            replay_all = (ms, status, body.strip())
        report(args, pg, load_s, timings, old, replay_all)
    finally:
        stop(gw, grace=10)
        pg.stop()
        if args.keep:
            log(f"kept {work} and {pg.dir}")
        else:
            pg.remove()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def report(args, pg, load_s, timings, old, replay_all):
    print(f"## bench/callbacks_pages.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{git_version()}\n")
    print(f"`python3 bench/callbacks_pages.py --rows {args.rows} --runs {args.runs} "
          f"--statement-timeout-ms {args.statement_timeout_ms}`; PostgreSQL {pg.version()}; "
          f"{args.rows} deliveries ({args.rows // 2} pending, {args.rows - args.rows // 2} dead) "
          f"loaded in {load_s:.1f} s.\n")
    print("| operation (HTTP) | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    print()
    print("Before pages, `GET /callbacks` ran one statement reading the whole list (and replay by id "
          "read every dead letter the same way); its execution time here, without a timeout: "
          f"pending {old[False]:.0f} ms, dead {old[True]:.0f} ms (the gateway's default "
          "`postgres_statement_timeout_ms` is 500).")
    if replay_all:
        ms, status, body = replay_all
        print(f"\n`POST /callbacks/replay?all-dead=1`: HTTP {status} `{body}` after {ms / 1000:.1f} s "
              "(batches of 500, each its own transaction).")


if __name__ == "__main__":
    main()
