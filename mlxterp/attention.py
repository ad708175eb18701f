"""Attention patterns: the softmax probabilities of each head, recomputed exactly.

mlx-lm's attention modules compute their probabilities inside a fused kernel
and never hand them out, so we recompute them from the module's own pieces:
its q/k projections (separate or fused), its q/k norms, its RoPE (with the
same per-row offsets a left-padded batch uses), its scale, its logit softcap
(Gemma 2) and the model's mask (causal, sliding window, left padding).
The input is the attention module's captured input, so the result is the
pattern the forward pass used: ``probs @ v`` through the output projection
reproduces the module's output (the tests check exactly that for every
supported architecture).

``LAYOUTS`` says, per mlx-lm model file, how that file's attention gets its
queries, keys and values; one function (``queries_keys_values``) reads them.
Architectures not in it (latent attention, attention sinks, per-layer NoPE
switches, ...) get an error naming them rather than a pattern that might be wrong.
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .analysis import layer_list
from .errors import MlxterpError
from .results import AttentionPatterns


@dataclass(frozen=True)
class Layout:
    """How one mlx-lm attention module computes q, k and v.

    ``qkv``: ``"separate"`` (``q_proj``/``k_proj``/``v_proj``), or the name of a
    fused projection: ``"qkv_proj"``/``"c_attn"`` (q | k | v concatenated),
    ``"query_key_value"`` (GPT-NeoX: q, k, v interleaved per head),
    ``"wqkv"`` (InternLM2: grouped per key/value head).
    ``norm``: where the module's q/k norms (if it has them) apply:
    ``"head"`` (each head's vector, before RoPE), ``"full"`` (the whole
    projection, before the head split), ``"after_rope"`` (each head, after RoPE).
    ``scale``: attribute holding the softmax scale, or None for ``head_dim ** -0.5``.
    ``out``: the output projection.
    ``input``: a sibling module of the block whose output is the attention's
    input, for modules called with a keyword input the trace does not record (GPT-J).
    """

    qkv: str = "separate"
    norm: str = "head"
    norm_names: Tuple[str, str] = ("q_norm", "k_norm")
    scale: Optional[str] = "scale"
    out: str = "o_proj"
    input: Optional[str] = None


STANDARD = Layout()
LAYOUTS = {
    **{arch: STANDARD for arch in (
        "llama", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "mixtral", "phimoe", "starcoder2", "cohere", "granite", "granitemoe", "ernie4_5",
        "ernie4_5_moe", "helium", "glm4", "glm4_moe", "dots1", "apertus", "internlm3", "seed_oss",
        "nemotron", "minicpm")},
    "phi": Layout(scale=None, out="dense"),
    "phi3": Layout(qkv="qkv_proj"),
    "stablelm": Layout(norm_names=("q_layernorm", "k_layernorm"), scale=None),
    "olmo2": Layout(norm="full"),
    "olmo3": Layout(norm="full"),
    "olmoe": Layout(norm="full"),
    "internlm2": Layout(qkv="wqkv", out="wo"),
    "exaone": Layout(out="out_proj"),
    "hunyuan_v1_dense": Layout(norm="after_rope", norm_names=("query_layernorm", "key_layernorm")),
    "openelm": Layout(qkv="qkv_proj", out="out_proj"),
    "gpt_neox": Layout(qkv="query_key_value", out="dense"),
    "gptj": Layout(scale="scale_attn", out="out_proj", input="ln_1"),
    "gpt2": Layout(qkv="c_attn", out="c_proj"),
    "gpt_bigcode": Layout(qkv="c_attn", out="c_proj"),
}
# Model types whose attention is another file's: mistral runs on llama.py, smollm3 is llama
# attention with the RoPE of its NoPE layers swapped for identity.
ALIASES = {"mistral": "llama", "smollm3": "llama"}
SUPPORTED_ARCHITECTURES = tuple(sorted({*LAYOUTS, *ALIASES}))

_HEADS = ("n_heads", "num_heads", "num_attention_heads", "n_head")
_KV_HEADS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")


def get_attention_patterns(model, inputs, layers: Optional[Union[int, Iterable[int]]] = None
                           ) -> AttentionPatterns:
    """Attention probabilities ``{layer: (batch, heads, query, key)}`` for ``inputs``
    (an ``AttentionPatterns``: ``result[layer]`` is an mx.array; it draws itself).

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

    captured = [model.resolve(f"layers.{layer}.{_input_module(modules[name])}")
                for layer, name in attention_names.items()]
    with model.trace(inputs, capture=captured) as tr:
        attention_inputs = {layer: saved_attention_input(model, layer) for layer in layers}
    left_padding = tr.padding or None

    patterns = {}
    for layer in layers:
        block = modules[model.resolve(f"layers.{layer}")]
        attention = modules[attention_names[layer]]
        patterns[layer] = attention_probabilities(
            attention,
            attention_inputs[layer],
            left_padding=left_padding,
            window=_sliding_window(model, block, attention, layer),
        )
    mx.eval(patterns)
    tokens = None
    if isinstance(inputs, str) and model.tokenizer is not None:
        tokens = model.token_strings(model.encode(inputs))
    return AttentionPatterns(layers, [patterns[layer] for layer in layers], tokens=tokens)


