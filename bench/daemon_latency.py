"""Round-trip latency of the daemon on the demo model: `hello`, a cached
`save layers.8 @ "France"`, and the same query on a new prompt each time (uncached).

    .venv/bin/python bench/daemon_latency.py [--n 200]

Starts its own daemon on a temporary runtime directory and stops it at the end.
Targets: cached p50 <= 5 ms, p95 <= 15 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from mlxterp_repl.client import connect

QUERY = 'save layers.8 @ "France"'
PROMPT = "The capital of France is"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(fn, n: int) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def line(name: str, samples: list[float]) -> str:
    return (f"{name:<34} n={len(samples):<4} p50 {statistics.median(samples):7.2f} ms   "
            f"p95 {percentile(samples, 95):7.2f} ms   max {max(samples):7.2f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="round trips per measurement")
    parser.add_argument("--model", default="demo", help="model the daemon loads")
    parser.add_argument("--uncached", type=int, default=30, help="round trips of the uncached query")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlxterp-bench-") as runtime:
        started = time.perf_counter()
        client = connect(runtime_dir=runtime, model=options.model)
        print(f"daemon started and greeted in {(time.perf_counter() - started) * 1000:.0f} ms")
        try:
            client.exec(f'prompt "{PROMPT}"')
            client.exec(QUERY)  # waits for the model, fills the cache
            before = client.stats()["forward_count"]
            hello = timed(lambda i: client.call("hello", protocol=1), options.n)
            cached = timed(lambda i: client.exec(QUERY), options.n)
            after_cached = client.stats()["forward_count"]
            uncached = timed(lambda i: client.exec(f'{QUERY} in "{PROMPT} {i} times France"'), options.uncached)
            after_uncached = client.stats()["forward_count"]
            print(line("hello", hello))
            print(line(f"cached   {QUERY}", cached))
            print(line(f"uncached {QUERY}", uncached))
            print(f"forward passes: {after_cached - before} for {options.n} cached queries, "
                  f"{after_uncached - after_cached} for {options.uncached} uncached ones")
            ok = statistics.median(cached) <= 5 and percentile(cached, 95) <= 15
            print(f"targets (cached p50 <= 5 ms, p95 <= 15 ms): {'met' if ok else 'NOT met'}")
        finally:
            client.shutdown()
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
