"""Collecting activations of many prompts: in memory, in batches, or streamed to disk.

``get_activations(model, prompts, layers, positions=-1)`` runs the prompts as
one left-padded batch and keeps, per layer, the activation at the given token
positions of each prompt: ``{"layer_3": (n, hidden)}``, or ``(n, n_positions,
hidden)`` for a list of positions. Positions count in each prompt's own
tokens (0 is its first token, -1 its last), whatever the padding.

``batch_get_activations`` does the same ``batch_size`` prompts at a time
(prompts of similar length batched together, results in the caller's order),
shows a progress bar when the run takes more than a few seconds, and with
``out=PATH`` streams the results to safetensors shards instead of memory;
``load_activations(PATH)`` reads them back (``iter_activation_shards`` one
shard at a time for data sets larger than memory).

Past one machine (``group=``, an ``mx.distributed`` group started by
``mlx.launch``): shard ``k`` (prompts ``k*shard_size`` ...) is computed by
process ``k % size``, so every shard holds exactly what a one-process run
writes. Each process writes its own shards; process 0 writes ``meta.json``
(the index the loader reads) once all are done. ``run.json`` describes the
run: the same call on a directory holding some of its shards (a stopped run)
computes only the missing ones. Without ``out`` every process gets all the
results.
"""

import hashlib

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from . import distributed
from .analysis import layer_list
from .attention import token_axis
from .errors import InputError, Interrupted

PROGRESS_AFTER_SECONDS = 2.0
SHARD_INDEX = "index"


def get_activations(model, prompts, layers=None, positions: Union[None, int, Sequence[int]] = -1) -> Dict[str, mx.array]:
    """Activations of ``layers`` at ``positions`` for every prompt, as one batch.

    ``layers``: what ``mlxterp collect --layers`` takes, as a list or one string: layer
    indices and ranges (``3``, ``-1``, ``"0..5"``, ``"3,8"``) and module names or patterns
    (``"layers.3.mlp"``, ``"layers.*.attn"``); ``None``: every layer. Keys are one style:
    ``"layer_3"`` for a whole layer (however it was named), the module's short name
    (``"layers.3.self_attn"``) for anything else. ``positions``: ``None`` is the default, -1.
    """
    positions = -1 if positions is None else positions
    prompts = _prompt_list(prompts)
    targets = _targets(model, layers)
    several = not isinstance(positions, int)
    position_list = _position_list(positions)

    with model.trace(prompts, capture=list(targets.values())) as tr:
        outputs = {key: tr.save(name) for key, name in targets.items()}
    length = len(tr.tokens[0]) + tr.padding[0] if tr.tokens else next(iter(outputs.values())).shape[1]
    index = _gather_index(tr.tokens, tr.padding, length, position_list, prompts)
    result = {}
    for key, activation in outputs.items():
        # Positions index the token axis of the module's layout (RoPE: (batch, heads, tokens, head_dim)).
        axis = token_axis(model, targets[key], activation.shape, length)
        tokens_second = mx.moveaxis(activation, axis, 1) if axis != 1 else activation
        picked = mx.take_along_axis(tokens_second, index.reshape(index.shape + (1,) * (activation.ndim - 2)), axis=1)
        result[key] = picked if several else picked[:, 0]
    mx.eval(result)
    return result


