"""Tracing: run the model once, recording (and optionally changing) module outputs.

The model's forward pass is not rewritten. For the length of one forward pass
the class of each recorded module gets a ``__call__`` that hands the calls of
the recorded instances to the active ``Recorder`` (and calls any other instance
as before); afterwards the classes' own ``__call__`` is put back, so the model
outside a forward pass is exactly the model the user gave us (same tree, same
parameters, same types, same classes).

MLX is lazy: recording keeps references to the lazy outputs. When the block
ends the trace keeps (and evaluates) what ``keep=`` says: what was saved, every
recorded output, or by default every output while they fit ``keep_budget_mib``
and only what was saved otherwise. Everything else is released. Nothing a trace
holds points back at it, so a dropped trace is freed without the garbage collector.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from .errors import InputError, Interrupted, MlxterpError, TraceError
from . import hooks
from .interventions import uncalled_factory
from .naming import OUTPUT

_active_recorder = None

# The key of a live object, as unique as id() but without its `builtins.id` audit event: where a library
# has installed an audit hook (filelock does on Python 3.12+, and mlx-lm imports it), every id() and
# every __class__ assignment calls that hook, and a trace recording every module made hundreds of each.
module_key = object.__hash__


_recording_calls: dict[type, tuple] = {}  # class -> (its __call__ when the recording one was made, the recording one)


def recording_call(cls: type):
    """The ``__call__`` that records the calls of ``cls``'s recorded instances (cached while ``cls.__call__``
    stays the same). Asked for before any class is changed: the original it wraps is ``cls.__call__``.

    It runs once per recorded module per forward pass, so the common path (record the input and output,
    nothing else to do) is kept inline.
    """
    original = cls.__call__
    made = _recording_calls.get(cls)
    if made is None or made[0] is not original:
        argument = _takes_one_argument(original)
        call = _any_arguments_call(original, cls) if argument is None else _one_argument_call(original, cls, argument)
        made = (original, call)
        _recording_calls[cls] = made
    return made[1]


def _any_arguments_call(original, owner):
    def __call__(self, *args, **kwargs):
        recorder = _active_recorder
        # Instances of a subclass reach here through super().__call__ or inheritance: theirs is not this call.
        if recorder is None or type(self) is not owner:
            return original(self, *args, **kwargs)
        name = recorder.names_by_key.get(module_key(self))
        if name is None:
            return original(self, *args, **kwargs)
        if recorder.plain and args:
            recorder.inputs[name] = args[0]
            out = original(self, *args, **kwargs)
            if name in recorder.outputs:  # a second call in one pass (RoPE on queries, then keys)
                recorder.calls[name] = recorder.calls.get(name, 1) + 1
            recorder.outputs[name] = out if type(out) is mx.array else _first_array(out)
            return out
        return recorder.call(self, name, original, args, kwargs)

    return __call__


def _one_argument_call(original, owner, argument: str):
    """The same for ``original(self, argument)``, without packing the arguments (most module calls):
    its recording lines repeat ``_any_arguments_call``'s, inline on purpose (a helper call would cost
    what this saves)."""
    def __call__(self, x):
        recorder = _active_recorder
        if recorder is None or type(self) is not owner:
            return original(self, x)
        name = recorder.names_by_key.get(module_key(self))
        if name is None:
            return original(self, x)
        if recorder.plain:
            recorder.inputs[name] = x
            out = original(self, x)
            outputs = recorder.outputs
            if name in outputs:
                recorder.calls[name] = recorder.calls.get(name, 1) + 1
            outputs[name] = out if type(out) is _array else _first_array(out)
            return out
        return recorder.call(self, name, original, (x,), {})

    code = __call__.__code__  # the argument keeps the original's name, so keyword calls still work
    __call__.__code__ = code.replace(co_varnames=("self", argument) + code.co_varnames[2:])
    return __call__


_array = mx.array


def _takes_one_argument(function):
    """The name of the one argument ``function(self, x)`` takes, or None when it takes any other way
    (defaults, ``*args``, keywords) or the name is one the one-argument wrapper uses itself."""
    code = getattr(function, "__code__", None)
    if code is None or code.co_argcount != 2 or code.co_kwonlyargcount or function.__defaults__ \
            or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return None
    argument = code.co_varnames[1]
    return None if argument in ("self", "recorder", "name", "out", "outputs", "original", "owner") else argument


def _first_array(value):
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], mx.array):
        return value[0]
    return value


def _replace_first(value, new):
    if isinstance(value, tuple):
        return (new,) + value[1:]
    if isinstance(value, list):
        return [new] + value[1:]
    return new


class Recorder:
    """Records outputs (and inputs) of named modules during one forward pass."""

    def __init__(self, names_by_key, interventions, should_stop=None, eval_at=(), stop_at=None,
                 input_interventions=None, eval_ahead=False):
        self.names_by_key = names_by_key
        self.interventions = interventions
        self.input_interventions = input_interventions or {}  # changes of a module's first array argument
        self.should_stop = should_stop
        self.eval_at = set(eval_at)
        # eval_ahead: at each of eval_at, start evaluating there and wait for the previous one only, so the
        # device works on one stretch of layers while Python builds the next (and at most two are in memory).
        self.eval_ahead = eval_ahead
        self.pending = None
        self.stop_at = stop_at  # names where should_stop is asked (None: every recorded module)
        self.outputs: dict[str, mx.array] = {}
        self.inputs: dict[str, mx.array] = {}
        self.calls: dict[str, int] = {}  # modules called more than once in the pass: how often (the last is kept)
        # Nothing to do but record: recording_call takes its inline path.
        self.plain = not interventions and not self.input_interventions and should_stop is None and not self.eval_at

    def call(self, module, name, original, args, kwargs):
        if self.should_stop is not None and (self.stop_at is None or name in self.stop_at) and self.should_stop():
            raise Interrupted(f"stopped before {name}")
        change_input = self.input_interventions.get(name)
        if args:
            if change_input is not None:
                args = (_apply(change_input, args[0], f"{name}.input"),) + tuple(args[1:])
            self.inputs[name] = args[0]
        elif kwargs:  # called by keyword, e.g. GPT-J's self.attn(inputs=...): its first array
            key = next((k for k, v in kwargs.items() if isinstance(v, mx.array)), None)
            if key is not None:
                if change_input is not None:
                    kwargs = {**kwargs, key: _apply(change_input, kwargs[key], f"{name}.input")}
                self.inputs[name] = kwargs[key]
        out = original(module, *args, **kwargs)
        change = self.interventions.get(name)
        if change is not None:
            out = _replace_first(out, _apply(change, _first_array(out), name))
        if name in self.outputs:
            self.calls[name] = self.calls.get(name, 1) + 1
        self.outputs[name] = _first_array(out)
        if name in self.eval_at:
            if self.eval_ahead:
                mx.async_eval(self.outputs[name])
                if self.pending is not None:
                    mx.eval(self.pending)
                self.pending = self.outputs[name]
            else:
                mx.eval(self.outputs[name])  # so an interrupt lands between layers, not after the whole graph
        return out


def _apply(change, activation, name):
    result = change(activation)
    if not isinstance(result, mx.array):
        raise TraceError(
            f"the intervention on {name} returned {type(result).__name__}; "
            "an intervention is a function taking and returning an mx.array"
        )
    # The batch may grow (a patching sweep adds rows at a layer); every other axis must stay.
    same_shape = result.ndim == getattr(activation, "ndim", result.ndim) and \
        result.shape[1:] == getattr(activation, "shape", result.shape)[1:]
    if not same_shape and not getattr(change, "changes_shape", False):
        raise TraceError(
            f"the intervention on {name} returned shape {tuple(result.shape)}, but {name}'s output has shape "
            f"{tuple(activation.shape)}; an intervention must return an array of the output's shape"
        )
    return result


def run_forward(model, call, modules_to_record, interventions, should_stop=None, eval_at=(), stop_at=None,
                input_interventions=None, names_by_key=None, eval_ahead=False, classes=None):
    """Call ``call()`` with the given modules recorded; returns (output, recorder). ``names_by_key`` and
    ``classes`` (their distinct classes) are worked out from ``modules_to_record`` when not given.

    The classes of the recorded modules get their recording ``__call__`` for the length of the
    call, then their own back. (Swapping each instance's class instead cost two ``__class__``
    assignments per module, each an audit event: with an audit hook installed, as on Python 3.12
    with mlx-lm's dependencies, recording every module took twice the Python it takes now.)
    """
    global _active_recorder
    if _active_recorder is not None:
        raise TraceError("a forward pass is already being traced; traces cannot run inside one another's forward pass")
    if names_by_key is None:
        names_by_key = {module_key(module): name for name, module in modules_to_record}
    recorder = Recorder(names_by_key, interventions, should_stop, eval_at, stop_at, input_interventions, eval_ahead)
    if classes is None:
        classes = {type(module) for _, module in modules_to_record}
    changed = []
    _active_recorder = recorder  # taken before any class changes, so no other trace starts meanwhile
    try:
        # Every recording call is made before any class changes: each wraps its class's own __call__.
        calls = [(cls, recording_call(cls)) for cls in classes]
        for cls, recording in calls:
            own = cls.__dict__.get("__call__", _INHERITED)
            setattr(cls, "__call__", recording)
            changed.append((cls, own))
        output = call()
    finally:
        for cls, own in changed:
            if own is _INHERITED:
                delattr(cls, "__call__")
            else:
                setattr(cls, "__call__", own)
        _active_recorder = None
    model.forward_count += 1
    return output, recorder


_INHERITED = object()  # a class that had no __call__ of its own


# -- what a trace keeps ----------------------------------------------------------

KEEP_CHOICES = ("saved", "all")
DEFAULT_KEEP_BUDGET_MIB = 256.0
logger = logging.getLogger("mlxterp.trace")


def _budget_from_environment() -> float:
    text = os.environ.get("MLXTERP_KEEP_BUDGET_MIB")
    if text is None:
        return DEFAULT_KEEP_BUDGET_MIB
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        logger.warning("MLXTERP_KEEP_BUDGET_MIB=%r is not a number of MiB (e.g. 256); using %g",
                       text, DEFAULT_KEEP_BUDGET_MIB)
        return DEFAULT_KEEP_BUDGET_MIB
    return value


# A trace made with the default keep= keeps every recorded output when they take at most this
# many MiB, and only what was saved otherwise. Set it here or with MLXTERP_KEEP_BUDGET_MIB.
keep_budget_mib: float = _budget_from_environment()
_budget_notice_given = False
BUDGET_KNOBS = "keep='all' on model.trace, mlxterp.trace.keep_budget_mib or MLXTERP_KEEP_BUDGET_MIB"


def held_bytes(values) -> int:
    """Bytes of the distinct arrays among ``values`` (each array once, however many names it has)."""
    seen = {}
    for value in values:
        if isinstance(value, mx.array):
            seen[module_key(value)] = value.nbytes
    return sum(seen.values())


class _Store:
    """One trace's recorded values and what the user saved.

    The Trace and its Activations both point here; it points at neither, so a
    dropped trace and everything it holds are freed at once (no reference cycle
    for the garbage collector to find).
    """

    def __init__(self, model, capture, keep):
        self.model = model
        self.capture = capture
        self.keep = keep
        self.outputs: dict = {}
        self.inputs: dict = {}
        self.saved: set = set()
        self.open = False
        self.recorded_anywhere: set[str] = set()  # pipeline-sharded: names any process records
        self.shared: set = set()
        self.ran: tuple = ((), ())  # after the block: (output names, input names) recorded, some maybe not kept
        self.layer_inputs: frozenset = frozenset()  # recorded layers, whose inputs a keep-all trace keeps
        self.over_budget_mib: float | None = None  # set when the default keep= dropped outputs
        self.lean = False  # recorded only model.recorded_by_default at first
        self.padding: list[int] = []  # left padding per row (hook points recompute attention with it)
        self.record_all = None  # while lean and open: runs the pass again recording everything

    def complete(self) -> None:
        """A lean trace was asked for something it did not record: record everything (once)."""
        record_all, self.record_all = self.record_all, None
        outputs, inputs = record_all()
        outputs.update(self.outputs)  # values already handed out stay the same objects
        inputs.update(self.inputs)
        self.outputs, self.inputs = outputs, inputs

    def read(self, name: str, what: str = "output"):
        """The value of full name ``name``; inside the block it is also marked saved."""
        if name not in self.model.names.modules and name != OUTPUT:
            point = hooks.point(self.model, name)
            if point is not None:  # a hook point (layers.8.resid_pre, layers.8.attn.z, layers.9.input)
                return hooks.read(self.model, self, point)
        group = self.model.pipeline_group
        if group is not None and self.open and (what, name) not in self.shared:
            self.share_from_owner(name, what, group)
        if self.record_all is not None and name not in (self.inputs if what == "input" else self.outputs):
            self.complete()
        if what == "input":
            if name not in self.inputs:
                raise TraceError(self.missing(name, "input"))
            if self.open:
                self.saved.add(("input", name))
            return self.inputs[name]
        if name not in self.outputs:
            raise TraceError(self.missing(name, "output"))
        if self.open:
            self.saved.add(("output", name))
        return self.outputs[name]

    def share_from_owner(self, name, what, group):
        """Pipeline-sharded model: the value the process owning ``name`` computed, on every process."""
        from . import distributed

        store = self.inputs if what == "input" else self.outputs
        shared = distributed.share(store.get(name), group)
        self.shared.add((what, name))
        if shared is not None:
            store[name] = shared

    def missing(self, full, what="output"):
        short = self.model.short_name(full)
        if full in self.ran[what == "input"] and full not in (self.inputs if what == "input" else self.outputs):
            message = (f"{short} ran in this forward pass, but its {what} was not kept after the block: "
                       f"save it inside the block (.{what}.save()"
                       + (" or trace.activations[...]" if what == "output" else "")
                       + ") or trace with keep='all'")
            if self.over_budget_mib is not None:
                message += (f"; this trace's outputs took {self.over_budget_mib:.0f} MiB, over the keep budget of "
                            f"{keep_budget_mib:g} MiB (mlxterp.trace.keep_budget_mib or MLXTERP_KEEP_BUDGET_MIB)")
            return message
        if self.lean and not self.open and full in self.model.names.modules:
            return (f"{short} was not recorded by this trace: a trace records the layers, their attention and MLP "
                    f"blocks, the embedding and the final norm, and the rest when the block reads it; read it "
                    f"inside the block (.{what}.save() or trace.activations[...]) or trace with keep='all'")
        if what == "input":
            return f"{short} received no recorded input in this trace"
        if self.capture is not None:
            return f"{short} was not captured in this trace; add it to capture= (now {self.capture!r})"
        return f"{short} did not run in this forward pass, so it has no output"

    def finish(self, ok: bool) -> None:
        """The block ended: keep what ``keep`` says, evaluate it, release the rest."""
        self.open = False
        self.record_all = None
        outputs = self.outputs
        keep_all = ok and self.keep == "all"
        if ok and self.keep is None:
            total = held_bytes(outputs.values())
            keep_all = total <= keep_budget_mib * 2**20
            if not keep_all:
                self.over_budget_mib = total / 2**20
                _budget_notice(self.over_budget_mib)
        if keep_all:
            kept = outputs
        else:
            kept = {name: outputs[name] for what, name in self.saved if what == "output" and name in outputs}
        ran = self.inputs
        inputs = {name: ran[name] for what, name in self.saved if what == "input" and name in ran}
        if keep_all:  # the layers' inputs (resid_pre): mostly the previous layer's output, the same arrays
            inputs.update((name, ran[name]) for name in self.layer_inputs if name in ran)
        self.ran = (tuple(outputs) if kept is not outputs else (), tuple(ran) if len(inputs) < len(ran) else ())
        self.outputs, self.inputs = kept, inputs
        # Nothing but what is kept may be referenced while it is evaluated: MLX reuses the buffers of
        # intermediates no one holds, and a pass holding every recorded output ran ~10 % slower on the GPU.
        del outputs, ran
        if ok and (kept or inputs):
            mx.eval(list(kept.values()) + list(inputs.values()))


def _budget_notice(mib: float) -> None:
    global _budget_notice_given
    if _budget_notice_given:
        return
    _budget_notice_given = True
    logger.warning(
        "a trace's outputs took %.0f MiB, over the keep budget of %g MiB: after the block it keeps only what was "
        "saved in it. To keep everything use %s (this notice is shown once)", mib, keep_budget_mib, BUDGET_KNOBS)


class Activations(Mapping):
    """Module outputs of one trace, read-only, keyed by full name; any name form works for lookups.

    Inside the block every recorded output is here, and reading one saves it. After
    the block, what the trace kept (see ``keep=`` on ``model.trace``).
    """

    __slots__ = ("_store",)

    def __init__(self, store: _Store):
        self._store = store

    def __getitem__(self, name):
        return self._store.read(self._store.model.resolve(name))

    def __iter__(self):
        return iter(list(self._every()))

    def __len__(self):
        return len(self._every())

    def _every(self) -> dict:
        if self._store.record_all is not None:  # inside the block of a lean trace: every module's output
            self._store.complete()
        return self._store.outputs

    def __contains__(self, name):
        store = self._store
        try:
            full = store.model.resolve(name)
        except Exception:
            return False
        if full not in store.model.names.modules and full != OUTPUT and hooks.point(store.model, full) is not None:
            try:  # a hook point: here when the values it is read from are
                store.read(full)
            except MlxterpError:
                return False
            return True
        if store.record_all is not None and full not in store.outputs and full in store.model.names.modules:
            store.complete()
        # Pipeline-sharded: a module another process ran is here once shared (see _Store.read).
        return full in store.outputs or (store.open and full in store.recorded_anywhere)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __repr__(self):
        names = [self._store.model.short_name(n) for n in self._store.outputs]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return f"<Activations: {len(names)} module outputs ({shown})>"


class Trace:
    """``with model.trace(inputs) as trace:`` — one forward pass, its activations, and what was saved."""

    def __init__(self, model, inputs, interventions=None, capture=None, should_stop=None, keep=None, cache=None,
                 eval_every=0):
        if keep is not None and keep not in KEEP_CHOICES:
            raise TraceError(f"keep= is 'saved' (what was saved in the block), 'all' (every recorded output) or "
                             f"None (everything while it fits the keep budget, else what was saved); got {keep!r}")
        self.model = model
        self.inputs = inputs
        self.interventions = dict(interventions or {})
        self.capture = capture
        self.should_stop = should_stop
        self.keep = keep
        self.tokens: list[list[int]] | None = None
        self.padding: list[int] = []
        self.cache = cache  # mlx-lm KV caches the forward pass continues (the library's own: a patching sweep)
        # Evaluate every eval_every-th layer's output as the pass goes, one stretch ahead of the one waited
        # for: a pass of many rows then holds a few layers' intermediates at a time (MLX-CUDA releases
        # buffers only once the GPU is done with them) and the device does not wait for Python.
        self.eval_every = eval_every
        self._store = _Store(model, capture, keep)
        self.activations = Activations(self._store)
        self._previous = None

    @property
    def inputs_by_module(self) -> dict:
        """Recorded module inputs by full name (after the block: the saved ones)."""
        return self._store.inputs

    # -- the block -----------------------------------------------------------
    def __enter__(self):
        self.run()
        self._previous = self.model._active_trace
        self.model._active_trace = self
        self._store.open = True
        return self

    def __exit__(self, exc_type, exc, tb):
        self.model._active_trace = self._previous
        self._previous = None
        self._store.finish(ok=exc_type is None)
        return False

    def save(self, name: str, what: str = "output") -> mx.array:
        """The activation of ``name`` (any name form, as for ``activations[...]``; ``what`` is output or
        input), kept after the block."""
        if what not in ("output", "input"):
            raise TraceError(f"what= is 'output' or 'input', not {what!r}")
        return self._store.read(self.model.resolve(name), what)

    # -- running ---------------------------------------------------------------
    def run(self):
        model = self.model
        interventions = {}
        for key, change in self.interventions.items():
            if not callable(change):
                raise TraceError(f"the intervention for {key!r} is {type(change).__name__}, not a function array -> array")
            uncalled_factory(key, change)
            for full in model.expand(key):
                if full in interventions:
                    first = interventions[full]
                    interventions[full] = lambda a, f=first, g=change: g(f(a))
                else:
                    interventions[full] = change
        input_interventions = {}
        if interventions:  # hook points become interventions on module outputs and inputs (mlxterp.hooks)
            interventions, input_interventions = hooks.route(model, interventions)
        # A plain trace records the blocks first; the first read of anything else in the block
        # runs the pass again recording everything (exact: with no interventions and no
        # should_stop the pass is deterministic; values already read are kept as they are).
        lean = (self.capture is None and self.keep != "all" and not interventions and not input_interventions
                and self.should_stop is None and self.cache is None and not self.eval_every
                and model.distributed_group is None)
        record, ordered, names_by_key, layer_inputs, classes = record_plan(model, self.capture, lean)
        extra = (set(interventions) | set(input_interventions)) - {OUTPUT} - record if interventions else set()
        should_stop, eval_at, stop_at, before_pass = self.should_stop, [], None, None
        eval_ahead = False
        if should_stop is not None:
            eval_at = model.names.layer_names
        elif self.eval_every:
            eval_at = model.names.layer_names[self.eval_every - 1::self.eval_every]
            eval_ahead = True
        extra |= set(eval_at) - record
        if should_stop is not None:
            if model.distributed_group is not None:
                should_stop, stop_at = self._agreed_stop(should_stop)
                if model.pipeline_group is not None:
                    before_pass, should_stop, eval_at = should_stop, None, []
        if extra:
            record = record | extra
            ordered = [(n, m) for n, m in model.names.modules.items() if n in record]
            names_by_key = classes = None
            layer_inputs = frozenset(record & set(model.names.layer_names))

        batches, self.tokens, self.padding = prepare_inputs(model, self.inputs)
        if self.cache is not None:
            if len(batches) != 1 or not isinstance(self.inputs, mx.array):
                raise TraceError("a trace continuing KV caches takes one mx.array of token ids")
            ids, cache = batches[0][0], self.cache
            batches = [(ids, lambda: model.model(self.inputs, cache=cache), {})]
        results = []
        for rows, call, extra in batches:
            if before_pass is not None and before_pass():
                raise Interrupted("stopped before the forward pass")
            changes = {**interventions, **extra} if extra else interventions
            output, recorder = run_forward(model, call, ordered, changes, should_stop, eval_at, stop_at,
                                           input_interventions, names_by_key, eval_ahead, classes)
            if recorder.calls:
                model.repeated_calls.update(recorder.calls)
            if OUTPUT in interventions:
                output = _apply(interventions[OUTPUT], output, OUTPUT)
            if model.distributed_group is not None:
                # A sharded model runs its collectives (send/recv, all_sum) now, in the same order on every
                # process; what is computed from the trace afterwards is local. Saves of a pipeline-sharded
                # model then share each value from the process that owns it.
                mx.eval(output, recorder.outputs)
            outputs = recorder.outputs
            outputs[OUTPUT] = output
            results.append((rows, outputs, recorder.inputs))
        outputs, inputs = merge_groups(results, self.padding)
        store = self._store
        store.outputs, store.inputs = outputs, inputs
        store.padding = self.padding
        store.recorded_anywhere = record  # the model's output is in every process's outputs
        store.layer_inputs = layer_inputs
        store.record_all = functools.partial(_record_everything, model, self.inputs) if lean else None
        store.lean = lean
        return self

    def _agreed_stop(self, should_stop):
        """A split model: (the should_stop all processes agree on, the names where it is asked).

        Every process must trace with a ``should_stop`` (each process runs the same
        script); it stops all of them when any one says stop. Tensor parallelism runs
        every layer on every process, so they agree at each layer boundary. A pipeline
        stage waits for the previous stage's output inside one evaluation, where no
        process can take part in another collective: they agree before each forward pass.
        """
        from . import distributed

        return distributed.agreed_stop(should_stop, self.model.distributed_group), set(self.model.names.layer_names)


def record_plan(model, capture, lean):
    """(names to record, [(name, module)] in model order, {module_key(module): name}, the recorded layers,
    their classes) for a trace's ``capture=`` (cached per model).

    Expanding capture patterns and walking the module table costs more Python than the rest of a
    restricted trace, so the answer is remembered per (capture, lean) and dropped when the
    model's name table is replaced or grows (a pipeline-sharded model completes its names).
    """
    if capture is None or isinstance(capture, str):
        key = (capture, lean)
    elif isinstance(capture, (list, tuple)) and all(isinstance(p, str) for p in capture):
        key = (tuple(capture), lean)
    else:
        key = None
    names = model.names
    stamp = names_stamp(model)
    plans = model.__dict__.get("_record_plans")
    if plans is None or plans[0] != stamp:
        plans = (stamp, {})
        model.__dict__["_record_plans"] = plans
    plan = plans[1].get(key) if key is not None else None
    if plan is not None:
        return plan
    if lean:
        record = set(model.recorded_by_default)
    elif capture is None:
        record = set(names.modules) - {"model"}
    else:
        patterns = [capture] if isinstance(capture, str) else list(capture)
        record = {full for p in patterns for full in model.expand(p)} - {OUTPUT}
        record |= hooks.recorded_for(model, record)
    ordered = tuple((n, m) for n, m in names.modules.items() if n in record)
    plan = (frozenset(record), ordered, {module_key(m): n for n, m in ordered}, frozenset(record & set(names.layer_names)),
            tuple({type(m) for _, m in ordered}))
    if key is not None:
        plans[1][key] = plan
    return plan


def names_stamp(model) -> tuple:
    """What answers remembered per model (record plans, weight bytes) are valid for: its name table,
    replaced when the model changes and grown when a pipeline-sharded model completes its names."""
    names = model.names
    return module_key(names), module_key(names.modules), len(names.modules)


def _record_everything(model, inputs):
    """(outputs, inputs) of a pass over ``inputs`` recording every module (a lean trace's second pass)."""
    trace = Trace(model, inputs, keep="all").run()
    return trace._store.outputs, trace._store.inputs


# -- inputs --------------------------------------------------------------------

FLOAT_DTYPES = frozenset([mx.float16, mx.bfloat16, mx.float32, mx.float64])
INTEGER_DTYPES = frozenset([mx.int8, mx.int16, mx.int32, mx.int64, mx.uint8, mx.uint16, mx.uint32, mx.uint64])


def prepare_inputs(model, inputs):
    """Turn any accepted input into forward calls: [(rows, call, extra_interventions)], tokens, padding."""
    if isinstance(inputs, mx.array):  # first: the common case when every microsecond of a trace counts
        return _array_inputs(model, inputs)
    if isinstance(inputs, str):
        inputs = [model.encode(inputs)]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, str) for x in inputs):
        inputs = [model.encode(t) for t in inputs]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (int, np.integer)) for x in inputs):
        inputs = [list(inputs)]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (list, tuple)) for x in inputs):
        inputs = [list(x) for x in inputs]
    elif isinstance(inputs, np.ndarray):
        return _array_inputs(model, mx.array(inputs))
    else:
        raise InputError(
            f"cannot trace {type(inputs).__name__}: give a string, a list of strings, a list of token ids, "
            "or an mx.array of token ids or floats"
        )

    if any(len(seq) == 0 for seq in inputs):
        raise InputError("cannot trace an empty sequence of tokens")
    for seq in inputs:
        check_ids(model, seq)
    lengths = [len(seq) for seq in inputs]
    longest = max(lengths)
    padding = [longest - n for n in lengths]
    if len(set(lengths)) == 1:
        ids = model_ids(inputs)
        return [(list(range(len(inputs))), lambda: model.model(ids), {})], [list(s) for s in inputs], padding
    if supports_left_padding(model.model):
        from mlx_lm.models.cache import BatchKVCache

        ids = model_ids([[0] * p + list(seq) for p, seq in zip(padding, inputs)])

        def call():
            # A pipeline stage keeps caches for its own layers only (mlx-lm's Model.layers).
            n_cache = len(model.model.layers) if model.pipeline_group is not None else model.n_layers
            cache = [BatchKVCache(padding) for _ in range(n_cache)]
            return model.model(ids, cache=cache)

        return [(list(range(len(inputs))), call, {})], [list(s) for s in inputs], padding
    # Architectures that cannot mask left padding (learned positions, recurrent or
    # rotating caches): one forward pass per prompt length, merged afterwards.
    groups = {}
    for row, seq in enumerate(inputs):
        groups.setdefault(len(seq), []).append(row)
    batches = []
    for length, rows in groups.items():
        ids = mx.array([inputs[r] for r in rows])
        batches.append((rows, (lambda ids=ids: model.model(ids)), {}))
    return batches, [list(s) for s in inputs], padding


