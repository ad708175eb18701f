"""Generation with interventions and per-step capture, on mlx-lm's KV cache.

``generate(model, prompt, max_tokens, interventions=..., capture=..., temperature=..., steps=...)``
runs the prompt once (step 0, filling mlx-lm's prompt cache) and then one token per step,
each step a forward pass of the new token against the cache, like
``mlx_lm.generate.generate_step``. Every pass goes through the trace machinery
(``mlxterp.trace.run_forward``), so:

* ``interventions={name: fn}`` change module outputs at every step, or only at the
  steps listed in ``steps=`` (step 0 is the prompt pass; step ``i`` the pass that
  reads generated token ``i-1`` and predicts token ``i``);
* ``capture=[names]`` records those modules' outputs at each step; the result holds
  them per step (``result.activations[name][step]``: ``(1, tokens of the step, ...)``);
* ``stream_generate`` yields each token as it is chosen, and ``generate`` calls
  ``on_token(step)`` for each; ``should_stop()`` is asked between steps and ends the
  generation early (the result says ``interrupted``).

``Generation`` is the result: the prompt, the generated ids and text, what was captured.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import hooks
from .errors import InputError, MlxterpError
from .interventions import combined, uncalled_factory
from .naming import OUTPUT
from .trace import check_ids, run_forward


from .generation_results import Generation, Step  # noqa: F401 (the result lives apart: no mlx)


def stream_generate(model, prompt, max_tokens: int = 20, interventions=None, capture=None,
                    temperature: float = 0.0, steps: Optional[Iterable[int]] = None,
                    seed: Optional[int] = None, stop_at_eos: bool = True) -> Iterator[Step]:
    """Yield each generated token as a ``Step`` (see the module docstring for the arguments)."""
    ids = _prompt_ids(model, prompt)
    max_tokens = _count(max_tokens)
    temperature = _temperature(temperature)
    step_set = None if steps is None else {_step(s) for s in _as_iterable(steps)}
    for key, change in (interventions or {}).items():
        if not callable(change):
            raise InputError(f"the intervention for {key!r} is {type(change).__name__}, not a function array -> array")
        uncalled_factory(key, change)
    # Hook points (layers.6.resid_pre, layers.8.attn.z.head[3]) become changes of module outputs and inputs.
    changes, input_changes = hooks.route(model, combined(interventions, resolve=model.expand))
    captured = _capture_names(model, capture)
    record = hooks.recorded_for(model, captured.values()) | set(captured.values()) | set(input_changes) | (
        set(changes) - {OUTPUT})
    ordered = [(n, m) for n, m in model.names.modules.items() if n in record]
    eos = _eos_ids(model) if stop_at_eos else set()
    key = mx.random.key(seed) if seed is not None else None

    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model.model)
    inputs = mx.array([ids])
    for step in range(max_tokens):
        on = step_set is None or step in step_set
        active = changes if on else {}
        output, recorder = run_forward(model, lambda: model.model(inputs, cache=cache), ordered,
                                       {n: f for n, f in active.items() if n != OUTPUT},
                                       input_interventions=input_changes if on else None)
        if OUTPUT in active:
            output = active[OUTPUT](output)
        logits = output[:, -1, :].astype(mx.float32)
        if temperature == 0:
            token = mx.argmax(logits, axis=-1)
        else:
            if key is not None:
                key, sub = mx.random.split(key)
                token = mx.random.categorical(logits / temperature, key=sub)
            else:
                token = mx.random.categorical(logits / temperature)
        saved = {label: output if n == OUTPUT else _captured(model, recorder, n) for label, n in captured.items()}
        mx.eval(token, saved)
        token_id = int(token.item())
        # The end-of-sequence token ends the text (its step and captures are still reported).
        yield Step(step, token_id, "" if token_id in eos else _token_text(model, token_id), saved)
        if token_id in eos:
            return
        inputs = mx.array([[token_id]])


def generate(model, prompt, max_tokens: int = 20, interventions=None, capture=None, temperature: float = 0.0,
             steps: Optional[Iterable[int]] = None, on_token: Optional[Callable[[Step], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None, seed: Optional[int] = None,
             stop_at_eos: bool = True) -> Generation:
    """Generate up to ``max_tokens`` tokens after ``prompt``; returns a ``Generation``.

    ``interventions`` apply at every step (or at ``steps``); ``capture`` names modules
    (patterns work: ``"layers.*"``, ``"output"`` for the logits) whose outputs come back per step;
    ``temperature`` 0 is greedy, above 0 samples (``seed`` makes it repeatable);
    ``on_token(step)`` is called as each token is chosen; ``should_stop()`` is asked between
    steps and ends the generation early (``result.interrupted``).
    """
    if isinstance(prompt, str):
        prompt_text = prompt
    else:
        ids = _prompt_ids(model, prompt)
        prompt_text = model.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids))
    step_list = None if steps is None else sorted({_step(s) for s in _as_iterable(steps)})
    tokens, texts, activations = [], [], {}
    interrupted = False
    stream = stream_generate(model, prompt, max_tokens, interventions=interventions, capture=capture,
                             temperature=temperature, steps=step_list, seed=seed, stop_at_eos=stop_at_eos)
    for step in stream:
        tokens.append(step.token)
        texts.append(step.text)
        for name, value in step.activations.items():
            activations.setdefault(name, []).append(np.array(value.astype(mx.float32)) if value.dtype == mx.bfloat16
                                                    else np.array(value))
        if on_token is not None:
            on_token(step)
        if should_stop is not None and len(tokens) < max_tokens and should_stop():
            interrupted = True
            stream.close()
            break
    intervened = sorted({model.short_name(n) if n != OUTPUT else "output"
                         for n in combined(interventions, resolve=model.expand)})
    eos = _eos_ids(model) if stop_at_eos else set()
    stopped = "interrupted" if interrupted else ("eos" if tokens and tokens[-1] in eos else "length")
    return Generation(prompt_text, tokens, texts, activations=activations, intervened=intervened,
                      steps=step_list if intervened else None, temperature=float(temperature),
                      interrupted=interrupted, stopped=stopped)


# -- checks -----------------------------------------------------------------------------------

def _prompt_ids(model, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("generate needs a prompt: an empty string has no tokens to continue")
        ids = model.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
        ids = [int(t) for t in prompt]
    elif isinstance(prompt, mx.array) and prompt.ndim in (1, 2) and not mx.issubdtype(prompt.dtype, mx.floating):
        if prompt.ndim == 2 and prompt.shape[0] != 1:
            raise InputError(f"generate continues one prompt; got a batch of {prompt.shape[0]}")
        ids = prompt.reshape(-1).tolist()
    else:
        raise InputError(f"generate takes a prompt string or a list of token ids; got {type(prompt).__name__}")
    if not ids:
        raise InputError("generate needs a prompt with at least one token")
    check_ids(model, ids)
    return ids


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"max_tokens is a whole number of tokens to generate, at least 1; got {value!r}")
    return int(value)


def _temperature(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"temperature is a number >= 0 (0: greedy); got {value!r}") from None
    if not value >= 0:
        raise InputError(f"temperature is a number >= 0 (0: greedy); got {value!r}")
    return value


def _step(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"steps are generation steps 0, 1, 2 ... (0: the prompt pass); got {value!r}")
    return int(value)


def _as_iterable(value) -> Sequence:
    return [value] if isinstance(value, (int, np.integer)) else list(value)


def _capture_names(model, capture) -> dict[str, str]:
    """{label: full name} to capture: a name as the user wrote it, the short names of a pattern's modules."""
    if capture is None:
        return {}
    patterns = [capture] if isinstance(capture, str) else list(capture)
    names = {}
    for pattern in patterns:
        expanded = model.expand(pattern)
        for full in expanded:
            point = hooks.point(model, full)
            if point is not None and point.hook in NOT_PER_STEP:
                raise MlxterpError(
                    f"{model.short_name(full)} cannot be captured during generation: {point.hook} is recomputed "
                    f"from the attention's input, which at a cached step holds only the new token; capture "
                    f"layers.N.attn.z, attn_out or the residual stream, or trace the whole text afterwards")
            label = pattern if len(expanded) == 1 else model.short_name(full)
            names.setdefault(label, full)
    return names


# Recomputed from the attention's input, which at a cached step holds only the new token.
NOT_PER_STEP = ("attn.q", "attn.k", "attn.v", "attn.pattern")


class _StepValues:
    """What one step's forward pass recorded, read the way a trace's store is (for hook points)."""

    padding: list = []

    def __init__(self, recorder):
        self.recorder = recorder

    def read(self, name, what="output"):
        return (self.recorder.inputs if what == "input" else self.recorder.outputs)[name]


def _captured(model, recorder, name: str) -> mx.array:
    point = hooks.point(model, name)
    if point is None:
        return recorder.outputs[name]
    return hooks.read(model, _StepValues(recorder), point)


def _eos_ids(model) -> set[int]:
    tokenizer = model.tokenizer
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        single = getattr(tokenizer, "eos_token_id", None)
        ids = [] if single is None else [single]
    return {int(i) for i in ids}


def _token_text(model, token_id: int) -> str:
    return model.decode([token_id]) if model.tokenizer is not None else str(token_id)
