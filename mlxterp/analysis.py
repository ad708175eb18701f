"""Analyses built on traces: token predictions, the logit lens, activation patching.

* ``get_token_predictions`` decodes a hidden state with the model's own final
  norm and unembedding (``lm_head``, or the tied embedding; a quantized tied
  embedding goes through ``QuantizedEmbedding.as_linear``).
* ``logit_lens`` applies that decoding to every layer's output at every
  position, from one forward pass.
* ``activation_patching`` measures how much of the clean output a corrupted
  run recovers when one layer's component (or one position of it) takes its
  clean value. The patched runs are rows of batched forward passes next to
  the clean and corrupted prompts (rows 0 and 1), one row per patched (layer,
  position), copying from row 0. A patched row joins the batch only at its
  layer's input (before it, it would equal the corrupted row), the logits are
  computed at the last position only, and a pass holds as many rows as
  ``batch_size`` and ``patch_budget_bytes`` allow: when all fit, the whole
  sweep is one forward pass costing about half a forward pass per layer.

Recovery, in percent, for a distance metric ``d`` on the last position's logits::

    recovery = 100 * (d(corrupted, clean) - d(patched, clean)) / d(corrupted, clean)

100 % means patching that component restores the clean output; 0 % means no
change; negative means it moves further away. With ``metric="logit_diff"`` and
``answers=(clean_answer, corrupted_answer)`` it is the usual normalised logit
difference ``100 * (LD(patched) - LD(corrupted)) / (LD(clean) - LD(corrupted))``
with ``LD = logit[clean_answer] - logit[corrupted_answer]``.
All metrics are computed in float32, so they stay finite on a 150k vocabulary.
"""

import logging
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import InputError, MlxterpError
from .interventions import combined, replace_rows, reshaping
from .results import ActivationPatching, LogitLens, TokenPredictions

METRICS = ("l2", "mse", "cosine", "logit_diff")
logger = logging.getLogger("mlxterp")  # the library prints nothing on stdout: what it has to say is logged


# -- decoding hidden states -----------------------------------------------------

def unembed(model, hidden: mx.array, norm: bool = True) -> mx.array:
    """Logits (float32) of hidden states ``(..., hidden)`` through the final norm (unless ``norm=False``)
    and unembedding."""
    modules = model.names.modules
    norm_name = model.names.find("norm")
    if norm_name is not None and norm:
        hidden = modules[norm_name](hidden)
    head_name = model.names.find("lm_head")
    if head_name is not None and isinstance(modules[head_name], nn.Module):
        logits = modules[head_name](hidden)
    else:
        embed_name = model.names.find("embed")
        embedding = modules.get(embed_name) if embed_name else None
        if embedding is None or not hasattr(embedding, "as_linear"):
            raise MlxterpError(
                "cannot decode hidden states: the model has neither an lm_head nor a token embedding "
                "with as_linear (is it a language model?)"
            )
        logits = embedding.as_linear(hidden)
    logits = logits.astype(mx.float32)
    softcap = _final_softcap(model)
    if softcap:
        logits = mx.tanh(logits / softcap) * softcap
    return logits


