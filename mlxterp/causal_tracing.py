"""Causal tracing (ROME, Meng et al. 2022): where a model recalls a fact about a subject.

Three runs of one prompt:

* clean: the model predicts the answer (" Paris" for "The capital of France is") with
  probability ``clean_probability``;
* corrupted: Gaussian noise of ``noise`` x the embedding's standard deviation is added
  to the embeddings of the subject's tokens, and the answer's probability drops to
  ``corrupted_probability`` (averaged over ``samples`` noise draws, seeded);
* restored: the corrupted run again, with one state put back to its clean value --
  the residual stream (a layer's output) at one (layer, position), or the MLP or
  attention outputs at one position for a window of ``window`` layers centred on
  the layer (clipped at the ends), as in ROME.

The answer's probability in each restored run is the heatmap cell; its excess over
``corrupted_probability`` is the indirect effect of that state. Restored runs are
rows of batched forward passes: row 0 of each batch is the clean prompt, and each
restored row copies its states from row 0 of the same module, so the clean run costs
one row per batch. ``causal_trace`` returns one ``CausalTrace`` result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .errors import InputError, PositionError
from .results import Result, _common, token_label

KINDS = ("residual", "mlp", "attn")
KIND_ALIASES = {"layer": "residual", "hidden": "residual", "resid": "residual", "self_attn": "attn",
                "attention": "attn"}
COLOURS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
DEFAULT_MEMORY = 1 << 30  # bytes of activations one batched forward pass may take


@dataclass(eq=False)
class CausalTrace(Result):
    """Probability of the clean answer with each state restored: ``probabilities[kind]`` is a
    ``(layers, positions)`` array; ``indirect_effect(kind)`` subtracts the corrupted baseline."""

    tokens: list[str]
    subject: list[int]  # positions of the corrupted subject tokens
    answer: str
    answer_id: int
    layers: list[int]
    probabilities: dict  # {kind: np.ndarray (layers, positions)}
    clean_probability: float
    corrupted_probability: float
    noise: float  # the factor of the embedding's standard deviation
    noise_std: float  # the standard deviation of the noise added
    samples: int
    window: int
    seed: int = 0
    seconds: float = 0.0
    plot: Optional[str] = None
    kind = "causal_trace"

    @property
    def kinds(self) -> list[str]:
        return list(self.probabilities)

    def indirect_effect(self, kind: str) -> np.ndarray:
        """``probabilities[kind]`` minus the corrupted probability: what restoring each state recovers."""
        return self._array(kind) - self.corrupted_probability

    def best(self, kind: str) -> tuple[int, int, float]:
        """(layer, position, probability) of the state whose restoration helps most."""
        array = self._array(kind)
        row, position = np.unravel_index(int(np.argmax(array)), array.shape)
        return self.layers[row], int(position), float(array[row, position])

    def _array(self, kind: str) -> np.ndarray:
        kind = KIND_ALIASES.get(kind, kind)
        if kind not in self.probabilities:
            raise InputError(f"no {kind!r} heatmap here; this trace has {', '.join(self.probabilities)}")
        return self.probabilities[kind]

    def position_labels(self) -> list[str]:
        """Token labels, the subject's marked with ``*``."""
        return [token_label(t) + ("*" if i in self.subject else "") for i, t in enumerate(self.tokens)]

    def save_plot(self, save_path=None) -> str:
        """The heatmaps (position x layer, one per kind, ROME's layout) in one PNG; its path, kept as ``plot``."""
        from .plots import _figure, _output_path

        kinds = self.kinds
        labels = self.position_labels()
        figure = _figure((4.2 * len(kinds) + 0.5, 0.32 * len(labels) + 1.8))
        figure.set_layout_engine("constrained")
        for index, kind in enumerate(kinds):
            axes = figure.add_subplot(1, len(kinds), index + 1)
            array = self.probabilities[kind].T  # (positions, layers)
            image = axes.imshow(array, cmap=COLOURS.get(kind, "Blues"), aspect="auto", interpolation="nearest",
                                vmin=min(self.corrupted_probability, float(array.min())),
                                vmax=max(float(array.max()), self.corrupted_probability + 1e-6))
            axes.set_yticks(range(len(labels)))
            axes.set_yticklabels(labels if index == 0 else [""] * len(labels))
            step = max(1, len(self.layers) // 8)
            axes.set_xticks(range(0, len(self.layers), step))
            axes.set_xticklabels([str(self.layers[i]) for i in range(0, len(self.layers), step)])
            what = {"residual": "residual stream", "mlp": f"MLP (window {self.window})",
                    "attn": f"attention (window {self.window})"}.get(kind, kind)
            axes.set_title(f"restoring the {what}", fontsize=10)
            axes.set_xlabel("layer")
            figure.colorbar(image, ax=axes, shrink=0.9).set_label(f"p({token_label(self.answer)})", fontsize=8)
        path = _output_path(save_path, "causal-trace")
        figure.savefig(path, dpi=100)
        self.plot = path
        return path

    # -- data and drawing ------------------------------------------------------------------------
    def data(self):
        return {"tokens": list(self.tokens), "subject": list(self.subject), "answer": self.answer,
                "answer_id": self.answer_id, "layers": list(self.layers),
                "probabilities": {k: np.asarray(v) for k, v in self.probabilities.items()},
                "clean_probability": self.clean_probability, "corrupted_probability": self.corrupted_probability,
                "noise": self.noise, "noise_std": self.noise_std, "samples": self.samples, "window": self.window,
                "seed": self.seed, "seconds": self.seconds, "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        return cls(list(data["tokens"]), [int(p) for p in data["subject"]], data["answer"], int(data["answer_id"]),
                   [int(n) for n in data["layers"]],
                   {k: np.asarray(v) for k, v in data["probabilities"].items()},
                   float(data["clean_probability"]), float(data["corrupted_probability"]), float(data["noise"]),
                   float(data["noise_std"]), int(data["samples"]), int(data["window"]), seed=int(data.get("seed", 0)),
                   seconds=float(data.get("seconds", 0.0)), plot=data.get("plot"), **_common(data))

    def heading(self) -> str:
        return (f"causal trace of p({token_label(self.answer)}): clean {self.clean_probability:.3f}, "
                f"subject corrupted {self.corrupted_probability:.3f} (noise {self.noise:g} x std, "
                f"{self.samples} samples)")

    def body(self):
        from rich.console import Group
        from rich.text import Text

        from .results import sparkline

        from .results import Column, FitTable

        # the sparklines go first when the terminal is narrow; numbers and labels are never cut
        span = f"L{self.layers[0]}..{self.layers[-1]}"
        columns = [Column("position")]
        for kind in self.kinds:
            columns += [Column(f"{kind}: best layer, p", "right"), Column(f"{kind} {span}", drop=1)]
        rows = []
        for position, label in enumerate(self.position_labels()):
            cells = []
            for kind in self.kinds:
                column = self.probabilities[kind][:, position]
                row = int(np.argmax(column))
                effect = float(column[row]) - self.corrupted_probability
                style = "bold green" if effect > 0.5 * max(self.clean_probability - self.corrupted_probability, 1e-9) else ""
                cells += [Text(f"L{self.layers[row]} {column[row]:.3f}", style=style),
                          Text(sparkline(column, width=24), style="cyan")]
            rows.append([f"{position} {label}", *cells])
        table = FitTable(columns, rows, title=Text(self.heading()))
        parts = [table] + ([Text(f"plot: {self.plot}", style="dim")] if self.plot else [])
        return Group(*parts) if len(parts) > 1 else table

    def short(self):
        kind = self.kinds[0] if self.kinds else None
        if kind is None:
            return "causal trace: nothing restored"
        layer, position, value = self.best(kind)
        return (f"{kind} best L{layer} @ {position} {token_label(self.tokens[position])}: {value:.2f} "
                f"(clean {self.clean_probability:.2f}, corrupted {self.corrupted_probability:.2f})")

    def table(self):
        columns = ["kind", "layer"] + [f"{p} {label}" for p, label in enumerate(self.position_labels())]
        rows = [[kind, layer] + [float(v) for v in self.probabilities[kind][row]]
                for kind in self.kinds for row, layer in enumerate(self.layers)]
        return self.heading(), columns, rows


def causal_trace(model, prompt: str, subject, answer=None, *, kinds: Union[str, Sequence[str]] = KINDS,
                 noise: float = 3.0, samples: int = 10, window: int = 10, seed: int = 0,
                 layers: Union[None, int, Iterable[int]] = None, batch_size: Optional[int] = None,
                 memory: int = DEFAULT_MEMORY, plot: bool = False, save_path=None,
                 should_stop=None) -> CausalTrace:
    """Corrupt ``subject`` in ``prompt`` with noise and restore each state, ROME-style.

    Args:
        model: an ``InterpretableModel`` of a language model.
        prompt: the prompt, e.g. ``"The capital of France is"``.
        subject: the subject's text in the prompt (``"France"``, ``"Eiffel Tower"``: the tokens
            spelling it), or its positions (an index, a list of them, a ``slice``).
        answer: the answer whose probability is traced (a single-token string or a token id);
            ``None`` for the clean run's top prediction.
        kinds: any of ``"residual"``, ``"mlp"``, ``"attn"``; one heatmap each.
        noise: the noise's standard deviation as a multiple of the embedding's (ROME: 3).
        samples: noise draws averaged per cell (the same draws for every cell).
        window: layers of MLP/attention restored together, centred on the cell's layer.
        seed: seed of the noise.
        layers: the layers to restore (heatmap rows); ``None`` for all.
        batch_size: rows per forward pass; ``None`` to fit ``memory`` bytes of activations.
        plot / save_path: also draw the heatmaps into a PNG (``save_path`` or a temp file).
        should_stop: checked between layers of every forward pass, to interrupt.

    Returns:
        a ``CausalTrace`` with a ``(layers, positions)`` array of probabilities per kind.
    """
    import time

    import mlx.core as mx

    from .analysis import _positive_int, answer_id, component_name, layer_list

    started = time.perf_counter()
    if not isinstance(prompt, str):
        raise InputError(f"causal_trace takes one prompt string, got {type(prompt).__name__}")
    kinds = _kinds(kinds)
    layers = layer_list(model, layers)
    samples = _positive_int(samples, "samples")
    window = _positive_int(window, "window")
    noise = float(noise)
    if not math.isfinite(noise) or noise <= 0:
        raise InputError(f"noise is a positive multiple of the embedding's standard deviation (ROME: 3), got {noise}")
    embed = model.names.find("embed")
    if embed is None or model.embedding_rows is None:
        raise InputError("causal tracing corrupts token embeddings: the model has no token embedding module")

    ids = model.encode(prompt)
    tokens = model.token_strings(ids)
    subject_at = subject_positions(subject, tokens)
    length = len(ids)

    # The noise: the same `samples` draws for every restored state, as in ROME.
    noise_std = noise * embedding_std(model, embed, seed)
    draws = mx.random.normal((samples, len(subject_at), model.hidden_size), key=mx.random.key(seed)) * noise_std
    per_sample = mx.zeros((samples, length, model.hidden_size)).at[:, mx.array(subject_at)].add(draws)

    # Jobs: (kind, layer, position) -> the module names restored at that position.
    n_layers = model.n_layers
    names = {kind: [component_name(model, layer, None if kind == "residual" else kind)
                    for layer in range(n_layers)] for kind in kinds}
    jobs = [(kind, layer, position) for kind in kinds for layer in layers for position in range(length)]

    def restored(kind, layer):
        if kind == "residual":
            return [names[kind][layer]]
        low, high = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
        return [names[kind][other] for other in range(low, high)]

    if batch_size is None:
        batch_size = _rows_in(memory, model, length)
    batch_size = max(_positive_int(batch_size, "batch_size"), samples + 1)
    jobs_per_batch = max(1, (batch_size - 1) // samples)
    # The first batch also holds the unrestored corrupted rows (job None).
    pending = [None] + jobs
    target = None if answer is None else answer_id(model, answer)
    clean_probability, corrupted, results = None, None, []
    for start in range(0, len(pending), jobs_per_batch):
        chunk = pending[start:start + jobs_per_batch]
        rows = 1 + samples * len(chunk)
        masks = {}
        for index, job in enumerate(chunk):
            if job is None:
                continue
            kind, layer, position = job
            for name in restored(kind, layer):
                mask = masks.setdefault(name, np.zeros((rows, length), dtype=bool))
                mask[1 + index * samples: 1 + (index + 1) * samples, position] = True
        batch_noise = mx.concatenate([mx.zeros((1, length, model.hidden_size)),
                                      mx.tile(per_sample, (len(chunk), 1, 1))])
        interventions = {embed: _add(batch_noise)}
        for name, mask in masks.items():
            interventions[name] = _restore(mx.array(mask))
        with model.trace([ids] * rows, interventions=interventions, capture=[], should_stop=should_stop,
                         keep="saved"):
            logits = model.output.save()
        last = logits[:, -1].astype(mx.float32)
        if target is None:
            target = int(mx.argmax(last[0]).item())
        probabilities = mx.softmax(last, axis=-1)[:, target]
        mx.eval(probabilities)
        probabilities = np.array(probabilities)
        if clean_probability is None:
            clean_probability = float(probabilities[0])
        for index, job in enumerate(chunk):
            value = float(probabilities[1 + index * samples: 1 + (index + 1) * samples].mean())
            if job is None:
                corrupted = value
            else:
                results.append(value)

    grid = np.array(results, dtype=np.float32).reshape(len(kinds), len(layers), length)
    result = CausalTrace(tokens, subject_at, model.token_to_str(target), int(target), layers,
                         {kind: grid[i] for i, kind in enumerate(kinds)}, clean_probability, corrupted, noise,
                         float(noise_std), samples, window, seed=seed, seconds=time.perf_counter() - started)
    if plot:
        path = result.save_plot(save_path)
        logging.getLogger("mlxterp").info("saved the causal trace heatmaps to %s", path)
    return result


def _add(batch_noise):
    def corrupt(embeddings):
        return embeddings + batch_noise.astype(embeddings.dtype)

    corrupt.__name__ = "corrupt_subject"
    return corrupt


def _restore(mask):
    """Rows/positions where ``mask`` is True take row 0's (the clean prompt's) value."""
    import mlx.core as mx

    def restore(activation):
        where = mask.reshape(mask.shape + (1,) * (activation.ndim - 2))
        return mx.where(where, activation[:1], activation)

    restore.__name__ = "restore_clean"
    return restore


def _kinds(kinds) -> list[str]:
    chosen = [kinds] if isinstance(kinds, str) else list(kinds)
    chosen = [KIND_ALIASES.get(k, k) if isinstance(k, str) else k for k in chosen]
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise InputError(f"unknown kind {unknown[0] if unknown else kinds!r} to restore; choose from "
                         f"{', '.join(KINDS)} (or several)")
    return list(dict.fromkeys(chosen))


def subject_positions(subject, tokens: list[str]) -> list[int]:
    """Positions of the subject: the consecutive tokens spelling ``subject`` (spaces around ignored),
    or positions given directly (an index, a list of them, a slice)."""
    from .core.positions import select_positions

    if isinstance(subject, str):
        wanted = subject.strip()
        if not wanted:
            raise PositionError("the subject is empty; give its text as in the prompt, e.g. \"France\"",
                                _valid(tokens))
        for start in range(len(tokens)):
            text = ""
            for end in range(start, len(tokens)):
                text += tokens[end]
                if text.strip() == wanted:
                    return list(range(start, end + 1))
                if len(text.strip()) >= len(wanted):
                    break
        raise PositionError(f"no run of tokens of the prompt spells the subject {subject!r}; give its text as in "
                            "the prompt, or its positions (an index, a list, a slice)", _valid(tokens))
    return sorted(set(select_positions(subject, tokens)))


def _valid(tokens):
    return [f"{i}:{token_label(t)}" for i, t in enumerate(tokens)]


def embedding_std(model, embed: str, seed: int = 0, sample: int = 4096) -> float:
    """Standard deviation of the token embeddings (of up to ``sample`` random tokens; works when quantized)."""
    import mlx.core as mx

    rows = model.embedding_rows
    ids = np.random.default_rng(seed).choice(rows, size=min(rows, sample), replace=False)
    values = model.names.modules[embed](mx.array(np.sort(ids))).astype(mx.float32)
    return float(mx.std(values).item())


def _rows_in(memory: int, model, length: int) -> int:
    """Rows of one forward pass that fit ``memory`` bytes: the logits, and the hidden states the
    restorations keep (a few per layer), in float32."""
    hidden, layers = model.hidden_size or 1, model.n_layers
    per_row = 4 * length * (model.embedding_rows + hidden * (4 * layers + 8))
    return max(2, int(memory // per_row))