def _array_inputs(model, inputs):
    if inputs.dtype in FLOAT_DTYPES:
        return [float_call(model, inputs)], None, []
    if inputs.ndim == 1:
        inputs = inputs[None]
    if inputs.ndim != 2:
        raise InputError(f"token ids must be 1-D or 2-D, got shape {tuple(inputs.shape)}")
    # Read and checked every time, before the embedding reads them (an id out of range crashes it).
    tokens = inputs.tolist()
    if inputs.dtype in INTEGER_DTYPES:
        for seq in tokens:  # the list made anyway: no second copy of the ids through numpy
            check_ids(model, seq)
        ids = model_ids(tokens, inputs.dtype)
    else:
        check_ids(model, inputs)
        ids = inputs
    rows = list(range(len(tokens)))
    return [(rows, lambda: model.model(ids), {})], tokens, [0] * len(rows)


# The model reads an array of ids made from the ones checked, never the caller's own: the caller's may
# change after the check (`ids[0, 0] = 10**9` or a numpy view writes an mx.array in place), and on a
# GPU, reading back ids the GPU has read costs 50-110 us (MLX-CUDA's unified memory moves their pages
# back), while the caller's array, never read there, stays cheap to check. The last one made is used
# again while the ids are the same (a prompt traced again is not copied to the device again).
_model_ids = None  # (dtype, rows, mx.array)
MODEL_IDS_CACHED = 1 << 16  # ids, at most, in the array kept for next time


