"""Tokens per second training sparse autoencoders on the demo model's layer-8 residual stream (CPU).

    python bench/sae_training.py [--steps 300] [--batch-size 1024]

Collects every token's layer-8 output of the demo model's training sentences into shards,
then trains a TopK, a BatchTopK and a ReLU+L1 SAE (4x dictionary, k=16) from those shards
and prints tokens per second of training (wall clock, and per CPU-second of this
process, which a machine shared with other work disturbs less) and the held-out
explained variance of each.
"""

from mlxterp_repl.blas import blas_in_use, reexec_with_openblas

reexec_with_openblas()  # before mlx loads: MLX's bundled reference BLAS is ~5x slower

import argparse
import os
import tempfile
import time
from pathlib import Path

from mlxterp import InterpretableModel
from mlxterp.sae import evaluate_sae, train_sae
from mlxterp.training import collect_tokens, demo_texts
from timing import cpu_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    options = parser.parse_args()
    model = InterpretableModel("demo")
    texts = demo_texts()
    train, held_out = texts[:-200], texts[-200:]
    print(f"BLAS: {blas_in_use()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        collect_tokens(model, train, [8], out=Path(tmp) / "acts", progress=False)
        seconds = time.perf_counter() - started
        n_tokens = sum(len(model.encode(t)) for t in train)
        print(f"collected layer 8 at {n_tokens} tokens of {len(train)} sentences in {seconds:.1f} s "
              f"({n_tokens / seconds:,.0f} tokens/s)")
        evaluation = collect_tokens(model, held_out, [8], progress=False)
        print(f"{'kind':<10} {'steps':>6} {'batch':>6} {'seconds':>8} {'tokens/s':>10} {'tokens/cpu-s':>12} "
              f"{'expl. var.':>10} {'L0':>6} {'dead':>5}")
        for kind in ("topk", "batchtopk", "relu"):
            # warm up: on a GPU the first call of each shape compiles kernels
            train_sae(Path(tmp) / "acts", key="layer_8", kind=kind, steps=3, batch_size=options.batch_size,
                      progress=False)
            started, cpu = time.perf_counter(), cpu_seconds()
            sae = train_sae(Path(tmp) / "acts", key="layer_8", kind=kind, k=16, steps=options.steps,
                            batch_size=options.batch_size, progress=False)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            tokens = options.steps * options.batch_size
            metrics = evaluate_sae(sae, evaluation)
            print(f"{kind:<10} {options.steps:>6} {options.batch_size:>6} {seconds:>8.1f} {tokens / seconds:>10,.0f} "
                  f"{tokens / cpu:>12,.0f} {metrics.explained_variance:>10.4f} {metrics.l0:>6.1f} "
                  f"{metrics.dead_features:>5}")


if __name__ == "__main__":
    main()
