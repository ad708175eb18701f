"""Interventions: plain functions ``array -> array`` applied to a module's output.

A trace takes ``interventions={name: fn}``; any callable that maps an
``mx.array`` to an ``mx.array`` of the same shape works. The names here are
factories of such functions for the common cases::

    from mlxterp import interventions as iv

    iv.zero_out()                # factories return a function (iv.zero_out itself works too)
    iv.scale(0.5)
    iv.clamp(-1.0, 1.0)
    iv.noise(std=0.1, seed=0)
    iv.add_vector(steering_vector)
    iv.add_vector(steering_vector, positions=[-1])   # only at the last position
    iv.at_positions(iv.zero_out, [0, 2])         # any intervention, at chosen positions
    iv.replace_with(clean_activation)
    iv.compose().add(iv.scale(0.8)).add(iv.clamp(-3, 3)).build()

``replace_rows`` is the batched form of ``replace_with`` the patching sweep
uses: it replaces only some rows (and optionally some positions) of a batch.
``combined`` is the one way several sets of interventions (steering, a ``with``,
a patching sweep's patches) become one ``{module: fn}``: on a module named more
than once, they apply in the order given.
"""

from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import mlx.core as mx

from .errors import MlxterpError

Intervention = Callable[[mx.array], mx.array]


def zero_out(activation: Optional[mx.array] = None):
    """Replace the activation with zeros.

    Like the other factories, ``zero_out()`` returns the intervention; ``zero_out`` itself is
    that intervention too, so ``{"layers.4": iv.zero_out}`` and ``{"layers.4": iv.zero_out()}``
    do the same.
    """
    if activation is None:
        return zero_out
    return mx.zeros_like(activation)


def scale(factor: float) -> Intervention:
    """Multiply the activation by ``factor`` (``scale(1.0)`` changes nothing)."""
    factor = _number(factor, "scale factor")

    def scaled(activation: mx.array) -> mx.array:
        return activation * factor

    scaled.__name__ = f"scale({factor})"
    return scaled


def clamp(lo: Optional[float] = None, hi: Optional[float] = None) -> Intervention:
    """Clip the activation to ``[lo, hi]`` (either bound may be ``None``)."""
    if lo is None and hi is None:
        raise MlxterpError("clamp needs at least one bound: clamp(lo, hi), clamp(lo=None, hi=1.0)")
    lo = None if lo is None else _number(lo, "clamp lower bound")
    hi = None if hi is None else _number(hi, "clamp upper bound")
    if lo is not None and hi is not None and lo > hi:
        raise MlxterpError(f"clamp lower bound {lo} is above the upper bound {hi}")

    def clamped(activation: mx.array) -> mx.array:
        return mx.clip(activation, lo, hi)

    clamped.__name__ = f"clamp({lo}, {hi})"
    return clamped


def noise(std: float = 0.1, seed: Optional[int] = None) -> Intervention:
    """Add Gaussian noise of standard deviation ``std``.

    With ``seed`` the noise is the same on every call (for the same shape),
    so a noisy run can be repeated exactly; without it, MLX's global random
    state is used (``mx.random.seed`` makes that reproducible too).
    """
    std = _number(std, "noise std")
    if std < 0:
        raise MlxterpError(f"noise std must be >= 0, got {std}")

    def noisy(activation: mx.array) -> mx.array:
        key = None if seed is None else mx.random.key(seed)
        sample = mx.random.normal(activation.shape, key=key)
        return activation + (std * sample).astype(activation.dtype)

    noisy.__name__ = f"noise(std={std})"
    return noisy


def add_vector(vector, positions=None) -> Intervention:
    """Add ``vector`` (a steering vector, shape ``(hidden,)`` or broadcastable) to the activation,
    at every position or at ``positions`` (see ``at_positions``)."""
    vector = mx.array(vector)
    if positions is not None:
        return at_positions(add_vector(vector), positions)

    def steered(activation: mx.array) -> mx.array:
        if vector.ndim and vector.shape[-1] != activation.shape[-1]:
            raise MlxterpError(
                f"add_vector: the vector has size {vector.shape[-1]} but the activation's last "
                f"dimension is {activation.shape[-1]} (activation shape {tuple(activation.shape)}); "
                f"use a vector of shape ({activation.shape[-1]},)"
            )
        return activation + vector.astype(activation.dtype)

    steered.__name__ = "add_vector"
    return steered