def get_token_predictions(model, hidden, top_k: int = 10, return_scores: bool = False,
                          labels: Optional[List[str]] = None) -> TokenPredictions:
    """Top-``top_k`` token ids predicted from a hidden state ``(hidden,)``.

    The result behaves as the list of token ids (with ``return_scores=True``, of
    ``(token_id, logit)`` pairs); a batch of hidden states ``(n, hidden)`` gives one such
    list per row. It is a ``TokenPredictions``: ``.predictions`` adds the token texts,
    and it draws itself in a terminal or notebook. ``labels`` name the rows.
    """
    hidden = mx.array(hidden)
    if hidden.ndim == 0 or hidden.shape[-1] != model.hidden_size:
        raise InputError(
            f"get_token_predictions takes hidden states of size {model.hidden_size} "
            f"(shape ({model.hidden_size},) or (n, {model.hidden_size})); got shape {tuple(hidden.shape)}"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    return top_tokens(model, unembed(model, flat), top_k, return_scores=return_scores, single=hidden.ndim == 1,
                      labels=labels)


def top_tokens(model, logits, top_k: int, return_scores: bool = True, single: bool = False,
               labels: Optional[List[str]] = None) -> TokenPredictions:
    """The ``top_k`` tokens of each row of ``logits`` ``(n, vocab)`` (already decoded, e.g. the model's output)."""
    top_k = _positive_int(top_k, "top_k")
    ids, scores = _top_k(mx.array(logits).reshape(-1, logits.shape[-1]), top_k)
    ids, scores = np.array(ids).astype(np.int32), np.array(scores.astype(mx.float32))
    return TokenPredictions(ids, scores, token_texts(model, ids), labels=labels, single=single,
                            return_scores=return_scores)


def token_texts(model, ids) -> Dict[int, str]:
    """{token id: text} of the ids in ``ids`` (empty for a model without a tokenizer)."""
    if model.tokenizer is None:
        return {}
    return {int(i): model.token_to_str(int(i)) for i in np.unique(np.asarray(ids))}


def _top_k(logits: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    if k > logits.shape[-1]:
        raise InputError(f"top {k} asks for more tokens than the vocabulary has ({logits.shape[-1]}); "
                         f"give at most {logits.shape[-1]}")
    ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-scores, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    scores = mx.take_along_axis(scores, order, axis=-1)
    mx.eval(ids, scores)
    return ids, scores


# -- logit lens -------------------------------------------------------------------

def logit_lens(model, text, layers: Optional[Iterable[int]] = None, top_k: int = 1,
               position: Union[None, int, Sequence[int]] = None, plot: bool = False,
               max_display_tokens: int = 15, figsize=(16, 10), cmap: str = "viridis",
               save_path: Optional[str] = None, interventions=None, should_stop=None,
               hidden_states: Optional[Mapping] = None, lens: str = "logit", translators=None) -> LogitLens:
    """What each layer's output predicts as the next token, at every position of ``text``.

    Returns a ``LogitLens``, which is ``{layer: [[(token_id, logit, token_str), ...] per
    position]}`` (``top_k`` items per position); with ``position`` an integer,
    ``{layer: [(token_id, logit, token_str), ...]}``; with ``position`` a list of
    positions, only those (``result.positions`` says which).
    ``plot=True`` (or a ``save_path``) also draws the heatmap (layers x last
    ``max_display_tokens`` positions) into a PNG whose path is ``result.plot``. ``interventions``
    apply during the forward pass (as in ``model.trace``); ``should_stop`` can interrupt it.
    ``hidden_states`` (``{layer or full layer name: (1, L, hidden)}``, e.g. a trace's
    ``activations``) are decoded instead of running the model. ``lens="tuned"`` with
    ``translators=`` a ``mlxterp.tuned_lens.TunedLens`` decodes each layer through its
    learned translator first (see docs/tuned-lens.md).
    """
    if not isinstance(text, str):
        raise InputError(f"logit_lens takes one prompt string, got {type(text).__name__}")
    translators = _lens_translators(model, lens, translators)
    layers = layer_list(model, layers)
    top_k = _positive_int(top_k, "top_k")
    tokens = model.encode(text)
    single = position is not None and not isinstance(position, (list, tuple))
    if position is None:
        chosen = list(range(len(tokens)))
    else:
        chosen = [_check_position(p, len(tokens)) for p in _as_list(position)]

    names = [model.names.layer_names[layer] for layer in layers]
    if hidden_states is None:
        # keep="saved": the model's own logits (every position, the whole vocabulary) are never computed.
        with model.trace(text, capture=names, interventions=interventions, should_stop=should_stop,
                         keep="saved") as tr:
            hidden_states = {name: tr.save(name) for name in names}
    index = mx.array(chosen)
    states = [_hidden_of(hidden_states, layer, name, len(tokens))[index] for layer, name in zip(layers, names)]
    if translators is None and states:
        ids, scores = _decode_top_k(model, mx.concatenate(states), top_k)
        ids, scores = ids.reshape(len(layers), len(chosen), top_k), scores.reshape(len(layers), len(chosen), top_k)
    else:
        ids, scores = [], []
        for layer, layer_states in zip(layers, states):
            layer_ids, layer_scores = _top_k(translators.logits(model, layer_states, layer), top_k)
            ids.append(np.array(layer_ids).astype(np.int32))
            scores.append(np.array(layer_scores))
        ids = np.stack(ids) if ids else np.zeros((0, len(chosen), top_k), np.int32)
        scores = np.stack(scores) if scores else np.zeros((0, len(chosen), top_k), np.float32)
    result = LogitLens(layers, chosen, model.token_strings([tokens[p] for p in chosen]), ids, scores,
                       token_texts(model, ids), single=single)
    if plot or save_path is not None:
        path = result.save_plot(save_path, max_display_tokens=max_display_tokens, figsize=figsize, cmap=cmap)
        logger.info("saved the logit lens heatmap to %s", path)
    return result


# Logits one decoding step may hold (float32 bytes): the lens decodes every (layer, position) row
# through one unembedding matmul per step instead of one per layer.
LENS_STEP_BYTES = 256 * 2**20


def _decode_top_k(model, states: mx.array, top_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k ids and logits of each row of ``states`` ``(n, hidden)``, decoded in steps of bounded memory."""
    vocab = model.embedding_rows or 1
    step = max(1, LENS_STEP_BYTES // (4 * vocab))
    ids, scores = [], []
    for start in range(0, states.shape[0], step):
        step_ids, step_scores = _top_k(unembed(model, states[start:start + step]), top_k)
        ids.append(np.array(step_ids).astype(np.int32))
        scores.append(np.array(step_scores))
    return np.concatenate(ids), np.concatenate(scores)


def _lens_translators(model, lens: str, translators):
    """The tuned lens to decode through (``lens="tuned"``), or None for the plain logit lens."""
    if lens == "logit":
        if translators is not None:
            raise InputError('translators= goes with lens="tuned"; the plain logit lens (lens="logit") has none')
        return None
    if lens != "tuned":
        raise InputError(f'unknown lens {lens!r}; choose "logit" or "tuned" (with translators=)')
    if isinstance(translators, (str, os.PathLike)):
        from .tuned_lens import load_tuned_lens

        translators = load_tuned_lens(translators)
    if translators is None or not hasattr(translators, "logits"):
        raise InputError('lens="tuned" needs translators=: a TunedLens (mlxterp.tuned_lens.train_tuned_lens) '
                         "or the directory one was saved to")
    translators.check_model(model)
    return translators


def _hidden_of(hidden_states: Mapping, layer: int, name: str, length: int) -> mx.array:
    """Layer ``layer``'s output ``(L, hidden)`` from given hidden states keyed by layer or full name."""
    states = hidden_states.get(layer, hidden_states.get(name)) if isinstance(hidden_states, Mapping) else None
    if states is None:
        raise InputError(f"hidden_states has no output of layer {layer} ({name})")
    states = mx.array(states)
    if states.ndim == 3:
        if states.shape[0] != 1:
            raise InputError(f"hidden_states of layer {layer} hold {states.shape[0]} rows; the logit lens decodes one prompt")
        states = states[0]
    if states.ndim != 2 or states.shape[0] != length:
        raise InputError(f"hidden_states of layer {layer} have shape {tuple(states.shape)}; expected "
                         f"(1, {length}, hidden) for the prompt's {length} tokens")
    return states


# -- activation patching ------------------------------------------------------------

def activation_patching(model, clean_text, corrupted_text, component: Optional[str] = "mlp",
                        layers: Optional[Iterable[int]] = None, metric: str = "l2",
                        positions: Union[None, str, Sequence[int]] = None,
                        answers: Optional[Sequence] = None, batch_size: int = 32,
                        plot: bool = False, save_path: Optional[str] = None,
                        interventions=None, should_stop=None) -> ActivationPatching:
    """Patch each layer's ``component`` from the clean run into the corrupted run.

    ``component``: ``"mlp"``, ``"attn"``/``"self_attn"``, a sub-module such as
    ``"mlp.gate_proj"`` or ``"self_attn.q_proj"``, or ``None``/``"layer"`` for
    the whole layer output. ``metric``: ``"l2"``, ``"mse"``, ``"cosine"``
    (distances between last-position logits) or ``"logit_diff"`` with
    ``answers=(clean_answer, corrupted_answer)`` (token ids or single-token strings).

    Returns an ``ActivationPatching``, which is ``{layer: recovery %}``; with ``positions``
    (a list of positions, or ``"all"``) each position is patched on its own and the result
    is ``{layer: {position: recovery %}}``. ``plot=True`` (or a ``save_path``) also saves a
    bar chart (a heatmap by position) as a PNG (its path: ``result.plot``). The clean prompt runs once; the
    patched runs go ``batch_size`` rows per forward pass (a sweep that fits in
    one batch, clean and corrupted rows included, is a single forward pass).
    ``interventions`` (e.g. steering) apply to every run, clean and corrupted
    alike; ``should_stop`` is checked at module boundaries of every run.
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "logit_diff" and answers is None:
        raise InputError('metric="logit_diff" needs answers=(clean_answer, corrupted_answer), e.g. (" Paris", " London")')
    layers = layer_list(model, layers)
    batch_size = _positive_int(batch_size, "batch_size")
    clean_tokens, corrupted_tokens = _token_ids(model, clean_text), _token_ids(model, corrupted_text)
    if len(clean_tokens) != len(corrupted_tokens):
        raise InputError(
            f"the clean and corrupted prompts must have the same number of tokens to patch position by position; "
            f"got {len(clean_tokens)} and {len(corrupted_tokens)}"
        )
    if clean_tokens == corrupted_tokens:
        raise InputError("the clean and corrupted prompts are the same tokens, so there is nothing to recover; "
                         "give prompts that differ")
    length = len(clean_tokens)
    names = {layer: component_name(model, layer, component) for layer in layers}
    by_position = positions is not None
    if positions is None:
        position_list = [None]
    elif positions == "all":
        position_list = list(range(length))
    else:
        position_list = [_check_position(p, length) for p in _as_list(positions)]

    jobs = [(layer, position) for layer in layers for position in position_list]
    clean_last, corrupted_last, patched_last = _patched_last_logits(
        model, clean_tokens, corrupted_tokens, jobs, names, interventions, should_stop, batch_size)

    scores = _recovery(metric, clean_last, corrupted_last, patched_last,
                       _answer_ids(model, answers) if metric == "logit_diff" else None)
    percent = np.array(scores.astype(mx.float32), dtype=np.float64)
    if by_position:
        percent = percent.reshape(len(layers), len(position_list))
    texts = model.tokenizer is not None
    result = ActivationPatching(
        component or "layer", metric, layers, percent, positions=position_list if by_position else None,
        tokens=model.token_strings([clean_tokens[p] for p in position_list]) if by_position and texts else [],
        corrupt_tokens=model.token_strings([corrupted_tokens[p] for p in position_list]) if by_position and texts else [],
        answers=[a if isinstance(a, str) else (model.token_to_str(int(a)) if texts else str(a)) for a in answers]
        if metric == "logit_diff" else None)
    if plot or save_path is not None:
        path = result.save_plot(save_path)
        logger.info("saved the patching plot to %s", path)
    return result


def _row_patches(jobs, names, first_row: int, source) -> Dict[str, object]:
    """Interventions patching row ``first_row + i`` at ``jobs[i] = (layer, position)``.

    ``source(layer)`` is the clean activation to patch in, or ``None`` to take it
    from row 0 of the same batch (the clean prompt running alongside).
    """
    by_name: Dict[str, List[Tuple[int, Optional[int]]]] = {}
    layer_of = {}
    for i, (layer, position) in enumerate(jobs):
        by_name.setdefault(names[layer], []).append((first_row + i, position))
        layer_of[names[layer]] = layer
    patches = {}
    for name, entries in by_name.items():
        rows, positions = [r for r, _ in entries], [p for _, p in entries]
        clean = source(layer_of[name])
        if clean is None:
            patches[name] = lambda a, rows=rows, positions=positions: replace_rows(a[:1], rows, positions)(a)
        else:
            patches[name] = replace_rows(clean, rows, positions)
    return patches


# Bytes the rows of one patching pass may take; None: as much as the model's weights (at least
# 256 MiB), which keeps a sweep's peak memory within about twice that of one plain forward pass.
patch_budget_bytes: Optional[int] = None
# Prompts sharing at least this many leading tokens run them once, into a KV cache that every row of
# the sweep continues (see _shared_prefix); shorter shared prefixes are not worth the extra pass.
prefix_min_tokens: int = 16


class _NotLayerByLayer(Exception):
    """The model does not run its layers one after another on one batch; rows cannot join mid-way."""


def _patched_last_logits(model, clean_tokens, corrupted_tokens, jobs, names, interventions, should_stop,
                         batch_size: int) -> Tuple[mx.array, mx.array, mx.array]:
    """Float32 last-position logits of the clean run, the corrupted run and each job's patched run.

    Each pass is one batched forward pass: row 0 the clean prompt, row 1 the corrupted one, then one
    row per job (layer, position), patched from row 0 of the same module. A job's row joins the
    batch at its layer's input as a copy of row 1 there, since the layers before it would compute
    the same values for it as for the corrupted row; and the logits are computed at the last
    position only, the one the metric reads. A pass holds at most ``batch_size`` rows and what
    ``patch_budget_bytes`` allows; jobs go to passes in layer order.

    When every job patches a whole layer, or a whole MLP in a sequential block, its row is not run
    at its layer: it joins after it, computed from rows 0 and 1 (``_computed_after_layer``).

    When the prompts share their first tokens, a causal model computes the same values there in every
    row, clean, corrupted or patched (a patch copies clean values, equal to the corrupted ones on the
    shared tokens). Those tokens then run once, into a KV cache, and every pass continues it with the
    differing tokens only; a job patching a shared position changes nothing (its logits are the
    corrupted run's).
    """
    # A model split across processes runs the plain way: every row from the first layer, all positions.
    join_late = last_only = model.distributed_group is None
    last_only = last_only and _only_inside_layers(model, interventions)
    sizes = _PassSizes(model)
    prefix = (_shared_prefix(model, clean_tokens, corrupted_tokens, interventions, should_stop, sizes)
              if join_late else None)
    start = 0 if prefix is None else prefix[0]
    per_pass = max(1, min(batch_size, sizes.rows_within_budget(len(clean_tokens) - start, start)) - 2)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    unchanged = [i for i in order if prefix is not None and jobs[i][1] is not None
                 and jobs[i][1] % len(clean_tokens) < start]
    if unchanged:
        order = [i for i in order if i not in set(unchanged)]
    patched = [None] * len(jobs)
    clean_last = corrupted_last = None
    for first in range(0, max(len(order), 1), per_pass):
        chunk = order[first:first + per_pass]
        chunk_jobs = [jobs[i] for i in chunk]
        last = None
        if prefix is not None:
            try:
                last = _patch_pass(model, clean_tokens, corrupted_tokens, chunk_jobs, names, interventions,
                                   should_stop, True, last_only, sizes, prefix)
            except (ValueError, _NotLayerByLayer):
                prefix = None
        if last is None and (join_late or last_only):
            try:
                last = _patch_pass(model, clean_tokens, corrupted_tokens, chunk_jobs, names,
                                   interventions, should_stop, join_late, last_only, sizes)
            except (ValueError, _NotLayerByLayer):
                # An architecture whose layers take per-row inputs besides the hidden state (or do not
                # run once each, in order): every row from the first layer, logits everywhere.
                join_late = last_only = False
        if last is None:
            last = _patch_pass(model, clean_tokens, corrupted_tokens, chunk_jobs, names,
                               interventions, should_stop, False, False, sizes)
        mx.eval(last)
        if clean_last is None:
            clean_last, corrupted_last = last[0], last[1]
        for row, i in enumerate(chunk):
            patched[i] = last[2 + row]
    for i in unchanged:
        patched[i] = corrupted_last
    return clean_last, corrupted_last, mx.stack(patched) if patched else mx.zeros((0,) + clean_last.shape)


def _shared_prefix(model, clean_tokens, corrupted_tokens, interventions, should_stop, sizes):
    """(length, KV caches after running it) of the leading tokens both prompts share, or None.

    None when they share fewer than ``prefix_min_tokens``, when the model's caches are not plain
    ``KVCache`` (sliding windows, recurrent state), or under the caller's interventions (which may
    index positions, and would see the prompt in two parts)."""
    from .trace import Trace, supports_left_padding

    shared = 0
    for a, b in zip(clean_tokens, corrupted_tokens):
        if a != b:
            break
        shared += 1
    shared = min(shared, len(clean_tokens) - 1)
    if shared < max(1, prefix_min_tokens) or interventions or not supports_left_padding(model.model):
        return None
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model.model)
    if len(cache) != model.n_layers:
        return None
    cut = {model.names.layer_names[-1]: reshaping(lambda a: a[:, -1:])}  # no logits for the shared tokens
    try:
        with Trace(model, mx.array([clean_tokens[:shared]]), interventions=cut, capture=[], keep="saved",
                   should_stop=should_stop, cache=cache, eval_every=sizes.eval_every(1, shared)):
            pass
    except (TypeError, ValueError):  # a model whose call takes no cache=
        return None
    if any(getattr(c, "offset", None) != shared for c in cache):
        return None
    # Started, not waited for: the device computes the prefix while Python builds the sweep's pass (on the
    # H200 the wait cost the middle-word sweep about 1.3 ms of its 17).
    mx.async_eval([(c.keys, c.values) for c in cache])
    return shared, [(c.keys[..., :shared, :], c.values[..., :shared, :]) for c in cache]


def _continued_caches(prefix, rows_at_layer):
    """Fresh KV caches holding the shared prefix once per row of each layer's batch."""
    from mlx_lm.models.cache import KVCache

    shared, states = prefix
    caches = []
    for (keys, values), rows in zip(states, rows_at_layer):
        cache = KVCache()
        cache.keys = mx.repeat(keys, rows, axis=0) if rows > 1 else keys
        cache.values = mx.repeat(values, rows, axis=0) if rows > 1 else values
        cache.offset = shared
        caches.append(cache)
    return caches


def _patch_pass(model, clean_tokens, corrupted_tokens, jobs, names, interventions, should_stop,
                join_late: bool, last_only: bool, sizes, prefix=None) -> mx.array:
    """One forward pass of clean, corrupted and ``jobs`` (sorted by layer) rows: float32 logits (rows, vocab).

    With ``prefix`` (from ``_shared_prefix``) the pass runs the tokens after it only, continuing its
    KV caches; job positions are then counted from the prefix's end."""
    from .trace import Trace

    layer_names = model.names.layer_names
    start = 0 if prefix is None else prefix[0]
    length = len(clean_tokens)
    if start:
        jobs = [(layer, None if p is None else p % length - start) for layer, p in jobs]
    shortcut = _computed_after_layer(model, jobs, names) if join_late and not interventions else None
    from_start = [job for job in jobs if not join_late or (job[0] == 0 and shortcut is None)]
    growth, rows_at_layer, capture = {}, [], []
    rows_before = 2 + len(from_start)
    if shortcut is not None:
        # Each row joins after its layer, computed from rows 0 and 1 instead of running the layer.
        joining: Dict[int, list] = {}
        for layer, position in jobs:
            joining.setdefault(layer, []).append(position)
        for layer in range(len(layer_names)):
            rows_at_layer.append(rows_before)
            if layer in joining:
                growth[layer_names[layer]] = _join_patched(rows_before, joining[layer], shortcut[layer])
                rows_before += len(joining[layer])
        capture = sorted({name for pair in shortcut.values() if pair for name in pair})
        patches = _last_mlp_at_last_position(model) if last_only else {}
    else:
        counts: Dict[int, int] = {}
        if join_late:
            for layer, _ in jobs:
                if layer > 0:
                    counts[layer] = counts.get(layer, 0) + 1
        for layer in range(len(layer_names)):
            if layer in counts:
                growth[layer_names[layer - 1]] = _join_rows(rows_before, counts[layer])
                rows_before += counts[layer]
            rows_at_layer.append(rows_before)
        patches = _row_patches(jobs, names, first_row=2, source=lambda layer: None)
    cut = {layer_names[-1]: reshaping(lambda a: a[:, -1:])} if last_only else {}
    batch = mx.array([clean_tokens[start:]] + [corrupted_tokens[start:]] * (1 + len(from_start)))
    changes = combined(interventions, patches, growth, cut, resolve=model.expand)
    cache = None if prefix is None else _continued_caches(prefix, rows_at_layer)
    with Trace(model, batch, interventions=changes, capture=capture, should_stop=should_stop, keep="saved",
               cache=cache, eval_every=sizes.eval_every(2 + len(jobs), length - start, start)):
        logits = model.output.save()
    if logits.ndim < 2 or logits.shape[0] != 2 + len(jobs):
        raise _NotLayerByLayer(f"{logits.shape[0]} rows came out of a pass of {2 + len(jobs)}")
    return logits[:, -1].astype(mx.float32)


def _join_rows(expected: int, count: int):
    """Layer output -> the same with ``count`` copies of row 1 (the corrupted run) appended."""
    calls = []

    def join(activation: mx.array) -> mx.array:
        calls.append(1)
        if len(calls) > 1 or activation.shape[0] != expected:
            raise _NotLayerByLayer("a layer ran twice or on another batch")
        copies = mx.broadcast_to(activation[1:2], (count,) + activation.shape[1:])
        return mx.concatenate([activation, copies], axis=0)

    return join


def _computed_after_layer(model, jobs, names) -> Optional[Dict[int, Optional[Tuple[str, str]]]]:
    """``{layer: how its patched rows are computed}`` when every job's row can join after its layer
    without running it, else None: ``None`` for a whole layer's output (the clean row's output there),
    ``(mid module, mlp_out module)`` for a sequential block's MLP (``hooks.sequential_parts``).

    Such a block's output is ``resid_mid + mlp_out``; in a row patched at its MLP, ``resid_mid`` is the
    corrupted row's (the layers and the attention before it are unchanged) and ``mlp_out`` the clean
    row's. Either way a sweep over L layers saves L layer-rows of its L(L+1)/2 + 2L.
    """
    found: Dict[int, Optional[Tuple[str, str]]] = {}
    for layer, _ in jobs:
        if layer in found:
            continue
        if names[layer] == model.names.layer_names[layer]:
            found[layer] = None
            continue
        mlp = _sequential_mlp(model, layer)
        if mlp is None or names[layer] != mlp[0]:
            return None
        found[layer] = mlp[1:]
    return found


def _sequential_mlp(model, layer: int) -> Optional[Tuple[str, str, str]]:
    """(MLP, mid, mlp_out) full module names of layer ``layer`` when it is a sequential block with an
    MLP (``hooks.sequential_parts``), else None."""
    from . import hooks

    parts = hooks.sequential_parts(model, model.names.layer_names[layer])
    if parts is None:
        return None
    try:
        return component_name(model, layer, "mlp"), parts["mid"], parts["mlp_out"]
    except MlxterpError:
        return None


def _last_mlp_at_last_position(model) -> Dict[str, object]:
    """An intervention running the last layer's MLP at the last position only, when the pass reads the
    last layer's output there only and nothing reads that MLP's output elsewhere (no job patches it).

    An MLP acts on each position alone, and a sequential block adds its output to the residual stream:
    the one row broadcasts over the positions, whose sums nobody reads. Not where the MLP's own input
    is ``resid_mid`` (OLMo 2), which the MLP-patched rows read."""
    mlp = _sequential_mlp(model, len(model.names.layer_names) - 1)
    if mlp is None or mlp[1] == mlp[0]:
        return {}
    return {f"{mlp[0]}.input": reshaping(lambda a: a[:, -1:])}


def _join_patched(expected: int, positions: List[Optional[int]], how: Optional[Tuple[str, str]]):
    """Layer output -> the same with one row per position appended: the corrupted row patched at this
    layer from the clean row (at one position, or at all for None). ``how`` (see
    ``_computed_after_layer``): None when the whole layer is patched, else the (mid, mlp_out) modules
    whose resid_mid (row 1) + mlp_out (row 0) the pass records."""
    from . import trace

    calls = []

    def join(activation: mx.array) -> mx.array:
        calls.append(1)
        if len(calls) > 1 or activation.shape[0] != expected:
            raise _NotLayerByLayer("a layer ran twice or on another batch")
        if how is None:
            patched = activation[0:1]
        else:
            mid, mlp_out = how
            recorder = trace._active_recorder
            if mid not in recorder.inputs or mlp_out not in recorder.outputs:
                raise _NotLayerByLayer(f"{mid} or {mlp_out} was not called with the residual stream")
            patched = (recorder.inputs[mid][1:2] + recorder.outputs[mlp_out][0:1]).astype(activation.dtype)
            if patched.shape[1:] != activation.shape[1:]:
                raise _NotLayerByLayer(f"resid_mid + mlp_out has shape {patched.shape}, the layer's output "
                                       f"{activation.shape}")
        index = mx.arange(activation.shape[1]).reshape(1, -1, *([1] * (activation.ndim - 2)))
        rows = [patched if p is None else mx.where(index == p % activation.shape[1], patched, activation[1:2])
                for p in positions]
        return mx.concatenate([activation] + rows, axis=0)

    return join


def _only_inside_layers(model, interventions) -> bool:
    """True when no intervention acts after the last layer (on the final norm, unembedding or logits),
    so those may run at the last position only."""
    layer_names = model.names.layer_names
    embed = model.names.find("embed")
    for key in (interventions or {}):
        for name in model.expand(key):
            if name != embed and not any(name == n or name.startswith(n + ".") for n in layer_names):
                return False
    return True


class _PassSizes:
    """How big a patching pass may be: rows within ``patch_budget_bytes``, and when to evaluate as it goes.

    Per row of ``length`` tokens (after ``cached`` tokens held in KV caches): the widest activations of
    a layer (an MLP ~4x wide, gate and up, the residual), attention scores in float32 where attention is
    not fused (heads ~ hidden / 64), and the KV caches of a shared prefix.
    """

    def __init__(self, model):
        weight_bytes, self.itemsize = _weights(model)
        self.model = model
        budget = patch_budget_bytes
        self.budget = max(weight_bytes, 256 * 2**20) if budget is None else budget

    def row_bytes(self, length: int, cached: int = 0) -> int:
        hidden = self.model.hidden_size or 1024
        return (length * hidden * 16 * self.itemsize + max(1, hidden // 64) * length * (length + cached) * 4
                + 2 * cached * hidden * self.itemsize * self.model.n_layers)

    def rows_within_budget(self, length: int, cached: int = 0) -> int:
        return max(3, int(self.budget // self.row_bytes(length, cached)))

    def eval_every(self, rows: int, length: int, cached: int = 0) -> int:
        return EVAL_EVERY if rows * self.row_bytes(length, cached) > SMALL_PASS_BYTES else 0


def _weights(model) -> Tuple[int, int]:
    """(bytes of the model's parameters, bytes per value of its first floating one), remembered per model
    while its module table stays: walking the parameter tree costs ~1 ms, a tenth of a small sweep."""
    from .trace import names_stamp

    stamp = names_stamp(model)
    known = model.__dict__.get("_weights")
    if known is None or known[0] != stamp:
        params = model.parameters()
        itemsize = next((v.dtype.size for v in params.values() if mx.issubdtype(v.dtype, mx.floating)), 4)
        known = (stamp, (sum(v.nbytes for v in params.values()), itemsize))
        model.__dict__["_weights"] = known
    return known[1]


# A big pass is evaluated every this many layers as it goes: otherwise the host queues every layer's
# kernels at once and MLX-CUDA, which frees a buffer only when the GPU is done with it, holds them all
# (a 16-layer 1B-shaped pass of 18 rows x 512 tokens peaked at 2.8x one forward pass). Small passes
# are not worth the synchronisations.
EVAL_EVERY = 2
SMALL_PASS_BYTES = 256 * 2**20


def _recovery(metric, clean, corrupted, patched, answers) -> mx.array:
    if metric == "logit_diff":
        a, b = answers

        def diff(logits):
            return logits[..., a] - logits[..., b]

        baseline = diff(clean) - diff(corrupted)
        if abs(baseline.item()) < 1e-12:
            raise MlxterpError(
                "the logit difference is the same on the clean and corrupted prompts, so recovery is undefined; "
                "pick answers the two prompts disagree on"
            )
        return 100.0 * (diff(patched) - diff(corrupted)) / baseline
    base = distance(metric, corrupted, clean)
    if base.item() <= 0:
        raise MlxterpError(
            "the clean and corrupted prompts give the same output, so recovery is undefined; "
            "use prompts that differ"
        )
    return 100.0 * (base - distance(metric, patched, clean)) / base


def distance(metric: str, a: mx.array, b: mx.array) -> mx.array:
    """Distance between logits along the last axis, in float32: l2, mse or cosine (1 - cos)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    if metric == "l2":
        # Scale before squaring so huge logits cannot overflow.
        difference = a - b
        peak = mx.maximum(mx.max(mx.abs(difference), axis=-1, keepdims=True), 1e-30)
        return peak[..., 0] * mx.sqrt(mx.sum(mx.square(difference / peak), axis=-1))
    if metric == "mse":
        return mx.mean(mx.square(a - b), axis=-1)
    if metric == "cosine":
        a = a / mx.maximum(mx.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
        b = b / mx.maximum(mx.linalg.norm(b, axis=-1, keepdims=True), 1e-30)
        # 1 - cos(a, b) written as half the squared distance of the unit vectors: no cancellation
        return 0.5 * mx.sum(mx.square(a - b), axis=-1)
    raise InputError(f"unknown metric {metric!r}; choose one of l2, mse, cosine")


def component_name(model, layer: int, component: Optional[str]) -> str:
    """Full name of ``component`` in ``layer`` (``None``/``"layer"`` = the layer itself)."""
    if component in (None, "", "layer", "output", "residual"):
        return model.names.layer_names[layer]
    if not isinstance(component, str):
        raise InputError(f"component must be a name like 'mlp', 'attn' or 'mlp.gate_proj', got {component!r}")
    return model.resolve(f"layers.{layer}.{component}")


def _answer_ids(model, answers) -> Tuple[int, int]:
    if len(answers) != 2:
        raise InputError("answers is a pair (clean_answer, corrupted_answer)")
    return tuple(answer_id(model, answer) for answer in answers)


def answer_id(model, answer) -> int:
    """The token id of one answer: a token id, or a string that is a single token (BOS aside).

    An answer written without a leading space (``"Paris"``) warns when the spaced token
    (``" Paris"``, the one that follows a word) exists and is another token."""
    if not isinstance(answer, str):
        return int(answer)
    found = _single_token(model, answer)
    warning = answer_warning(model, answer)
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
    return found


def answer_warning(model, answer: str) -> Optional[str]:
    """The warning for an answer without a leading space whose spaced form is another single
    token, or None."""
    if not isinstance(answer, str) or not answer or answer[0].isspace():
        return None
    try:
        bare, spaced = _single_token(model, answer), _single_token(model, " " + answer)
    except InputError:
        return None
    if bare == spaced:
        return None
    return (f"the answer {answer!r} is token {bare} ({model.token_to_str(bare)!r}), not {spaced} "
            f"({model.token_to_str(spaced)!r}, with a leading space), which is what follows a word: "
            f"write {' ' + answer!r} if that is the answer meant")


def _single_token(model, answer: str) -> int:
    tokens = model.encode(answer)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if tokens and bos is not None and tokens[0] == bos:
        tokens = tokens[1:]
    if len(tokens) != 1:
        pieces = ", ".join(repr(t) for t in model.token_strings(tokens)) or "no tokens"
        raise InputError(f"the answer {answer!r} is {len(tokens)} tokens ({pieces}); an answer must be a "
                         f"single token, such as a word with its leading space: \" Paris\"")
    return tokens[0]


# -- small helpers ------------------------------------------------------------------

def layer_list(model, layers) -> List[int]:
    """Layer indices (negative ones counted from the end) checked through the resolver."""
    if layers is None:
        return list(range(model.n_layers))
    if isinstance(layers, int):
        layers = [layers]
    result = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"layers are given as integers, got {layer!r}")
        full = model.resolve(f"layers.{layer}")  # LayerIndexError for an index out of range
        result.append(model.names.layer_index(full))
    return result


def _token_ids(model, text) -> List[int]:
    if isinstance(text, str):
        return model.encode(text)
    if isinstance(text, mx.array):
        text = text.reshape(-1).tolist()
    return [int(t) for t in text]


def _check_position(position, length: int) -> int:
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"a position is an integer, got {position!r}")
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens (0..{length - 1} or -{length}..-1)")
    return position % length


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return value


def _as_list(value) -> list:
    return [value] if isinstance(value, int) else list(value)


def _final_softcap(model) -> Optional[float]:
    base = model.model
    for owner in (base, getattr(base, "args", None)):
        value = getattr(owner, "final_logit_softcapping", None)
        if value:
            return float(value)
    return None


def __getattr__(name):
    # Collection lives in mlxterp.collect; these names are also reachable from here.
    if name in ("get_activations", "batch_get_activations", "load_activations", "iter_activation_shards"):
        from . import collect
        return getattr(collect, name)
    raise AttributeError(f"module 'mlxterp.analysis' has no attribute {name!r}")
