"""Batched patching sweep vs one forward pass per layer, on the demo model.

    python bench/patching.py

Prints both timings, the speedup, and checks that both give the same
recoveries (to 1e-4). The batched sweep runs the clean prompt once and all
patched corrupted runs as rows of one batch; the reference also runs the
clean and corrupted prompts once, then one patched forward pass per layer.
"""

import time

import mlx.core as mx

from mlxterp import InterpretableModel
from mlxterp.analysis import activation_patching, distance
from mlxterp.interventions import replace_with

CLEAN = "Paris is the capital of France"
CORRUPTED = "London is the capital of France"


def one_run_per_layer(model, component, metric):
    names = [model.resolve(f"layers.{i}.{component}") for i in range(model.n_layers)]
    with model.trace(CLEAN, capture=names) as tr:
        clean = [tr.save(n) for n in names]
        clean_logits = model.output.save()[0, -1]
    with model.trace(CORRUPTED, capture=[]):
        corrupted_logits = model.output.save()[0, -1]
    base = distance(metric, corrupted_logits, clean_logits).item()
    results = {}
    for layer, name in enumerate(names):
        with model.trace(CORRUPTED, interventions={name: replace_with(clean[layer])}, capture=[]):
            patched = model.output.save()[0, -1]
        results[layer] = 100 * (base - distance(metric, patched, clean_logits).item()) / base
    return results


def best_time(fn, repeats=3):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    model = InterpretableModel("demo")
    print(f"model: {model}")
    worst = 0.0
    for component in ("mlp", "attn"):
        for metric in ("l2", "mse", "cosine"):
            batched_time, batched = best_time(lambda: activation_patching(model, CLEAN, CORRUPTED, component, metric=metric))
            naive_time, naive = best_time(lambda: one_run_per_layer(model, component, metric))
            diff = max(abs(batched[k] - naive[k]) for k in naive)
            worst = max(worst, diff)
            print(f"{component:5s} {metric:6s}  batched {batched_time * 1000:7.1f} ms   "
                  f"one run per layer {naive_time * 1000:7.1f} ms   speedup {naive_time / batched_time:4.1f}x   "
                  f"max |difference| {diff:.2e} (percentage points)")
    assert worst < 1e-4, f"batched and per-layer sweeps disagree by {worst}"
    print(f"same numbers: max difference {worst:.2e} < 1e-4")


if __name__ == "__main__":
    main()
