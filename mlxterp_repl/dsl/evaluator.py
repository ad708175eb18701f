"""The evaluator: each statement becomes one call of the `mlxterp` library.

A `Session` holds what one client has built up: the model, the current prompt, the `$`
variables and the steering in force. `Session.execute(text)` parses and runs every
statement and returns one result per statement; errors are `QueryError`s pinned to the
piece of text they are about (library errors are translated, with the span of the path,
position or file they concern).

Every forward pass that `save`, `stats`, `export`, `predict` and `lens` need goes
through `Session.activations`, which keys the run by (model, prompt tokens,
interventions in force). Given a `trace_cache` (anything with `get(key)` and
`put(key, activations, nbytes)`; `TraceCache` is an in-memory LRU bounded in bytes), it
captures every module once and answers later questions about the same run from the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp import InterpretableModel
from mlxterp.attention import token_axis
import mlxterp.interventions as iv  # (not `from mlxterp import interventions`: that recurses in mlxterp.__getattr__)
from mlxterp.core import positions as positions_rules
from mlxterp.core.statements import STATEMENTS, usage
from mlxterp.errors import Interrupted, LayerIndexError, MlxterpError, UnknownModuleError

from mlxterp_repl import safe_files
from mlxterp_repl.dsl import ast, selection
from mlxterp_repl.dsl.errors import QueryError, Span, closest
from mlxterp_repl.dsl.parser import parse, statement_name
from mlxterp.results import (TOKENS_SHOWN, ActivationStats, TableResult, TextResult, TokenPredictions, ValuesResult,
                             prompt_label, token_label, token_listing)

OUTPUT = "output"


class TraceCache:
    """Captured activations of recent runs, least recently used first out, within a byte budget.

    The budget counts what the cache really holds: each distinct array once, however many
    entries or names share it (an array stays held until the last entry holding it leaves).
    """

    def __init__(self, budget_bytes: int = 512 * 2**20):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict = OrderedDict()  # key -> activations
        self._held: dict[int, list] = {}  # id(array) -> [array, entries holding it]

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key, activations: dict, nbytes: int | None = None) -> None:
        """Hold `activations` under `key`. `nbytes` (the caller's estimate) is not trusted: the cache
        counts the distinct arrays itself."""
        if key in self._entries:
            self._release(self._entries.pop(key))
        arrays = self._distinct(activations)
        if self._new_bytes(arrays) > self.budget_bytes:
            return
        while self._entries and self.used_bytes + self._new_bytes(arrays) > self.budget_bytes:
            self._release(self._entries.popitem(last=False)[1])
        self._entries[key] = dict(activations)
        for array in arrays.values():
            held = self._held.get(id(array))
            if held is None:
                self._held[id(array)] = [array, 1]
                self.used_bytes += array.nbytes
            else:
                held[1] += 1

    @staticmethod
    def _distinct(activations: dict) -> dict:
        return {id(a): a for a in activations.values() if isinstance(a, mx.array)}

    def _new_bytes(self, arrays: dict) -> int:
        return sum(a.nbytes for i, a in arrays.items() if i not in self._held)

    def _release(self, activations: dict) -> None:
        for i, array in self._distinct(activations).items():
            held = self._held[i]
            held[1] -= 1
            if held[1] == 0:
                del self._held[i]
                self.used_bytes -= array.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._held.clear()
        self.used_bytes = 0

    def report(self, shapes: bool = True) -> dict:
        """What the cache holds, as plain data: entries, bytes, budget, hits, misses and (with
        `shapes`) per entry, least recently used first, {full module name: output shape}."""
        held = {"entries": len(self._entries), "bytes": self.used_bytes, "budget": self.budget_bytes,
                "hits": self.hits, "misses": self.misses}
        if shapes:
            held["shapes"] = [{name: [int(n) for n in array.shape] for name, array in activations.items()}
                              for activations in list(self._entries.values())]
        return held

    def __len__(self) -> int:
        return len(self._entries)


class Run:
    """What one `execute` call passes down: the callbacks, the cache and the interventions of a `with`."""

    def __init__(self, should_stop=None, on_progress=None, trace_cache=None):
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.trace_cache = trace_cache
        self.extra: list[tuple[ast.Intervention, object, str | None]] = []
        self.notes: list[str] = []  # said under the result (e.g. which call of a module it shows)


def to_numpy(array) -> np.ndarray:
    """An evaluated mx.array as float32 numpy (bfloat16 and friends go through float32)."""
    if isinstance(array, mx.array):
        if array.dtype not in (mx.float32, mx.float64):
            array = array.astype(mx.float32)
        return np.array(array)
    return np.asarray(array, dtype=np.float32)


@contextlib.contextmanager
def paused_gc(pause: bool = True):
    """Parsing a huge text builds millions of (acyclic) nodes; the collector's full passes over
    them hold the interpreter lock for up to a second, stalling the daemon's event loop."""
    import gc

    was_enabled = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause and was_enabled:
            gc.enable()


def context_length(model) -> int | None:
    """The longest input the model was built for (max_position_embeddings or its kin), or None."""
    args = getattr(getattr(model, "model", None), "args", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def memory_estimate(model, n_tokens: int) -> int:
    """Bytes one traced forward pass over `n_tokens` may hold at its peak, roughly: every
    module's output kept (about 24 hidden-size arrays a layer, float32), one layer's attention
    scores (heads x tokens x tokens, twice for the softmax) and the logits."""
    hidden, layers = int(model.hidden_size or 1), int(model.n_layers or 1)
    args = getattr(getattr(model, "model", None), "args", None)
    heads = int(getattr(args, "num_attention_heads", 0) or getattr(args, "n_head", 0) or 32)
    vocab = int(getattr(model, "vocab_size", 0) or 32000)
    return 4 * (24 * layers * n_tokens * hidden + 2 * heads * n_tokens * n_tokens + 2 * n_tokens * vocab)


def memory_budget() -> int:
    """Bytes one query may use: $MLXTERP_QUERY_MEMORY_MB, else half the memory available now."""
    explicit = os.environ.get("MLXTERP_QUERY_MEMORY_MB")
    if explicit:
        return int(float(explicit) * 2**20)
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_input_fits(model, n_tokens: int, span) -> None:
    """Refuse an input longer than the model's context, or one whose forward pass would need
    more memory than the budget (a query must never take the daemon down)."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise QueryError(f"this input has {n_tokens:,} tokens; the model takes at most {limit:,} "
                         "(max_position_embeddings): shorten it", span)
    need, budget = memory_estimate(model, n_tokens), memory_budget()
    if need > budget:
        raise QueryError(f"this input has {n_tokens:,} tokens: a forward pass would need about "
                         f"{need / 2**20:,.0f} MiB, over the budget of {budget / 2**20:,.0f} MiB "
                         "($MLXTERP_QUERY_MEMORY_MB): shorten it", span)


def load_model(source: str, layer_attr: str = "layers") -> InterpretableModel:
    """What `load` does unless a Session is given another loader."""
    return InterpretableModel(source, layer_attr=layer_attr)


class Session:
    """One client's state: model, current prompt, `$` variables, steering.

    `loader(source, layer_attr)` is what `load` calls for a model; a process holding
    several sessions passes one that hands out models it already has."""

    def __init__(self, model: InterpretableModel | None = None, workdir: str | os.PathLike | None = None,
                 loader=load_model):
        self.model = model
        self.loader = loader
        self.workdir = Path(workdir) if workdir is not None else None
        # Set by the daemon (docs/security.md): files a statement writes must stay under
        # `write_root` (relative names, no links); `may_write` False refuses every write.
        self.write_root: Path | None = None
        self.may_write = True
        # Likewise for directories a statement reads (`sae load`, `lens tuned`): only under `read_root`.
        self.read_root: Path | None = None
        self.may_read = True
        self.prompt: str | None = None
        self.variables: dict[str, ValuesResult] = {}
        self.steering: list[tuple[ast.Intervention, object, str | None]] = []
        self.saes: dict[str, tuple] = {}  # full module name -> (SAE, its source, digest): `sae load`
        self.tuned_lenses: dict[str, object] = {}  # directory -> TunedLens: `lens tuned DIR`

    # ---- running text ----

    def execute(self, text: str, should_stop=None, on_progress=None, trace_cache=None,
                max_statements: int | None = None) -> list:
        """Run every statement of `text`; one result each. Raises the first QueryError met
        (parse errors before anything runs); its `.results` holds what ran before it. A stop
        asked for (`should_stop()`) is checked between statements: Interrupted, with `.results`."""
        try:
            with paused_gc(len(text) > 100_000):
                parsed = parse(text, should_stop)
        except RecursionError:
            error = QueryError("this text is nested too deeply to read: split long expressions into several "
                               "`let` statements", Span(1, 1, 1, 2))
            error.results = []
            raise error from None
        if parsed.errors:
            error = parsed.errors[0]
            error.results = []
            raise error
        if max_statements is not None and len(parsed.statements) > max_statements:
            error = QueryError(f"this text has {len(parsed.statements):,} statements; one run takes at most "
                               f"{max_statements:,} (split it)", parsed.statements[max_statements].span)
            error.results = []
            raise error
        run = Run(should_stop, on_progress, trace_cache)
        results = []
        for index, statement in enumerate(parsed.statements):
            if should_stop is not None and index and should_stop():
                stop = Interrupted(f"stopped after {index} of {len(parsed.statements)} statements")
                stop.results = results
                raise stop
            if on_progress is not None:
                on_progress(f"{index + 1}/{len(parsed.statements)}: {statement.text}")
            try:
                results.append(self.run_statement(statement, run))
            except (QueryError, Interrupted) as error:
                error.results = results
                raise
        return results

    def execute_statement(self, statement: ast.Statement, should_stop=None, on_progress=None, trace_cache=None):
        """Run one parsed statement (for runners that go on after errors)."""
        return self.run_statement(statement, Run(should_stop, on_progress, trace_cache))

    def run_statement(self, statement: ast.Statement, run: Run):
        handler = getattr(self, STATEMENTS[statement_name(statement)].handler)  # the statement table's handler
        try:
            return handler(statement, run)
        except (QueryError, Interrupted):
            raise
        except LayerIndexError as error:
            raise QueryError(str(error), statement.span, layer_range(self.model)) from None
        except UnknownModuleError as error:
            raise QueryError(module_message(error), statement.span, error.suggestions) from None
        except MlxterpError as error:
            raise QueryError(str(error), statement.span) from None
        except RecursionError:
            raise QueryError("this statement is nested too deeply to evaluate (e.g. an expression of very many "
                             "terms): split it into several `let` statements", statement.span) from None
        except ValueError as error:  # MLX reports shapes that do not fit (an added vector, a replacement) so
            raise QueryError(f"the model run failed: {error}", statement.span) from None

    # ---- shared pieces ----

    def need_model(self, statement) -> InterpretableModel:
        if self.model is None:
            raise QueryError("no model is loaded; start with: load demo", statement.span, ["load demo"])
        return self.model

    def resolve_input(self, string: ast.String | None, statement) -> tuple[str, list[int], list[str]]:
        """(text, token ids, token strings) of `in "..."`, else of the current prompt."""
        model = self.need_model(statement)
        if string is not None:
            text, span = string.value, string.span
        elif self.prompt is not None:
            text, span = self.prompt, statement.span
        else:
            raise QueryError('no prompt is set: run prompt "..." first, or add in "..."', statement.span,
                             ['prompt "The capital of France is"'])
        try:
            ids = model.encode(text)
        except (MlxterpError, UnicodeError) as error:
            raise QueryError(f"cannot tokenize this text: {error}", span) from None
        if not ids:
            raise QueryError("this text has no tokens (and the tokenizer adds no BOS)", span)
        check_input_fits(model, len(ids), span)
        return text, ids, model.token_strings(ids)

    def expand(self, path: ast.Path) -> list[str]:
        """Full names of a path or pattern, through the library's one resolver."""
        model = self.model
        try:
            return model.expand(path.text)
        except LayerIndexError as error:
            raise QueryError(str(error), path.span, layer_range(model)) from None
        except UnknownModuleError as error:
            raise QueryError(module_message(error), path.span, error.suggestions) from None
        except MlxterpError as error:
            raise QueryError(str(error), path.span) from None

    def label(self, full_name: str) -> str:
        return self.model.short_name(full_name)

    def positions(self, node, tokens: list[str]) -> tuple[list[int], bool]:
        """Token indices a position means, and whether it names a single token (the core's rule)."""
        return selection.select(node, tokens)

    def intervention_function(self, node: ast.Intervention):
        """The `mlxterp.interventions` function for one intervention, and its cache text
        (None when the run cannot be cached: noise without a seed)."""
        self.expand(node.target)  # an unknown module is an error here, with its span
        if node.position is not None:  # `@ POSITION`: the same intervention, at those positions only
            function, key = self.intervention_function(dataclasses.replace(node, position=None))
            where = self.intervention_positions(node)
            if where is not None:
                function = iv.at_positions(function, where)
            return function, (None if key is None else f"{key} @ {node.position_text}")
        key = node.canonical()
        try:
            if node.kind == "zero":
                return iv.zero_out, key
            if node.kind == "scale":
                return iv.scale(node.numbers[0]), key
            if node.kind == "clamp":
                return iv.clamp(node.numbers[0], node.numbers[1]), key
            if node.kind == "noise":
                return iv.noise(node.numbers[0], seed=node.seed), (key if node.seed is not None else None)
            if node.kind in ("ablate", "amplify", "inject"):
                return self.feature_intervention(node)
            value = self.variable(node.var)
            if len(value.arrays) != 1:
                raise QueryError(f"${node.var.name} holds {len(value.arrays)} arrays; {node.kind} takes one",
                                 node.var.span, [label for label, _ in value.arrays])
            array = value.arrays[0][1]
            self.check_vector(node, array)
            digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
            key += f" #{digest}"
            if node.kind == "add":
                factor = node.numbers[0] if node.numbers else 1.0
                return iv.add_vector(mx.array(array) * factor), key
            return iv.replace_with(mx.array(array)), key
        except MlxterpError as error:
            raise QueryError(str(error), node.span) from None

    def intervention_positions(self, node: ast.Intervention):
        """The positions of `TARGET KIND ... @ POSITION` for `iv.at_positions` (None: every one).
        Numbers stay as written (`-1` is the last position of whatever input runs); token text
        is found in the session's prompt."""
        spec = selection.position_spec(node.position)
        items = spec if isinstance(spec, list) else [spec]
        if any(isinstance(item, str) for item in items):
            if spec == positions_rules.ALL:
                return None
            if self.prompt is None:
                raise QueryError("a position given as text is looked up in the prompt: set one with prompt "
                                 "\"...\" first, or give the position as a number", node.position.span)
            chosen, _ = selection.select(node.position, self.model.token_strings(self.model.encode(self.prompt)))
            return chosen
        return spec

    def check_vector(self, node: ast.Intervention, array) -> None:
        """`add $v` needs a vector as wide as each target's output; `replace $x` an array ending in
        that width. Checked where the intervention is written, not at the next query."""
        shape = tuple(np.shape(array))
        for full in self.expand(node.target):
            width = self.output_width(full)
            if width is None:
                continue
            label = self.label(full)
            if node.kind == "add" and shape != (width,):
                what = "is a scalar" if shape == () else f"has shape {shape}"
                raise QueryError(f"${node.var.name} {what}; add on {label} takes a vector of shape ({width},), "
                                 f"the width of {label}'s output", node.var.span)
            if node.kind == "replace" and (not shape or shape[-1] != width):
                what = "is a scalar" if shape == () else f"has shape {shape}"
                raise QueryError(f"${node.var.name} {what}; replace on {label} takes an array whose last "
                                 f"dimension is {width} (shape ({width},) or (tokens, {width}))", node.var.span)

    def output_width(self, full: str) -> int | None:
        """The last dimension of module `full`'s output: the hidden size for a layer, else from a
        one-token forward pass (remembered per model)."""
        model = self.model
        if full in model.names.layer_names and model.hidden_size:
            return model.hidden_size
        known = self.__dict__.setdefault("_output_widths", {})
        key = (id(model), full)
        if key not in known:
            with model.trace([[0]], capture=[] if full == OUTPUT else [full], keep="saved") as tr:
                value = tr.save(full)
            known[key] = int(value.shape[-1]) if value.ndim else None
        return known[key]

    def interventions_in_force(self, run: Run) -> tuple[dict, str | None]:
        """{target: function} for the trace (steering, then `with`), and the cache text."""
        steps = self.steering + run.extra
        functions = iv.combined(*[{node.target.text: function} for node, function, _ in steps])
        keys = [key for _, _, key in steps]
        canonical = None if any(k is None for k in keys) else "; ".join(keys)
        return functions, canonical

    def activations(self, ids: list[int], names: list[str], run: Run, span) -> dict[str, mx.array]:
        """Outputs (1, L, ...) of the modules `names` (full names; "output" = logits) on `ids`,
        under the interventions in force. The one way forward passes run for values."""
        model = self.model
        interventions, canonical = self.interventions_in_force(run)
        cache = run.trace_cache
        key = None if cache is None or canonical is None else (id(model), model.source, tuple(ids), canonical)
        if key is not None:
            stored = cache.get(key)
            if stored is not None and all(n in stored for n in names):
                return {n: stored[n] for n in names}
        capture = None if key is not None else [n for n in names if n != OUTPUT]
        with model.trace([ids], interventions=interventions or None, capture=capture,
                         should_stop=run.should_stop, keep="all" if key is not None else "saved") as tr:
            if key is not None:
                found = {n: tr.save(n) for n in list(tr.activations)}
                found.update({n: tr.save(n) for n in names if n not in found and n != OUTPUT})  # hook points
            else:
                found = {n: tr.save(n) for n in names}
        missing = [self.label(n) for n in names if n not in found]
        if missing:
            raise QueryError("no output in this forward pass for: " + ", ".join(missing), span)
        if key is not None:
            cache.put(key, found)
        return {n: found[n] for n in names}

    def variable(self, var: ast.Var) -> ValuesResult:
        if var.name not in self.variables:
            known = ["$" + v for v in self.variables]
            close = ["$" + c for c in closest(var.name, list(self.variables))]
            listing = ", ".join(known) if known else "none yet (save ... as $name)"
            raise QueryError(f"${var.name} is not defined; defined: {listing}", var.span, close or known)
        return self.variables[var.name]

    def bind(self, name: str, array, label: str | None = None) -> ValuesResult:
        """Make `$name` hold `array` (a value from Python: a notebook's `%mlxq --bind`, the
        daemon's `bind` op). Raises ValueError naming what was wrong."""
        from mlxterp_repl.dsl.lexer import tokenize

        tokens = tokenize("$" + name)[0] if isinstance(name, str) and name else []
        if not tokens or tokens[0].kind != "VAR" or tokens[0].value != name:
            raise ValueError(f"{name!r} is not a $ name: use letters, digits and _ (e.g. 'direction')")
        try:
            values = np.asarray(array, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"${name} must be an array of numbers, got {type(array).__name__} ({error})") from None
        result = ValuesResult([(label or name, values)], kind="let", name=name, where="bound from Python")
        self.variables[name] = result
        return result

    def values_at(self, statement, target: ast.Path, position, string, run: Run):
        """(labels, arrays at the positions, description) of a path on an input."""
        text, ids, tokens = self.resolve_input(string, statement)
        names = self.expand(target)
        chosen, single = self.positions(position, tokens)
        found = self.activations(ids, names, run, target.span)
        every = position is None or isinstance(position, ast.AllPositions)
        arrays = []
        for name in names:
            whole = to_numpy(found[name])
            array = whole[0]
            if not every:  # along the module's token axis (its known layout), less the batch axis
                try:
                    axis = token_axis(self.model, name, whole.shape, len(ids)) - 1
                except MlxterpError as error:
                    raise QueryError(str(error), position.span, ["*"]) from None
                array = np.take(array, chosen[0] if single else chosen, axis=axis)
            arrays.append((self.label(name), array))
            calls = self.model.repeated_calls.get(name)
            if calls:
                run.notes.append(f"{self.label(name)} runs {calls} times in each forward pass (RoPE: on queries, "
                                 f"then keys); shown: its last call ({calls} of {calls})")
        if single:
            where = f"at {chosen[0]} ({token_label(tokens[chosen[0]])})"
        elif len(chosen) == len(tokens):
            where = f"all {len(tokens)} positions"
        else:
            shown = [str(p) for p in chosen] if len(chosen) <= 8 else [*map(str, chosen[:6]), "…", str(chosen[-1])]
            where = f"at {len(chosen)} positions " * (len(chosen) > 8) + "at " * (len(chosen) <= 8) + ", ".join(shown)
        return arrays, f"{where} of {prompt_label(text)}"

    def plotted(self, result, node) -> None:
        """Draw the result's plot when the statement says `plot [to FILE] [overwrite]`."""
        if node.plot is not None:
            result.plot = self.plotting(result.save_plot, node.plot, getattr(node, "overwrite", False))

    def with_notes(self, result, run: Run):
        result.notes.extend(note for note in run.notes if note not in result.notes)
        texts = [node.canonical() for node, _, _ in self.steering + run.extra]
        if texts:
            result.notes.append("interventions: " + "; ".join(texts))
        return result

    def output_path(self, file: ast.String) -> Path:
        """Where a file named in a statement goes (relative to the workdir); parents are created.
        Under the daemon, only inside the session's write root (mlxterp_repl.safe_files)."""
        if not file.value.strip():
            raise QueryError("the file name is empty", file.span)
        if not self.may_write:
            raise QueryError("this session cannot write files: a TCP client writes only under the directory the "
                             "daemon was started with (mlxterp serve --write-root DIR)", file.span)
        try:
            if self.write_root is not None:
                path = safe_files.resolve_under(self.write_root, file.value)
            else:
                path = Path(file.value).expanduser()
                if not path.is_absolute() and self.workdir is not None:
                    path = self.workdir / path
            safe_files.make_parents(path)
        except safe_files.UnsafePath as error:
            raise QueryError(str(error), file.span) from None
        except OSError as error:
            raise QueryError(f"cannot create the directory {path.parent}: {error.strerror or error}", file.span) from None
        return path

    @contextlib.contextmanager
    def writing(self, path: Path, overwrite: bool, span):
        """`safe_files.replacing` with its refusals as query errors: yields a temporary file
        renamed over `path` at the end, so a crash or a full disk never leaves a partial file."""
        try:
            with safe_files.replacing(path, overwrite=overwrite) as tmp:
                yield tmp
        except FileExistsError as error:
            raise QueryError(error.strerror, span, ["overwrite"]) from None
        except safe_files.UnsafePath as error:
            raise QueryError(str(error), span) from None
        except safe_files.DiskFull as error:
            raise QueryError(error.strerror, span) from None
        except OSError as error:
            raise QueryError(f"cannot write {path}: {error.strerror or error}", span) from None

    def completion_context(self):
        """What `complete` needs to know about this session (no model run)."""
        from mlxterp_repl.dsl.complete import CompletionContext

        if self.model is None:
            return CompletionContext(variables=list(self.variables))
        tokens = []
        if self.prompt is not None:
            tokens = self.model.token_strings(self.model.encode(self.prompt))
        return CompletionContext(self.model.module_info(), self.model.n_layers, list(self.variables), tokens,
                                 table=self.model.names.table)  # the core table: module paths and hook points

    # ---- statements ----

    def do_load(self, node: ast.Load, run: Run):
        layer_attr = node.options.get("layers", "layers")
        try:
            model = self.loader(node.source.value, layer_attr)
        except (MlxterpError, OSError, ValueError) as error:
            raise QueryError(str(error), node.source.span, ["demo"]) from None
        self.model = model
        self.prompt = None
        self.steering = []
        self.saes, self.tuned_lenses = {}, {}
        return TextResult(f"loaded {model!r}", kind="load", fields={"model": model_summary(model)})

    def do_prompt(self, node: ast.Prompt, run: Run):
        self.need_model(node)
        _, ids, tokens = self.resolve_input(node.prompt, node)
        self.prompt = node.prompt.value
        message = f"prompt set: {len(ids)} tokens: " + token_listing(tokens)
        if len(tokens) > TOKENS_SHOWN:
            message += " (`tokens` lists them all)"
        return TextResult(message, kind="prompt", fields={"prompt": self.prompt, "ids": ids, "tokens": tokens})

    def do_tokens(self, node: ast.Tokens, run: Run):
        text, ids, tokens = self.resolve_input(node.input, node)
        rows = [[i, token_id, token] for i, (token_id, token) in enumerate(zip(ids, tokens))]
        return TableResult(["position", "id", "token"], rows, kind="tokens", title=prompt_label(text))

    def do_save(self, node: ast.Save, run: Run):
        self.need_model(node)
        arrays, where = self.values_at(node, node.target, node.position, node.input, run)
        result = ValuesResult(arrays, kind="save", name=node.name.name if node.name else None, where=where)
        if node.name is not None:
            self.variables[node.name.name] = result
        return self.with_notes(result, run)

    def do_stats(self, node: ast.Stats, run: Run):
        self.need_model(node)
        arrays, where = self.values_at(node, node.target, node.position, node.input, run)
        return self.with_notes(ActivationStats.of(arrays, title=where), run)

    def do_predict(self, node: ast.Predict, run: Run):
        from mlxterp.analysis import get_token_predictions, top_tokens

        model = self.need_model(node)
        top = node.top or 5
        if isinstance(node.target, ast.Var):
            if node.position is not None or node.input is not None:
                raise QueryError("'@' and 'in' apply to a module path, not to a saved $name", node.target.span)
            arrays = self.variable(node.target).arrays
        else:
            arrays, _ = self.values_at(node, node.target, node.position, node.input, run)
        parts = []
        for label, array in arrays:
            states = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
            labels = [label] if len(states) == 1 else [f"{label} [{n}]" for n in range(len(states))]
            if label == OUTPUT or (array.ndim and array.shape[-1] == model.vocab_size != model.hidden_size):
                parts.append(top_tokens(model, states, top, labels=labels))  # logits already: no decoding
            elif states.shape[-1] != model.hidden_size:
                raise QueryError(f"{label} has size {states.shape[-1]}, not the model's hidden size "
                                 f"{model.hidden_size}: predict decodes hidden states", node.target.span)
            else:
                parts.append(get_token_predictions(model, states, top_k=top, return_scores=True, labels=labels))
        result = parts[0] if len(parts) == 1 else TokenPredictions.join(parts)
        return self.with_notes(result, run)

    def patch_heads(self, node: ast.Patch, run: Run):
        """`patch heads ...`: each head's z patched from the clean run (mlxterp.attribution.head_patching)."""
        from mlxterp.attribution import head_patching

        model = self.need_model(node)
        _, _, clean_tokens = self.resolve_input(node.clean, node)
        _, _, corrupt_tokens = self.resolve_input(node.corrupt, node)
        positions = None
        if node.position is not None:
            positions = list(dict.fromkeys(self.patch_positions(node.position, clean_tokens, corrupt_tokens)))
        answers = [self.answer_id(answer) for answer in node.answers] if node.answers else None
        run.notes.extend(self.answer_warnings(node.answers or []))
        if run.should_stop is not None and run.should_stop():
            raise Interrupted("stopped before the head patching sweep ran")
        interventions, _ = self.interventions_in_force(run)
        try:
            result = head_patching(model, node.clean.value, node.corrupt.value, layers=self.layer_indices(node.layers),
                                   metric=node.metric.value if node.metric else "l2", answers=answers,
                                   positions=positions, interventions=interventions, should_stop=run.should_stop)
        except MlxterpError as error:
            raise QueryError(str(error), node.clean.span.to(node.corrupt.span)) from None
        self.plotted(result, node)
        return self.with_notes(result, run)

    def do_dla(self, node: ast.Dla, run: Run):
        from mlxterp.attribution import direct_logit_attribution

        model = self.need_model(node)
        text, _, _ = self.resolve_input(node.input, node)
        answer = wrong = None
        if node.answers:
            answer, wrong = (self.answer_id(a) for a in node.answers)
        elif node.answer is not None:
            answer = self.answer_id(node.answer)
        run.notes.extend(self.answer_warnings(node.answers or ([node.answer] if node.answer else [])))
        interventions, _ = self.interventions_in_force(run)
        result = direct_logit_attribution(model, text, answer, wrong, layers=self.layer_indices(node.layers),
                                          interventions=interventions)
        self.plotted(result, node)
        return self.with_notes(result, run)

    def do_attribute(self, node: ast.Attribute, run: Run):
        from mlxterp.attribution import attribution_patching

        model = self.need_model(node)
        answers = [self.answer_id(a) for a in node.answers]
        run.notes.extend(self.answer_warnings(node.answers))
        if self.steering or run.extra:  # the gradient pass takes no interventions: say so rather than ignore them
            run.notes.append("attribution patching runs without the interventions in force (steer / with)")
        try:
            result = attribution_patching(model, node.clean.value, node.corrupt.value, answers,
                                          layers=self.layer_indices(node.layers))
        except MlxterpError as error:
            raise QueryError(str(error), node.clean.span.to(node.corrupt.span)) from None
        self.plotted(result, node)
        return self.with_notes(result, run)

    def do_attention(self, node: ast.Attention, run: Run):
        from mlxterp import hooks
        from mlxterp.attribution import head_attention

        model = self.need_model(node)
        text, _, _ = self.resolve_input(node.input, node)
        names = self.expand(node.target)
        points = {n: hooks.point(model, n) for n in names}
        layers = {model.names.layer_index(model.resolve(n) if point is None else point.module) for n, point in points.items()}
        if len(layers) != 1 or None in layers:
            raise QueryError("attention shows the heads of one layer: give layers.N, or layers.N.attn.pattern.head[H]",
                             node.target.span, ["layers.0", "layers.0.attn.pattern.head[0]"])
        point = hooks.point(model, names[0])
        heads = point.heads if point is not None else None
        if self.steering or run.extra:
            run.notes.append("attention patterns are read without the interventions in force")
        result = head_attention(model, text, layers.pop(), heads)
        self.plotted(result, node)
        return self.with_notes(result, run)

    def do_generate(self, node: ast.Generate, run: Run):
        from mlxterp.generate import generate

        model = self.need_model(node)
        text, ids, _ = self.resolve_input(node.input, node)
        check_input_fits(model, len(ids) + node.count, node.span)
        interventions, _ = self.interventions_in_force(run)
        if run.should_stop is not None and run.should_stop():
            raise Interrupted("stopped before generating")
        streamed = []

        def on_token(step):
            streamed.append(step.text)
            if run.on_progress is not None:
                if step.step == 0:
                    run.on_progress(out=text)
                run.on_progress(out=step.text)
                run.on_progress(f"generate: {step.step + 1}/{node.count} tokens", stage="generate",
                                fraction=(step.step + 1) / node.count, text="".join(streamed))

        result = generate(model, text, node.count, interventions=interventions or None, on_token=on_token,
                          should_stop=run.should_stop, stop_at_eos=not node.ignore_eos)
        if run.on_progress is not None and streamed:
            run.on_progress(out="\n")
        if result.interrupted:
            raise Interrupted(f"stopped after {len(result.tokens)} of {node.count} tokens: {result.text!r}")
        return self.with_notes(result, run)

    def do_lens(self, node: ast.Lens, run: Run):
        model = self.need_model(node)
        text, ids, tokens = self.resolve_input(node.input, node)
        chosen, single = self.positions(node.position, tokens)
        layers = self.layer_indices(node.layers)
        shown = layers if layers is not None else list(range(model.n_layers))
        if run.should_stop is not None and run.should_stop():
            raise Interrupted("stopped before the logit lens ran")
        # The run `save` would use (served by the trace cache), decoded by the library's one lens.
        hidden = self.activations(ids, [model.names.layer_names[layer] for layer in shown], run, node.span)
        tuned = {} if node.tuned is None else {"lens": "tuned", "translators": self.tuned_lens(node.tuned)}
        result = model.logit_lens(text, layers=shown, top_k=node.top or (5 if single else 1),
                                  position=chosen[0] if single else chosen, hidden_states=hidden, **tuned)
        if node.tuned is not None:
            result.notes.append(f"tuned lens: {node.tuned.value}")
        self.plotted(result, node)
        return self.with_notes(result, run)

    def do_patch(self, node: ast.Patch, run: Run):
        model = self.need_model(node)
        if node.component.text == "heads":
            return self.patch_heads(node, run)
        metric = node.metric.value if node.metric else "l2"
        layers = self.layer_indices(node.layers)
        component = node.component.text
        try:
            probe = selection.patch_component(component)
            model.resolve(probe) if probe is not None else None
        except UnknownModuleError as error:
            raise selection.unknown_component(node.component, error) from None
        _, _, clean_tokens = self.resolve_input(node.clean, node)
        _, _, corrupt_tokens = self.resolve_input(node.corrupt, node)
        positions = None
        if node.position is not None:
            positions = list(dict.fromkeys(self.patch_positions(node.position, clean_tokens, corrupt_tokens)))
        answers = [self.answer_id(answer) for answer in node.answers] if node.answers else None
        run.notes.extend(self.answer_warnings(node.answers or []))
        if run.should_stop is not None and run.should_stop():
            raise Interrupted("stopped before the patching sweep ran")
        if not node.force:
            passes = len(layers if layers is not None else range(model.n_layers)) * len(positions or [None])
            self.refuse_long_sweep(model, node, passes, max(len(clean_tokens), len(corrupt_tokens)))
        interventions, _ = self.interventions_in_force(run)
        try:
            result = model.activation_patching(node.clean.value, node.corrupt.value, component=component,
                                               layers=layers, metric=metric, positions=positions, answers=answers,
                                               interventions=interventions, should_stop=run.should_stop)
        except MlxterpError as error:
            raise QueryError(str(error), node.clean.span.to(node.corrupt.span)) from None
        self.plotted(result, node)
        return self.with_notes(result, run)

    def refuse_long_sweep(self, model, statement, passes: int, n_tokens: int) -> None:
        """A sweep of many forward passes whose estimate (passes x one timed forward pass) is over
        a minute ($MLXTERP_LONG_SWEEP_SECONDS) is refused unless the statement says `force`."""
        if passes < 32:
            return
        limit = float(os.environ.get("MLXTERP_LONG_SWEEP_SECONDS", 60))
        started = time.perf_counter()
        mx.eval(model.model(mx.array([[0] * n_tokens])))
        estimate = passes * (time.perf_counter() - started)
        if estimate > limit:
            raise QueryError(f"this sweep runs {passes:,} forward passes of {n_tokens} tokens: about "
                             f"{estimate:,.0f} s, over {limit:g} s. Add `force` to run it anyway, or narrow "
                             "`layers` or `@`", statement.span, ["force"])

    def patch_positions(self, node, clean_tokens: list[str], corrupt_tokens: list[str]) -> list[int]:
        """The positions of `patch ... @ POSITION` (`selection.select_patch`'s rule)."""
        return selection.select_patch(node, clean_tokens, corrupt_tokens)

    def answer_id(self, answer: ast.String) -> int:
        """The token id of one `answers` string, which must be a single token (BOS aside)."""
        import warnings

        from mlxterp.analysis import answer_id

        try:
            with warnings.catch_warnings():  # said under the result instead (answer_warnings)
                warnings.simplefilter("ignore")
                return answer_id(self.model, answer.value)
        except (MlxterpError, UnicodeError) as error:
            raise QueryError(str(error), answer.span) from None

    def answer_warnings(self, answers: list) -> list[str]:
        from mlxterp.analysis import answer_warning

        return [w for w in (answer_warning(self.model, a.value) for a in answers) if w]

    # ---- tuned lens, SAEs, attention heads, causal tracing (docs/tuned-lens.md, sae.md, heads.md,
    # causal-tracing.md): one library call each ----

    def input_path(self, string: ast.String) -> str:
        """A directory a statement reads (relative to the workdir); `demo` names the bundled one."""
        if string.value == "demo":
            return "demo"
        if not self.may_read:
            raise QueryError("a TCP client reads directories only under the daemon's --write-root (this daemon "
                             "has none): use `demo`, or start the daemon with --write-root DIR", string.span, ["demo"])
        if self.read_root is not None:
            try:
                return str(safe_files.resolve_under(self.read_root, string.value))
            except safe_files.UnsafePath as error:
                raise QueryError(str(error), string.span) from None
        path = Path(string.value).expanduser()
        if not path.is_absolute() and self.workdir is not None:
            path = self.workdir / path
        return str(path)

    def tuned_lens(self, directory: ast.String):
        """The tuned lens saved in `directory`, loaded once per session (`lens tuned DIR`)."""
        from mlxterp.tuned_lens import load_tuned_lens

        path = self.input_path(directory)
        if path not in self.tuned_lenses:
            try:
                lens = load_tuned_lens(path)
                lens.check_model(self.model)
            except (MlxterpError, OSError, ValueError) as error:
                raise QueryError(str(error), directory.span, ["demo"]) from None
            self.tuned_lenses[path] = lens
        return self.tuned_lenses[path]

    def sae_for(self, path: ast.Path):
        """(full module name, the SAE loaded for it with `sae load`) of a path naming one module."""
        names = self.expand(path)
        if len(names) != 1:
            raise QueryError(f"{path.text} names {len(names)} modules; an SAE reads one", path.span)
        if names[0] not in self.saes:
            loaded = [self.label(n) for n in self.saes]
            listing = ("SAEs are loaded for: " + ", ".join(loaded)) if loaded else "no SAE is loaded"
            raise QueryError(f"no SAE is loaded for {self.label(names[0])} ({listing}); load one with: "
                             "sae load DIR", path.span, loaded or ["sae load demo"])
        return names[0], self.saes[names[0]][0]

    def feature_intervention(self, node: ast.Intervention):
        """`ablate F`, `amplify F K`, `inject F A`: the intervention of feature F of the target's SAE
        (`sae.ablate`, `sae.scale`, `sae.steer`) and its cache text (which names the SAE's weights)."""
        full, sae = self.sae_for(node.target)
        feature = node.numbers[0]
        if not float(feature).is_integer():
            raise QueryError(f"a feature is a whole number from 0 to {sae.n_features - 1}, not {feature:g}", node.span)
        feature = int(feature)
        if node.kind == "ablate":
            function = sae.ablate(feature)
        elif node.kind == "amplify":
            function = sae.scale(feature, node.numbers[1])
        else:
            function = sae.steer(feature, node.numbers[1])
        return function, f"{node.canonical()} #sae:{self.saes[full][2]}"

    def do_sae(self, node: ast.Sae, run: Run):
        model = self.need_model(node)
        if node.source is not None:
            from mlxterp.sae import load_sae

            try:
                sae = load_sae(self.input_path(node.source))
                if not sae.module:
                    raise MlxterpError("this SAE does not say which module it reads (its config.json has no "
                                       "module); set sae.module and save it again")
                full = model.resolve(sae.module)
            except (MlxterpError, OSError, ValueError) as error:
                raise QueryError(str(error), node.source.span, ["demo"]) from None
            width = self.output_width(full)
            if width is not None and width != sae.d_model:
                raise QueryError(f"this SAE reads activations of width {sae.d_model}; {self.label(full)} outputs "
                                 f"width {width}", node.source.span)
            digest = hashlib.sha1(np.asarray(sae.W_dec).tobytes() + np.asarray(sae.b_enc).tobytes()).hexdigest()[:16]
            self.saes[full] = (sae, node.source.value, digest)
        rows = [[self.label(full), sae.kind, sae.n_features, sae.k if sae.kind != "relu" else "-", source]
                for full, (sae, source, _) in self.saes.items()]
        title = f"loaded an SAE for {rows[-1][0]}" if node.source is not None else "SAEs loaded"
        return TableResult(["module", "kind", "features", "k", "from"], rows, kind="sae", title=title)

    def do_features(self, node: ast.Features, run: Run):
        from mlxterp.sae import active_features

        model = self.need_model(node)
        _, sae = self.sae_for(node.target)
        _, ids, tokens = self.resolve_input(node.input, node)
        if node.position is None:
            position = len(ids) - 1
        else:
            chosen, single = self.positions(node.position, tokens)
            if not single:
                raise QueryError("features reads one position, like @ -1 or @ \"France\"", node.position.span,
                                 ["-1"])
            position = chosen[0]
        if run.should_stop is not None and run.should_stop():
            raise Interrupted("stopped before the SAE features were read")
        interventions, _ = self.interventions_in_force(run)
        result = active_features(model, sae, ids, position=position, top=node.top or 10,
                                 interventions=interventions or None)
        return self.with_notes(result, run)

    def do_heads(self, node: ast.Heads, run: Run):
        from mlxterp.heads import head_scores

        model = self.need_model(node)
        text = self.resolve_input(node.input, node)[0] if node.input is not None else None
        result = head_scores(model, node.kind.value if node.kind else None, text=text,
                             layers=self.layer_indices(node.layers))
        self.plotted(result, node)
        if self.steering:
            result.notes.append("head scores are measured without the steering in force")
        return result

    def do_causal(self, node: ast.Causal, run: Run):
        from mlxterp.causal_tracing import causal_trace
        from mlxterp.errors import PositionError

        model = self.need_model(node)
        text, _, _ = self.resolve_input(node.input, node)
        answer = self.answer_id(node.answer) if node.answer is not None else None
        try:
            result = causal_trace(model, text, node.subject.value, answer, layers=self.layer_indices(node.layers),
                                  should_stop=run.should_stop)
        except PositionError as error:
            raise QueryError(str(error), node.subject.span, error.suggestions or error.valid) from None
        result.notes.extend(self.answer_warnings([node.answer] if node.answer is not None else []))
        self.plotted(result, node)
        if self.steering:
            result.notes.append("causal tracing runs without the steering in force")
        return result

    def do_with(self, node: ast.With, run: Run):
        self.need_model(node)
        added = [(i, *self.intervention_function(i)) for i in node.interventions]
        inner = Run(run.should_stop, run.on_progress, run.trace_cache)
        inner.extra = run.extra + added
        return self.run_statement(node.body, inner)

    def do_steer(self, node: ast.Steer, run: Run):
        self.need_model(node)
        if node.clear:
            count = len(self.steering)
            self.steering = []
            return TextResult(f"steering cleared ({count} removed)", kind="steer", fields={"steering": []})
        for intervention in node.interventions:
            self.steering.append((intervention, *self.intervention_function(intervention)))
        texts = [i.canonical() for i, _, _ in self.steering]
        message = "steering: " + "; ".join(texts) if texts else "no steering in force"
        return TextResult(message, kind="steer", fields={"steering": texts})

    def do_let(self, node: ast.Let, run: Run):
        value = self.evaluate(node.expr)
        arrays = value if isinstance(value, list) else [(expression_text(node.expr), np.asarray(value, np.float32))]
        result = ValuesResult(arrays, kind="let", name=node.name.name, where=node.text.split("=", 1)[1].strip())
        self.variables[node.name.name] = result
        return result

    def do_ls(self, node: ast.Ls, run: Run):
        model = self.need_model(node)
        info = model.module_info()
        if node.path is None:
            # outside the layers every module; of the layers only their count and first layer's type
            rows = [[m["name"], m["type"], m["params"]] for m in info if m["layer"] is None and m["name"] != "model"]
            if model.n_layers:
                first = next(m for m in info if m["full_name"] == model.names.layer_names[0])
                rows.append([f"layers.0..{model.n_layers - 1}", f"{first['type']} x{model.n_layers}", first["params"]])
            title = "modules (ls layers.0 for one layer)"
        else:
            roots = self.expand(node.path)
            rows = [[m["name"], m["type"], m["params"]] for m in info
                    if any(m["full_name"] == r or m["full_name"].startswith(r + ".") for r in roots)]
            title = node.path.text
        return TableResult(["module", "type", "params"], rows, kind="ls", title=title)

    def do_export(self, node: ast.Export, run: Run):
        self.need_model(node)
        path = self.output_path(node.file)
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".safetensors"):
            raise QueryError(f"export writes .npz or .safetensors files, not {suffix or 'a file without suffix'}",
                             node.file.span, [path.stem + ".npz", path.stem + ".safetensors"])
        if isinstance(node.source, ast.Var):
            arrays = self.variable(node.source).arrays
        else:
            arrays, _ = self.values_at(node, node.source, node.position, node.input, run)
        named = {}
        for label, array in arrays:
            key = label if label not in named else f"{label}_{len(named)}"
            named[key] = np.asarray(array, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        try:
            with self.writing(path, getattr(node, "overwrite", False), node.file.span) as tmp:
                if suffix == ".npz":
                    np.savez(tmp, **named)
                else:
                    from safetensors.numpy import save_file

                    save_file(named, str(tmp))
        except (ValueError, TypeError) as error:
            raise QueryError(f"cannot write {path}: {error}", node.file.span) from None
        rows = [[key, str(tuple(a.shape)), str(a.dtype)] for key, a in named.items()]
        return TableResult(["array", "shape", "dtype"], rows, kind="export", title=f"wrote {path}",
                           fields={"file": str(path), "bytes": path.stat().st_size})

    def do_info(self, node: ast.Info, run: Run):
        model = self.need_model(node)
        summary = model_summary(model)
        summary["prompt"] = self.prompt
        summary["variables"] = ["$" + v for v in self.variables]
        summary["steering"] = [i.canonical() for i, _, _ in self.steering]
        rows = [[key, str(value)] for key, value in summary.items()]
        fields = {"model": summary}
        if run.trace_cache is not None and hasattr(run.trace_cache, "report"):
            held = run.trace_cache.report(shapes=False)
            fields["cache"] = held
            entries = f"{held['entries']} " + ("entry" if held["entries"] == 1 else "entries")
            rows.append(["trace cache", f"{entries}, {held['bytes'] / 2**20:.1f} MiB used of "
                                        f"{held['budget'] / 2**20:.0f} MiB"])
        return TableResult(["", ""], rows, kind="info", title=repr(model), fields=fields)

    def do_help(self, node: ast.Help, run: Run):
        if node.topic is None:
            rows = [[name, spec.syntax, spec.summary] for name, spec in STATEMENTS.items()]
            return TableResult(["statement", "syntax", "does"], rows, kind="help", title="statements")
        topic = node.topic.value
        if topic not in STATEMENTS:
            raise QueryError(f"no statement named {topic!r}", node.topic.span,
                             closest(topic, STATEMENTS) or list(STATEMENTS))
        spec = STATEMENTS[topic]
        return TextResult(usage(topic), kind="help",
                          fields={"statement": topic, "syntax": spec.syntax})

    # ---- helpers of statements ----

    def layer_indices(self, layers: ast.Layers | None) -> list[int] | None:
        return selection.layers(layers, self.model.n_layers)

    PLOT_FORMATS = (".png", ".svg", ".pdf")

    def plot_path(self, plot: ast.Plot) -> str | None:
        """The file of `plot to FILE` (relative to the workdir), or None for the default."""
        if not plot.file:
            return None
        path = self.output_path(ast.String(span=plot.span, value=plot.file))
        if path.suffix.lower() not in self.PLOT_FORMATS:
            raise QueryError(f"a plot is written as .png, .svg or .pdf, not {path.suffix or 'a file without suffix'}",
                             plot.span, [path.stem + s for s in self.PLOT_FORMATS])
        return str(path)

    def plotting(self, draw, plot: ast.Plot, overwrite: bool = False) -> str:
        """`draw(path)` writes the plot: into a temporary file renamed over `plot to FILE`
        (see `writing`), or to the library's default place."""
        try:
            target = self.plot_path(plot)
            if target is None:
                return draw(None)
            with self.writing(Path(target), overwrite, plot.span) as tmp:
                draw(str(tmp))
            return target
        except MlxterpError as error:
            raise QueryError(str(error), plot.span) from None
        except OSError as error:
            raise QueryError(f"cannot write the plot: {error.strerror or error}", plot.span) from None

    # ---- let ----

    def evaluate(self, expr):
        """A let expression: a float, or a list of (label, array)."""
        if isinstance(expr, ast.Number):
            return float(expr.value)
        if isinstance(expr, ast.Var):
            return [(label, array.astype(np.float32)) for label, array in self.variable(expr).arrays]
        if isinstance(expr, ast.Negate):
            return combine("*", -1.0, self.evaluate(expr.operand), expr)
        if isinstance(expr, ast.BinOp):
            return combine(expr.op, self.evaluate(expr.left), self.evaluate(expr.right), expr)
        if isinstance(expr, ast.Call):
            value = self.evaluate(expr.argument)
            if not isinstance(value, list):
                raise QueryError(f"{expr.function}() takes a $name, not a number", expr.argument.span)
            return call(expr.function, value, expr)
        raise QueryError("not an expression", expr.span)


# ---- plain helpers ----------------------------------------------------------------------


def layer_range(model) -> list[str]:
    if model is None or not model.n_layers:
        return []
    n = model.n_layers
    return [f"0..{n - 1}", f"-{n}..-1"]


def module_message(error: UnknownModuleError) -> str:
    """The library's message without its "did you mean" tail (the suggestions show it)."""
    return str(error).split("; did you mean", 1)[0]


def token_list(tokens: list[str]) -> list[str]:
    return [f"{i}:{token_label(t)}" for i, t in enumerate(tokens)]


def model_summary(model) -> dict:
    return {
        "source": model.source,
        "type": type(model.model).__name__,
        "layers": model.n_layers,
        "hidden_size": model.hidden_size,
        "vocab_size": model.vocab_size if model.tokenizer is not None else None,
        "parameters": int(sum(p.size for p in model.parameters().values())),
    }


def expression_text(expr) -> str:
    if isinstance(expr, ast.Number):
        return f"{expr.value:g}"
    if isinstance(expr, ast.Var):
        return "$" + expr.name
    if isinstance(expr, ast.Negate):
        return "-" + expression_text(expr.operand)
    if isinstance(expr, ast.BinOp):
        return f"{expression_text(expr.left)} {expr.op} {expression_text(expr.right)}"
    if isinstance(expr, ast.Call):
        return f"{expr.function}({expression_text(expr.argument)})"
    return "?"


def combine(op: str, left, right, expr):
    """`left op right` where each side is a float or a list of (label, array)."""
    def apply(a, b):
        with np.errstate(all="ignore"):
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            return a / b

    if not isinstance(left, list) and not isinstance(right, list):
        return apply(left, right)
    if not isinstance(left, list) or not isinstance(right, list):
        scalar, arrays = (left, right) if not isinstance(left, list) else (right, left)
        scalar_first = not isinstance(left, list)
        return [(label, (apply(scalar, a) if scalar_first else apply(a, scalar)).astype(np.float32))
                for label, a in arrays]
    if len(left) != len(right) and 1 not in (len(left), len(right)):
        raise QueryError(f"cannot combine {len(left)} arrays with {len(right)} arrays", expr.span)
    pairs = list(zip(left, right)) if len(left) == len(right) else (
        [(l, right[0]) for l in left] if len(right) == 1 else [(left[0], r) for r in right])
    out = []
    for (label_a, a), (label_b, b) in pairs:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise QueryError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit together for {op!r}",
                             expr.span) from None
        label = label_a if label_a == label_b else f"{label_a} {op} {label_b}"
        out.append((label, apply(a, b).astype(np.float32)))
    return out


def call(function: str, value: list, expr):
    """mean(): of several arrays, their average; of one, the average over its first axis.
    norm(): the L2 norm over the last axis of each array."""
    if function == "norm":
        return [(f"norm({label})", np.asarray(np.linalg.norm(a.astype(np.float64), axis=-1) if a.ndim else abs(a),
                                               np.float32)) for label, a in value]
    if len(value) > 1:
        shapes = {a.shape for _, a in value}
        if len(shapes) > 1:
            raise QueryError("mean() of arrays with different shapes: " + ", ".join(str(s) for s in shapes), expr.span)
        return [(f"mean of {len(value)}", np.mean([a for _, a in value], axis=0).astype(np.float32))]
    label, array = value[0]
    return [(f"mean({label})", np.asarray(array.mean(axis=0) if array.ndim else array, np.float32))]
