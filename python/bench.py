"""midcall from Python versus what a Pipecat or LiveKit user writes today.

    python python/bench.py                      # 5 interleaved rounds; about a minute
    python python/bench.py --quick              # 2 short rounds
    python python/bench.py --json out.json --md out.md

Every client fetches the same caller record from the same local upstream and reads one value
out of the JSON:

- ``midcall``: ``out = await call.tool("lookup", {"phone": p})``; ``out.values["customer.name"]``
- ``aiohttp``: ``ClientSession.get(url)``, ``await r.json()``, ``d["data"]["customer"]["name"]``
- ``httpx``: ``AsyncClient.get(url)``, ``r.json()[...]``
- ``midcall_hit``: the same tool call answered from midcall's cache (``cache = {ttl_s}``)

The upstream is ``midcall bench --serve-upstreams`` (Rust, hyper) in its own process, plain
HTTP on 127.0.0.1 with keep-alive, the same for everyone. Each client keeps one pool for the
whole run and is warmed first; all asyncio clients get TCP_NODELAY from asyncio itself, as
midcall sets it. Rounds interleave the clients (the order rotates), and every figure is the
median over rounds of that round's value. Latency is measured from just before the ``await``
to just after the value is read, on the event loop, with ``time.perf_counter_ns``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_upstream(binary: Path, body_bytes: int):
    p = subprocess.Popen(
        [str(binary), "bench", "--serve-upstreams", "--body-bytes", str(body_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = p.stdout.readline().split()
    if not line or line[0] != "ports":
        p.kill()
        raise SystemExit(f"error: {binary} bench --serve-upstreams did not start")
    return p, int(line[1])


def find_binary(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    b = ROOT / "target" / "release" / "midcall"
    if not b.exists():
        log("building the upstream: cargo build --release --bin midcall (a few minutes the first time)")
        subprocess.run(["cargo", "build", "--release", "--bin", "midcall", "-q"], cwd=ROOT, check=True)
    return b


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]


async def run_batch(op, n: int, concurrency: int):
    """n operations, `concurrency` at a time; returns (latencies in ns, wall seconds)."""
    lat = []
    per = n // concurrency
    counter = iter(range(n))

    async def worker():
        for _ in range(per):
            i = next(counter)
            t = time.perf_counter_ns()
            await op(i)
            lat.append(time.perf_counter_ns() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, time.perf_counter() - t0


AGENT = """
[agent]
id = "pybench"
tenant = "pybench"

[egress]
allow_http = true

[[actions]]
name = "lookup"
description = "lookup"
url = "http://127.0.0.1:{port}/v1/customers?phone={{{{args.phone}}}}"
parameters = {{ type = "object", properties = {{ phone = {{ type = "string" }} }} }}
timeout_ms = 10000
dedupe = false
extract = {{ "customer.name" = "$.data.customer.name" }}

