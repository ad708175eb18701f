"""Hook points: the residual stream around each block and each attention head's values, by name.

A hook point is a name in the one resolver (`mlxterp.core.paths`): `layers.N.resid_pre`,
`resid_mid`, `resid_post`, `attn_out`, `mlp_out`, per head `layers.N.attn.q|k|v|z|pattern`
(optionally `.head[H]`), and `PATH.input` for any module's input. None of them adds a module
or a step to the forward pass: each is read from (or intervened on through) a module the
trace already wraps, as ``BLOCKS`` says per mlx-lm model file:

- `resid_pre` / `resid_post`: the block's input / output (every architecture).
- `attn_out` / `mlp_out`: the output of the module whose output the block adds to the
  residual stream (`self_attn` in Llama; `post_attention_layernorm` in Gemma 2 and OLMo 2).
- `resid_mid`: the input of the module the block feeds the middle residual stream to
  (`post_attention_layernorm` in Llama); intervening on it changes `attn_out` so that
  `resid_pre + attn_out` becomes the new value (exact up to float rounding).
  Parallel blocks (GPT-J, Phi, Cohere, GPT-NeoX) have no `resid_mid`.
- `attn.z`: the output projection's input split into heads, (batch, positions, heads, head_dim);
  intervening on it (all heads or `.head[H]`) changes what that projection receives.
- `attn.q|k|v|pattern`: recomputed from the attention's input by `mlxterp.attention` (the same
  architectures as attention patterns); read-only.

Architectures not in ``BLOCKS`` have `resid_pre`, `resid_post` and `input`; asking for another
hook point raises an error naming the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .core.paths import HEAD_HOOKS, INPUT
from .errors import MlxterpError, TraceError


@dataclass(frozen=True)
class Block:
    """Where one mlx-lm block's residual additions are (names relative to the block; the core's
    aliases `attn` and `mlp` stand for whatever the architecture calls them).

    ``attn_out`` / ``mlp_out``: the module whose output the block adds to the residual stream:
    the attention / MLP itself, or a norm of that module's output alone (Gemma 2's
    ``post_feedforward_layernorm``). ``mid``: the module whose input is the residual stream
    between the two, or None for a parallel block (attention and MLP both read ``resid_pre``).
    A sequential block's output is then exactly ``resid_mid + mlp_out``."""

    attn_out: str = "attn"
    mlp_out: str = "mlp"
    mid: Optional[str] = "post_attention_layernorm"


SEQUENTIAL = Block()
PARALLEL = Block(mid=None)
POST_NORMS = Block("post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm")
BLOCKS = {
    **{arch: SEQUENTIAL for arch in (
        "llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "gemma", "phi3", "phimoe", "starcoder2", "mixtral",
        "internlm3", "helium", "ernie4_5", "ernie4_5_moe", "seed_oss", "nemotron", "hunyuan_v1_dense", "glm4_moe",
        "dots1", "olmoe", "stablelm", "gpt_neox", "deepseek_v2", "deepseek_v3", "llama4_text", "gpt_oss")},
    "gpt2": Block(mid="ln_2"),
    "gpt_bigcode": Block(mid="ln_2"),
    "exaone": Block(mid="ln_2"),
    "internlm2": Block(mid="ffn_norm"),
    "openelm": Block(mid="ffn_norm"),
    "apertus": Block(mid="feedforward_layernorm"),
    "gemma2": POST_NORMS,
    "gemma3_text": POST_NORMS,
    "olmo2": Block("post_attention_layernorm", "post_feedforward_layernorm", "mlp"),
    "olmo3": Block("post_attention_layernorm", "post_feedforward_layernorm", "mlp"),
    "phi": PARALLEL,  # and gpt_neox, stablelm with use_parallel_residual (block_layout)
    "cohere": PARALLEL,
    "cohere2": PARALLEL,
    "gptj": PARALLEL,
}
# Not listed, and why: granite, granitemoe, minicpm, minicpm3 scale each addition by a number
# inside the block (no module outputs what is added); glm4 norms after adding; recurrent
# mixers (mamba, lfm2, qwen3_next) have no attention/MLP pair in every layer.
ALWAYS = ("resid_pre", "resid_post")


def block_layout(block) -> Optional[Block]:
    """The ``Block`` of one block module: its file's entry, made parallel where the block says it
    runs attention and MLP in parallel (GPT-NeoX and StableLM's ``use_parallel_residual``)."""
    layout = BLOCKS.get(source_file(block))
    if layout is not None and getattr(block, "use_parallel_residual", False):
        layout = Block(layout.attn_out, layout.mlp_out, None)
    return layout


