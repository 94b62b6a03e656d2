"""Throughput of the HTTP teacher (`luffy_trl.traces.OpenAITeacher`) against the local fake OpenAI-compatible server.

    python benchmarks/bench_http_teacher.py [--latency 0.05 0.2] [--concurrency 1 4 16 64] [--requests 128]
        [--out results.jsonl] [--plot bench_http_teacher.png]

Each request sleeps `latency` seconds on the server (a stand-in for generation time), so the ideal throughput is
concurrency / latency requests per second; the table gives the measured rate and its ratio to that ideal, which shows
the client's own overhead (threads, JSON, HTTP on loopback). Only 127.0.0.1 is contacted. Prints a table, writes one
JSON line per point and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from luffy_trl.evaluation.runner import Problem, Request
from luffy_trl.traces.fake_server import FakeOpenAIServer
from luffy_trl.traces.generate import TRACES
from luffy_trl.traces.teachers import OpenAITeacher


def requests(n: int) -> list[Request]:
    problems = [Problem("bench", f"p{i}", ({"role": "user", "content": f"What is {i} + {i}?"},), str(2 * i))
                for i in range(n)]
    return [Request(p, 0, "", i, False) for i, p in enumerate(problems)]


def measure(latency: float, concurrency: int, n: int) -> dict:
    with FakeOpenAIServer(lambda prompt: "The answer is \\boxed{2}.", latency=latency) as server:
        teacher = OpenAITeacher(server.base_url, "fake", concurrency=concurrency, timeout=60, max_retries=0)
        start = time.perf_counter()
        received = sum(g is not None for _, g in teacher.stream(requests(n), TRACES))
        wall = time.perf_counter() - start
        in_flight = server.max_in_flight
    rate = received / wall
    ideal = concurrency / latency if latency else float("nan")
    return {"latency_s": latency, "concurrency": concurrency, "requests": n, "received": received,
            "wall_s": round(wall, 3), "requests_per_s": round(rate, 1), "ideal_per_s": round(ideal, 1),
            "efficiency": round(rate / ideal, 3) if latency else None, "max_in_flight": in_flight}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'latency s':>9} {'conc.':>5} {'req/s':>8} {'ideal':>8} {'eff.':>6} {'in flight':>9}")
    for latency in args.latency:
        for concurrency in args.concurrency:
            n = max(args.requests, 4 * concurrency)
            row = measure(latency, concurrency, n)
            row.update(machine=platform.machine(), cpus=os.cpu_count(), load=round(os.getloadavg()[0], 2))
            rows.append(row)
            print(f"{latency:9.3f} {concurrency:5d} {row['requests_per_s']:8.1f} {row['ideal_per_s']:8.1f} "
                  f"{row['efficiency'] or float('nan'):6.2f} {row['max_in_flight']:9d}", flush=True)
    if args.out:
        with open(args.out, "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for latency in args.latency:
            points = [r for r in rows if r["latency_s"] == latency]
            ax.plot([r["concurrency"] for r in points], [r["requests_per_s"] for r in points], "o-",
                    label=f"measured, latency {latency} s")
            ax.plot([r["concurrency"] for r in points], [r["ideal_per_s"] for r in points], ":", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("requests / s")
        ax.set_title("OpenAITeacher vs fake server (dotted: concurrency / latency)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
