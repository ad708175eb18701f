"""Real-shape benchmark models with random weights, built with mlx-lm from configs (no downloads).

    from models import build, SHAPES
    base = build("1b")                     # Llama-3.2-1B shape, bfloat16
    base = build("1b-small", "float32")    # the CPU scale-down: same 128256 vocabulary, 4 layers x 512
    base = build("1b", quantized=True)     # the same, 4-bit (group 64), tied embedding quantized too
    model = interpretable("1b-small")      # an InterpretableModel with a tokenizer stand-in

Shapes (``SHAPES``): ``1b`` is Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 key-value
heads, MLP 8192, vocabulary 128256, tied embedding, llama3 RoPE scaling); ``1b-small`` keeps the
vocabulary and the tie and scales the rest down so a 512-token forward takes about a second on two
CPU cores; ``tiny`` is for smoke runs. ``quantized=True`` quantizes every linear layer and the
tied embedding to 4 bits with mlx-lm's ``quantize_model`` (the way ``mlx_lm.convert -q`` does), so
the unembedding runs through ``QuantizedEmbedding.as_linear``.

``ByteTokenizer`` is the tokenizer stand-in: one token per UTF-8 byte (ids 3..258), BOS = 1,
enough for analyses that take text (the logit lens, predictions) on a model whose weights are
random anyway.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

# name: layers, hidden, query heads, key-value heads, MLP width, vocabulary
SHAPES = {
    "1b": (16, 2048, 32, 8, 8192, 128256),
    "1b-small": (4, 512, 8, 2, 2048, 128256),
    "tiny": (2, 128, 4, 2, 256, 128256),
}
# The dtype each shape runs in unless told: bfloat16 on an accelerator, float32 on the CPU
# (MLX's CPU backend has no fast bfloat16 matmul).
GROUP_SIZE, BITS = 64, 4


def default_dtype() -> str:
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def config(shape: str) -> dict:
    """The config.json (as a dict) of a benchmark shape, as mlx-lm reads it."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    layers, hidden, heads, kv_heads, mlp, vocab = SHAPES[shape]
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": mlp,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }


def build(shape: str = "1b", dtype: str | None = None, quantized: bool = False, seed: int = 0) -> nn.Module:
    """A random-weight ``mlx_lm.models.llama.Model`` of ``shape``, parameters evaluated."""
    from mlx_lm.utils import quantize_model

    args = llama.ModelArgs.from_dict(config(shape))
    mx.random.seed(seed)
    model = llama.Model(args)
    # Before the first eval, so float32 weights of the whole model are never materialised at once.
    model.set_dtype(getattr(mx, dtype or default_dtype()))
    if quantized:
        model, _ = quantize_model(model, config(shape), group_size=GROUP_SIZE, bits=BITS)
    mx.eval(model.parameters())
    return model


def describe(base: nn.Module, shape: str, dtype: str | None, quantized: bool) -> str:
    from mlx.utils import tree_flatten

    layers, hidden, heads, kv_heads, mlp, vocab = SHAPES[shape]
    weights = sum(v.nbytes for _, v in tree_flatten(base.parameters()))
    form = f"4-bit (group {GROUP_SIZE}) over {dtype or default_dtype()}" if quantized else (dtype or default_dtype())
    return (f"Llama shape {shape!r}: {layers} layers x {hidden}, {heads}/{kv_heads} heads, MLP {mlp}, "
            f"vocab {vocab} tied, {form}, weights {weights / 2**20:.0f} MiB, on {mx.default_device()}")


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 3), BOS = 1: a stand-in with the interface the library uses."""

    bos_token_id = 1
    eos_token_id = 2
    OFFSET = 3

    def __init__(self, vocab_size: int = SHAPES["1b"][5]):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        specials = {0: "<pad>", 1: "<s>", 2: "</s>"}
        out = []
        for i in ids:
            i = int(i)
            if i in specials:
                out.append(specials[i])
            elif i < 256 + self.OFFSET:
                out.append(bytes([i - self.OFFSET]).decode("utf-8", errors="replace"))
            else:
                out.append(f"<{i}>")
        return "".join(out)

    def get_vocab(self) -> dict:
        return {self.decode([i]): i for i in range(self.vocab_size)}


def interpretable(shape: str = "1b", dtype: str | None = None, quantized: bool = False, seed: int = 0):
    """An ``InterpretableModel`` of a benchmark shape with the byte tokenizer stand-in."""
    from mlxterp import InterpretableModel

    return InterpretableModel(build(shape, dtype, quantized, seed), tokenizer=ByteTokenizer(SHAPES[shape][5]))


def prompt_pair(length: int, seed: int = 0, differ: str = "end") -> tuple[str, str]:
    """A clean and a corrupted prompt of ``length`` byte tokens (BOS included) differing in one word:
    the last (``differ="end"``: they share all tokens before it), the middle one (``"middle"``) or the
    first (``"start"``)."""
    import random

    rng = random.Random(seed)
    words = "the of and a to in is was for on that with as by at from his her it an were are which".split()
    body = []
    while len(" ".join(body)) < length:
        body.append(rng.choice(words))
    text = " ".join(body)[: length - 1 - len(" Paris")].rstrip().ljust(length - 1 - len(" Paris"), ".")
    if differ == "start":
        return "Paris " + text, "Rome! " + text
    if differ == "middle":
        half = text.rfind(" ", 0, len(text) // 2) + 1
        return text[:half] + "Paris " + text[half:], text[:half] + "Rome! " + text[half:]
    return text + " Paris", text + " Rome!"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build a benchmark model and print what it is")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b-small")
    parser.add_argument("--dtype")
    parser.add_argument("--quantized", action="store_true")
    opts = parser.parse_args()
    base = build(opts.shape, opts.dtype, opts.quantized)
    print(describe(base, opts.shape, opts.dtype, opts.quantized))
    print(base(mx.array([[1, 2, 3]])).shape)
