"""Training on collected activations: every token's activation on disk, streamed batches, checkpoints.

Shared by the tuned lens (``mlxterp.tuned_lens``) and sparse autoencoders (``mlxterp.sae``).

* ``collect_tokens(model, texts, layers, out=DIR)`` keeps the activation at
  every token of every text (``mlxterp.collect`` keeps chosen positions):
  rows ``{"layer_8": (n_tokens, hidden), "token", "prompt", "position"}``,
  written as the same safetensors shards ``iter_activation_shards`` and
  ``load_activations`` read, one shard of ``shard_size`` texts at a time, and
  resumable the same way (a stopped run computes only the missing shards).
* ``ActivationRows(data, keys)`` reads such rows from a shard directory (or a
  dict of arrays), any leading shape flattened to rows, one shard in memory at
  a time; ``batches(...)`` cuts them into shuffled minibatches whose order
  depends only on the seed, so a resumed run sees the batches it would have seen.
* ``train_loop`` runs Adam over those batches with a progress bar on stderr,
  writing a checkpoint (parameters, optimizer state, step, loss history)
  every ``checkpoint_every`` steps; the same call on the same checkpoint
  directory continues from the last one.
* ``demo_texts(seed)`` gives the sentences the demo model was trained on, the data the
  scripts, benchmarks and tests that train lenses and SAEs on the demo model use.
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .collect import ShardWriter, _prompt_list, _targets, iter_activation_shards
from .errors import InputError

PROGRESS_AFTER_SECONDS = 2.0
TOKEN_KEYS = ("token", "prompt", "position")


# -- every token's activation ---------------------------------------------------------

def collect_tokens(model, texts, layers, out: Optional[Union[str, Path]] = None, batch_size: int = 32,
                   shard_size: int = 2048, progress: Optional[bool] = None):
    """The output of ``layers`` at every token of every text.

    ``layers``: layer indices (keys ``"layer_8"``) and/or module names (``"layers.8.mlp"``).
    Returns ``{key: (n_tokens, hidden), "token": ids, "prompt": text index,
    "position": position in its text}``; with ``out`` writes shards of
    ``shard_size`` texts to that directory and returns its path.
    """
    texts = _prompt_list(texts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    targets = _targets(model, layers)
    encoded = [model.encode(t) if isinstance(t, str) else [int(i) for i in t] for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).tolist()
    starts = list(range(0, len(texts), shard_size))
    windows = [(offsets[s], offsets[min(s + shard_size, len(texts))] - offsets[s]) for s in starts]
    writer = None
    if out is not None:
        import hashlib

        run = {"rows": "tokens", "n_texts": len(texts), "n_tokens": offsets[-1],
               "texts_sha256": hashlib.sha256(json.dumps(encoded).encode()).hexdigest(),
               "layers": sorted(targets), "shard_size": shard_size,
               "model": f"{type(model.model).__name__}, {model.n_layers} layers, hidden {model.hidden_size}"}
        writer = ShardWriter(out, n_prompts=offsets[-1], run=run)
    n_batches = [math.ceil(min(shard_size, len(texts) - s) / batch_size) for s in starts]
    bar = Progress(sum(n_batches), progress, "Collecting token activations")
    collected: Dict[str, List[mx.array]] = {}
    try:
        for k, start in enumerate(starts):
            if writer is not None and writer.done(k):
                bar.advance(n_batches[k])
                continue
            window = sorted(range(start, min(start + shard_size, len(texts))), key=lambda i: len(encoded[i]))
            per_text = {}
            for b in range(0, len(window), batch_size):
                rows = window[b:b + batch_size]
                with model.trace([encoded[i] for i in rows], capture=list(targets.values())) as tr:
                    saved = {key: tr.save(name) for key, name in targets.items()}
                for r, i in enumerate(rows):
                    pad = tr.padding[r] if tr.padding else 0
                    per_text[i] = {key: value[r, pad:pad + len(encoded[i])] for key, value in saved.items()}
                mx.eval([per_text[i] for i in rows])
                bar.advance()
            order = sorted(per_text)
            arrays = {key: mx.concatenate([per_text[i][key] for i in order]) for key in targets}
            arrays["token"] = mx.array([t for i in order for t in encoded[i]], dtype=mx.int32)
            arrays["prompt"] = mx.array([i for i in order for _ in encoded[i]], dtype=mx.int32)
            arrays["position"] = mx.array([p for i in order for p in range(len(encoded[i]))], dtype=mx.int32)
            if writer is not None:
                writer.write(arrays, first_index=offsets[start], number=k)
            else:
                for key, value in arrays.items():
                    collected.setdefault(key, []).append(value)
    finally:
        bar.close()
    if writer is not None:
        return writer.finish(windows)
    return {key: mx.concatenate(parts) for key, parts in collected.items()}


class ActivationRows:
    """Rows of activations from a shard directory or a dict of arrays, one shard in memory at a time.

    Every leading axis is flattened: ``(n, hidden)`` and ``(n, positions, hidden)`` alike give rows of ``hidden``.
    """

    def __init__(self, data, keys: Sequence[str]):
        self.keys = list(keys)
        if isinstance(data, (str, Path)):
            self.directory = Path(data).expanduser()
            meta_file = self.directory / "meta.json"
            next(iter_activation_shards(self.directory, self.keys), None)  # clear errors for a bad directory
            meta = json.loads(meta_file.read_text())
            per_item = int(np.prod(meta["keys"][self.keys[0]]["shape"][:-1] or [1]))
            self.sizes = [shard["count"] * per_item for shard in meta["shards"]]
            self.width = {key: meta["keys"][key]["shape"][-1] for key in self.keys}
            self.arrays = None
        elif isinstance(data, dict):
            missing = [key for key in self.keys if key not in data]
            if missing:
                raise InputError(f"no activations named {missing} in the data; it has {sorted(data)}")
            self.directory = None
            self.arrays = {key: _rows(mx.array(data[key])) for key in self.keys}
            self.sizes = [self.arrays[self.keys[0]].shape[0]]
            self.width = {key: value.shape[-1] for key, value in self.arrays.items()}
        else:
            raise InputError(f"training data is a directory of collected shards or a dict of arrays, "
                             f"got {type(data).__name__}")
        if sum(self.sizes) == 0:
            raise InputError("the training data holds no rows")

    @property
    def n_rows(self) -> int:
        return sum(self.sizes)

    def shard(self, k: int) -> Dict[str, mx.array]:
        if self.arrays is not None:
            return self.arrays
        meta = json.loads((self.directory / "meta.json").read_text())
        arrays = mx.load(str(self.directory / meta["shards"][k]["file"]))
        return {key: _rows(arrays[key]) for key in self.keys}

    def shards(self) -> Iterator[Dict[str, mx.array]]:
        for k in range(len(self.sizes)):
            yield self.shard(k)

    def batches(self, batch_size: int, seed: int = 0, skip: int = 0) -> Iterator[Dict[str, mx.array]]:
        """Shuffled minibatches forever (epoch after epoch); ``skip`` the first ones without reading them."""
        epoch = 0
        while True:
            rng = np.random.default_rng([seed, epoch])
            for k in rng.permutation(len(self.sizes)).tolist():
                n_batches = math.ceil(self.sizes[k] / batch_size)
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                arrays = self.shard(k)
                order = np.random.default_rng([seed, epoch, k]).permutation(self.sizes[k])
                for b in range(skip, n_batches):
                    rows = mx.array(order[b * batch_size:(b + 1) * batch_size])
                    yield {key: value[rows] for key, value in arrays.items()}
                skip = 0
            epoch += 1


def _rows(array: mx.array) -> mx.array:
    return array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(-1)


# -- the demo model's sentences ---------------------------------------------------------

DEMO_CORPUS = Path(__file__).resolve().parent / "assets" / "demo" / "corpus.txt"


def demo_texts(seed: int = 0) -> List[str]:
    """The distinct sentences of the demo model's training corpus, shuffled with ``seed``.

    They ship next to the demo model (``assets/demo/corpus.txt``, sorted, one a line), which
    ``scripts/train_demo_model.py`` writes with the model; tests/test_collect_cli_layers.py
    checks that the file holds the corpus the script builds.
    """
    import random

    texts = DEMO_CORPUS.read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(texts)
    return texts


# -- the training loop ----------------------------------------------------------------

def train_loop(module: nn.Module, loss_fn: Callable, batches: Callable[[int], Iterator], *, steps: int,
               learning_rate: float, checkpoint_dir=None, checkpoint_every: int = 100, resume: bool = True,
               progress=None, config: Optional[dict] = None, after_step: Optional[Callable] = None,
               label: str = "Training") -> List[float]:
    """Adam on ``loss_fn(module, batch)`` for ``steps`` steps; returns the loss of every step.

    ``loss_fn`` returns the loss, or ``(loss, shown)`` to record and show ``shown`` (e.g. the
    reconstruction error without auxiliary terms) instead.

    ``batches`` is a function ``skip -> iterator`` so a resumed run starts where the checkpoint stopped.
    ``after_step(module, batch)`` runs after each update (e.g. to renormalise a decoder).
    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end;
    with ``resume`` a checkpoint already there (of the same ``config``) is continued.
    """
    for value, what in ((steps, "steps"), (checkpoint_every, "checkpoint_every")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be a positive integer, got {value!r}")
    optimizer = optim.Adam(learning_rate=learning_rate)
    optimizer.init(module.trainable_parameters())
    history: List[float] = []
    start = 0
    checkpoint = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    if checkpoint is not None and resume and (checkpoint / "checkpoint.json").exists():
        start, history = load_checkpoint(checkpoint, module, optimizer, config)
    step_fn = nn.value_and_grad(module, loss_fn)
    bar = Progress(steps, progress, label)
    bar.advance(start)
    stream = batches(start)
    try:
        for step in range(start, steps):
            batch = next(stream)
            loss, grads = step_fn(module, batch)
            optimizer.update(module, grads)
            mx.eval(loss, module.parameters(), optimizer.state)
            if after_step is not None:
                after_step(module, batch)
            history.append((loss[1] if isinstance(loss, (tuple, list)) else loss).item())
            bar.advance(description=f"{label}  loss {history[-1]:.4g}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(checkpoint, module, optimizer, step + 1, history, config)
    finally:
        bar.close()
    return history


def save_checkpoint(directory: Path, module: nn.Module, optimizer, step: int, history: List[float],
                    config: Optional[dict]) -> None:
    """``checkpoint.safetensors`` (parameters and optimizer state), then ``checkpoint.json`` (step, losses)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"param.{k}": v for k, v in tree_flatten(module.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    aside = directory / ".checkpoint.writing.safetensors"
    mx.save_safetensors(str(aside), arrays)
    os.replace(aside, directory / "checkpoint.safetensors")
    text = json.dumps({"step": step, "history": history, "config": config}, indent=1)
    (directory / ".checkpoint.writing.json").write_text(text)
    os.replace(directory / ".checkpoint.writing.json", directory / "checkpoint.json")


def load_checkpoint(directory: Path, module: nn.Module, optimizer, config: Optional[dict]):
    """Restore ``module`` and ``optimizer`` from ``directory``; returns (step, loss history)."""
    saved = json.loads((directory / "checkpoint.json").read_text())
    if saved.get("config") != config:
        earlier, now = saved.get("config") or {}, config or {}
        changed = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k))
        raise InputError(f"{directory} holds a checkpoint of a different training run (it differs in "
                         f"{', '.join(changed)}); give the same arguments to resume it, a new directory, "
                         "or resume=False to start over")
    arrays = mx.load(str(directory / "checkpoint.safetensors"))
    params = [(k[len("param."):], v) for k, v in arrays.items() if k.startswith("param.")]
    module.load_weights(params)
    state = tree_unflatten([(k[len("optimizer."):], v) for k, v in arrays.items() if k.startswith("optimizer.")])
    optimizer.state = state
    mx.eval(module.parameters(), optimizer.state)
    return saved["step"], list(saved["history"])


# -- progress ---------------------------------------------------------------------------

class Progress:
    """A rich progress bar on stderr; with ``enabled=None`` it appears once the run looks longer than 2 s."""

    def __init__(self, total: int, enabled: Optional[bool], label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.done = 0
        self.started = time.monotonic()
        self.bar = None
        self.task = None

    def advance(self, n: int = 1, description: Optional[str] = None):
        self.done += n
        if self.bar is None and self.enabled is not False and 0 < self.done < self.total:
            expected = (time.monotonic() - self.started) / self.done * self.total
            if self.enabled or expected > PROGRESS_AFTER_SECONDS:
                from rich.console import Console
                from rich.progress import Progress as RichProgress

                self.bar = RichProgress(*RichProgress.get_default_columns(), console=Console(file=sys.stderr),
                                        transient=True)
                self.bar.start()
                self.task = self.bar.add_task(self.label, total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=description or self.label)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