def model_ids(rows: list, dtype=mx.int32) -> mx.array:
    """An mx.array of ``rows`` (lists of checked token ids) for the model to read, new or the last one."""
    global _model_ids
    last = _model_ids
    if last is not None and last[0] == dtype and last[1] == rows:
        ids = last[2]
    else:
        ids = mx.array(rows, dtype=dtype)
        if rows and len(rows) * len(rows[0]) <= MODEL_IDS_CACHED:
            _model_ids = (dtype, [list(r) for r in rows], ids)
    # A copy made on the device, not the kept array: what the trace hands out (the embedding's recorded
    # input) may be written in place, through a numpy view too, and must not change the kept one.
    return ids + 0


LEARNED_POSITIONS = {"gpt2", "gpt_bigcode", "opt", "starcoder", "bloom"}
# gemma2 adds a (B, 1, L, S) padding mask to (B, kv_heads, repeats, L, S) scores: B lines up with kv_heads.
NO_LEFT_PADDING = LEARNED_POSITIONS | {"gemma2"}


def supports_left_padding(base) -> bool:
    """True when one padded forward pass with mlx-lm's BatchKVCache equals per-prompt passes."""
    from mlx_lm.models.cache import KVCache

    if getattr(base, "model_type", None) in NO_LEFT_PADDING or not hasattr(base, "layers"):
        return False
    try:
        cache = base.make_cache() if hasattr(base, "make_cache") else [KVCache() for _ in base.layers]
    except Exception:
        return False
    return all(type(c) is KVCache for c in cache)


