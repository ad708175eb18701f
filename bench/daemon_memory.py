"""The daemon's resident memory over many mixed queries on a real-size model (issue 16, item 4).

Writes a random-weight model of a benchmark shape (``bench/models.py``) as an mlx-lm directory,
with the demo model's tokenizer (its ids are all inside the 128k vocabulary), starts a daemon on it
with a trace-cache budget, runs mixed queries on new prompts (the mix of the demo model's 500-query
test in tests/test_tools_edges.py: prompt, tokens, save, lens, predict, stats, a pattern save,
patch) and prints the daemon's resident memory every 100 queries, and the bytes the trace cache
counts against its budget.

    python bench/daemon_memory.py                             # 1b shape, 1,000 queries
    python bench/daemon_memory.py --shape 1b-small --queries 300
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import models  # noqa: E402
from mlxterp.loading import demo_path  # noqa: E402
from mlxterp_repl.client import connect  # noqa: E402

# Layer numbers for the 16-layer shapes; {middle}, {early} and {patched} follow the shape's layers.
MIXED = [
    'prompt "{text}"', "tokens", "save layers.{middle} @ -1", "lens @ -1 top 3", "predict layers.-1 @ -1 top 3",
    "stats layers.0..{early} @ -1", "save layers.*.mlp @ -1 as $m",
    'patch mlp clean "{text}" corrupt "{other}" layers {patched}',
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model(shape: str, dtype: str, directory: str) -> None:
    """An mlx-lm directory: config.json, model.safetensors and the demo model's tokenizer."""
    base = models.build(shape, dtype)
    config = {**models.config(shape), "torch_dtype": dtype}
    with open(os.path.join(directory, "config.json"), "w") as out:
        json.dump(config, out)
    mx.save_safetensors(os.path.join(directory, "model.safetensors"), dict(tree_flatten(base.parameters())))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(demo_path(), name), directory)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(models.SHAPES), default="1b")
    parser.add_argument("--dtype", help="float32 or bfloat16 (default: float32 on the CPU, else bfloat16)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=100, help="queries before the first measurement")
    parser.add_argument("--cache-mb", type=int, default=256)
    opts = parser.parse_args()
    dtype = opts.dtype or models.default_dtype()
    with tempfile.TemporaryDirectory(prefix="mlxterp-bench-model-") as model_dir, \
            tempfile.TemporaryDirectory(prefix="mlxterp-bench-rt-") as runtime:
        write_model(opts.shape, dtype, model_dir)
        log = open(os.path.join(runtime, "bench-daemon.log"), "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", runtime,
                                   "--model", model_dir, "--cache-mb", str(opts.cache_mb)],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(runtime, "daemon.sock")) and time.monotonic() < deadline:
                time.sleep(0.1)
            client = connect(runtime_dir=runtime, autostart=False)
            pid = client.hello["pid"]
            started = time.perf_counter()

            n_layers = models.SHAPES[opts.shape][0]
            layers = {"middle": n_layers // 2, "early": min(3, n_layers - 1),
                      "patched": f"{n_layers // 4}..{min(n_layers // 4 + 2, n_layers - 1)}"}

            def query(number: int) -> None:
                text = f"The capital of France number {number % 97} is"  # new prompts turn the cache over
                client.exec(MIXED[number % len(MIXED)].format(text=text, other=text.replace("France", "Italy"),
                                                              **layers))

            for number in range(opts.warm):
                query(number)
            warm = rss_bytes(pid)
            sizes, cached = [], []
            for number in range(opts.warm, opts.queries):
                query(number)
                if (number + 1) % 100 == 0:
                    sizes.append(rss_bytes(pid))
                    cache = client.stats().get("cache") or {}
                    cached.append(cache.get("bytes", 0))
            seconds = time.perf_counter() - started
            stats = client.stats()
            client.close()
            print(f"shape {opts.shape!r}, {dtype}, {opts.queries} mixed queries in {seconds:.0f} s "
                  f"({stats.get('forward_count', '?')} forward passes), trace cache budget {opts.cache_mb} MB, "
                  f"on {stats['model'].get('device', '?')}")
            print(f"daemon RSS after {opts.warm} queries: {warm / 2**20:.0f} MiB; then every 100: "
                  + ", ".join(f"{size / 2**20:.0f}" for size in sizes))
            print(f"growth over the last {len(sizes) * 100} queries: {(sizes[-1] - warm) / 2**20:+.0f} MiB; "
                  f"over the last 500: {(sizes[-1] - sizes[-6]) / 2**20:+.0f} MiB" if len(sizes) >= 6 else "")
            print(f"trace cache bytes counted at each measurement (MiB): "
                  + ", ".join(f"{b / 2**20:.0f}" for b in cached) + f"; budget {opts.cache_mb} MiB")
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    main()
