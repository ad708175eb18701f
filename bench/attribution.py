"""Attribution patching against the exact patching sweeps it approximates, on the demo model.

    python bench/attribution.py                # the demo: "France" vs "Japan", answers " Paris" / " Tokyo"
    python bench/attribution.py --repeats 5

Coverage is the same for both: every layer x component (resid_pre, attn_out, mlp_out) x position,
and every layer x head x position (each head's z). The exact side is
``mlxterp.attribution.exact_patching`` (batched ``activation_patching`` sweeps, one per component
and one per head); the estimate is ``attribution_patching`` (one batched clean+corrupted forward and
one backward pass). Prints the best time of each (after a warm-up), the speedup (target: >= 10x),
and Spearman's rank correlation of the estimates with the exact recoveries, per component and overall.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlxterp_repl.blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()  # before mlx loads: MLX's bundled reference BLAS is ~5x slower

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.attribution import attribution_patching, exact_patching, rank_correlation  # noqa: E402

CLEAN, CORRUPT, ANSWERS = "The capital of France is", "The capital of Japan is", (" Paris", " Tokyo")


def best_time(function, repeats: int):
    function()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = InterpretableModel("demo")
    estimate_time, estimate = best_time(lambda: attribution_patching(model, CLEAN, CORRUPT, ANSWERS), args.repeats)
    exact_time, exact = best_time(lambda: exact_patching(model, CLEAN, CORRUPT, ANSWERS), args.repeats)
    cells = sum(exact[c].size for c in exact.components) + exact.heads.size
    print(f"demo model, {len(model.encode(CLEAN))} tokens, {cells} patches "
          f"({', '.join(exact.components)} per layer and position; {exact.heads.shape[1]} heads per layer and position)")
    print(f"exact patching sweeps:  {exact_time * 1e3:8.1f} ms")
    print(f"attribution patching:   {estimate_time * 1e3:8.1f} ms   speedup {exact_time / estimate_time:.1f}x "
          f"(target >= 10x)")
    for component in estimate.components:
        print(f"rank correlation {component:>9}: {rank_correlation(estimate[component], exact[component]):.3f}")
    print(f"rank correlation     heads: {rank_correlation(estimate.heads, exact.heads):.3f}")
    every = [np.concatenate([r[c].ravel() for c in r.components] + [r.heads.ravel()]) for r in (estimate, exact)]
    print(f"rank correlation       all: {rank_correlation(*every):.3f}")


if __name__ == "__main__":
    main()