def source_file(module) -> str:
    """The mlx-lm model file a module's class comes from (``llama``, ``gemma2``, ...)."""
    return type(module).__module__.rsplit(".", 1)[-1]


# -- the table entries (mlxterp.naming builds the core table with them) ---------------------

def table_entries(table, modules: dict, architecture: Optional[str] = None) -> tuple[list[str], int, str]:
    """(hook points every layer has, query heads per layer, why others are missing) for a
    model's name table ``table`` and its modules."""
    from . import attention

    if not table.layer_names or any(name not in modules for name in table.layer_names):
        return [], 0, "this model has no list of layer modules"
    blocks = [modules[name] for name in table.layer_names]
    files = {source_file(block) for block in blocks}
    arch = architecture or "/".join(sorted(files))
    hooks, notes, n_heads = list(ALWAYS), [], 0
    layout = block_layout(blocks[0]) if len(files) == 1 else None
    if layout is not None and all(_block_modules(table, layer, layout) for layer in table.layer_names):
        hooks += ["attn_out", "mlp_out"] + (["resid_mid"] if layout.mid else [])
        if not layout.mid:
            notes.append(f"{arch} adds attention and MLP in parallel, so it has no resid_mid")
    else:
        notes.append(f"the {arch} architecture's blocks are not in mlxterp.hooks.BLOCKS "
                     f"(no module outputs exactly what its attention or MLP adds)")
    attentions = [table.attention_of(layer) for layer in table.layer_names]
    try:
        if any(a is None for a in attentions):
            raise MlxterpError(f"not every layer of {arch} has an attention module")
        for name in attentions:
            attention.check_supported(modules[name])
        n_heads = attention.head_counts(modules[attentions[0]])[0]
        hooks += ["attn." + hook for hook in HEAD_HOOKS]
    except Exception:  # noqa: BLE001 -- an attention we cannot read per head must not stop the model loading
        notes.append(f"per-head q, k, v, z and pattern need an attention mlxterp.attention recomputes exactly, "
                     f"which {arch}'s is not")
    return hooks, n_heads, "; ".join(notes)


def _block_modules(table, layer: str, layout: Block) -> Optional[dict]:
    """Full names of a block's attn_out, mlp_out and mid modules, or None when one is missing."""
    found = {}
    for role in ("attn_out", "mlp_out", "mid"):
        relative = getattr(layout, role)
        if relative is None:
            continue
        try:
            found[role] = table.resolve(f"{table.short(layer)}.{relative}")
        except MlxterpError:
            return None
        if table.layer_index(found[role]) is None:
            return None
    return found


# -- a hook point's pieces ---------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One hook point of a model: what it is and which module's value it comes from."""

    full: str  # its full name
    hook: str  # "resid_pre", "attn.z", "input", ...
    module: str  # the module it belongs to (a layer, an attention module, any module for input)
    heads: Optional[list]  # head numbers of a head selection, or None
    single_head: bool  # head[3]: the head axis is dropped


def point(model, full: str) -> Optional[Point]:
    """The hook point a full name names, or None when it names a module (or the output)."""
    table = model.names.table
    parts = table.hook_parts(full)
    if parts is None:
        return None
    module, hook, heads = parts
    indices = table.head_indices(heads)
    single = heads is not None and heads.lstrip("-").isdigit()
    return Point(full, hook, module, indices, single)


def _block_parts(model, layer: str) -> dict:
    layout = block_layout(model.names.modules[layer])
    return _block_modules(model.names.table, layer, layout)


def sequential_parts(model, layer: str) -> Optional[dict]:
    """Full names of block ``layer``'s ``attn_out``, ``mlp_out`` and ``mid`` modules when it is a
    sequential block of ``BLOCKS`` (its output is ``resid_mid + mlp_out``), else None."""
    layout = block_layout(model.names.modules[layer])
    if layout is None or layout.mid is None:
        return None
    return _block_modules(model.names.table, layer, layout)


def _out_projection(model, attention_full: str) -> str:
    from . import attention

    return f"{attention_full}.{attention.layout_of(model.names.modules[attention_full]).out}"


def _attention_input_source(model, attention_full: str) -> tuple[str, str]:
    """(module, "input"|"output") holding the attention's input (GPT-J: ln_1's output)."""
    from . import attention

    layout = attention.layout_of(model.names.modules[attention_full])
    if layout is not None and layout.input:
        layer = model.names.layer_names[model.names.layer_index(attention_full)]
        return model.resolve(f"{model.short_name(layer)}.{layout.input}"), "output"
    return attention_full, "input"


