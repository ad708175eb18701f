"""Attention patterns: the softmax probabilities of each head, recomputed exactly.

mlx-lm's attention modules compute their probabilities inside a fused kernel
and never hand them out, so we recompute them from the module's own pieces:
its ``q_proj``/``k_proj``, its q/k norms (Qwen3), its RoPE (with the same
per-row offsets a left-padded batch uses), its scale, its logit softcap
(Gemma 2) and the model's mask (causal, sliding window, left padding).
The input is the attention module's captured input, so the result is the
pattern the forward pass used: ``probs @ v`` through ``o_proj`` reproduces the
module's output (the tests check exactly that).

Architectures whose attention is laid out differently (fused qkv, q/k norms
over the whole projection, latent attention, ...) get an error naming them
rather than a pattern that might be wrong.
"""

from typing import Dict, Iterable, Optional, Sequence, Union

import mlx.core as mx

from .analysis import layer_list
from .errors import MlxterpError

# mlx-lm modules whose Attention computes q/k as recomputed here.
SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
)


def get_attention_patterns(model, inputs, layers: Optional[Union[int, Iterable[int]]] = None
                           ) -> Dict[int, mx.array]:
    """Attention probabilities ``{layer: (batch, heads, query, key)}`` for ``inputs``.

    ``inputs`` is anything ``model.trace`` takes (a prompt, a list of prompts,
    token ids). ``layers`` is a layer index, a list of them, or ``None`` for all.
    Rows of a padded batch have zero probability on their padding keys, and
    padding query positions are all zeros.
    """
    layers = layer_list(model, layers)
    modules = dict(model.named_modules())
    attention_names = {layer: model.resolve(f"layers.{layer}.attn") for layer in layers}
    for layer, name in attention_names.items():
        check_supported(modules[name], model)

    with model.trace(inputs, capture=list(attention_names.values())) as tr:
        attention_inputs = {layer: model.layers[layer].attn.input.save() for layer in layers}
    left_padding = tr.padding or None

    patterns = {}
    for layer in layers:
        block = modules[model.resolve(f"layers.{layer}")]
        patterns[layer] = attention_probabilities(
            modules[attention_names[layer]],
            attention_inputs[layer],
            left_padding=left_padding,
            window=_sliding_window(model, block),
        )
    mx.eval(patterns)
    return patterns


def check_supported(attention, model=None) -> None:
    """Raise a clear error if ``attention`` is not a module we can recompute exactly."""
    source = type(attention).__module__.rsplit(".", 1)[-1]
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")
    if source not in SUPPORTED_ARCHITECTURES or not all(hasattr(attention, a) for a in needed):
        architecture = _architecture_name(model) or source
        raise MlxterpError(
            f"attention patterns are not available for the {architecture!r} architecture "
            f"({type(attention).__module__}.{type(attention).__name__}): its attention cannot be "
            f"recomputed exactly here. Supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            f"The attention output itself is still available as layers.N.attn."
        )


def attention_probabilities(attention, x: mx.array, left_padding: Optional[Sequence[int]] = None,
                            window: Optional[int] = None) -> mx.array:
    """Probabilities ``(batch, heads, L, L)`` of ``attention`` on its input ``x`` ``(batch, L, dim)``."""
    batch, length, _ = x.shape
    queries = attention.q_proj(x).reshape(batch, length, attention.n_heads, -1)
    keys = attention.k_proj(x).reshape(batch, length, attention.n_kv_heads, -1)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    if hasattr(attention, "k_norm"):
        keys = attention.k_norm(keys)
    queries = queries.transpose(0, 2, 1, 3)
    keys = keys.transpose(0, 2, 1, 3)

    padded = left_padding is not None and any(left_padding)
    if padded:
        # Same convention as mlx-lm's BatchKVCache: each row's first real token is position 0.
        offset = mx.array([-p for p in left_padding])
        queries = attention.rope(queries, offset=offset)
        keys = attention.rope(keys, offset=offset)
    else:
        queries = attention.rope(queries)
        keys = attention.rope(keys)

    repeats = attention.n_heads // attention.n_kv_heads
    if repeats > 1:
        keys = mx.repeat(keys, repeats, axis=1)

    scores = (queries.astype(mx.float32) * attention.scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
    softcap = getattr(attention, "attn_logit_softcapping", None)
    if softcap:
        scores = mx.tanh(scores / softcap) * softcap

    allowed = attention_mask(length, left_padding if padded else None, window)
    scores = mx.where(allowed, scores, mx.array(-mx.inf, mx.float32))
    probabilities = mx.softmax(scores, axis=-1, precise=True)
    # Padding queries see no key at all: give them zeros rather than NaN.
    return mx.where(allowed.any(axis=-1, keepdims=True), probabilities, 0.0)


def attention_mask(length: int, left_padding: Optional[Sequence[int]] = None,
                   window: Optional[int] = None) -> mx.array:
    """Boolean ``(batch or 1, 1, L, L)``: may query i attend to key j (causal, window, padding)."""
    query = mx.arange(length)[:, None]
    key = mx.arange(length)[None, :]
    allowed = query >= key
    if window is not None:
        allowed = allowed & (query < key + window)
    allowed = allowed[None, None]
    if left_padding is not None:
        allowed = allowed & (mx.array(left_padding)[:, None, None, None] <= key)
    return allowed


def _sliding_window(model, block) -> Optional[int]:
    if not getattr(block, "use_sliding", False):
        return None
    args = getattr(block, "args", None)
    return getattr(args, "sliding_window", None)


def _architecture_name(model) -> Optional[str]:
    module = getattr(model, "model", None)
    args = getattr(module, "args", None) or getattr(getattr(module, "model", None), "args", None)
    return getattr(args, "model_type", None)
