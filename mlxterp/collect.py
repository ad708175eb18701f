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
"""

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .analysis import layer_list
from .errors import InputError

PROGRESS_AFTER_SECONDS = 2.0
SHARD_INDEX = "index"


def get_activations(model, prompts, layers, positions: Union[int, Sequence[int]] = -1) -> Dict[str, mx.array]:
    """Activations of ``layers`` at ``positions`` for every prompt, as one batch.

    ``layers``: layer indices (keys ``"layer_3"``) and/or module names such as
    ``"layers.3.mlp"`` (keyed by the name as given).
    """
    prompts = _prompt_list(prompts)
    targets = _targets(model, layers)
    several = not isinstance(positions, int)
    position_list = _position_list(positions)

    with model.trace(prompts, capture=list(targets.values())) as tr:
        outputs = {key: tr.save(name) for key, name in targets.items()}
    length = next(iter(outputs.values())).shape[1]
    index = _gather_index(tr.tokens, tr.padding, length, position_list, prompts)
    result = {}
    for key, activation in outputs.items():
        picked = mx.take_along_axis(activation, index[..., None], axis=1)
        result[key] = picked if several else picked[:, 0]
    mx.eval(result)
    return result


def batch_get_activations(model, prompts, layers, batch_size: int = 32,
                          positions: Union[int, Sequence[int]] = -1, out: Optional[Union[str, Path]] = None,
                          shard_size: int = 4096, progress: Optional[bool] = None):
    """``get_activations`` over ``prompts`` in batches of ``batch_size``.

    Returns ``{key: array (n, ...)}`` in the order of ``prompts``; with ``out``
    writes safetensors shards of ``shard_size`` prompts to that directory and
    returns its path (read it with ``load_activations``). ``progress``: ``None``
    shows a bar only when the run looks longer than a few seconds.
    """
    prompts = _prompt_list(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    writer = ShardWriter(out, n_prompts=len(prompts)) if out is not None else None
    shard_size = max(batch_size, (shard_size // batch_size) * batch_size)

    batches_total = (len(prompts) + batch_size - 1) // batch_size
    bar = _LazyProgress(batches_total, enabled=progress)
    collected: Dict[str, List[mx.array]] = {}
    try:
        for start in range(0, len(prompts), shard_size):
            window = list(range(start, min(start + shard_size, len(prompts))))
            # Similar lengths in one batch means little padding; results go back to prompt order.
            window.sort(key=lambda i: len(prompts[i]))
            pieces: Dict[str, List[Tuple[List[int], mx.array]]] = {}
            for b in range(0, len(window), batch_size):
                rows = window[b:b + batch_size]
                acts = get_activations(model, [prompts[i] for i in rows], layers, positions)
                for key, value in acts.items():
                    pieces.setdefault(key, []).append((rows, value))
                bar.advance()
            ordered = {key: _in_prompt_order(parts, start) for key, parts in pieces.items()}
            if writer is not None:
                writer.write(ordered, first_index=start)
            else:
                for key, value in ordered.items():
                    collected.setdefault(key, []).append(value)
    finally:
        bar.close()
    if writer is not None:
        return writer.finish()
    return {key: mx.concatenate(parts, axis=0) for key, parts in collected.items()}


def _in_prompt_order(parts, start: int) -> mx.array:
    rows = [r for rs, _ in parts for r in rs]
    values = mx.concatenate([v for _, v in parts], axis=0)
    order = sorted(range(len(rows)), key=lambda k: rows[k])
    result = values[mx.array(order)]
    mx.eval(result)
    return result


# -- shards on disk ----------------------------------------------------------------

class ShardWriter:
    """Writes ``shard-00000.safetensors``, ... plus ``meta.json`` into one directory."""

    def __init__(self, directory, n_prompts: int):
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and any(self.directory.glob("shard-*.safetensors")):
            raise InputError(f"{self.directory} already holds activation shards; give an empty or new directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n_prompts = n_prompts
        self.shards: List[dict] = []

    def write(self, arrays: Dict[str, mx.array], first_index: int) -> None:
        n = next(iter(arrays.values())).shape[0]
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = dict(arrays)
        tensors[SHARD_INDEX] = mx.arange(first_index, first_index + n, dtype=mx.int64)
        mx.save_safetensors(str(self.directory / name), tensors)
        self.shards.append({"file": name, "first": first_index, "count": n})
        self.keys = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in arrays.items()}

    def finish(self) -> Path:
        meta = {"n_prompts": self.n_prompts, "keys": getattr(self, "keys", {}), "shards": self.shards}
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.directory


def iter_activation_shards(directory, keys: Optional[Iterable[str]] = None) -> Iterator[Dict[str, mx.array]]:
    """Yield each shard as ``{key: array, "index": prompt indices}``, in prompt order."""
    directory = Path(directory).expanduser()
    meta_file = directory / "meta.json"
    if not meta_file.exists():
        raise InputError(f"{directory} is not an activation directory (no meta.json); "
                         "write one with batch_get_activations(..., out=PATH)")
    meta = json.loads(meta_file.read_text())
    wanted = None if keys is None else set(keys) | {SHARD_INDEX}
    if wanted is not None:
        unknown = wanted - set(meta["keys"]) - {SHARD_INDEX}
        if unknown:
            raise InputError(f"no activations named {sorted(unknown)} in {directory}; it has {sorted(meta['keys'])}")
    for shard in meta["shards"]:
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
    """{result key: full module name} for layer indices and module names."""
    if isinstance(layers, (int, str)):
        layers = [layers]
    targets = {}
    indices = [layer for layer in layers if not isinstance(layer, str)]
    for layer in layer_list(model, indices) if indices else []:
        targets[f"layer_{layer}"] = model.names.layer_names[layer]
    for name in (layer for layer in layers if isinstance(layer, str)):
        targets[name] = model.resolve(name)
    if not targets:
        raise InputError("no layers given: pass layer indices like [3, 8] or names like 'layers.3.mlp'")
    return targets


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

    def __init__(self, total: int, enabled: Optional[bool]):
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.started = time.monotonic()
        self.progress = None
        self.task = None

    def advance(self):
        self.done += 1
        if self.progress is None and self.enabled is not False and self.done < self.total:
            elapsed = time.monotonic() - self.started
            expected = elapsed / self.done * self.total
            if self.enabled or expected > PROGRESS_AFTER_SECONDS:
                from rich.progress import Progress

                self.progress = Progress(transient=True)
                self.progress.start()
                self.task = self.progress.add_task("Collecting activations", total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
