"""Python time a trace adds over a plain forward pass, with evaluation stubbed out.

MLX is lazy: building a forward pass's graph is pure Python, evaluating it is the
device's work. This script replaces ``mx.eval`` with a no-op and times, on a
16-layer Llama structure (tiny widths: the graph is never computed), the best of
N runs of a plain ``model(ids)`` and of each trace mode, and prints what each
mode adds in microseconds. Reproducible and device-independent, so figures from
before and after a change compare directly (issue 16 item 3).

    python bench/trace_python_cost.py            # best of 1500
    python bench/trace_python_cost.py --repeats 300
"""

import argparse
import gc
import sys
import time

import mlx.core as mx
from mlx_lm.models import llama

from mlxterp import InterpretableModel


def build(layers=16, hidden=64, vocab=128256):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        vocab_size=vocab, tie_word_embeddings=True, rope_theta=500000.0,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_interleaved(fns: dict, repeats, batch=20):
    """``best`` of each of ``fns``, taking turns a batch at a time: a slow spell of the machine then
    lands on all of them, not on whichever ran during it."""
    found = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, repeats // batch)):
        for name, fn in fns.items():
            found[name] = min(found[name], best(fn, batch))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1500)
    opts = parser.parse_args()
    base = build()
    model = InterpretableModel(base)
    ids = mx.random.randint(0, 128256, (1, 32), key=mx.random.key(0))
    mx.eval(ids)
    id_list = ids.tolist()
    picked = [4, 8, 14]

    def plain():
        base(ids)

    def default_trace():
        with model.trace(ids):
            model.output.save()

    def capture_all():
        with model.trace(ids, keep="all"):
            pass

    def restricted():
        with model.trace(ids, capture=[f"layers.{i}" for i in picked]):
            for i in picked:
                model.layers[i].output.save()
            model.output.save()

    def restricted_list():
        with model.trace(id_list, capture=[f"layers.{i}" for i in picked]):
            for i in picked:
                model.layers[i].output.save()
            model.output.save()

    modes = {"default trace": default_trace, "capture everything": capture_all,
             "restricted capture": restricted, "restricted, list ids": restricted_list}
    real_eval = mx.eval
    mx.eval = lambda *args, **kwargs: None
    gc.disable()
    try:
        for fn in [plain, *modes.values()]:  # warm up
            for _ in range(20):
                fn()
        results = best_interleaved({"plain forward": plain, **modes}, opts.repeats)
        baseline = results.pop("plain forward")
    finally:
        gc.enable()
        mx.eval = real_eval
    print(f"Llama structure, 16 layers, 1 x 32 tokens, mx.eval stubbed out; best of {opts.repeats}, the runs "
          f"taking turns; Python {sys.version.split()[0]}")
    print(f"{'run':<24}{'us':>10}{'added us':>10}")
    print(f"{'plain forward':<24}{baseline * 1e6:>10.1f}")
    for name, seconds in results.items():
        print(f"{name:<24}{seconds * 1e6:>10.1f}{(seconds - baseline) * 1e6:>10.1f}")


if __name__ == "__main__":
    main()
