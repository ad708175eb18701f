"""Draw the pictures of docs/heads.md and docs/causal-tracing.md into docs/img/.

    .venv/bin/python scripts/heads_and_tracing_figures.py

* docs/img/induction-heads.png: head scores of the bundled induction model;
* docs/img/causal-trace.png: causal trace of "The capital of France is" on the demo model
  (ROME's settings: noise 3 x the embedding's std, 10 samples, window 10).

Prints the figures' numbers and timings (they go into the docs and the closing notes).
"""

import os
import sys
import time
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
if __name__ == "__main__" and sys.platform.startswith("linux") and "LD_PRELOAD" not in os.environ \
        and os.path.exists(OPENBLAS):
    os.environ["LD_PRELOAD"] = OPENBLAS
    os.execv(sys.executable, [sys.executable, *sys.argv])

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.causal_tracing import causal_trace  # noqa: E402
from mlxterp.heads import head_scores, induction_model  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "img"


def main():
    IMAGES.mkdir(exist_ok=True)
    toy = induction_model()
    started = time.perf_counter()
    scores = head_scores(toy)
    print(f"induction model head scores in {time.perf_counter() - started:.2f}s")
    for kind in scores.kinds:
        print(f"  {kind}: top {[(layer, head, round(value, 3)) for layer, head, value in scores.top(kind, 3)]}")
    print("  ->", scores.save_plot(IMAGES / "induction-heads.png"))

    demo = InterpretableModel("demo")
    started = time.perf_counter()
    demo_scores = head_scores(demo)
    print(f"demo model head scores in {time.perf_counter() - started:.2f}s; "
          f"induction top {[(layer, head, round(value, 3)) for layer, head, value in demo_scores.top('induction', 3)]}")

    trace = causal_trace(demo, "The capital of France is", "France")
    print(f"causal trace (3 kinds x 16 layers x 6 positions x 10 samples) in {trace.seconds:.2f}s: "
          f"clean {trace.clean_probability:.3f}, corrupted {trace.corrupted_probability:.3f}")
    for kind in trace.kinds:
        print(f"  {kind}: best {trace.best(kind)}")
    print("  ->", trace.save_plot(IMAGES / "causal-trace.png"))


if __name__ == "__main__":
    main()
