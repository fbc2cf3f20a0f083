#!/usr/bin/env python3
"""What the read cache really costs in memory, against what it says it holds.

    python3 bench/cache_memory.py [--runs 3] [--answers 6000] [--max-bytes 4194304]
                                  [--body-bytes 512,1024,8192] [--binary target/release/pandagate]

For each answer size in `--body-bytes`, each run starts the release binary
twice against a loopback provider that answers every product read with its
own answer of about that size: once with
no cached route (the baseline) and once with `/open/product/get` cached in a
`--max-bytes` cache. Both get the same warm-up (300 reads of other ids) and
then `--answers` reads of distinct ids from 8 keep-alive connections.
Measured per gateway: the growth of VmRSS (from /proc) over the timed part;
for the cached one also `pandagate_cache_bytes` at the end. The cache's real
cost is the cached gateway's growth minus the baseline's. Passing: the cached
gateway grows by less than 24 MiB, and `pandagate_cache_bytes` is within 1.5x
of the real cost (either way). Medians of the runs, per answer size; exit 1
if a median fails.
"""

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RELEASE_BINARY, LoopbackServer, QuietHandler, build_release, git_version, http_get  # noqa: E402
from benchlib import memory_kib, parse_metrics, serve_in_thread, start_gateway, stop  # noqa: E402

READ_PATH = "/open/product/get"


class Handler(QuietHandler):
    disable_nagle_algorithm = True

    def serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        query = parse_qs(urlsplit(self.path).query)
        item = int(query.get("itemId", ["0"])[0])
        head = json.dumps({"requestId": f"r{item}", "code": 200, "msg": "success",
                           "data": {"itemId": item, "title": f"Product {item}", "description": ""}},
                          separators=(",", ":"))
        pad = max(0, self.server.body_bytes - len(head))
        body = head.replace('"description":""', '"description":"' + "d" * pad + '"').encode()
        self.answer_json(200, body)


def rss_kib(pid):
    return memory_kib(pid)["VmRSS"]


def cache_bytes(admin_port):
    _, body = http_get(admin_port, "/metrics")
    return parse_metrics(body.decode(), ["pandagate_cache_bytes"]).get("pandagate_cache_bytes", 0.0)


def reads(port, ids, connections=8):
    """Reads every id once, from `connections` keep-alive connections."""
    chunks = [ids[i::connections] for i in range(connections)]
    failures = []

    def worker(chunk):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for item in chunk:
            conn.request("GET", f"{READ_PATH}?itemId={item}")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures.append(resp.status)
        conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} reads failed: {failures[:5]}")


def one_gateway(binary, work, provider_port, cached, args):
    toml = [f'[[routes]]\npath = "{READ_PATH}"']
    if cached:
        toml.append("cache_ttl_ms = 600000")
        toml.append(f"\n[cache]\nmax_bytes = {args.max_bytes}")
    work.mkdir()
    proc, ports = start_gateway(binary, work, "\n".join(toml) + "\n",
                                PANDAGATE_UPSTREAM=f"http://127.0.0.1:{provider_port}")
    try:
        reads(ports["gateway"], list(range(1_000_000, 1_000_300)))
        before = rss_kib(proc.pid)
        reads(ports["gateway"], list(range(args.answers)))
        after = rss_kib(proc.pid)
        held = cache_bytes(ports["admin"]) if cached else 0.0
    finally:
        stop(proc)
    return (after - before) / 1024, held / (1024 * 1024)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--answers", type=int, default=6000)
    p.add_argument("--max-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--body-bytes", default="512,1024,8192")
    p.add_argument("--binary", default=str(RELEASE_BINARY))
    args = p.parse_args(argv)
    if args.binary == str(RELEASE_BINARY):
        build_release()

    provider = LoopbackServer(Handler, seed=1)
    serve_in_thread(provider)
    port = provider.server_address[1]

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(b) for b in args.body_bytes.split(",")]:
            provider.body_bytes = size
            rows = []
            for run in range(args.runs):
                work = Path(tmp) / f"{size}-{run}"
                work.mkdir()
                base, _ = one_gateway(args.binary, work / "base", port, False, args)
                grown, held = one_gateway(args.binary, work / "cache", port, True, args)
                real = grown - base
                ratio = held / real if real > 0 else float("inf")
                rows.append((base, grown, real, held, ratio))
                print(f"{size} B, run {run + 1}: baseline +{base:.1f} MiB, cached +{grown:.1f} MiB, "
                      f"real cost {real:.1f} MiB, pandagate_cache_bytes {held:.1f} MiB, "
                      f"ratio {ratio:.2f}", file=sys.stderr, flush=True)
            table.append((size, [statistics.median(col) for col in zip(*rows)]))
    provider.shutdown()

    ok = all(med[1] < 24 and 1 / 1.5 <= med[4] <= 1.5 for _, med in table)
    print(f"# Read-cache memory ({git_version()})\n")
    print(f"`python3 bench/cache_memory.py --runs {args.runs} --answers {args.answers} "
          f"--max-bytes {args.max_bytes} --body-bytes {args.body_bytes}`; medians of {args.runs} runs, "
          f"{args.answers} distinct answers into a {args.max_bytes / 2**20:.0f} MiB cache.\n")
    print("| answer size | RSS growth, no cache | RSS growth, cache (< 24 MiB) | real cost | "
          "`pandagate_cache_bytes` | metric / real (0.67-1.5) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, med in table:
        print(f"| {size} B | {med[0]:.1f} MiB | {med[1]:.1f} MiB | {med[2]:.1f} MiB | "
              f"{med[3]:.1f} MiB | {med[4]:.2f} |")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
