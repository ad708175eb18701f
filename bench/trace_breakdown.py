"""Where a trace's extra time goes, on the device the model runs on (issue 16 item 3).

``trace_overhead.py`` says how much a trace costs over a plain forward pass; this
script says why. Same model and input (``--shape``), medians of interleaved runs
after warm-up, for each of the three trace modes (default, capture everything,
restricted) and the modules each records:

- ``bare keep``: the plain forward with a minimal wrapper on the same modules that
  only appends each output to a list, all evaluated together: the cost of holding
  those outputs (no buffer reuse, more allocations) with next to no Python;
- ``run_forward``: the library's recording hot path alone (no Trace object, no input
  checks, no keep rule), its outputs evaluated;
- the trace itself;

the three stages of a plain forward pass and of capture everything timed apart (building the
graph, evaluating it, dropping it), and, with ``mx.eval`` stubbed out, the Python each adds on this
host (best of N), plus graph building alone and ``ids.tolist()``.

    python bench/trace_breakdown.py --shape 1b          # on the GPU machine
    python bench/trace_breakdown.py --shape 1b-small --dtype float32
"""

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.trace import record_plan, run_forward  # noqa: E402
from timing import measure  # noqa: E402
from trace_overhead import SHAPES, build  # noqa: E402
from trace_python_cost import best  # noqa: E402


