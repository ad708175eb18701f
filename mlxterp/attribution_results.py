"""The results of ``mlxterp.attribution``: direct logit attribution, head patching, attribution
patching and per-head attention heatmaps, with their terminal drawings.

Kept apart from the computations so that clients that only draw results rebuild them without
importing mlx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import MlxterpError
from .results import Column, FitTable, Result, _common, recovery_style, shorten, token_label


COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
SHADES = " ░▒▓█"
HEATMAP_SIDE = 32  # query and key positions a terminal heatmap shows (the last ones of a longer prompt)


# ---- results --------------------------------------------------------------------------------


def _shade_row(values, scale: float, signed: bool = True):
    """One row of a compact heatmap: a shaded block per value, green positive, red negative."""
    from rich.text import Text

    row = Text()
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            row.append("?", style="dim")
            continue
        level = min(len(SHADES) - 1, int(round(abs(value) / scale * (len(SHADES) - 1)))) if scale > 0 else 0
        style = ("green" if value >= 0 else "red") if signed else "cyan"
        row.append(SHADES[level] * 2, style=style)
    return row


def _heat_table(array: np.ndarray, row_labels: list[str], column_labels: list[str], title: str, signed=True):
    """A (rows, columns) array as a compact shaded grid, with the largest |value| as the scale."""
    from rich.text import Text

    finite = np.abs(array[np.isfinite(array)])
    scale = float(finite.max()) if finite.size else 0.0
    header = "".join(label[:2].rjust(2) for label in column_labels)
    rows = [[label, _shade_row(values, scale, signed)] for label, values in zip(row_labels, array)]
    legend = f"{'green + / red -, ' if signed else ''}█ = {scale:.3g}"
    return FitTable([Column("", "right", name="rows"), Column(Text(header), cut_header=True)], rows,
                    title=Text(title), notes=[Text(legend, style="dim")])


@dataclass(eq=False)
class LogitAttribution(Result):
    """Direct logit attribution: ``values[i]`` is what ``labels[i]`` ("embed", "3 attn", "3 mlp")
    adds to the logit of ``answer`` (minus that of ``wrong``) at ``position``; ``heads`` the
    same per head, ``(layers, heads)``. ``total`` is their sum, ``logit`` the model's own value."""

    labels: list[str]
    values: np.ndarray
    layers: list[int]
    heads: Optional[np.ndarray]  # (layers, heads) or None
    answer: str
    wrong: Optional[str]
    position: int
    total: float
    logit: float
    plot: Optional[str] = None
    kind = "dla"

    def __getitem__(self, label: str) -> float:
        return float(self.values[self.labels.index(label)])

    def head(self, layer: int, head: int) -> float:
        return float(self.heads[self.layers.index(layer), head])

    def top_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """(layer, head, value) of the ``k`` heads of largest |value|."""
        if self.heads is None:
            return []
        order = np.argsort(-np.abs(self.heads), axis=None)[:k]
        return [(self.layers[i // self.heads.shape[1]], int(i % self.heads.shape[1]), float(self.heads.flat[i]))
                for i in order]

    def what(self) -> str:
        return f"logit {token_label(self.answer)}" + (f" - {token_label(self.wrong)}" if self.wrong else "")

    def data(self):
        return {"labels": list(self.labels), "values": np.asarray(self.values), "layers": list(self.layers),
                "heads": None if self.heads is None else np.asarray(self.heads), "answer": self.answer,
                "wrong": self.wrong, "position": self.position, "total": self.total, "logit": self.logit,
                "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        heads = data.get("heads")
        return cls(list(data["labels"]), np.asarray(data["values"]), [int(n) for n in data["layers"]],
                   None if heads is None else np.asarray(heads), data["answer"], data.get("wrong"),
                   int(data["position"]), float(data["total"]), float(data["logit"]), plot=data.get("plot"),
                   **_common(data))

    def save_plot(self, save_path=None) -> str:
        from .plots import plot_head_grid

        if self.heads is None:
            raise MlxterpError("this attribution has no per-head values to plot (heads=False)")
        self.plot = plot_head_grid(self.heads, self.layers, f"Direct logit attribution per head: {self.what()}",
                                   "logit contribution", save_path=save_path, stem="dla")
        return self.plot

    def body(self):
        from rich.console import Group
        from rich.text import Text

        scale = float(np.max(np.abs(self.values))) if len(self.values) else 1.0
        order = np.argsort(-np.abs(self.values))[:12]
        rows = []
        for i in sorted(order):
            value = float(self.values[i])
            width = int(round(abs(value) / scale * 24)) if scale else 0
            rows.append([self.labels[i], f"{value:+.3f}", Text("█" * width, style="green" if value >= 0 else "red")])
        title = (f"direct logit attribution of the {self.what()} at position {self.position}: "
                 f"sum {self.total:+.3f}, model {self.logit:+.3f}")
        parts = [FitTable([Column("component"), Column("value", "right"), Column("", drop=1, name="bars")], rows,
                          title=Text(title),
                          notes=[Text(f"the {len(order)} largest of {len(self.values)} components", style="dim")]
                          if len(order) < len(self.values) else [])]
        if self.heads is not None:
            parts.append(_heat_table(self.heads, [str(n) for n in self.layers],
                                     [str(h) for h in range(self.heads.shape[1])], "per head (rows: layers)"))
            parts.append(Text("strongest heads: " + ", ".join(f"L{l}H{h} {v:+.3f}" for l, h, v in self.top_heads(5))))
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts)

    def short(self):
        best = int(np.argmax(np.abs(self.values))) if len(self.values) else None
        if best is None:
            return "dla: nothing"
        return f"dla {self.what()}: {self.labels[best]} {float(self.values[best]):+.3f} (of {self.total:+.3f})"

    def table(self):
        rows = [[label, float(v)] for label, v in zip(self.labels, self.values)]
        return f"direct logit attribution of the {self.what()}", ["component", "value"], rows


@dataclass(eq=False)
class HeadPatching(Result):
    """Recovery % of patching each head's ``z`` from the clean run: ``percent`` is
    ``(layers, heads)``, or ``(layers, heads, positions)`` with positions."""

    layers: list[int]
    percent: np.ndarray
    metric: str
    positions: Optional[list[int]] = None
    tokens: list[str] = field(default_factory=list)
    answers: Optional[list[str]] = None
    plot: Optional[str] = None
    kind = "head_patching"

    def recovery(self, layer: int, head: int, position: Optional[int] = None) -> float:
        row = self.percent[self.layers.index(layer), head]
        return float(row if position is None else row[self.positions.index(position)])

    def by_head(self) -> np.ndarray:
        """(layers, heads): per position, the position of largest |recovery| for each head."""
        if self.positions is None:
            return self.percent
        index = np.nanargmax(np.abs(self.percent), axis=-1)
        return np.take_along_axis(self.percent, index[..., None], axis=-1)[..., 0]

    def best(self) -> tuple:
        flat = np.where(np.isfinite(self.percent), self.percent, -np.inf)
        index = np.unravel_index(int(np.argmax(flat)), self.percent.shape)
        layer, head = self.layers[index[0]], int(index[1])
        position = self.positions[index[2]] if self.positions is not None else None
        return layer, head, position, float(self.percent[index])

    def data(self):
        return {"layers": list(self.layers), "percent": np.asarray(self.percent), "metric": self.metric,
                "positions": self.positions, "tokens": list(self.tokens), "answers": self.answers, "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        positions = data.get("positions")
        return cls([int(n) for n in data["layers"]], np.asarray(data["percent"]), data["metric"],
                   positions=None if positions is None else [int(p) for p in positions],
                   tokens=list(data.get("tokens") or []), answers=data.get("answers"), plot=data.get("plot"),
                   **_common(data))

    def save_plot(self, save_path=None) -> str:
        from .plots import plot_head_grid

        title = f"Head patching ({self.metric})" + (": strongest position per head" if self.positions else "")
        self.plot = plot_head_grid(self.by_head(), self.layers, title, "recovery %", save_path=save_path,
                                   stem="head-patching", limit=100)
        return self.plot

    def body(self):
        from rich.console import Group
        from rich.text import Text

        n_heads = self.percent.shape[1]
        parts = []
        if self.positions is None or len(self.positions) == 1:
            grid = self.percent if self.positions is None else self.percent[..., 0]
            columns = [Column("layer", "right")] + [Column(f"H{h}", "right", drop=h + 1) for h in range(n_heads)]
            rows = [[str(layer)] + [Text(f"{v:+.0f}", style=recovery_style(v)) for v in row]
                    for layer, row in zip(self.layers, grid.tolist())]
            where = "" if self.positions is None else f" at position {self.positions[0]}"
            parts.append(FitTable(columns, rows, title=Text(f"head patching ({self.metric}): recovery %{where}")))
        else:
            for index, layer in enumerate(self.layers):
                parts.append(_heat_table(self.percent[index], [f"L{layer}H{h}" for h in range(n_heads)],
                                         [str(p) for p in self.positions],
                                         f"layer {layer}: head (rows) x position (columns), recovery %"))
        layer, head, position, value = self.best()
        where = f" @ {position}" if position is not None else ""
        parts.append(Text(f"best: layer {layer} head {head}{where}: {value:+.1f}%"))
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts)

    def short(self):
        layer, head, position, value = self.best()
        return f"best head L{layer}H{head}" + (f" @ {position}" if position is not None else "") + f": {value:+.1f}%"

    def table(self):
        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(self.percent.shape[1]):
                if self.positions is None:
                    rows.append([layer, h, "", float(self.percent[i, h])])
                else:
                    rows += [[layer, h, p, float(v)] for p, v in zip(self.positions, self.percent[i, h])]
        return f"head patching ({self.metric})", ["layer", "head", "position", "recovery %"], rows


@dataclass(eq=False)
class AttributionPatching(Result):
    """Attribution patching estimates (recovery %, the gradient approximation of activation
    patching): ``scores[component]`` is ``(layers, positions)``; ``heads`` is
    ``(layers, heads, positions)`` (the estimate for patching each head's ``z``)."""

    components: list[str]
    layers: list[int]
    positions: list[int]
    scores: dict  # {component: np.ndarray (layers, positions)}
    heads: Optional[np.ndarray]
    tokens: list[str] = field(default_factory=list)
    answers: Optional[list[str]] = None
    clean_diff: float = 0.0
    corrupt_diff: float = 0.0
    plot: Optional[str] = None
    kind = "attribution"

    def __getitem__(self, component: str) -> np.ndarray:
        return self.scores[component]

    def data(self):
        return {"components": list(self.components), "layers": list(self.layers), "positions": list(self.positions),
                "scores": {k: np.asarray(v) for k, v in self.scores.items()},
                "heads": None if self.heads is None else np.asarray(self.heads), "tokens": list(self.tokens),
                "answers": self.answers, "clean_diff": self.clean_diff, "corrupt_diff": self.corrupt_diff,
                "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        heads = data.get("heads")
        return cls(list(data["components"]), [int(n) for n in data["layers"]], [int(p) for p in data["positions"]],
                   {k: np.asarray(v) for k, v in data["scores"].items()}, None if heads is None else np.asarray(heads),
                   tokens=list(data.get("tokens") or []), answers=data.get("answers"),
                   clean_diff=float(data.get("clean_diff") or 0.0), corrupt_diff=float(data.get("corrupt_diff") or 0.0),
                   plot=data.get("plot"), **_common(data))

    def save_plot(self, save_path=None) -> str:
        from .plots import plot_patching

        first = self.components[0]
        grid = {layer: {p: float(v) for p, v in zip(self.positions, row)}
                for layer, row in zip(self.layers, self.scores[first])}
        self.plot = plot_patching(grid, title=f"Attribution patching: {first} (recovery % estimate)",
                                  position_labels=dict(zip(self.positions, self.tokens)) or None, save_path=save_path)
        return self.plot

    def strongest(self, k: int = 12) -> list[tuple[str, int, int, float]]:
        """(component or "L{layer}H{head}", layer, position, estimate) of the ``k`` largest |estimates|."""
        cells = [(c, layer, p, float(v)) for c in self.components
                 for layer, row in zip(self.layers, self.scores[c]) for p, v in zip(self.positions, row)]
        if self.heads is not None:
            cells += [(f"head {h}", layer, p, float(v)) for i, layer in enumerate(self.layers)
                      for h in range(self.heads.shape[1]) for p, v in zip(self.positions, self.heads[i, h])]
        cells.sort(key=lambda cell: -abs(cell[3]))
        return cells[:k]

    def body(self):
        from rich.console import Group
        from rich.text import Text

        labels = [token_label(t)[:2] for t in self.tokens] if self.tokens else [str(p) for p in self.positions]
        parts = [_heat_table(self.scores[c], [str(n) for n in self.layers], labels,
                             f"{c}: layer (rows) x position (columns)") for c in self.components]
        # one label per row (hook point and position), so no two rows read alike in a narrow terminal
        rows = [[f"layers.{layer}.{what} @ {p}", token_label(self.tokens[self.positions.index(p)]) if self.tokens else "",
                 Text(f"{v:+.1f}%", style=recovery_style(v))] for what, layer, p, v in self.strongest()]
        parts.append(FitTable([Column("hook point @ position"), Column("token", shrink=True, max_width=16),
                               Column("estimate", "right")], rows,
                              title=Text("attribution patching: the strongest estimated recoveries"), label=False))
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts)

    def short(self):
        what, layer, position, value = self.strongest(1)[0]
        return f"attribution: strongest {what} L{layer} @ {position}: {value:+.1f}%"

    def table(self):
        rows = [[c, layer, p, float(v)] for c in self.components for layer, row in zip(self.layers, self.scores[c])
                for p, v in zip(self.positions, row)]
        return "attribution patching (recovery % estimate)", ["component", "layer", "position", "estimate"], rows


@dataclass(eq=False)
class HeadAttention(Result):
    """Attention patterns of some heads of one layer: ``patterns`` is ``(heads, query, key)``
    for the first row of the input; ``tokens`` its tokens."""

    layer: int
    heads: list[int]
    patterns: np.ndarray
    tokens: list[str] = field(default_factory=list)
    plot: Optional[str] = None
    kind = "head_attention"

    def data(self):
        return {"layer": self.layer, "heads": list(self.heads), "patterns": np.asarray(self.patterns),
                "tokens": list(self.tokens), "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        return cls(int(data["layer"]), [int(h) for h in data["heads"]], np.asarray(data["patterns"]),
                   tokens=list(data.get("tokens") or []), plot=data.get("plot"), **_common(data))

    def save_plot(self, save_path=None) -> str:
        from .plots import plot_head_attention

        self.plot = plot_head_attention(self.patterns, self.heads, self.layer, self.tokens, save_path=save_path)
        return self.plot

    def body(self):
        from rich.console import Group
        from rich.text import Text

        length = self.patterns.shape[-1]
        start = max(0, length - HEATMAP_SIDE)
        tokens = self.tokens or [str(p) for p in range(length)]
        # One row per query position, one column per head: a shaded character per key position.
        rows = []
        for query in range(start, length):
            row = [f"{query} {shorten(token_label(tokens[query]), 12)}"]
            for index in range(len(self.heads)):
                cells = Text()
                for key in range(start, length):
                    value = float(self.patterns[index, query, key])
                    level = min(len(SHADES) - 1, int(round(value * (len(SHADES) - 1))))
                    cells.append(SHADES[level] if key <= query else "·", style="cyan" if key <= query else "dim")
                row.append(cells)
            rows.append(row)
        columns = [Column("query", "right")] + [Column(f"head {h}", drop=i + 1) for i, h in enumerate(self.heads)]
        notes = [Text("each cell: one key position, left to right; █ = probability 1", style="dim")]
        if start:
            notes.append(Text(f"the last {length - start} of {length} positions; the data and the plot hold all",
                              style="dim"))
        parts = [FitTable(columns, rows, title=Text(f"attention of layer {self.layer}: query (rows) to key"),
                          notes=notes)]
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts)

    def short(self):
        return f"attention of layer {self.layer} heads {', '.join(map(str, self.heads))}: {self.patterns.shape[-1]} tokens"

    def table(self):
        rows = [[head, q, k, float(self.patterns[i, q, k])] for i, head in enumerate(self.heads)
                for q in range(self.patterns.shape[1]) for k in range(q + 1)]
        return f"attention of layer {self.layer}", ["head", "query", "key", "probability"], rows


# ---- direct logit attribution ----------------------------------------------------------------
