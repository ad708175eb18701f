"""Build the tuned lens and the sparse autoencoder bundled for the demo model.

    .venv/bin/python scripts/build_demo_lens_sae.py [--out mlxterp/assets]

Writes ``demo-lens/`` (a tuned lens for all 16 layers) and ``demo-sae/`` (a TopK SAE of
``layers.8``, 4x dictionary, k=16) trained on the demo model's training sentences, so that
``lens tuned demo``, ``sae load demo`` and the query-language examples of docs/dsl.md run
without training anything first (``mlxterp.tuned_lens.load_tuned_lens("demo")``,
``mlxterp.sae.load_sae("demo")``). Deterministic; about two minutes on a 2-core CPU. It prints
the quality figures of both on 200 held-out sentences.
"""

from mlxterp_repl.blas import reexec_with_openblas

reexec_with_openblas()

import argparse
import tempfile
import time
from pathlib import Path

from mlxterp import InterpretableModel
from mlxterp.sae import evaluate_sae, train_sae
from mlxterp.training import collect_tokens, demo_texts
from mlxterp.tuned_lens import compare_lenses, train_tuned_lens

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "mlxterp" / "assets"))
    parser.add_argument("--lens-steps", type=int, default=200)
    parser.add_argument("--sae-steps", type=int, default=1000)
    options = parser.parse_args()
    out = Path(options.out)
    model = InterpretableModel("demo")
    texts = demo_texts()
    train, held_out = texts[:-200], texts[-200:]
    with tempfile.TemporaryDirectory() as tmp:
        acts = collect_tokens(model, train, range(model.n_layers), out=Path(tmp) / "acts", progress=False)
        evaluation = collect_tokens(model, held_out, range(model.n_layers), progress=False)
        started = time.perf_counter()
        lens = train_tuned_lens(model, acts, steps=options.lens_steps, batch_size=256, learning_rate=1e-3,
                                progress=False)
        print(f"tuned lens: {options.lens_steps} steps in {time.perf_counter() - started:.1f} s; "
              f"{compare_lenses(model, evaluation, lens).short()}")
        lens.save(out / "demo-lens")
        started = time.perf_counter()
        sae = train_sae(acts, key="layer_8", kind="topk", expansion=4, k=16, steps=options.sae_steps,
                        batch_size=256, progress=False)
        print(f"SAE: {options.sae_steps} steps in {time.perf_counter() - started:.1f} s; "
              f"{evaluate_sae(sae, evaluation, model=model, texts=held_out).short()}")
        sae.save(out / "demo-sae")


if __name__ == "__main__":
    main()