def at_positions(change: Intervention, positions) -> Intervention:
    """``change`` applied at some token positions only (axis 1 of the activation; the rest keep
    their values). ``positions``: an int, a list of ints (negative counts from the end) or a
    ``slice``. Works on every hook point and module output laid out ``(batch, positions, ...)``."""
    if isinstance(positions, (int, slice)):
        positions = [positions] if isinstance(positions, int) else positions
    elif not isinstance(positions, slice):
        try:
            positions = [int(p) for p in positions]
        except (TypeError, ValueError):
            raise MlxterpError(f"positions= is an int, a list of ints or a slice; got {positions!r}") from None
    if not callable(change):
        raise MlxterpError(f"at_positions takes an intervention function first, got {type(change).__name__}")

    def at_chosen(activation: mx.array) -> mx.array:
        length = activation.shape[1]
        if isinstance(positions, slice):
            chosen = list(range(length))[positions]
        else:
            bad = [p for p in positions if not -length <= p < length]
            if bad:
                raise MlxterpError(f"position {bad[0]} is outside the {length} positions of this activation "
                                   f"(0..{length - 1}, or -{length}..-1 from the end)")
            chosen = [p % length for p in positions]
        where = mx.zeros((length,), dtype=mx.bool_)
        if chosen:
            where = mx.arange(length)[:, None] == mx.array(chosen)[None, :]
            where = where.any(axis=1)
        where = where.reshape(1, length, *([1] * (activation.ndim - 2)))
        return mx.where(where, change(activation), activation)

    at_chosen.__name__ = f"{getattr(change, '__name__', 'fn')}@{positions}"
    return at_chosen


def replace_with(replacement) -> Intervention:
    """Replace the activation with ``replacement`` (e.g. the same module's output on a clean prompt)."""
    replacement = mx.array(replacement)

    def replaced(activation: mx.array) -> mx.array:
        return _broadcast_like(replacement, activation, "replace_with")

    replaced.__name__ = "replace_with"
    return replaced


def replace_rows(replacement: mx.array, rows: Sequence[int],
                 positions: Optional[Sequence[Optional[int]]] = None) -> Intervention:
    """Replace rows ``rows`` of a batched activation with ``replacement``.

    ``replacement`` has the shape of one row (``(1, L, ...)`` or ``(L, ...)``).
    ``positions[i]`` (if given and not ``None``) limits the replacement of
    ``rows[i]`` to that one sequence position. Rows not listed are untouched,
    which is what lets a patching sweep patch a different layer in each row
    of one batched forward pass.
    """
    rows = [int(r) for r in rows]
    positions = [None] * len(rows) if positions is None else list(positions)
    if len(positions) != len(rows):
        raise MlxterpError("replace_rows: give one position (or None) per row")
    replacement = mx.array(replacement)

    def patched(activation: mx.array) -> mx.array:
        batch = activation.shape[0]
        one_row = replacement if replacement.ndim == activation.ndim else replacement[None]
        one_row = _broadcast_like(one_row, activation[:1], "replace_rows")
        row_ids = mx.arange(batch)[:, None]
        position_ids = mx.arange(activation.shape[1])[None, :]
        where = mx.zeros((batch, activation.shape[1]), dtype=mx.bool_)
        for row, position in zip(rows, positions):
            if not -batch <= row < batch:
                raise MlxterpError(f"replace_rows: row {row} is outside a batch of {batch}")
            hit = row_ids == (row % batch)
            if position is not None:
                hit = hit & (position_ids == (position % activation.shape[1]))
            where = where | hit
        where = where.reshape(batch, activation.shape[1], *([1] * (activation.ndim - 2)))
        return mx.where(where, one_row, activation)

    patched.__name__ = "replace_rows"
    return patched