def saved_attention_input(model, layer: int) -> mx.array:
    """Inside a trace: save and return the input of layer ``layer``'s attention module."""
    attention = model.module(f"layers.{layer}.attn")
    source = _input_module(attention)
    if source == "attn":
        return model.layers[layer].attn.input.save()
    return getattr(model.layers[layer], source).output.save()


def _input_module(attention) -> str:
    layout = layout_of(attention)
    return (layout and layout.input) or "attn"


def layout_of(attention) -> Optional[Layout]:
    """The ``Layout`` of an attention module, or None if it is not one we recompute exactly."""
    return LAYOUTS.get(type(attention).__module__.rsplit(".", 1)[-1])


def check_supported(attention, model=None) -> None:
    """Raise a clear error if ``attention`` is not a module we can recompute exactly."""
    layout = layout_of(attention)
    projections = ("q_proj", "k_proj", "v_proj") if layout and layout.qkv == "separate" else (
        layout.qkv if layout else "",)
    if layout is None or not all(hasattr(attention, name) for name in (*projections, layout.out)):
        source = type(attention).__module__.rsplit(".", 1)[-1]
        architecture = _architecture_name(model) or source
        raise MlxterpError(
            f"attention patterns are not available for the {architecture!r} architecture "
            f"({type(attention).__module__}.{type(attention).__name__}): its attention cannot be "
            f"recomputed exactly here. Supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            f"The attention output itself is still available as layers.N.attn."
        )


def head_counts(attention) -> Tuple[int, int]:
    """(query heads, key/value heads) of an attention module."""
    heads = next(getattr(attention, a) for a in _HEADS if isinstance(getattr(attention, a, None), int))
    kv_heads = next((getattr(attention, a) for a in _KV_HEADS
                     if isinstance(getattr(attention, a, None), int)), heads)
    return heads, kv_heads


def queries_keys_values(attention, x: mx.array, left_padding: Optional[Sequence[int]] = None
                        ) -> Tuple[mx.array, mx.array, mx.array]:
    """q, k, v ``(batch, heads, L, head_dim)`` as ``attention`` computes them from ``x``.

    q and k are normed and rotated as in the module; k and v keep their
    key/value heads (not repeated for grouped-query attention).
    """
    layout = layout_of(attention)
    batch, length, _ = x.shape
    heads, kv_heads = head_counts(attention)
    if layout.qkv == "separate":
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
    elif layout.qkv in ("qkv_proj", "c_attn"):
        qkv = getattr(attention, layout.qkv)(x)
        head_dim = qkv.shape[-1] // (heads + 2 * kv_heads)
        q, k, v = mx.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
    elif layout.qkv == "query_key_value":
        q, k, v = mx.split(attention.query_key_value(x).reshape(batch, length, heads, -1), 3, axis=-1)
    elif layout.qkv == "wqkv":
        groups = heads // kv_heads
        qkv = attention.wqkv(x).reshape(batch, length, kv_heads, groups + 2, -1)
        q, k, v = qkv[..., :groups, :], qkv[..., -2, :], qkv[..., -1, :]
    else:
        raise ValueError(f"unknown qkv layout {layout.qkv!r}")

    q_norm, k_norm = (getattr(attention, name, None) for name in layout.norm_names)
    if layout.norm == "full" and q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q = q.reshape(batch, length, heads, -1)
    k = k.reshape(batch, length, kv_heads, -1)
    v = v.reshape(batch, length, kv_heads, -1)
    if layout.norm == "head" and q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))

    rope = getattr(attention, "rope", None)
    if rope is not None:
        if left_padding is not None and any(left_padding):
            # Same convention as mlx-lm's BatchKVCache: each row's first real token is position 0.
            offset = mx.array([-p for p in left_padding])
            q, k = rope(q, offset=offset), rope(k, offset=offset)
        else:
            q, k = rope(q), rope(k)
    if layout.norm == "after_rope" and q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q, k, v