def sources(model, p: Point) -> list[tuple[str, str]]:
    """(module full name, "input"|"output") values a hook point is read from."""
    hook = p.hook
    if hook == INPUT or hook == "resid_pre":
        return [(p.module, "input")]
    if hook == "resid_post":
        return [(p.module, "output")]
    if hook in ("attn_out", "mlp_out"):
        return [(_block_parts(model, p.module)[hook], "output")]
    if hook == "resid_mid":
        return [(_block_parts(model, p.module)["mid"], "input")]
    if hook == "attn.z":
        return [(_out_projection(model, p.module), "input")]
    return [_attention_input_source(model, p.module)]


def recorded_for(model, names) -> set:
    """Modules a trace must record so that the hook points among ``names`` can be read."""
    found = set()
    for name in names:
        p = point(model, name)
        if p is not None:
            found |= {module for module, _ in sources(model, p)}
    return found


# -- reading -------------------------------------------------------------------------------

def read(model, store, p: Point) -> mx.array:
    """The value of hook point ``p`` from a trace's store (``store.read(name, what)``)."""
    try:
        values = [store.read(module, what) for module, what in sources(model, p)]
    except TraceError as error:
        raise TraceError(f"{model.short_name(p.full)} cannot be read here: {error}. Read hook points inside the "
                         f"block (trace.activations[...] or .save()), or use model.run_with_cache") from None
    value = values[0]
    if p.hook.startswith("attn."):
        value = _head_values(model, store, p, value)
    return value


def _head_values(model, store, p: Point, x: mx.array) -> mx.array:
    from . import attention

    module = model.names.modules[p.module]
    heads, _ = attention.head_counts(module)
    if p.hook == "attn.z":
        value = x.reshape(*x.shape[:-1], heads, -1)
        return _select_heads(value, p, axis=2)
    padding = getattr(store, "padding", None) or None
    if p.hook == "attn.pattern":
        layer = model.names.layer_index(p.module)
        block = model.names.modules[model.names.layer_names[layer]]
        window = attention._sliding_window(model, block, module, layer)
        value = attention.attention_probabilities(module, x, left_padding=padding, window=window)
        return _select_heads(value, p, axis=1)
    padded = padding if padding is not None and any(padding) else None
    q, k, v = attention.queries_keys_values(module, x, padded)
    value = {"attn.q": q, "attn.k": k, "attn.v": v}[p.hook].transpose(0, 2, 1, 3)
    return _select_heads(value, p, axis=2)


def _select_heads(value: mx.array, p: Point, axis: int) -> mx.array:
    if p.heads is None:
        return value
    if p.hook in ("attn.k", "attn.v") and max(p.heads) >= value.shape[axis]:
        raise MlxterpError(f"{p.hook} has {value.shape[axis]} key/value heads (grouped-query attention); "
                           f"head {max(p.heads)} is outside them")
    index = mx.array(p.heads)
    picked = mx.take(value, index, axis=axis)
    return picked.squeeze(axis) if p.single_head else picked


# -- intervening ---------------------------------------------------------------------------

def route(model, interventions: dict) -> tuple[dict, dict]:
    """Split ``{full name: fn}`` (modules and hook points) into interventions on module outputs
    and on module inputs, ``({module: fn}, {module: fn})``; several on one module chain in order.
    The modules of both must be recorded (an intervention on resid_mid reads its block's input,
    so the block is among the inputs, unchanged)."""
    outputs: dict[str, list] = {}
    inputs: dict[str, list] = {}
    for full, change in interventions.items():
        p = point(model, full)
        if p is None:
            outputs.setdefault(full, []).append(change)
            continue
        target, what, function = _hook_intervention(model, p, change)
        (inputs if what == "input" else outputs).setdefault(target, []).append(function)
        if p.hook == "resid_mid":
            inputs.setdefault(p.module, []).insert(0, _unchanged)
    return {n: _chain(fs) for n, fs in outputs.items()}, {n: _chain(fs) for n, fs in inputs.items()}


def _unchanged(activation: mx.array) -> mx.array:
    return activation


def _chain(functions: list) -> Callable:
    from .interventions import chain

    return chain(*functions)


