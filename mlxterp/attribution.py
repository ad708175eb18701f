"""Heads and components: direct logit attribution, head-level patching, attribution patching,
and per-head attention heatmaps.

All of them read the model through its hook points (``mlxterp.hooks``): ``layers.N.resid_pre``,
``attn_out``, ``mlp_out`` and ``layers.N.attn.z`` (each head's mix of values, the output
projection's input), so they cover the architectures whose hook points are exact.

* ``direct_logit_attribution``: what each component (the embedding, each layer's attention
  and MLP, each head) adds to the logit of an answer (or to the difference between two
  answers) at one position, through the final norm with its scale frozen at the value the
  forward pass used (the TransformerLens convention). For RMS norms the parts sum to the
  logit exactly; a norm's bias and a final logit softcap are left out (a note says so).
* ``head_patching``: exact activation patching of each head's ``z`` from the clean run into
  the corrupted run, per layer and head (or per layer, head and position): one batched sweep
  per head (``mlxterp.analysis.activation_patching`` on ``attn.z.head[H]``).
* ``attribution_patching``: the gradient approximation of activation patching
  (``(clean - corrupted) . d metric / d activation`` at the corrupted run) for every layer,
  component and position, and every head, from one clean forward pass and one forward and
  backward pass of the corrupted prompt (``mx.vjp`` through a trace).
* ``head_attention``: the attention pattern of chosen heads, drawn as a compact heatmap in
  the terminal and as a PNG.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .analysis import METRICS, _check_position, _token_ids, activation_patching, answer_id, layer_list
from .errors import InputError, MlxterpError

from .attribution_results import (  # noqa: F401 (the results live apart: no mlx)
    COMPONENTS, AttributionPatching, HeadAttention, HeadPatching, LogitAttribution,
)


def direct_logit_attribution(model, text, answer=None, wrong=None, position: int = -1, layers=None,
                             heads: bool = True, interventions=None) -> LogitAttribution:
    """What each component adds to the logit of ``answer`` (minus ``wrong``'s) at ``position``.

    ``answer``/``wrong``: single-token strings (``" Paris"``) or token ids; ``answer`` defaults to
    the model's top prediction there. Components: ``embed`` (the residual stream entering layer
    0), each layer's ``attn`` and ``mlp`` (``attn_out``, ``mlp_out``) and, with ``heads``, each
    head (its ``z`` through the output projection; the heads of a layer sum to its ``attn``
    less the projection's bias). The final norm's scale is frozen at the forward pass's value.
    ``interventions`` (e.g. steering) apply to the forward pass that is attributed.
    """
    ids = _token_ids(model, text)
    if not ids:
        raise InputError("direct_logit_attribution needs a text with at least one token")
    position = _check_position(position, len(ids))
    layers = layer_list(model, layers)
    every = list(range(model.n_layers))
    heads = heads and _heads_add_to_the_residual(model)
    notes = [] if heads or not model.names.table.n_heads else [
        "no per-head values: this architecture norms the attention's output before adding it, so a head's z "
        "through the output projection is not what it adds"]
    names = {"embed": model.resolve("layers.0.resid_pre")}
    for layer in every:
        names[f"{layer} attn"] = model.resolve(f"layers.{layer}.attn_out")
        names[f"{layer} mlp"] = model.resolve(f"layers.{layer}.mlp_out")
    final_name = model.names.layer_names[-1]
    with model.trace([ids], interventions=interventions or None, keep="saved") as tr:
        values = {label: tr.activations[name][0, position] for label, name in names.items()}
        final = tr.save(final_name)[0, position]
        z = {layer: tr.activations[f"layers.{layer}.attn.z"][0, position] for layer in layers} if heads else {}
        logits = model.output.save()[0, position].astype(mx.float32)
    if answer is None:
        answer = int(mx.argmax(logits).item())
    a = answer_id(model, answer)
    b = answer_id(model, wrong) if wrong is not None else None
    direction = _unembedding_direction(model, a, b)
    frozen, norm_notes = _frozen_norm_direction(model, final, direction)
    notes += norm_notes
    labels = ["embed"] + [f"{layer} {part}" for layer in layers for part in ("attn", "mlp")]
    stacked = mx.stack([values[label].astype(mx.float32) for label in labels])
    contributions = stacked @ frozen
    # Layers left out still add to the residual stream: the total counts every layer.
    everything = mx.stack([v.astype(mx.float32) for v in values.values()]) @ frozen
    head_values = None
    if heads:
        per_layer = [_head_contributions(model, layer, z[layer], frozen) for layer in layers]
        head_values = np.array(mx.stack(per_layer)) if per_layer else None
    softcap = _final_softcap_of(model)
    if softcap:  # attribute the logits before the cap
        logits = mx.arctanh(mx.clip(logits / softcap, -1 + 1e-7, 1 - 1e-7)) * softcap
        notes.append("the model caps its final logits (softcap); the attribution is of the logits before the cap")
    logit = logits[a] - (logits[b] if b is not None else 0.0)
    mx.eval(contributions, everything, logit)
    rest = float(logit.item()) - float(everything.sum().item())
    if abs(rest) > 1e-3 * max(1.0, abs(float(logit.item()))):
        notes.append(f"{rest:+.3g} of the logit comes from no component (biases of the final norm or the "
                     f"unembedding, or a scale the model applies to its logits)")
    text_of = (lambda t: model.token_to_str(t)) if model.tokenizer is not None else str
    return LogitAttribution(labels, np.array(contributions), layers, head_values, text_of(a),
                            text_of(b) if b is not None else None, position, float(everything.sum().item()),
                            float(logit.item()), notes=notes)


def _heads_add_to_the_residual(model) -> bool:
    """True when layers' attn_out is the attention module's own output (not a norm of it), so each
    head's z through the output projection is what it adds to the residual stream."""
    from . import hooks

    if not model.names.table.n_heads or "attn_out" not in model.names.table.hooks:
        return False
    full = model.resolve("layers.0.attn_out")
    [(module, _)] = hooks.sources(model, hooks.point(model, full))
    return module == model.resolve("layers.0.attn")


def _unembedding_direction(model, a: int, b: Optional[int]) -> mx.array:
    """The hidden-size vector d with (lm_head(h)[a] - lm_head(h)[b]) = h . d (+ a bias): a vjp of the
    unembedding (an lm_head, quantized or not, or the tied embedding)."""
    modules = model.names.modules
    head_name = model.names.find("lm_head")
    if head_name is not None and isinstance(modules[head_name], nn.Module):
        head = modules[head_name]
    else:
        embed_name = model.names.find("embed")
        embedding = modules.get(embed_name) if embed_name else None
        if embedding is None or not hasattr(embedding, "as_linear"):
            raise MlxterpError("direct logit attribution needs an lm_head or a token embedding with as_linear")
        head = embedding.as_linear
    hidden = model.hidden_size
    probe = mx.zeros((1, hidden), dtype=mx.float32)
    vocab = head(probe).shape[-1]
    cotangent = mx.zeros((1, vocab), dtype=mx.float32)
    cotangent[0, a] = 1.0
    if b is not None:
        cotangent[0, b] = -1.0
    _, (direction,) = mx.vjp(lambda h: head(h).astype(mx.float32), [probe], [cotangent])
    return direction[0].astype(mx.float32)


def _frozen_norm_direction(model, final: mx.array, direction: mx.array) -> tuple[mx.array, list[str]]:
    """D such that a component c adds c . D to the logit with the final norm's scale frozen."""
    norm_name = model.names.find("norm")
    if norm_name is None:
        return direction, ["the model has no final norm"]
    norm = model.names.modules[norm_name]
    x = final.astype(mx.float32)
    eps = float(getattr(norm, "eps", 1e-5))
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__:
        # Its per-dimension gain from an input of mean 0 and variance 1 (+1, -1, ...), less its bias.
        probe = mx.array([[1.0, -1.0] * (x.shape[-1] // 2) + [0.0] * (x.shape[-1] % 2)])
        bias = norm(mx.zeros_like(probe).astype(final.dtype)).astype(mx.float32)[0]
        gain = (norm(probe.astype(final.dtype)).astype(mx.float32)[0] - bias) * math.sqrt(1 + eps) * probe[0]
        scaled = gain * direction / mx.sqrt(mx.var(x) + eps)
        return scaled - scaled.mean(), []  # the norm centres its input: a component's mean adds nothing
    # An RMS norm (weight, or 1 + weight as in Gemma): its per-dimension gain from a vector of ones.
    ones = mx.ones((1, x.shape[-1]), dtype=mx.float32)
    gain = norm(ones.astype(final.dtype)).astype(mx.float32)[0] * math.sqrt(1 + eps)
    return gain * direction * mx.rsqrt(mx.mean(x * x) + eps), []


def _head_contributions(model, layer: int, z: mx.array, frozen: mx.array) -> mx.array:
    """(heads,): each head's z (heads, head_dim) through the output projection, dotted with ``frozen``."""
    from . import attention

    module = model.module(f"layers.{layer}.attn")
    projection = attention.output_projection(module)
    heads, head_dim = z.shape
    probe = mx.zeros((1, heads * head_dim), dtype=mx.float32)
    _, (back,) = mx.vjp(lambda v: projection(v.astype(z.dtype)).astype(mx.float32), [probe], [frozen[None]])
    return (z.astype(mx.float32) * back.reshape(heads, head_dim)).sum(-1)


def _final_softcap_of(model):
    from .analysis import _final_softcap

    return _final_softcap(model)


# ---- head-level patching ----------------------------------------------------------------------


def head_patching(model, clean_text, corrupted_text, layers=None, heads=None, metric: str = "logit_diff",
                  answers=None, positions=None, batch_size: int = 32, interventions=None,
                  should_stop=None) -> HeadPatching:
    """Exact activation patching of each head's ``z`` (``layers.N.attn.z.head[H]``) from the clean run
    into the corrupted run: recovery % per layer and head, or per layer, head and position with
    ``positions`` (a list, or ``"all"``). One batched sweep (``activation_patching``) per head."""
    layers = layer_list(model, layers)
    n_heads = model.names.table.n_heads
    if not n_heads:
        raise MlxterpError("head patching needs per-head hook points (layers.N.attn.z), which this model lacks: "
                           + (model.names.table.hooks_note or "its attention is not recomputed exactly"))
    chosen = list(range(n_heads)) if heads is None else [_head_index(h, n_heads) for h in heads]
    sweeps = []
    for head in chosen:
        sweeps.append(activation_patching(model, clean_text, corrupted_text, component=f"attn.z.head[{head}]",
                                          layers=layers, metric=metric, answers=answers, positions=positions,
                                          batch_size=batch_size, interventions=interventions,
                                          should_stop=should_stop))
    percent = np.stack([s.percent for s in sweeps], axis=1)  # (layers, heads[, positions])
    first = sweeps[0]
    if heads is not None and chosen != list(range(n_heads)):
        full = np.full((len(layers), n_heads) + percent.shape[2:], np.nan)
        full[:, chosen] = percent
        percent = full
    return HeadPatching(layers, percent, metric, positions=first.positions, tokens=first.tokens,
                        answers=first.answers)


def _head_index(head, n_heads: int) -> int:
    if isinstance(head, bool) or not isinstance(head, int) or not -n_heads <= head < n_heads:
        raise InputError(f"head {head!r} is not a head of this model: heads run from 0 to {n_heads - 1}")
    return head % n_heads


# ---- attribution patching ---------------------------------------------------------------------


def attribution_patching(model, clean_text, corrupted_text, answers, layers=None,
                         components: Sequence[str] = COMPONENTS, heads: bool = True) -> AttributionPatching:
    """The gradient approximation of activation patching, for every layer, component and position
    (and head): ``(clean - corrupted) . d metric / d activation`` at the corrupted run, as recovery %
    of the logit difference between ``answers`` (clean answer, corrupted answer).

    One clean forward pass reads the clean activations; one forward and one backward pass of the
    corrupted prompt (``mx.vjp`` through a trace with a zero added at every hook point) give every
    gradient at once. ``components`` are hook points of each layer (``resid_pre``, ``attn_out``,
    ``mlp_out``, ``resid_mid``, ``resid_post``)."""
    if answers is None or len(answers) != 2:
        raise InputError('attribution patching measures the logit difference: give answers=(clean, corrupted), '
                         'e.g. (" Paris", " London")')
    a, b = (answer_id(model, x) for x in answers)
    clean_ids, corrupt_ids = _token_ids(model, clean_text), _token_ids(model, corrupted_text)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(f"the clean and corrupted prompts must have the same number of tokens; got "
                         f"{len(clean_ids)} and {len(corrupt_ids)}")
    layers = layer_list(model, layers)
    components = list(components)
    for component in components:
        model.resolve(f"layers.0.{component}")  # an error naming the valid hook points
    if heads and not model.names.table.n_heads:
        heads = False
    keys = [(c, layer) for c in components for layer in layers]
    if heads:
        keys += [("attn.z", layer) for layer in layers]
    names = [f"layers.{layer}.{c}" for c, layer in keys]  # short names: the trace resolves them
    for name in names:
        model.resolve(name)

    # One batched pass: row 0 the clean prompt, row 1 the corrupted one. A zero is added at every hook
    # point; the metric reads row 1 only, so the vjp gives d metric / d activation at the corrupted run.
    batch = mx.array([clean_ids, corrupt_ids])

    def run(*deltas):
        changes = {name: (lambda x, d=d: x + d.astype(x.dtype)) for name, d in zip(names, deltas)}
        with model.trace(batch, interventions=changes, capture=[], keep="saved") as tr:
            logits = model.output.save()[:, -1].astype(mx.float32)
            values = [tr.activations[name] for name in names]
        return [logits[1, a] - logits[1, b], logits[0, a] - logits[0, b]] + values

    shapes = _hook_shapes(model, names, len(clean_ids))
    zeros = [mx.zeros((2,) + shape, dtype=mx.float32) for shape in shapes]
    cotangents = [mx.array(1.0), mx.array(0.0)] + [mx.zeros((2,) + shape) for shape in shapes]
    outputs, grads = mx.vjp(run, zeros, cotangents)
    corrupt_diff, clean_diff = outputs[0], outputs[1]
    baseline = clean_diff - corrupt_diff
    mx.eval(baseline, outputs, grads)
    if abs(baseline.item()) < 1e-12:
        raise MlxterpError("the logit difference is the same on the clean and corrupted prompts, so recovery is "
                           "undefined; pick answers the two prompts disagree on")
    percent = []
    for value, grad in zip(outputs[2:], grads):
        value = value.astype(mx.float32)
        change = ((value[0] - value[1]) * grad[1]).sum(-1)
        percent.append(np.array(100.0 * (change if change.ndim == 1 else change.T) / baseline))  # z: (heads, L)
    scores = {c: np.stack([percent[keys.index((c, layer))] for layer in layers]) for c in components}
    head_scores = np.stack([percent[keys.index(("attn.z", layer))] for layer in layers]) if heads else None
    tokens = model.token_strings(clean_ids) if model.tokenizer is not None else []
    texts = [x if isinstance(x, str) else (model.token_to_str(int(x)) if model.tokenizer else str(x)) for x in answers]
    return AttributionPatching(components, layers, list(range(len(clean_ids))), scores, head_scores, tokens=tokens,
                               answers=texts, clean_diff=float(clean_diff.item()),
                               corrupt_diff=float(corrupt_diff.item()))


def _hook_shapes(model, names: list[str], length: int) -> list[tuple]:
    """The per-row shape (positions, ...) of each hook point: the residual stream's, or (positions,
    heads, head_dim) for attn.z (the output projection's input split into heads)."""
    from . import attention, hooks

    shapes = []
    for name in names:
        point = hooks.point(model, model.resolve(name))
        if point is not None and point.hook == "attn.z":
            projection = attention.output_projection(model.names.modules[point.module])
            width = projection.weight.shape[1]
            bits = getattr(projection, "bits", None)  # quantized: packed 32-bit words
            width = width * 32 // bits if bits else width
            heads = model.names.table.n_heads
            shapes.append((length, heads, width // heads))
        else:
            shapes.append((length, model.hidden_size))
    return shapes


def exact_patching(model, clean_text, corrupted_text, answers, layers=None, components: Sequence[str] = COMPONENTS,
                   heads: bool = True, batch_size: int = 64) -> AttributionPatching:
    """The exact sweeps attribution patching approximates, at equal coverage (every layer, component,
    position and head), in the same result form: for checking and timing the approximation."""
    layers = layer_list(model, layers)
    scores = {c: activation_patching(model, clean_text, corrupted_text, component=c, layers=layers,
                                     metric="logit_diff", answers=answers, positions="all",
                                     batch_size=batch_size).percent for c in components}
    head_scores = None
    if heads and model.names.table.n_heads:
        head_scores = head_patching(model, clean_text, corrupted_text, layers=layers, answers=answers,
                                    positions="all", batch_size=batch_size).percent
    ids = _token_ids(model, clean_text)
    return AttributionPatching(list(components), layers, list(range(len(ids))), scores, head_scores,
                               tokens=model.token_strings(ids) if model.tokenizer is not None else [],
                               answers=[str(x) for x in answers])


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation of two arrays of the same size (ties get their mean rank)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise InputError(f"rank_correlation needs two arrays of the same size (at least 2); got {x.size} and {y.size}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # ties: the mean of their ranks
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


# ---- attention heatmaps ------------------------------------------------------------------------


def head_attention(model, text, layer: int, heads=None) -> HeadAttention:
    """The attention pattern of ``heads`` (default: all) of ``layer`` on ``text``, as a result that
    draws a compact heatmap per head in the terminal and a PNG with ``save_plot()``."""
    from .attention import get_attention_patterns

    (layer,) = layer_list(model, [layer])
    patterns = get_attention_patterns(model, text, layers=[layer])[layer]
    n_heads = patterns.shape[1]
    chosen = list(range(n_heads)) if heads is None else [_head_index(h, n_heads) for h in
                                                         ([heads] if isinstance(heads, int) else heads)]
    array = np.array(patterns[0].astype(mx.float32))[chosen]
    tokens = model.token_strings(_token_ids(model, text)) if isinstance(text, str) and model.tokenizer else []
    return HeadAttention(layer, chosen, array, tokens=tokens)


__all__ = ["COMPONENTS", "METRICS", "AttributionPatching", "HeadAttention", "HeadPatching", "LogitAttribution",
           "attribution_patching", "direct_logit_attribution", "exact_patching", "head_attention", "head_patching",
           "rank_correlation"]
