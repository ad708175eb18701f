"""Tokens per second training a tuned lens on the demo model (all 16 layers), and its held-out KL.

    python bench/tuned_lens_training.py [--steps 100] [--batch-size 256]

Collects every layer's output at every token of the demo model's training sentences,
trains a tuned lens from those shards, and prints tokens per second (wall clock and per
CPU-second of this process) and the mean KL to the final distribution, logit lens and
tuned lens, on 200 held-out sentences.
"""

from mlxterp_repl.blas import blas_in_use, reexec_with_openblas

reexec_with_openblas()  # before mlx loads: MLX's bundled reference BLAS is ~5x slower

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlxterp import InterpretableModel
from mlxterp.training import collect_tokens, demo_texts
from mlxterp.tuned_lens import compare_lenses, train_tuned_lens
from timing import cpu_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    options = parser.parse_args()
    model = InterpretableModel("demo")
    texts = demo_texts()
    train, held_out = texts[:-200], texts[-200:]
    print(f"device: {mx.default_device()}, BLAS: {blas_in_use()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        collect_tokens(model, train, range(model.n_layers), out=Path(tmp) / "acts", progress=False)
        print(f"collected 16 layers at every token of {len(train)} sentences in {time.perf_counter() - started:.1f} s")
        train_tuned_lens(model, Path(tmp) / "acts", steps=3, batch_size=options.batch_size, progress=False)  # warm up
        started, cpu = time.perf_counter(), cpu_seconds()
        lens = train_tuned_lens(model, Path(tmp) / "acts", steps=options.steps, batch_size=options.batch_size,
                                progress=False)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        tokens = options.steps * options.batch_size
        print(f"tuned lens: {options.steps} steps of {options.batch_size} tokens in {seconds:.1f} s: "
              f"{tokens / seconds:,.0f} tokens/s, {tokens / cpu:,.0f} tokens per CPU-second")
        comparison = compare_lenses(model, held_out, lens)
        print(comparison.short())


if __name__ == "__main__":
    main()