def _hook_intervention(model, p: Point, change) -> tuple[str, str, Callable]:
    hook, short = p.hook, model.short_name(p.full)
    if hook in ("attn.q", "attn.k", "attn.v", "attn.pattern"):
        raise MlxterpError(f"{short} is read-only: q, k, v and pattern are recomputed from the attention's input, "
                           f"not values of the forward pass; intervene on layers.N.attn.z (per head: "
                           f"layers.N.attn.z.head[H]) or layers.N.attn_out")
    if hook in (INPUT, "resid_pre"):
        return p.module, "input", change
    if hook == "resid_post":
        return p.module, "output", change
    if hook in ("attn_out", "mlp_out"):
        return _block_parts(model, p.module)[hook], "output", change
    if hook == "resid_mid":
        return _block_parts(model, p.module)["attn_out"], "output", _via_attn_out(p.module, change)
    return _out_projection(model, p.module), "input", _on_heads(model, p, change)


def _via_attn_out(block: str, change) -> Callable:
    """resid_mid = resid_pre + attn_out: change attn_out so that the sum becomes change(sum)."""
    from . import trace

    def through_attn_out(attn_out: mx.array) -> mx.array:
        resid_pre = trace._active_recorder.inputs[block]
        return change(resid_pre + attn_out) - resid_pre

    through_attn_out.__name__ = f"resid_mid:{getattr(change, '__name__', 'fn')}"
    return through_attn_out


def _on_heads(model, p: Point, change) -> Callable:
    """An intervention on z (all heads or the selected ones) as one on the output projection's input."""
    from . import attention

    heads = attention.head_counts(model.names.modules[p.module])[0]

    def on_heads(x: mx.array) -> mx.array:
        z = x.reshape(*x.shape[:-1], heads, -1)
        if p.heads is None:
            return change(z).reshape(x.shape)
        index = mx.array(p.heads)
        picked = mx.take(z, index, axis=2)
        new = change(picked.squeeze(2) if p.single_head else picked)
        if p.single_head:
            new = mx.expand_dims(new, 2)
        new = mx.broadcast_to(new.astype(z.dtype), picked.shape)
        slot = {head: j for j, head in enumerate(p.heads)}
        every = [new[:, :, slot[h]] if h in slot else z[:, :, h] for h in range(heads)]
        return mx.stack(every, axis=2).reshape(x.shape)

    on_heads.__name__ = f"heads:{getattr(change, '__name__', 'fn')}"
    return on_heads


# -- run_with_cache ------------------------------------------------------------------------

class ActivationCache(Mapping):
    """What ``model.run_with_cache`` returns beside the logits: values by full name, looked up by
    any name form (``"layers.8.resid_post"``, ``"model.model.layers.8"``) or TransformerLens'
    ``(hook, layer)`` pair (``cache["resid_post", 8]``, ``cache["attn.z", 8]``)."""

    def __init__(self, model, values: dict):
        self._model = model
        self._values = values

    def _full(self, name) -> str:
        if isinstance(name, tuple) and len(name) == 2:
            hook, layer = name
            name = f"layers.{int(layer)}.{hook}"
        full = self._model.resolve(name)
        if full not in self._values:
            raise KeyError(f"{self._model.short_name(full)} is not in this cache; it holds "
                           f"{len(self._values)} values (run_with_cache(names=...) says which)")
        return full

    def __getitem__(self, name) -> mx.array:
        return self._values[self._full(name)]

    def __contains__(self, name) -> bool:
        try:
            self._full(name)
        except (KeyError, MlxterpError):
            return False
        return True

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        names = [self._model.short_name(n) for n in self._values]
        return f"<ActivationCache: {len(names)} values ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})>"


RECOMPUTED = ("attn.q", "attn.k", "attn.v", "attn.pattern")


def cache_names(model, names) -> list:
    """Full names ``run_with_cache(names=...)`` keeps, in model order where it can tell."""
    table = model.names.table
    if names is None or callable(names):
        every = list(model.names.modules)[1:]
        for short in model.hook_names():
            full = model.resolve(short)
            if names is not None or point(model, full).hook not in RECOMPUTED:
                every.append(full)
        if names is None:
            return every
        return [full for full in every if names(table.short(full))]
    patterns = [names] if isinstance(names, str) else list(names)
    found = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise MlxterpError(f"names= holds names or patterns (strings), a function or None; got "
                               f"{type(pattern).__name__}")
        found += [full for full in model.expand(pattern) if full not in found]
    return found


def run_with_cache(model, inputs, names=None, interventions=None):
    """``(logits, ActivationCache)`` of one forward pass (``InterpretableModel.run_with_cache``)."""
    from .naming import OUTPUT

    wanted = [n for n in cache_names(model, names) if n != OUTPUT]
    with model.trace(inputs, interventions=interventions, capture=wanted, keep="saved") as trace:
        values = {name: trace.save(name) for name in wanted}
        logits = trace.save(OUTPUT)
    mx.eval(logits, values)
    return logits, ActivationCache(model, values)