def check_ids(model, ids):
    vocab = model.embedding_rows
    if vocab is None:
        return
    if type(ids) is list and ids and all(type(i) is int for i in ids):  # the common case, without numpy
        low, high = min(ids), max(ids)
        if low >= 0 and high < vocab:
            return
        bad = high if high >= vocab else low
        raise InputError(f"token id {bad} is outside the vocabulary: ids run from 0 to {vocab - 1} ({vocab} entries)")
    array = np.array(ids)
    if array.size and (array.min() < 0 or array.max() >= vocab):
        bad = int(array.max()) if array.max() >= vocab else int(array.min())
        raise InputError(f"token id {bad} is outside the vocabulary: ids run from 0 to {vocab - 1} ({vocab} entries)")


def float_call(model, x):
    """Float inputs: the model's own input for non-language models, input embeddings for language models."""
    embed = model.names.find("embed") if model.embedding_rows is not None else None
    rows = list(range(x.shape[0])) if x.ndim >= 2 else [0]
    if embed is None:
        return rows, (lambda: model.model(x)), {}
    if x.ndim != 3 or x.shape[-1] != model.hidden_size:
        raise InputError(
            f"float inputs to a language model are input embeddings of shape (batch, length, {model.hidden_size}); "
            f"got {tuple(x.shape)}"
        )
    ids = mx.zeros(x.shape[:2], dtype=mx.int32)
    return rows, (lambda: model.model(ids)), {embed: lambda _: x}


