"""Tokens per second collecting activations of 1,000 prompts on the demo model.

    python bench/collect.py

Collects the last-token outputs of three layers with batch_get_activations,
in memory and streamed to safetensors shards, and checks a few prompts
against one-at-a-time collection.
"""

from mlxterp_repl.blas import blas_in_use, reexec_with_openblas

reexec_with_openblas()  # before mlx loads: MLX's bundled reference BLAS is ~5x slower

import os
import random
import tempfile
import time

import numpy as np

from mlxterp import InterpretableModel
from mlxterp.collect import batch_get_activations, get_activations, load_activations

WORDS = "the capital of france is paris and london is in england while rome berlin madrid are cities".split()


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def main():
    model = InterpretableModel("demo")
    data = prompts(1000)
    n_tokens = sum(len(model.encode(p)) for p in data)
    layers = [3, 8, 12]
    print(f"BLAS: {blas_in_use()}")
    print(f"model: {model}\n{len(data)} prompts, {n_tokens} tokens, load average {os.getloadavg()[0]:.1f}")
    batch_get_activations(model, data[:64], layers, batch_size=32, progress=False)  # warm up
    results = {}
    for batch_size in (8, 32, 64):
        start = time.perf_counter()
        results[batch_size] = batch_get_activations(model, data, layers, batch_size=batch_size, progress=False)
        elapsed = time.perf_counter() - start
        print(f"batch_size {batch_size:3d}: {elapsed:6.2f} s   {n_tokens / elapsed:9.0f} tokens/s   "
              f"{len(data) / elapsed:7.1f} prompts/s")
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        batch_get_activations(model, data, layers, batch_size=32, out=directory, shard_size=256, progress=False)
        elapsed = time.perf_counter() - start
        print(f"streamed to shards (batch 32): {elapsed:6.2f} s   {n_tokens / elapsed:9.0f} tokens/s")
        loaded = load_activations(directory)
    acts = results[32]
    # Batches of other compositions round differently: compare relative to the activations' scale.
    worst = max(relative_difference(loaded[k], acts[k]) for k in acts)
    for i in (0, 17, 999):
        alone = get_activations(model, [data[i]], layers)
        worst = max(worst, max(relative_difference(alone[k][0], acts[k][i]) for k in acts))
    assert worst < 1e-4, worst
    print(f"checked: shards equal memory, batched rows equal one at a time: max difference {worst:.1e} "
          "of the largest activation")


def relative_difference(a, b):
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


if __name__ == "__main__":
    main()
