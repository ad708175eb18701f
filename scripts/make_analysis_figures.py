"""Figures for docs/tuned-lens.md and docs/sae.md, from training runs on the demo model.

    .venv/bin/python scripts/make_analysis_figures.py [--out docs/img]

Trains a tuned lens (all 16 layers) and one SAE of each kind (layer 8, 4x dictionary, k=16)
on the demo model's training sentences, evaluates them on held-out sentences and writes
``tuned-lens-kl.png`` (KL to the final distribution per layer, logit lens vs tuned lens) and
``sae-training.png`` (loss curves). It prints the training times and quality figures the
docs quote. About five minutes on a 2-core CPU.
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
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--lens-steps", type=int, default=500)
    parser.add_argument("--sae-steps", type=int, default=1000)
    parser.add_argument("--only", choices=["lens", "sae"], help="make only the tuned-lens or only the SAE figure")
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    model = InterpretableModel("demo")
    texts = demo_texts()
    train, held_out = texts[:-200], texts[-200:]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        layers = [8] if options.only == "sae" else range(model.n_layers)
        acts = collect_tokens(model, train, layers, out=Path(tmp) / "acts")
        print(f"collected {len(layers)} layers at every token of {len(train)} sentences: "
              f"{time.perf_counter() - started:.1f} s")
        evaluation = collect_tokens(model, held_out, layers, progress=False)
        if options.only != "sae":
            make_lens_figure(model, acts, evaluation, options.lens_steps, out)
        if options.only != "lens":
            make_sae_figure(model, acts, evaluation, held_out, options.sae_steps, out)


def make_lens_figure(model, acts, evaluation, steps, out):
    started = time.perf_counter()
    lens = train_tuned_lens(model, acts, steps=steps, batch_size=256, learning_rate=1e-3)
    print(f"tuned lens: {steps} steps of 256 tokens in {time.perf_counter() - started:.1f} s")
    comparison = compare_lenses(model, evaluation, lens)
    print(comparison.short())
    for layer, plain, tuned in zip(comparison.layers, comparison.logit_lens_kl, comparison.tuned_lens_kl):
        print(f"  layer {layer:2d}: logit lens {plain:.3f}  tuned lens {tuned:.3f} nats")
    print("wrote", comparison.draw(str(out / "tuned-lens-kl.png")))


def make_sae_figure(model, acts, evaluation, held_out, steps, out):
    from mlxterp.plots import _figure

    figure = _figure((7, 4))
    ax = figure.add_subplot()
    for kind in ("topk", "batchtopk", "relu"):
        started = time.perf_counter()
        sae = train_sae(acts, key="layer_8", kind=kind, k=16, steps=steps, batch_size=256)
        seconds = time.perf_counter() - started
        metrics = evaluate_sae(sae, evaluation, model=model, texts=held_out)
        print(f"SAE {kind}: {steps} steps of 256 tokens in {seconds:.1f} s; {metrics.short()}; "
              f"cross-entropy clean {metrics.ce_clean:.3f}, spliced {metrics.ce_sae:.3f}, zeroed {metrics.ce_zero:.3f}")
        ax.plot(sae.history, label=f"{kind} (L0 {metrics.l0:.0f})", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step (256 tokens)")
    ax.set_ylabel("reconstruction loss")
    ax.set_title("SAE training on layer 8 of the demo model (4x dictionary, k=16)")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.savefig(out / "sae-training.png", dpi=100, bbox_inches="tight")
    print("wrote", out / "sae-training.png")


if __name__ == "__main__":
    main()