def merge_groups(results, padding):
    """One dict of activations from per-length groups, left-padded to the longest like the batched path."""
    if len(results) == 1:
        return results[0][1], results[0][2]
    n_rows = sum(len(rows) for rows, _, _ in results)

    def merge(key_values):
        names = set.intersection(*[set(d) for d in key_values])
        merged = {}
        for name in names:
            arrays = [values[name] for values in key_values]
            # Only arrays whose axis 1 is the sequence (length + padding is the same in every
            # group) are padded; (batch, heads, length, dim) and the like are left out.
            if any(not isinstance(a, mx.array) or a.ndim < 2 for a in arrays) or len(
                {a.shape[1] + padding[rows[0]] for a, (rows, _, _) in zip(arrays, results)}
            ) != 1:
                continue
            pieces = [None] * n_rows
            ok = True
            for (rows, _, _), values in zip(results, key_values):
                array = values[name]
                if not isinstance(array, mx.array) or array.ndim < 2 or array.shape[0] != len(rows):
                    ok = False
                    break
                for j, row in enumerate(rows):
                    piece = array[j:j + 1]
                    pad = padding[row]
                    if pad:
                        piece = mx.concatenate([mx.zeros((1, pad) + piece.shape[2:], piece.dtype), piece], axis=1)
                    pieces[row] = piece
            if ok:
                merged[name] = mx.concatenate(pieces, axis=0)
        return merged

    return merge([o for _, o, _ in results]), merge([i for _, _, i in results])