class Compose:
    """Builder chaining interventions: ``compose().add(f).add(g).build()`` applies f, then g."""

    def __init__(self, steps: Iterable[Intervention] = ()):
        self.steps = []
        for step in steps:
            self.add(step)

    def add(self, step: Intervention) -> "Compose":
        if not callable(step):
            raise MlxterpError(
                f"compose().add() takes an intervention function (array -> array), got {type(step).__name__}"
            )
        self.steps.append(step)
        return self

    def build(self) -> Intervention:
        return chain(*self.steps)


def chain(*steps: Intervention) -> Intervention:
    """One intervention applying ``steps`` in order (a single step is returned as it is)."""
    if len(steps) == 1:
        return steps[0]

    def composed(activation: mx.array) -> mx.array:
        for step in steps:
            activation = step(activation)
        return activation

    composed.__name__ = " -> ".join(getattr(s, "__name__", "fn") for s in steps) or "identity"
    if any(getattr(s, "changes_shape", False) for s in steps):
        composed.changes_shape = True
    return composed


def reshaping(function: Intervention) -> Intervention:
    """Mark ``function`` as an intervention that may change its output's shape (the library's
    own, such as a patching sweep keeping only the last position); a trace refuses any other
    intervention whose result has another shape than the output."""
    function.changes_shape = True
    return function


def combined(*groups: Optional[Mapping[str, Intervention]], resolve=None) -> Dict[str, Intervention]:
    """One ``{module: intervention}`` of several such mappings, applied in order.

    ``resolve(key)`` (e.g. ``model.expand``) gives the full module names a key stands
    for, so ``"layers.3"`` and ``"model.model.layers.3"`` are the same module; without it
    keys are taken as they are. Where several interventions reach one module, the
    earlier group's runs first and the next one sees its output.
    """
    steps: Dict[str, list] = {}
    for group in groups:
        for key, function in (group or {}).items():
            for name in (resolve(key) if resolve is not None else [key]):
                steps.setdefault(name, []).append(function)
    return {name: chain(*functions) for name, functions in steps.items()}


def compose(*steps: Intervention) -> Compose:
    """Start a chain of interventions (optionally with its first steps)."""
    return Compose(steps)


def _number(value, what: str) -> float:
    if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
        # An array here is an activation: the factory itself was given as the intervention.
        raise MlxterpError(f"{what} must be a number, got an array of shape {tuple(value.shape)}: was the factory "
                           "passed uncalled? Call it: iv.scale(0.5), not iv.scale")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MlxterpError(f"{what} must be a number, got {value!r}") from None


# Factories that must be called to give an intervention, with an example call for the hint.
FACTORY_EXAMPLES = {"scale": "scale(0.5)", "clamp": "clamp(-1.0, 1.0)", "noise": "noise(std=0.1)",
                    "add_vector": "add_vector(vector)", "at_positions": "at_positions(iv.zero_out, [-1])", "replace_with": "replace_with(clean_activation)",
                    "replace_rows": "replace_rows(replacement, rows)", "compose": "compose(f, g).build()",
                    "chain": "chain(f, g)"}


def uncalled_factory(key, change) -> None:
    """Raise when ``change`` is one of this module's factories given without calling it."""
    name = getattr(change, "__name__", None)
    if name in FACTORY_EXAMPLES and globals().get(name) is change:
        raise MlxterpError(f"the intervention for {key!r} is the factory iv.{name} itself, not an intervention; "
                           f"call it: iv.{FACTORY_EXAMPLES[name]}")


def _broadcast_like(replacement: mx.array, activation: mx.array, who: str) -> mx.array:
    if replacement.shape == activation.shape:
        return replacement.astype(activation.dtype)
    try:
        return mx.broadcast_to(replacement, activation.shape).astype(activation.dtype)
    except ValueError:
        raise MlxterpError(
            f"{who}: the replacement has shape {tuple(replacement.shape)} but the activation has shape "
            f"{tuple(activation.shape)}; patch between prompts with the same number of tokens"
        ) from None