def output_projection(attention):
    """The module mapping the heads' mixed values back to the residual stream (``o_proj``, ...)."""
    return getattr(attention, layout_of(attention).out)


def attention_probabilities(attention, x: mx.array, left_padding: Optional[Sequence[int]] = None,
                            window: Optional[int] = None) -> mx.array:
    """Probabilities ``(batch, heads, L, L)`` of ``attention`` on its input ``x`` ``(batch, L, dim)``."""
    length = x.shape[1]
    padded = left_padding is not None and any(left_padding)
    queries, keys, _ = queries_keys_values(attention, x, left_padding if padded else None)
    repeats = queries.shape[1] // keys.shape[1]
    if repeats > 1:
        keys = mx.repeat(keys, repeats, axis=1)

    scale_name = layout_of(attention).scale
    scale = getattr(attention, scale_name) if scale_name else queries.shape[-1] ** -0.5
    scores = (queries.astype(mx.float32) * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
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


def _sliding_window(model, block, attention, layer: int) -> Optional[int]:
    """The window of a sliding-window layer (llama/olmo3 ``layer_types``, gemma3 pattern), else None."""
    args = getattr(block, "args", None) or _model_args(model)
    layer_types = getattr(args, "layer_types", None)
    sliding = (getattr(block, "use_sliding", False) or getattr(attention, "is_sliding", False)
               or (layer_types is not None and layer_types[layer] == "sliding_attention"))
    return getattr(args, "sliding_window", None) if sliding else None


def _model_args(model):
    module = getattr(model, "model", None)
    return getattr(module, "args", None) or getattr(getattr(module, "model", None), "args", None)


def _architecture_name(model) -> Optional[str]:
    return getattr(_model_args(model), "model_type", None)


# -- where the tokens are in a module's output -----------------------------------------

def is_rotary(module) -> bool:
    """Whether ``module`` is a rotary position embedding (mlx's ``nn.RoPE`` or one of mlx-lm's
    RoPE variants), which attention applies to ``(batch, heads, tokens, head_dim)`` arrays."""
    import mlx.nn as nn

    if isinstance(module, nn.RoPE):
        return True
    return any("rope" in cls.__name__.lower() or "rotary" in cls.__name__.lower() for cls in type(module).__mro__)


def token_axis(model, full_name: str, shape: Sequence[int], tokens: int) -> int:
    """The axis of the tokens in the output (``shape``, batch first) of module ``full_name``,
    from the module's known layout: ``(batch, heads, tokens, head_dim)`` for RoPE, which
    attention calls after splitting heads; ``(batch, tokens, ...)`` for the logits and every
    module called on the hidden states. Raises MlxterpError when the output does not have
    that layout (its token axis is not known), rather than guessing from a length."""
    module = None if full_name == "output" else model.names.modules.get(full_name)
    short = model.short_name(full_name)
    if module is not None and is_rotary(module):
        axis, layout = len(shape) - 2, "(batch, heads, tokens, head_dim)"
    elif module is None and (model.names.table.hook_parts(full_name) or (None, None))[1] == "attn.pattern":
        # an attention pattern hook point: (batch, [heads,] query, key); positions pick queries
        axis, layout = len(shape) - 2, "(batch, heads, query, key)"
    else:
        axis, layout = 1, "(batch, tokens, ...)"
    if len(shape) < 2 or axis < 1 or shape[axis] != tokens:
        raise MlxterpError(
            f"the token axis of {short}'s output (shape {tuple(shape)}) is not known: positions select along the "
            f"tokens of a {layout} output and this one does not have the input's {tokens} tokens there; "
            f"use @ * for the whole output")
    return axis
