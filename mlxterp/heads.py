"""Attention-head detection: previous-token, first-token and induction scores per layer and head.

Scores are mean attention probabilities read from exact patterns
(``mlxterp.attention.get_attention_patterns``):

* ``previous_token``: attention from each position to the one before it;
* ``first_token``: attention from each position (after the first) to position 0,
  where the BOS token sits (heads that "rest" there);
* ``induction``: on sequences of random tokens repeated once (``[BOS] r r``), attention
  from each token of the second copy to the token that followed its earlier
  occurrence -- the signature of an induction head.

All three come from one batch of repeated random sequences (seeded), or the
first two from a prompt of yours (``text=``). ``head_scores`` returns one
``HeadScores`` result; ``induction_model()`` loads the small two-layer
attention-only model shipped with mlxterp, whose weights are set by hand to the
textbook circuit: a previous-token head in layer 0 and an induction head in layer 1
(``scripts/build_induction_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .results import Result, _common, as_numpy

KINDS = ("previous_token", "first_token", "induction")
INDUCTION_PATH = Path(__file__).parent / "assets" / "induction"


@dataclass(eq=False)
class HeadScores(Result):
    """Head-type scores: ``scores[kind]`` is a ``(layers, heads)`` array of mean attention.

    ``top(kind, k)`` lists the highest-scoring heads; ``save_plot()`` draws one
    layer x head heatmap per kind. ``setup`` says what the scores were measured on.
    """

    layers: list[int]
    scores: dict  # {kind: np.ndarray (layers, heads)}
    setup: dict = field(default_factory=dict)  # text, or repeat_length / sequences / seed
    plot: Optional[str] = None
    kind = "heads"

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    @property
    def n_heads(self) -> int:
        return int(next(iter(self.scores.values())).shape[1]) if self.scores else 0

    def score(self, kind: str, layer: int, head: int) -> float:
        """The ``kind`` score of one head."""
        return float(self._array(kind)[self.layers.index(layer), head])

    def top(self, kind: str, k: int = 5) -> list[tuple[int, int, float]]:
        """(layer, head, score) of the ``k`` heads with the highest ``kind`` score, best first."""
        array = self._array(kind)
        order = np.argsort(-array, axis=None, kind="stable")[:k]
        return [(self.layers[i // array.shape[1]], int(i % array.shape[1]), float(array.flat[i])) for i in order]

    def _array(self, kind: str) -> np.ndarray:
        if kind not in self.scores:
            raise InputError(f"no {kind!r} scores here; this result has {', '.join(self.scores)}")
        return self.scores[kind]

    def save_plot(self, save_path=None) -> str:
        """One heatmap (layers x heads) per kind in a PNG; its path, also kept as ``plot``."""
        from .plots import _figure, _output_path

        kinds = self.kinds
        height = max(3.0, 0.35 * len(self.layers) + 1.5)
        figure = _figure((max(4.0, 0.45 * self.n_heads + 2.0) * len(kinds) + 1.0, height))
        figure.set_layout_engine("constrained")
        for index, kind in enumerate(kinds):
            axes = figure.add_subplot(1, len(kinds), index + 1)
            array = self.scores[kind]
            image = axes.imshow(array, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
            if array.size <= 400:
                for (row, head), value in np.ndenumerate(array):
                    axes.text(head, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if value > 0.6 else "black")
            axes.set_xticks(range(array.shape[1]))
            axes.set_yticks(range(len(self.layers)))
            axes.set_yticklabels([str(layer) for layer in self.layers])
            axes.set_xlabel("head")
            axes.set_ylabel("layer")
            axes.set_title(kind.replace("_", "-") + " score")
        figure.colorbar(image, ax=figure.axes, shrink=0.8, label="mean attention")
        path = _output_path(save_path, "heads")
        figure.savefig(path, dpi=100)
        self.plot = path
        return path

    # -- data and drawing ----------------------------------------------------------------------
    def data(self):
        return {"layers": list(self.layers), "scores": {k: np.asarray(v) for k, v in self.scores.items()},
                "setup": dict(self.setup), "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        return cls([int(n) for n in data["layers"]], {k: np.asarray(v) for k, v in data["scores"].items()},
                   setup=dict(data.get("setup") or {}), plot=data.get("plot"), **_common(data))

    def body(self):
        from rich.console import Group
        from rich.text import Text

        from .results import Column, FitTable

        # one row label per head (layer.head), so rows stay distinct however narrow the terminal
        columns = [Column("layer.head")] + [Column(kind.replace("_", "-"), "right") for kind in self.kinds]
        rows = []
        for row, layer in enumerate(self.layers):
            for head in range(self.n_heads):
                cells = []
                for kind in self.kinds:
                    value = float(self.scores[kind][row, head])
                    cells.append(Text(f"{value:.3f}", style="bold green" if value >= 0.4 else ""))
                rows.append([f"{layer}.{head}", *cells])
        table = FitTable(columns, rows, title=Text(f"head scores (mean attention) on {self.described()}"))
        parts = [table]
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts) if len(parts) > 1 else table

    def described(self) -> str:
        if self.setup.get("text") is not None:
            return f"{self.setup['text']!r} (induction on repeated random tokens)" \
                if "induction" in self.scores else repr(self.setup["text"])
        return (f"{self.setup.get('sequences', '?')} sequences of {self.setup.get('repeat_length', '?')} "
                f"random tokens repeated twice (seed {self.setup.get('seed', '?')})")

    def short(self):
        if not self.scores or not self.layers:
            return "heads: none"
        return "; ".join(f"{kind.replace('_', '-')} L{layer}H{head} {value:.2f}"
                         for kind in self.kinds for layer, head, value in self.top(kind, 1))

    def table(self):
        rows = [[layer, head] + [float(self.scores[kind][row, head]) for kind in self.kinds]
                for row, layer in enumerate(self.layers) for head in range(self.n_heads)]
        return f"head scores on {self.described()}", ["layer", "head"] + self.kinds, rows


def head_scores(model, kinds: Union[None, str, Sequence[str]] = None, *, text: Optional[str] = None,
                layers: Union[None, int, Iterable[int]] = None, repeat_length: int = 20, sequences: int = 8,
                seed: int = 0) -> HeadScores:
    """Previous-token, first-token and induction scores of every head of ``layers``.

    Args:
        model: an ``InterpretableModel`` whose attention ``get_attention_patterns`` supports.
        kinds: one of ``KINDS`` or a list of them; ``None`` for all three.
        text: measure previous-token and first-token scores on this prompt instead of
            on the random sequences (induction always uses repeated random tokens).
        layers: a layer index or list of them; ``None`` for all.
        repeat_length: random tokens in each copy (sequences are ``[BOS] r r``).
        sequences: how many random sequences to average over (one batch).
        seed: seed of the random tokens.

    Returns:
        a ``HeadScores`` with a ``(layers, heads)`` array per kind.
    """
    from .analysis import _positive_int, layer_list
    from .attention import get_attention_patterns

    kinds = _kinds(kinds)
    layers = layer_list(model, layers)
    repeat_length = _positive_int(repeat_length, "repeat_length")
    sequences = _positive_int(sequences, "sequences")
    if repeat_length < 2:
        raise InputError(f"repeat_length must be at least 2 (a copy needs a token after the first), got {repeat_length}")

    setup: dict = {"repeat_length": repeat_length, "sequences": sequences, "seed": seed}
    scores = {}
    need_random = "induction" in kinds or text is None
    if need_random:
        batch, prefix = repeated_random_tokens(model, repeat_length, sequences, seed)
        patterns = get_attention_patterns(model, batch, layers=layers)
        random_patterns = np.stack([as_numpy(patterns[layer]) for layer in layers])  # (layers, B, H, L, L)
        if "induction" in kinds:
            scores["induction"] = induction_score(random_patterns, prefix, repeat_length)
    if text is not None:
        if not isinstance(text, str):
            raise InputError(f"text is one prompt string, got {type(text).__name__}")
        patterns = get_attention_patterns(model, text, layers=layers)
        own_patterns = np.stack([as_numpy(patterns[layer]) for layer in layers])
        setup = {"text": text, **(setup if "induction" in kinds else {})}
    else:
        own_patterns = random_patterns
    if own_patterns.shape[-1] < 2 and ("previous_token" in kinds or "first_token" in kinds):
        raise InputError("previous-token and first-token scores need a prompt of at least 2 tokens")
    if "previous_token" in kinds:
        scores["previous_token"] = previous_token_score(own_patterns)
    if "first_token" in kinds:
        scores["first_token"] = first_token_score(own_patterns)
    return HeadScores(layers, {kind: scores[kind] for kind in kinds}, setup=setup)


def _kinds(kinds) -> list[str]:
    if kinds is None:
        return list(KINDS)
    chosen = [kinds] if isinstance(kinds, str) else list(kinds)
    aliases = {"previous": "previous_token", "prev": "previous_token", "previous-token": "previous_token",
               "first": "first_token", "first-token": "first_token", "bos": "first_token"}
    chosen = [aliases.get(k, k) if isinstance(k, str) else k for k in chosen]
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise InputError(f"unknown head kind {unknown[0] if unknown else kinds!r}; choose from {', '.join(KINDS)}")
    return list(dict.fromkeys(chosen))


# -- the scores, from patterns (layers, batch, heads, query, key) -------------------------------------


def previous_token_score(patterns: np.ndarray) -> np.ndarray:
    """Mean attention from each position q >= 1 to q - 1: ``(layers, heads)``."""
    diagonal = np.diagonal(patterns, offset=-1, axis1=-2, axis2=-1)  # (..., L - 1)
    return diagonal.mean(axis=(1, -1))


def first_token_score(patterns: np.ndarray) -> np.ndarray:
    """Mean attention from each position q >= 1 to position 0: ``(layers, heads)``."""
    return patterns[..., 1:, 0].mean(axis=(1, -1))


def induction_score(patterns: np.ndarray, prefix: int, repeat_length: int) -> np.ndarray:
    """Mean attention from each token of the second copy to the token after its first occurrence.

    The sequences are ``prefix`` tokens (BOS or none), then ``r``, then ``r`` again
    (``repeat_length`` tokens each): query ``prefix + n + i`` attends to key ``prefix + i + 1``.
    """
    n = repeat_length
    queries = np.arange(prefix + n, prefix + 2 * n)
    keys = queries - n + 1
    return patterns[..., queries, keys].mean(axis=(1, -1))


def repeated_random_tokens(model, repeat_length: int, sequences: int, seed: int = 0):
    """(token id rows ``[BOS] r r``, prefix length): random non-special tokens, seeded."""
    rng = np.random.default_rng(seed)
    vocab = model.embedding_rows
    tokenizer = model.tokenizer
    if tokenizer is not None:
        vocab = min(vocab or model.vocab_size, model.vocab_size)
    if not vocab:
        raise InputError("head scores need a language model with a token embedding (random token ids to repeat)")
    special = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    candidates = np.array([i for i in range(vocab) if i not in special])
    if len(candidates) < 2:
        raise InputError("the vocabulary has fewer than two ordinary tokens to draw random sequences from")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    prefix = [int(bos)] if bos is not None else []
    rows = []
    for _ in range(sequences):
        copy = rng.choice(candidates, size=repeat_length, replace=len(candidates) < repeat_length).tolist()
        rows.append(prefix + copy + copy)
    return rows, len(prefix)


# -- the shipped induction model -------------------------------------------------------------------------


def induction_model():
    """The bundled two-layer attention-only model with an induction head (layer 1, head 0), as an
    ``InterpretableModel``."""
    from .errors import MlxterpError
    from .model import InterpretableModel

    if not (INDUCTION_PATH / "config.json").exists():
        raise MlxterpError(f"the induction model is missing from {INDUCTION_PATH}; "
                           "build it with: python scripts/build_induction_model.py")
    return InterpretableModel(str(INDUCTION_PATH))