[[actions]]
name = "lookup_cached"
description = "lookup, cached"
url = "http://127.0.0.1:{port}/v1/customers?phone={{{{args.phone}}}}&c=1"
parameters = {{ type = "object", properties = {{ phone = {{ type = "string" }} }} }}
timeout_ms = 10000
dedupe = false
cache = {{ ttl_s = 3600, scope = "tenant" }}
extract = {{ "customer.name" = "$.data.customer.name" }}
"""


async def bench(args) -> dict:
    import aiohttp
    import httpx

    import midcall

    binary = find_binary(args.midcall_bin)
    up, port = start_upstream(binary, args.body_bytes)
    try:
        tmp = Path(tempfile.mkdtemp())
        agent = tmp / "agent.toml"
        agent.write_text(AGENT.format(port=port))
        rt = midcall.Runtime(agent, allow_networks=["127.0.0.0/8"])
        call = await rt.start_call(id="bench", from_number="+15550000000")
        url = f"http://127.0.0.1:{port}/v1/customers?phone="
        aio = aiohttp.ClientSession()
        hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))

        async def op_midcall(i):
            out = await call.tool("lookup", {"phone": f"+1555{i % 1000:07d}"}, budget_ms=10_000)
            if out.values.get("customer.name") is None:
                raise SystemExit(f"error: midcall: {out.to_dict()}")

        async def op_hit(i):
            out = await call.tool("lookup_cached", {"phone": "+15550000001"})
            if out.cache != "hit" or out.values.get("customer.name") is None:
                raise SystemExit(f"error: not a hit: {out.to_dict()}")

        async def op_aiohttp(i):
            async with aio.get(f"{url}+1555{i % 1000:07d}") as r:
                d = await r.json()
            if d["data"]["customer"]["name"] is None:
                raise SystemExit("error: aiohttp")

        async def op_httpx(i):
            r = await hx.get(f"{url}+1555{i % 1000:07d}")
            if r.json()["data"]["customer"]["name"] is None:
                raise SystemExit("error: httpx")

        clients = {"midcall": op_midcall, "aiohttp": op_aiohttp, "httpx": op_httpx}
        # Warm every pool to the highest concurrency, and fill the cache.
        await call.tool("lookup_cached", {"phone": "+15550000001"})
        for name, op in clients.items():
            await run_batch(op, max(args.concurrency) * 4, max(args.concurrency))
        series: dict = {}
        for r in range(args.rounds):
            order = list(clients.items())
            order = order[r % len(order):] + order[: r % len(order)]
            for c in args.concurrency:
                for name, op in order:
                    lat, wall = await run_batch(op, args.requests, c)
                    series.setdefault((name, c), []).append((lat, wall))
            lat, wall = await run_batch(op_hit, args.requests, 1)
            series.setdefault(("midcall_hit", 1), []).append((lat, wall))
            log(f"round {r + 1}/{args.rounds} done")
        await aio.close()
        await hx.aclose()
    finally:
        up.stdin.close()
        up.wait(10)

    rows = []
    for (name, c), runs in series.items():
        rows.append({
            "client": name,
            "concurrency": c,
            "requests_per_round": args.requests,
            "rounds": len(runs),
            "p50_us": statistics.median(pct(l, 0.50) for l, _ in runs) / 1000,
            "p99_us": statistics.median(pct(l, 0.99) for l, _ in runs) / 1000,
            "throughput_per_s": statistics.median(len(l) / w for l, w in runs),
        })
    by = {(r["client"], r["concurrency"]): r for r in rows}
    c1, cmax = 1, max(args.concurrency)
    goals = {
        "p50_c1_vs_aiohttp": by[("midcall", c1)]["p50_us"] / by[("aiohttp", c1)]["p50_us"],
        "throughput_cmax_vs_aiohttp": by[("midcall", cmax)]["throughput_per_s"] / by[("aiohttp", cmax)]["throughput_per_s"],
        "hit_p50_us": by[("midcall_hit", 1)]["p50_us"],
    }
    return {
        "bench": "python/bench.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": {
            "midcall": getattr(midcall, "__version__", "0.1.0"),
            "aiohttp": aiohttp.__version__,
            "httpx": httpx.__version__,
        },
        "upstream": f"{binary} bench --serve-upstreams (separate process), plain HTTP, {args.body_bytes}-byte body",
        "rows": rows,
        "goals": {
            "p50_c1_vs_aiohttp": {"value": goals["p50_c1_vs_aiohttp"], "goal": "<= 0.5", "met": goals["p50_c1_vs_aiohttp"] <= 0.5},
            "throughput_c%d_vs_aiohttp" % cmax: {"value": goals["throughput_cmax_vs_aiohttp"], "goal": ">= 4", "met": goals["throughput_cmax_vs_aiohttp"] >= 4},
            "cache_hit_p50_us": {"value": goals["hit_p50_us"], "goal": "<= 20", "met": goals["hit_p50_us"] <= 20},
        },
    }


def table(report: dict) -> str:
    rows = sorted(report["rows"], key=lambda r: (r["concurrency"], r["client"]))
    base = {r["concurrency"]: r for r in rows if r["client"] == "aiohttp"}
    out = ["| client | concurrency | p50 µs | p99 µs | req/s | p50 vs aiohttp | req/s vs aiohttp |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["concurrency"])
        vs = f"{r['p50_us'] / b['p50_us']:.2f}x" if b else "-"
        tv = f"{r['throughput_per_s'] / b['throughput_per_s']:.2f}x" if b else "-"
        out.append(f"| {r['client']} | {r['concurrency']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
                   f"{r['throughput_per_s']:.0f} | {vs} | {tv} |")
    out.append("")
    for k, g in report["goals"].items():
        out.append(f"- {k}: {g['value']:.3g} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2048, help="per client, concurrency and round")
    ap.add_argument("--concurrency", default="1,64", help="comma-separated, e.g. 1,64")
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 512 requests")
    ap.add_argument("--midcall-bin", help="the midcall binary for the upstream (default target/release/midcall)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--md", help="write the table here")
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    if 1 not in args.concurrency:
        ap.error("--concurrency must include 1")
    if args.quick:
        args.rounds, args.requests = 2, 512
    if args.rounds < 1 or args.requests < max(args.concurrency):
        ap.error("--rounds >= 1 and --requests >= the highest concurrency")
    args.requests -= args.requests % max(args.concurrency)
    report = asyncio.run(bench(args))
    md = table(report)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(f"# python/bench.py, {report['date']}\n\n{report['machine']}; "
                                 f"{report['upstream']}; versions {report['versions']}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