def batch_get_activations(model, prompts, layers=None, batch_size: Optional[int] = 32,
                          positions: Union[None, int, Sequence[int]] = -1, out: Optional[Union[str, Path]] = None,
                          shard_size: Optional[int] = 4096, progress: Optional[bool] = None, group=None,
                          should_stop=None):
    """``get_activations`` over ``prompts`` in batches of ``batch_size``.

    Returns ``{key: array (n, ...)}`` in the order of ``prompts``; with ``out``
    writes safetensors shards of ``shard_size`` prompts to that directory and
    returns its path (read it with ``load_activations``). ``progress``: ``None``
    shows a bar only when the run looks longer than a few seconds. ``group``:
    split the prompts over the processes of an ``mx.distributed`` group (every
    process calls this with the same arguments); the bar shows on process 0.
    ``layers`` and ``positions`` as ``get_activations`` takes them; ``None`` for
    ``batch_size``/``shard_size``/``positions`` is their default. ``should_stop()`` is asked
    before each batch of a run in one process; when it says True the run raises ``Interrupted``
    (shards already written stay, and the same call resumes from them).
    """
    batch_size = 32 if batch_size is None else batch_size
    shard_size = 4096 if shard_size is None else shard_size
    positions = -1 if positions is None else positions
    prompts = _prompt_list(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if should_stop is not None and distributed.is_distributed(group):
        # processes hold different numbers of batches: a per-batch vote would wait forever
        raise InputError("should_stop= works in one process; stop a split collection by ending its launcher")
    shard_size = max(batch_size, (shard_size // batch_size) * batch_size)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    starts = list(range(0, len(prompts), shard_size))
    mine = [k for k in range(len(starts)) if k % size == rank]
    writer = None
    if out is not None:
        run = _run_description(model, prompts, layers, positions, batch_size, shard_size)
        writer = ShardWriter(out, n_prompts=len(prompts), run=run, group=group)

    def n_batches(k):
        return (min(shard_size, len(prompts) - starts[k]) + batch_size - 1) // batch_size

    bar = _LazyProgress(sum(n_batches(k) for k in mine), enabled=progress if rank == 0 else False,
                        label="Collecting activations" + (f" (process 0 of {size})" if size > 1 else ""))
    collected: Dict[str, List[mx.array]] = {}
    windows: List[Tuple[int, Dict[str, mx.array]]] = []
    try:
        for k in mine:
            start = starts[k]
            if writer is not None and writer.done(k):
                bar.advance(n_batches(k))
                continue
            window = list(range(start, min(start + shard_size, len(prompts))))
            # Similar lengths in one batch means little padding; results go back to prompt order.
            window.sort(key=lambda i: len(prompts[i]))
            pieces: Dict[str, List[Tuple[List[int], mx.array]]] = {}
            for b in range(0, len(window), batch_size):
                if should_stop is not None and should_stop():
                    raise Interrupted(f"collection stopped before prompt {start + b} of {len(prompts)}"
                                      + ("; the shards written so far are kept, and the same call resumes" if out else ""))
                rows = window[b:b + batch_size]
                acts = get_activations(model, [prompts[i] for i in rows], layers, positions)
                for key, value in acts.items():
                    pieces.setdefault(key, []).append((rows, value))
                bar.advance()
            ordered = {key: _in_prompt_order(parts, start) for key, parts in pieces.items()}
            if writer is not None:
                writer.write(ordered, first_index=start, number=k)
            elif size > 1:
                windows.append((start, ordered))
            else:
                for key, value in ordered.items():
                    collected.setdefault(key, []).append(value)
    finally:
        bar.close()
    if writer is not None:
        return writer.finish([(starts[k], min(shard_size, len(prompts) - starts[k])) for k in range(len(starts))])
    if size > 1:
        return _gather_rows(windows, len(prompts), group)
    return {key: mx.concatenate(parts, axis=0) for key, parts in collected.items()}


def _run_description(model, prompts, layers, positions, batch_size, shard_size) -> dict:
    """What makes shards of one run interchangeable: resuming needs all of it to match."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    layer_list_ = None if layers is None else [layers] if isinstance(layers, (int, str)) else list(layers)
    return {
        "n_prompts": len(prompts), "prompts_sha256": digest, "layers": layer_list_,
        "positions": positions if isinstance(positions, int) else list(positions),
        "batch_size": batch_size, "shard_size": shard_size,
        "model": f"{type(model.model).__name__}, {model.n_layers} layers, hidden {model.hidden_size}",
    }


def _gather_rows(windows, n_prompts: int, group) -> Dict[str, mx.array]:
    """Every process's rows, in prompt order, on every process (one all_sum per key)."""
    described = {key: [list(v.shape[1:]), str(v.dtype)] for _, arrays in windows[:1] for key, v in arrays.items()}
    for raw in distributed.all_gather_bytes(json.dumps(described).encode(), group):
        described.update(json.loads(raw))
    dtypes = {str(d): d for d in distributed.DTYPES}
    result = {}
    for key in sorted(described):
        shape, dtype = described[key]
        full = mx.zeros([n_prompts] + shape, dtype=dtypes[dtype])
        for start, arrays in windows:
            full[start:start + arrays[key].shape[0]] = arrays[key]
        result[key] = mx.distributed.all_sum(full, group=group)
        mx.eval(result[key])
    return result


def _in_prompt_order(parts, start: int) -> mx.array:
    rows = [r for rs, _ in parts for r in rs]
    values = mx.concatenate([v for _, v in parts], axis=0)
    order = sorted(range(len(rows)), key=lambda k: rows[k])
    result = values[mx.array(order)]
    mx.eval(result)
    return result


# -- shards on disk ----------------------------------------------------------------

class ShardWriter:
    """Writes ``shard-00000.safetensors``, ... plus ``run.json`` and (at the end) ``meta.json`` into one directory.

    Shard ``k`` is the ``k``-th window of prompts, whichever process writes
    it; a shard file appears whole (written aside, then renamed), so a
    stopped run leaves only finished shards behind.
    """

    def __init__(self, directory, n_prompts: int, run: Optional[dict] = None, group=None):
        self.directory = Path(directory).expanduser()
        self.n_prompts = n_prompts
        self.run = run or {"n_prompts": n_prompts}
        self.group = group
        self.keys: dict = {}
        self.key_order: List[str] = []  # as the caller asked (safetensors files do not keep an order)
        run_file = self.directory / "run.json"
        if self.directory.exists() and any(self.directory.glob("shard-*.safetensors")):
            if not run_file.exists():
                raise InputError(f"{self.directory} already holds activation shards; give an empty or new directory")
            earlier = _read_json(run_file, "run the same command again after deleting it to resume; the shards "
                                            "already written are kept if the arguments are the same")
            changed = sorted(k for k in set(earlier) | set(self.run) if earlier.get(k) != self.run.get(k))
            if changed:
                raise InputError(
                    f"{self.directory} already holds activation shards of a different run (it differs in "
                    f"{', '.join(changed)}); give an empty or new directory, or the same arguments to resume it"
                )
        distributed.barrier(group)
        if group is None or group.rank() == 0:
            self._write_run_file(run_file)
        distributed.barrier(group)
        if not run_file.exists():  # another machine's disk: each process keeps its own copy
            self._write_run_file(run_file)

    def _write_run_file(self, run_file: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not run_file.exists():
            _write_atomic(run_file, json.dumps(self.run, indent=1).encode())

    def path(self, number: int) -> Path:
        return self.directory / f"shard-{number:05d}.safetensors"

    def done(self, number: int) -> bool:
        """True when shard ``number`` was written by an earlier (stopped) run: it is skipped."""
        return self.path(number).exists()

    def write(self, arrays: Dict[str, mx.array], first_index: int, number: Optional[int] = None) -> None:
        n = next(iter(arrays.values())).shape[0]
        number = len(list(self.directory.glob("shard-*.safetensors"))) if number is None else number
        tensors = dict(arrays)
        self.key_order = self.key_order or list(arrays)
        tensors[SHARD_INDEX] = mx.arange(first_index, first_index + n, dtype=mx.int64)
        aside = self.directory / f".writing-{number:05d}.safetensors"
        try:
            mx.save_safetensors(str(aside), tensors)
            _fsync(aside)
            os.replace(aside, self.path(number))
        except BaseException as error:
            full = _disk_full(error, aside)
            _remove(aside)
            if full:
                _raise_disk_full(self.path(number))
            raise

    def finish(self, windows: List[Tuple[int, int]]) -> Path:
        """Once every process is done, process 0 writes ``meta.json``: shards ``(first, count)`` in order."""
        distributed.barrier(self.group)
        if self.group is None or self.group.rank() == 0:
            arrays = mx.load(str(self.path(0)))
            names = [k for k in self.key_order if k in arrays] + sorted(k for k in arrays if k not in self.key_order)
            keys = {k: {"shape": list(arrays[k].shape[1:]), "dtype": str(arrays[k].dtype)}
                    for k in names if k != SHARD_INDEX}
            shards = [{"file": self.path(k).name, "first": first, "count": count}
                      for k, (first, count) in enumerate(windows)]
            meta = {"n_prompts": self.n_prompts, "keys": keys, "shards": shards,
                    "processes": self.group.size() if self.group is not None else 1}
            _write_atomic(self.directory / "meta.json", json.dumps(meta, indent=1).encode())
        distributed.barrier(self.group)
        return self.directory


def _read_json(path: Path, advice: str):
    """A metadata file, or an InputError saying it is damaged (a run stopped while writing it,
    before writes were atomic, or a copy cut short) and what to do."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is damaged (truncated or not JSON: {error}); {advice}") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _disk_full(error: BaseException, path: Path) -> bool:
    """Whether a failed write failed for want of space (MLX says only "Unable to write": then
    the file system is asked, before the partial file is removed)."""
    if isinstance(error, OSError):
        return error.errno in (28, 122)  # ENOSPC, EDQUOT
    if "Unable to write" not in str(error):
        return False
    try:
        info = os.statvfs(path.parent)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < 1024 * 1024


def _raise_disk_full(path: Path) -> None:
    raise InputError(f"the disk is full: {path} was not written (no partial file is left); free space and "
                     "run the same command again to resume") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a metadata file whole or not at all: temporary file, fsync, rename."""
    aside = path.with_name(f".writing-{path.name}")
    try:
        with open(aside, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(aside, path)
    except BaseException as error:
        full = _disk_full(error, aside)
        _remove(aside)
        if full:
            _raise_disk_full(path)
        raise


def iter_activation_shards(directory, keys: Optional[Iterable[str]] = None) -> Iterator[Dict[str, mx.array]]:
    """Yield each shard as ``{key: array, "index": prompt indices}``, in prompt order."""
    directory = Path(directory).expanduser()
    meta_file = directory / "meta.json"
    if not meta_file.exists() and (directory / "run.json").exists():
        found = len(list(directory.glob("shard-*.safetensors")))
        raise InputError(f"the collection in {directory} did not finish ({found} shards written, no meta.json); "
                         "run the same command again to resume it")
    if not meta_file.exists():
        raise InputError(f"{directory} is not an activation directory (no meta.json); "
                         "write one with batch_get_activations(..., out=PATH)")
    meta = _read_json(meta_file, "run the collection's command again: it keeps the shards written and writes "
                                 "meta.json anew")
    wanted = None if keys is None else set(keys) | {SHARD_INDEX}
    if wanted is not None:
        unknown = wanted - set(meta["keys"]) - {SHARD_INDEX}
        if unknown:
            raise InputError(f"no activations named {sorted(unknown)} in {directory}; it has {sorted(meta['keys'])}")
    for shard in meta["shards"]:
        if not (directory / shard["file"]).exists():
            raise InputError(f"{directory} lacks {shard['file']} (prompts {shard['first']}.."
                             f"{shard['first'] + shard['count'] - 1}); when processes on several machines wrote "
                             "the shards, copy them all into this directory")
        arrays = mx.load(str(directory / shard["file"]))
        yield {k: v for k, v in arrays.items() if wanted is None or k in wanted}


def load_activations(directory, keys: Optional[Iterable[str]] = None) -> Dict[str, mx.array]:
    """All shards of ``directory`` concatenated: ``{key: array (n_prompts, ...)}``."""
    parts: Dict[str, List[mx.array]] = {}
    for shard in iter_activation_shards(directory, keys):
        for key, value in shard.items():
            if key != SHARD_INDEX:
                parts.setdefault(key, []).append(value)
    return {key: mx.concatenate(values, axis=0) for key, values in parts.items()}


# -- helpers -------------------------------------------------------------------------

def _prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    if not all(isinstance(p, str) for p in prompts) and not all(isinstance(p, (list, tuple)) for p in prompts):
        raise InputError("prompts are strings or lists of token ids")
    return prompts


def _targets(model, layers) -> Dict[str, str]:
    """{result key: full module name} for layer indices, ranges and module names or patterns
    (the forms ``mlxterp collect --layers`` takes); None: every layer."""
    from .core.paths import parse_layers

    if layers is None:
        layers = list(range(model.n_layers))
    if isinstance(layers, (int, str)):
        layers = [layers]
    fulls = []
    for item in layers:
        if not isinstance(item, str):
            fulls += [model.names.layer_names[layer] for layer in layer_list(model, [item])]
            continue
        selection = parse_layers(item)
        parts = [item] if selection is not None else _comma_parts(item)
        for part in parts:
            selection = parse_layers(part)
            if selection is not None and selection.kind != "all":
                fulls += [model.names.layer_names[i] for i in selection.indices(model.n_layers)]
            elif selection is not None:
                fulls += list(model.names.layer_names)
            else:
                fulls += model.expand(part)
    targets = {}
    for full in fulls:
        layer = model.names.layer_index(full)
        whole_layer = layer is not None and model.names.layer_names[layer] == full
        targets[f"layer_{layer}" if whole_layer else model.short_name(full)] = full
    if not targets:
        raise InputError("no layers given: pass layer indices like [3, 8], ranges like '0..5', "
                         "or names like 'layers.3.mlp' / 'layers.*.attn'")
    return targets


def _comma_parts(text: str) -> List[str]:
    """``"3,8,layers.[1,2].attn"`` -> its parts, split at commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def _position_list(positions) -> List[int]:
    values = [positions] if isinstance(positions, int) else list(positions)
    if not values or not all(isinstance(p, int) and not isinstance(p, bool) for p in values):
        raise InputError(f"positions are an integer or a list of integers, got {positions!r}")
    return values


def _gather_index(tokens, padding, length: int, positions: List[int], prompts) -> mx.array:
    """(n, n_positions) indices into the padded batch for each prompt's own positions."""
    if tokens is None:
        tokens = [[0] * length]
        padding = [0]
    rows = []
    for row, seq in enumerate(tokens):
        pad = padding[row] if padding else length - len(seq)
        n = len(seq)
        indices = []
        for p in positions:
            if not -n <= p < n:
                raise InputError(
                    f"position {p} is outside prompt {row} ({prompts[row]!r}), which has {n} tokens"
                )
            indices.append(pad + (p % n))
        rows.append(indices)
    return mx.array(rows)


class _LazyProgress:
    """A rich progress bar that appears only once the run looks longer than a few seconds."""

    def __init__(self, total: int, enabled: Optional[bool], label: str = "Collecting activations"):
        self.label = label
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.started = time.monotonic()
        self.progress = None
        self.task = None

    def advance(self, n: int = 1):
        self.done += n
        if self.progress is None and self.enabled is not False and self.done < self.total:
            elapsed = time.monotonic() - self.started
            expected = elapsed / self.done * self.total
            if self.enabled or expected > PROGRESS_AFTER_SECONDS:
                from rich.console import Console
                from rich.progress import Progress

                self.progress = Progress(transient=True, console=Console(stderr=True))  # stdout stays the caller's
                self.progress.start()
                self.task = self.progress.add_task(self.label, total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
