"""Latency of `mlxterp lsp` as an editor feels it: initialize, completion on a 1,000-line
file, and the time from the last change to the diagnostics for it.

    .venv/bin/python bench/lsp_latency.py [--model demo] [--n 200]

Starts its own daemon (through the server) on a temporary runtime directory and stops it
at the end. Targets: initialize <= 600 ms, completion p95 <= 20 ms, diagnostics <= 300 ms
after the last change (with the default 150 ms debounce).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lsprotocol import types  # noqa: E402

from lsp_support import (URI, change_document, open_document, start_server, stop_daemon,  # noqa: E402
                         stop_server, wait_for)

TARGETS = {"initialize": 600.0, "completion p95": 20.0, "diagnostics": 300.0}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def thousand_lines() -> str:
    block = ['prompt "The capital of France is"', 'save layers.8 @ "France" as $paris{i}',
             "lens @ -1 top 3", "with layers.3 zero: predict $paris{i} top 3",
             "save layers.*.mlp @ -1", "# a comment", 'stats layers.2 @ "capital"', "let $v{i} = $paris{i} * 2"]
    lines = []
    for i in range(125):
        lines += [line.format(i=i) for line in block]
    return "\n".join(lines)


async def measure_initialize(runtime: Path, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        client = await start_server(runtime, options={"autostart": False})
        samples.append((time.perf_counter() - started) * 1000)
        await stop_server(client)
    return samples


async def main_async(options) -> int:
    runtime = Path(tempfile.mkdtemp(prefix="mlxterp-lsp-bench-"))
    try:
        init = await measure_initialize(runtime, options.init_runs)
        client = await start_server(runtime, options={"model": options.model, "debounceMs": 150})
        try:
            text = thousand_lines()
            lines = text.split("\n")
            open_document(client, text)
            # Wait for the daemon and the module tree (the model-aware diagnostics arrive).
            await wait_for(lambda: client.diagnostics.get(URI) is not None and client.versions.get(URI) == 1, 120)
            doc = types.TextDocumentIdentifier(URI)
            probe = types.CompletionParams(doc, types.Position(1, len("save layers.8.")))
            await wait_for_modules(client, probe)
            rng = random.Random(0)
            completion = []
            for _ in range(options.n):
                line = rng.randrange(len(lines))
                at = types.Position(line, rng.randrange(len(lines[line]) + 1))
                started = time.perf_counter()
                await client.text_document_completion_async(types.CompletionParams(doc, at))
                completion.append((time.perf_counter() - started) * 1000)
            diagnostics = []
            version = 1
            for i in range(options.changes):
                version += 1
                line = 8 * rng.randrange(125) + 1
                change_document(client, version, (line, 5), (line, 13), "layers.9" if i % 2 else "layers.8")
                started = time.perf_counter()
                await wait_for(lambda v=version: client.versions.get(URI) == v, 30, interval=0.001)
                diagnostics.append((time.perf_counter() - started) * 1000)
        finally:
            await stop_server(client)
    finally:
        stop_daemon(runtime)
    report = {
        "initialize": statistics.median(init),
        "completion p95": percentile(completion, 95),
        "diagnostics": statistics.median(diagnostics),
    }
    print(f"initialize (spawn + initialize)  median {statistics.median(init):7.1f} ms   min {min(init):7.1f} ms   "
          f"n={len(init)}")
    print(f"completion, 1,000-line file       p50 {statistics.median(completion):7.2f} ms   "
          f"p95 {percentile(completion, 95):7.2f} ms   max {max(completion):7.2f} ms   n={len(completion)}")
    print(f"change -> diagnostics (150 ms debounce)  median {statistics.median(diagnostics):7.1f} ms   "
          f"p95 {percentile(diagnostics, 95):7.1f} ms   n={len(diagnostics)}")
    failed = [name for name, value in report.items() if value > TARGETS[name]]
    for name in TARGETS:
        mark = "MISSED" if name in failed else "ok"
        print(f"  target {name:<15} <= {TARGETS[name]:5.0f} ms: {report[name]:7.1f} ms  {mark}")
    return 1 if failed else 0


async def wait_for_modules(client, params) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        result = await client.text_document_completion_async(params)
        if result.items:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the server never got the module tree from the daemon")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model for the daemon (demo, or a local mlx-lm directory)")
    parser.add_argument("--n", type=int, default=200, help="completion requests")
    parser.add_argument("--changes", type=int, default=20, help="edits timed from change to diagnostics")
    parser.add_argument("--init-runs", type=int, default=5, help="server starts timed")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
