"""Cost of tracing against the plain mlx-lm forward pass, measured in one run.

Prints the ratio of (forward + capture everything) and (forward + capture three
layers) to the plain forward for a 12-layer, hidden-768 Llama config at batch
8 x 128 tokens, and the peak memory of each. Targets: <= 1.25x and <= 1.05x.

    python bench/trace_overhead.py            # the issue's configuration
    python bench/trace_overhead.py --quick    # a smaller model, for a smoke run
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models import llama

from mlxterp import InterpretableModel


def build(layers, hidden):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, rms_norm_eps=1e-5,
        vocab_size=32000, tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def measure(runs, repeats):
    """Median seconds and peak MiB of each run, interleaved so machine noise hits all alike."""
    times = {name: [] for name in runs}
    peaks = {name: 0.0 for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            mx.reset_peak_memory()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mx.get_peak_memory() / 2**20)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, hidden 256, batch 2 x 64")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    layers, hidden, batch, length = (4, 256, 2, 64) if opts.quick else (12, 768, 8, 128)
    base = build(layers, hidden)
    model = InterpretableModel(base)
    ids = mx.random.randint(0, 32000, (batch, length))

    def plain():
        mx.eval(base(ids))

    def capture_all():
        with model.trace(ids) as trace:
            for name in list(dict.keys(trace.activations)):
                trace.activations[name]
        return trace

    def capture_three():
        picked = [layers // 4, layers // 2, layers - 2]
        with model.trace(ids, capture=[f"layers.{i}" for i in picked]):
            for i in picked:
                model.layers[i].output.save()
            model.output.save()

    results = measure({"plain forward": plain, "capture everything": capture_all,
                       "capture three layers": capture_three}, opts.repeats)
    baseline = results["plain forward"][0]
    print(f"Llama {layers} layers, hidden {hidden}, batch {batch} x {length} tokens, median of {opts.repeats}")
    print(f"{'run':<24}{'ms':>10}{'ratio':>8}{'peak MiB':>10}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<24}{seconds * 1e3:>10.1f}{seconds / baseline:>8.3f}{peak:>10.1f}")
    n_all = len(capture_all().activations)
    print(f"(capture everything kept {n_all} activations)")


if __name__ == "__main__":
    main()