def bare_keeper(modules, kept):
    """A function running a call with the classes of ``modules`` given a ``__call__`` that appends the
    output of each of those modules to ``kept`` (their own ``__call__`` put back after)."""
    wanted = {object.__hash__(m) for m in modules}
    calls = {}
    for cls in {type(m) for m in modules}:
        original = cls.__call__

        def __call__(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if object.__hash__(self) in wanted:
                kept.append(out)
            return out

        calls[cls] = (cls.__dict__.get("__call__"), __call__)

    def wrapped(call):
        for cls, (_, recording) in calls.items():
            setattr(cls, "__call__", recording)
        try:
            return call()
        finally:
            for cls, (own, _) in calls.items():
                if own is None:
                    delattr(cls, "__call__")
                else:
                    setattr(cls, "__call__", own)

    return wrapped


def print_stages(model, base, ids, plain_ids, repeats):
    """Medians of the three stages of a plain forward pass and of a capture-everything trace, timed
    apart in the same rounds: building the graph (Python), evaluating it (the device and MLX's own
    host work) and dropping the result."""
    clock = time.perf_counter
    times = {}

    def note(name, seconds):
        times.setdefault(name, []).append(seconds)

    def plain():
        t0 = clock()
        out = base(plain_ids)
        t1 = clock()
        mx.eval(out)
        t2 = clock()
        del out
        note("plain forward", (t1 - t0, t2 - t1, clock() - t2))

    def everything():
        t0 = clock()
        trace = model.trace(ids, keep="all")
        trace.__enter__()
        t1 = clock()
        trace.__exit__(None, None, None)  # keeps every output and evaluates them
        t2 = clock()
        del trace
        note("capture everything", (t1 - t0, t2 - t1, clock() - t2))

    for round_ in range(repeats + 5):
        for fn in (plain, everything):
            mx.synchronize()
            fn()
        if round_ == 4:
            times.clear()
    print(f"Stages, median of {repeats} (us):")
    print(f"{'run':<24}{'build':>9}{'evaluate':>10}{'drop':>8}")
    for name, rows in times.items():
        build, evaluate, drop = (statistics.median(column) * 1e6 for column in zip(*rows))
        print(f"{name:<24}{build:>9.0f}{evaluate:>10.0f}{drop:>8.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--dtype")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--python-repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3)
    opts = parser.parse_args()
    layers, hidden, heads, kv_heads, mlp, vocab, tied, batch, length, dtype = SHAPES[opts.shape]
    dtype = opts.dtype or dtype
    base = build(layers, hidden, heads, kv_heads, mlp, vocab, tied, dtype)
    model = InterpretableModel(base)
    ids = mx.random.randint(0, vocab, (batch, length), key=mx.random.key(0))
    mx.eval(ids)
    picked = [layers // 4, layers // 2, layers - 2]
    restricted_names = [f"layers.{i}" for i in picked]

    plans = {
        "default": record_plan(model, None, True),
        "everything": record_plan(model, None, False),
        "restricted": record_plan(model, restricted_names, False),
    }

    def trace_default():
        with model.trace(ids):
            model.output.save()

    def trace_everything():
        with model.trace(ids, keep="all"):
            pass

    def trace_restricted():
        with model.trace(ids, capture=restricted_names):
            for i in picked:
                model.layers[i].output.save()
            model.output.save()

    traces = {"default": trace_default, "everything": trace_everything, "restricted": trace_restricted}
    # The runs without the library read their own copy of the ids: the traces read `ids` on the host
    # and never hand them to the device (see trace_overhead.py).
    plain_ids = mx.array(ids.tolist())
    mx.eval(plain_ids)
    reread_ids = mx.array(ids.tolist())  # read on the host after every GPU forward pass that read them

    def plain_reading_ids():
        reread_ids.tolist()
        mx.eval(base(reread_ids))

    def trace_default_saved_only():
        with model.trace(ids, keep="saved"):
            model.output.save()

    runs = {"plain forward": lambda: mx.eval(base(plain_ids)), "plain forward after ids.tolist()": plain_reading_ids,
            "default, keep='saved'": trace_default_saved_only}
    for mode, (record, ordered, names_by_key, _, classes) in plans.items():
        kept = []
        keeper = bare_keeper([m for _, m in ordered], kept)

        def bare(keeper=keeper, kept=kept):
            out = keeper(lambda: base(plain_ids))
            mx.eval(out, kept)
            kept.clear()

        def hot_path(ordered=ordered, names_by_key=names_by_key, classes=classes):
            out, recorder = run_forward(model, lambda: base(plain_ids), ordered, {}, names_by_key=names_by_key,
                                        classes=classes)
            mx.eval(out, list(recorder.outputs.values()))

        runs[f"{mode}: bare keep ({len(ordered)} modules)"] = bare
        runs[f"{mode}: run_forward"] = hot_path
        runs[f"{mode}: trace"] = traces[mode]

    results = measure(runs, opts.repeats, opts.warmup)
    baseline = results["plain forward"][0]
    print(f"{opts.shape} shape, {dtype}, {batch} x {length} tokens, on {mx.default_device()} ({model.device}); "
          f"median of {opts.repeats}")
    print(f"{'run':<40}{'ms':>9}{'x plain':>9}{'+us':>9}{'peak MiB':>10}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<40}{seconds * 1e3:>9.3f}{seconds / baseline:>9.3f}{(seconds - baseline) * 1e6:>9.0f}"
              f"{peak:>10.1f}")

    print_stages(model, base, ids, plain_ids, opts.repeats)

    start = time.perf_counter()
    for _ in range(100):
        ids.tolist()
    print(f"ids.tolist(): {(time.perf_counter() - start) * 1e4:.1f} us")

    real_eval = mx.eval
    mx.eval = lambda *args, **kwargs: None
    gc.disable()
    try:
        python = {"plain forward (graph only)": lambda: base(ids)}
        python.update({f"{mode}: trace": fn for mode, fn in traces.items()})
        for fn in python.values():
            for _ in range(20):
                fn()
        python_times = {name: best(fn, opts.python_repeats) for name, fn in python.items()}
    finally:
        gc.enable()
        mx.eval = real_eval
    graph = python_times["plain forward (graph only)"]
    print(f"Python alone (mx.eval stubbed), best of {opts.python_repeats}:")
    for name, seconds in python_times.items():
        print(f"{name:<40}{seconds * 1e6:>9.1f} us{(seconds - graph) * 1e6:>9.1f} added")


if __name__ == "__main__":
    main()
