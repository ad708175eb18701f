"""Cost of tracing against the plain mlx-lm forward pass, measured in one run.

Builds a random-weight mlx-lm Llama (no download) and times, interleaved so
machine noise hits all alike, after warm-up rounds, the median of N runs of:

- plain forward: ``mx.eval(model(ids))``
- default trace: ``with model.trace(ids): logits = model.output.save()`` (records the
  blocks, keeps them while they fit the keep budget)
- capture everything: ``keep="all"``, every module output recorded and kept
- restricted capture: ``capture=`` three layers, saving them and the logits

and prints each one's ratio to the plain forward and its peak memory. Targets
(issue 16, at 1 x 32 tokens on the 1B shape): default <= 1.10x, capture
everything <= 1.15x, restricted <= 1.03x. Device-agnostic: it runs on MLX's
default device (CPU here, Metal or CUDA where MLX has them). On this CPU
bfloat16 matmuls are several times slower than float32 (``--dtype float32``).

    python bench/trace_overhead.py                # 12 layers x 768, batch 8 x 128, float32
    python bench/trace_overhead.py --shape 1b     # Llama-3.2-1B shape, 1 x 32 tokens, bfloat16
    python bench/trace_overhead.py --shape 1b-small  # same vocabulary (128256), 4 layers x 512
    python bench/trace_overhead.py --quick        # a smaller model, for a smoke run
"""

import argparse
import inspect

import mlx.core as mx
from mlx_lm.models import llama

from mlxterp import InterpretableModel
from timing import measure

# name: (layers, hidden, heads, kv heads, mlp, vocab, tied, batch, tokens, dtype)
SHAPES = {
    "default": (12, 768, 12, 12, 3072, 32000, False, 8, 128, "float32"),
    "quick": (4, 256, 4, 4, 1024, 32000, False, 2, 64, "float32"),
    "1b": (16, 2048, 32, 8, 8192, 128256, True, 1, 32, "bfloat16"),
    "1b-small": (4, 512, 8, 2, 2048, 128256, True, 1, 32, "bfloat16"),
}
TARGETS = {"default trace": 1.10, "capture everything": 1.15, "restricted capture": 1.03}


def build(layers, hidden, heads, kv_heads, mlp, vocab, tied, dtype):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
        vocab_size=vocab, tie_word_embeddings=tied, rope_theta=500000.0,
    )
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))  # before the first eval: float32 weights are never materialised
    mx.eval(model.parameters())
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--quick", action="store_true", help="same as --shape quick")
    parser.add_argument("--dtype", help="override the shape's dtype (float32, bfloat16, float16)")
    parser.add_argument("--device", choices=["cpu", "gpu"], help="MLX device (default: MLX's default device)")
    parser.add_argument("--repeats", type=int, default=100,
                        help="interleaved rounds (a GPU run needs a few hundred for 1 %% to show)")
    parser.add_argument("--warmup", type=int, default=2)
    opts = parser.parse_args()
    if opts.device:
        mx.set_default_device(mx.cpu if opts.device == "cpu" else mx.gpu)
    shape = "quick" if opts.quick else opts.shape
    layers, hidden, heads, kv_heads, mlp, vocab, tied, batch, length, dtype = SHAPES[shape]
    dtype = opts.dtype or dtype
    base = build(layers, hidden, heads, kv_heads, mlp, vocab, tied, dtype)
    model = InterpretableModel(base)
    ids = mx.random.randint(0, vocab, (batch, length), key=mx.random.key(0))
    mx.eval(ids)
    # Older versions of the library had no keep=: reading every activation in the block kept them all.
    has_keep = "keep" in inspect.signature(model.trace).parameters
    picked = [layers // 4, layers // 2, layers - 2]

    # The plain forward pass reads its own copy of the ids. A trace checks the ids it is given on the host
    # and hands the model an array of its own, so the traced `ids` are never read by the device; read
    # back after a GPU used them (one array shared by both), their pages move back first: 50-110 us
    # on the H200 (bench/trace_breakdown.py prices it: "plain forward after ids.tolist()").
    plain_ids = mx.array(ids.tolist())
    mx.eval(plain_ids)

    def plain():
        mx.eval(base(plain_ids))

    def default_trace():
        with model.trace(ids):
            model.output.save()

    def capture_all():
        if has_keep:
            with model.trace(ids, keep="all") as trace:
                pass
        else:
            with model.trace(ids) as trace:
                for name in list(trace.activations):
                    trace.activations[name]
        return trace

    def capture_three():
        with model.trace(ids, capture=[f"layers.{i}" for i in picked]):
            for i in picked:
                model.layers[i].output.save()
            model.output.save()

    results = measure({"plain forward": plain, "default trace": default_trace, "capture everything": capture_all,
                       "restricted capture": capture_three}, opts.repeats, opts.warmup)
    baseline = results["plain forward"][0]
    n_params = sum(v.size for v in model.parameters().values())
    print(f"Llama {layers} layers, hidden {hidden}, vocab {vocab}, {n_params / 1e6:.0f}M parameters, {dtype}, "
          f"batch {batch} x {length} tokens, on {mx.default_device()}; median of {opts.repeats} "
          f"after {opts.warmup} warm-up rounds")
    print(f"{'run':<22}{'ms':>10}{'ratio':>8}{'target':>8}{'peak MiB':>10}")
    for name, (seconds, peak) in results.items():
        target = f"{TARGETS[name]:.2f}" if name in TARGETS else ""
        print(f"{name:<22}{seconds * 1e3:>10.2f}{seconds / baseline:>8.3f}{target:>8}{peak:>10.1f}")
    n_all = len(capture_all().activations)
    print(f"(capture everything kept {n_all} activations)")


if __name__ == "__main__":
    main()
