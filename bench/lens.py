"""The logit lens on every layer at one position against one plain forward pass, at a 128k vocabulary.

    python bench/lens.py                          # CPU scale-down (1b-small), 512 tokens, float32
    python bench/lens.py --shape 1b               # Llama-3.2-1B shape (bfloat16 on a GPU)
    python bench/lens.py --shape 1b --quantized   # 4-bit: the tied unembedding is a QuantizedEmbedding

Times (median of ``--repeats`` after a warm-up round, interleaved) and peak memory
(``mx.get_peak_memory``, weights included) of a plain forward pass (``mx.eval(model(ids))``, logits
at every position) and of ``logit_lens(model, text, position=-1, top_k=5)``: every layer's output
decoded at the last position through the final norm and the unembedding. Target (issue 16): the
lens costs <= 1.5x one forward pass in time and in memory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlxterp_repl.blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()  # before mlx loads: MLX's bundled reference BLAS is ~5x slower

import argparse  # noqa: E402

import mlx.core as mx  # noqa: E402

import models  # noqa: E402
from timing import measure  # noqa: E402
from mlxterp.analysis import logit_lens  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(models.SHAPES), default="1b-small")
    parser.add_argument("--dtype")
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()

    model = models.interpretable(opts.shape, opts.dtype, opts.quantized)
    text, _ = models.prompt_pair(opts.tokens)
    ids = mx.array([model.encode(text)])
    print(models.describe(model.model, opts.shape, opts.dtype, opts.quantized))
    print(f"device {model.device}, {ids.shape[1]} tokens, load average {os.getloadavg()[0]:.1f}")

    runs = {
        "plain forward": lambda: mx.eval(model.model(ids)),
        "logit lens, all layers, 1 position": lambda: logit_lens(model, text, position=-1, top_k=5),
    }
    results = measure(runs, opts.repeats, warmup=1)
    forward, forward_peak = results["plain forward"]
    print(f"{'run':<38}{'ms':>10}{'x forward':>11}{'peak MiB':>10}{'x forward':>11}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<38}{seconds * 1e3:>10.1f}{seconds / forward:>11.2f}{peak:>10.0f}{peak / forward_peak:>11.2f}")
    print("target: the lens <= 1.50x one forward pass in time and in memory")


if __name__ == "__main__":
    main()
