"""Result objects: what one statement gives back.

Each result is plain data plus three views of it: `render()` (a rich renderable for a
terminal: tables, a coloured layer x position grid for `lens`, a bar chart for `patch` (with
`@`, a layer x position grid coloured by recovery), a sparkline for saved values),
`to_data()` (plain dicts, lists, numbers and strings; arrays as {"dtype", "shape", "data":
bytes}; with "summary" and "text", the other two views as plain text, for clients that do
not draw) and `summary(max_len)` (one line for inline
display). `result_from_data(data)` rebuilds the object from its `to_data()` form, so a
client of the daemon draws a result with the same code as the process that made it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
PALETTE = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta",
           "bright_green", "bright_yellow", "bright_blue", "bright_red"]


# ---- small helpers ---------------------------------------------------------------------


def sparkline(values, width: int = 24) -> str:
    """The values as a row of block characters, averaged down to `width` cells."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return ""
    if flat.size > width:
        flat = np.array([chunk.mean() for chunk in np.array_split(flat, width)])
    lo, hi = float(flat.min()), float(flat.max())
    if hi - lo < 1e-12:
        return SPARK[3] * flat.size
    levels = ((flat - lo) / (hi - lo) * (len(SPARK) - 1)).round().astype(int)
    return "".join(SPARK[i] for i in levels)


def array_data(array) -> dict:
    """An array in plain form: {"dtype", "shape", "data": its bytes, C order, little-endian}.
    (Not np.ascontiguousarray: that makes a 0-d array 1-d.)"""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes(order="C")}


def array_from_data(data: dict) -> np.ndarray:
    """The array of `array_data`'s form; bfloat16 (no numpy dtype) comes back as float32.
    Raises ValueError for a dtype numpy does not know or bytes that do not fit the shape."""
    if "data" not in data:
        raise ValueError("this array came without its bytes (a fetch handle: fetch them from the daemon first)")
    raw, dtype = data["data"], data["dtype"]
    shape = tuple(int(n) for n in data["shape"])
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    try:
        np_dtype = np.dtype(dtype).newbyteorder("<")
    except TypeError:
        raise ValueError(f"unknown array dtype {dtype!r}") from None
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()


def array_stats(array: np.ndarray) -> dict:
    """shape, norm, mean, std, min, max and the first few values of an array, as plain numbers."""
    flat = np.asarray(array, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return {"shape": list(array.shape), "norm": 0.0, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "first": []}
    with np.errstate(all="ignore"):
        return {
            "shape": list(array.shape),
            "norm": float(np.linalg.norm(flat)),
            "mean": float(flat.mean()),
            "std": float(flat.std()),
            "min": float(flat.min()),
            "max": float(flat.max()),
            "first": [float(v) for v in flat[:6]],
        }


def number(value: float) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def token_label(text: str) -> str:
    """A token's text made visible: quotes when it has leading/trailing spaces or is empty."""
    return repr(text) if text.strip() != text or not text else text


def shorten(text: str, max_len: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_len else text[: max(max_len - 1, 0)] + "…"


def colour_of(token_id: int) -> str:
    return PALETTE[token_id % len(PALETTE)]


def prediction_data(predictions) -> list[dict]:
    return [{"id": int(i), "score": float(s), "token": t} for i, s, t in predictions]


def predictions_from_data(cells: list[dict]) -> list[tuple]:
    return [(int(d["id"]), float(d["score"]), d["token"]) for d in cells]


TEXT_WIDTH = 100  # columns of the plain-text rendering in to_data()["text"]


def plain_text(renderable, width: int = TEXT_WIDTH) -> str:
    """A renderable drawn as plain text (no colour, no control codes), `width` columns wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False,
                      legacy_windows=False, force_terminal=False, force_jupyter=False)
    console.print(renderable)
    return console.file.getvalue()


# ---- the results -------------------------------------------------------------------------


@dataclass
class Result:
    """Base: `kind`, notes shown under the result, and the three views."""

    notes: list[str] = field(default_factory=list, kw_only=True)
    kind = "result"

    def data(self) -> dict:
        return {}

    def to_data(self, text: bool = True) -> dict:
        """Plain data; ``text`` adds the plain-text drawing (most of the cost of a cached query)."""
        data = {"kind": self.kind, **self.data(), "notes": list(self.notes), "summary": self.summary(40)}
        if text:
            data["text"] = plain_text(self.render())
        return data

    @classmethod
    def from_data(cls, kind: str, fields: dict, notes: list[str]):
        """The result whose `to_data()` gave `fields` (plus the keys every result has)."""
        raise NotImplementedError

    def body(self):
        return Text(self.short())

    def render(self):
        parts = [self.body()] + [Text(note, style="dim") for note in self.notes]
        return Group(*parts)

    def short(self) -> str:
        return self.kind

    def summary(self, max_len: int = 40) -> str:
        return shorten(self.short(), max_len)


@dataclass
class TextResult(Result):
    """A message: `prompt`, `steer`, `load`, `info`, `help` when there is no table to show."""

    message: str
    kind: str = "text"
    fields: dict = field(default_factory=dict)

    def data(self):
        return {"message": self.message, **self.fields}

    @classmethod
    def from_data(cls, kind, fields, notes):
        rest = {k: v for k, v in fields.items() if k != "message"}
        return cls(fields["message"], kind=kind, fields=rest, notes=notes)

    def body(self):
        return Text(self.message)

    def short(self):
        return self.message.split("\n", 1)[0]


@dataclass
class TableResult(Result):
    """Rows under named columns: `tokens`, `stats`, `ls`, `info`, `help`."""

    columns: list[str]
    rows: list[list]
    kind: str = "table"
    title: str = ""
    fields: dict = field(default_factory=dict)

    def data(self):
        return {"title": self.title, "columns": list(self.columns), "rows": [list(r) for r in self.rows], **self.fields}

    @classmethod
    def from_data(cls, kind, fields, notes):
        rest = {k: v for k, v in fields.items() if k not in ("title", "columns", "rows")}
        return cls(list(fields["columns"]), [list(r) for r in fields["rows"]], kind=kind,
                   title=fields.get("title", ""), fields=rest, notes=notes)

    def body(self):
        table = Table(title=Text(self.title) if self.title else None, title_justify="left")
        for column in self.columns:
            numeric = self.rows and isinstance(self.rows[0][self.columns.index(column)], (int, float))
            table.add_column(column, justify="right" if numeric else "left")
        for row in self.rows:
            table.add_row(*[Text(number(v) if isinstance(v, float) else str(v)) for v in row])
        return table

    def short(self):
        if self.kind == "tokens":
            return f"{len(self.rows)} tokens: " + " ".join(token_label(r[2]) for r in self.rows)
        return f"{self.title or self.kind}: {len(self.rows)} rows"


@dataclass
class ValuesResult(Result):
    """Arrays with their statistics: `save` (captured activations) and `let` (arithmetic)."""

    arrays: list[tuple[str, np.ndarray]]  # (label: module short name or expression, values)
    kind: str = "save"
    name: str | None = None  # the $ name it was kept as
    where: str = ""  # which positions of which input, for the title

    def data(self):
        return {
            "name": self.name,
            "where": self.where,
            "arrays": [{"label": label, **array_stats(a), "array": array_data(a)} for label, a in self.arrays],
        }

    @classmethod
    def from_data(cls, kind, fields, notes):
        arrays = [(entry["label"], array_from_data(entry["array"])) for entry in fields["arrays"]]
        return cls(arrays, kind=kind, name=fields.get("name"), where=fields.get("where", ""), notes=notes)

    def body(self):
        title = (f"${self.name} = " if self.name else "") + self.where
        table = Table(title=Text(title) if title else None, title_justify="left")
        for column in ("", "shape", "norm", "mean", "std", "min", "max", "values"):
            table.add_column(column, justify="left" if column in ("", "values") else "right")
        for label, array in self.arrays:
            s = array_stats(array)
            first = " ".join(number(v) for v in s["first"][:4]) + (" …" if array.size > 4 else "")
            table.add_row(Text(label), str(tuple(s["shape"])), number(s["norm"]), number(s["mean"]), number(s["std"]),
                          number(s["min"]), number(s["max"]), Text(sparkline(array), style="cyan") + Text(" " + first))
        return table

    def short(self):
        prefix = f"${self.name} " if self.name else ""
        if len(self.arrays) == 1:
            label, array = self.arrays[0]
            s = array_stats(array)
            return f"{prefix}{tuple(s['shape'])} norm {number(s['norm'])} mean {number(s['mean'])}"
        norms = [array_stats(a)["norm"] for _, a in self.arrays]
        return f"{prefix}{len(self.arrays)} arrays, norm {number(min(norms))}..{number(max(norms))}"


@dataclass
class LensResult(Result):
    """Logit lens: per layer and position, the top tokens with their logits."""

    layers: list[int]
    positions: list[int]
    tokens: list[str]  # the input token at each shown position
    predictions: list[list[list[tuple]]]  # [layer][position] -> [(id, score, text), ...]
    kind: str = "lens"
    plot: str | None = None

    def data(self):
        return {
            "layers": list(self.layers),
            "positions": list(self.positions),
            "tokens": list(self.tokens),
            "predictions": [[prediction_data(cell) for cell in row] for row in self.predictions],
            "plot": self.plot,
        }

    @classmethod
    def from_data(cls, kind, fields, notes):
        predictions = [[predictions_from_data(cell) for cell in row] for row in fields["predictions"]]
        return cls(list(fields["layers"]), list(fields["positions"]), list(fields["tokens"]), predictions,
                   kind=kind, plot=fields.get("plot"), notes=notes)

    def body(self):
        if len(self.positions) == 1:
            position = self.positions[0]
            title = Text(f"logit lens at position {position} ({token_label(self.tokens[0])})")
            table = Table(title=title, title_justify="left")
            table.add_column("layer", justify="right")
            k = max((len(row[0]) for row in self.predictions), default=0)
            for rank in range(k):
                table.add_column(f"top {rank + 1}")
            for layer, row in zip(self.layers, self.predictions):
                cells = [Text(f"{token_label(t)} {s:.2f}", style=colour_of(i)) for i, s, t in row[0]]
                table.add_row(str(layer), *cells)
        else:
            # In a narrow terminal the token columns shrink (their cells end in "…"); the layer
            # column never does. Rich only shrinks columns that may wrap, so the token columns
            # may, and their cells themselves do not.
            table = Table(title="logit lens: top token per layer (rows) and position (columns)", title_justify="left")
            table.add_column("layer", justify="right", no_wrap=True,
                             min_width=max((len(str(layer)) for layer in self.layers), default=1))
            for position, token in zip(self.positions, self.tokens):
                header = Text(f"{position}\n{token_label(token)}", no_wrap=True, overflow="ellipsis")
                table.add_column(header, max_width=14, overflow="ellipsis")
            for layer, row in zip(self.layers, self.predictions):
                cells = [Text(token_label(cell[0][2]), style=colour_of(cell[0][0]), no_wrap=True, overflow="ellipsis")
                         for cell in row]
                table.add_row(str(layer), *cells)
        if self.plot:
            return Group(table, Text(f"plot: {self.plot}", style="dim"))
        return table

    def short(self):
        layer, cell = self.layers[-1], self.predictions[-1][-1]
        return f"layer {layer}: {token_label(cell[0][2])} {cell[0][1]:.2f}"


@dataclass
class PredictResult(Result):
    """Top tokens a hidden state decodes to, one row per (array, position)."""

    rows: list[tuple[str, list[tuple]]]  # (label, [(id, score, text), ...])
    kind: str = "predict"

    def data(self):
        return {"rows": [{"label": label, "predictions": prediction_data(p)} for label, p in self.rows]}

    @classmethod
    def from_data(cls, kind, fields, notes):
        rows = [(row["label"], predictions_from_data(row["predictions"])) for row in fields["rows"]]
        return cls(rows, kind=kind, notes=notes)

    def body(self):
        table = Table(title_justify="left")
        table.add_column("")
        k = max((len(p) for _, p in self.rows), default=0)
        for rank in range(k):
            table.add_column(f"top {rank + 1}")
        for label, predictions in self.rows:
            table.add_row(Text(label), *[Text(f"{token_label(t)} {s:.2f}", style=colour_of(i)) for i, s, t in predictions])
        return table

    def short(self):
        label, predictions = self.rows[-1]
        return " ".join(f"{token_label(t)} {s:.1f}" for _, s, t in predictions[:3])


@dataclass
class PatchResult(Result):
    """Activation patching: recovery % per layer (a bar chart), or per layer and position
    (a grid coloured by value, with `@`)."""

    component: str
    metric: str
    recovery: dict  # {layer: recovery %}, or {layer: {position: recovery %}} when positions are given
    kind: str = "patch"
    plot: str | None = None
    positions: list[int] = field(default_factory=list)  # empty: one value per layer
    tokens: list[str] = field(default_factory=list)  # the clean prompt's token at each position
    corrupt_tokens: list[str] = field(default_factory=list)  # the corrupted prompt's token there
    answers: list[str] | None = None  # (clean, corrupted) for metric logit_diff

    def data(self):
        if self.positions:
            recovery = {str(layer): {str(p): float(v) for p, v in row.items()} for layer, row in self.recovery.items()}
        else:
            recovery = {str(k): float(v) for k, v in self.recovery.items()}
        return {
            "component": self.component,
            "metric": self.metric,
            "answers": self.answers,
            "recovery": recovery,
            "positions": list(self.positions),
            "tokens": list(self.tokens),
            "corrupt_tokens": list(self.corrupt_tokens),
            "plot": self.plot,
        }

    @classmethod
    def from_data(cls, kind, fields, notes):
        positions = [int(p) for p in fields.get("positions") or []]
        if positions:
            recovery = {int(layer): {int(p): float(v) for p, v in row.items()}
                        for layer, row in fields["recovery"].items()}
        else:
            recovery = {int(layer): float(value) for layer, value in fields["recovery"].items()}
        answers = fields.get("answers")
        return cls(fields["component"], fields["metric"], recovery, kind=kind, plot=fields.get("plot"),
                   positions=positions, tokens=list(fields.get("tokens") or []),
                   corrupt_tokens=list(fields.get("corrupt_tokens") or []),
                   answers=list(answers) if answers else None, notes=notes)

    def title(self, what: str) -> Text:
        metric = self.metric
        if self.answers:
            metric += f" {token_label(self.answers[0])} vs {token_label(self.answers[1])}"
        return Text(f"patching {self.component} ({metric}): recovery % {what}")

    def body(self):
        table = self.grid() if self.positions else self.bars()
        if self.plot:
            return Group(table, Text(f"plot: {self.plot}", style="dim"))
        return table

    def bars(self):
        table = Table(title=self.title("per layer"), title_justify="left")
        table.add_column("layer", justify="right")
        table.add_column("recovery", justify="right")
        table.add_column("")
        finite = [abs(v) for v in self.recovery.values() if math.isfinite(v)]
        scale = max(finite + [1e-9])
        for layer, value in self.recovery.items():
            width = int(round(abs(value) / scale * 30)) if math.isfinite(value) else 0
            bar = Text("█" * width, style="green" if value >= 0 else "red")
            table.add_row(str(layer), f"{value:+.1f}%", bar)
        return table

    def grid(self):
        table = Table(title=self.title("per layer (rows) and position (columns)"), title_justify="left")
        table.add_column("layer", justify="right", no_wrap=True)
        for position, clean, corrupt in zip(self.positions, self.tokens, self.corrupt_tokens):
            label = token_label(clean) if clean == corrupt else f"{token_label(clean)}/{token_label(corrupt)}"
            table.add_column(Text(f"{position}\n{label}", no_wrap=True, overflow="ellipsis"), justify="right",
                             max_width=14, overflow="ellipsis")
        for layer, row in self.recovery.items():
            cells = [Text(f"{row[p]:+.1f}", style=recovery_style(row[p])) for p in self.positions]
            table.add_row(str(layer), *cells)
        return table

    def best(self):
        """(layer, position or None, value) of the highest finite recovery, or None."""
        if self.positions:
            cells = [(layer, p, v) for layer, row in self.recovery.items() for p, v in row.items()]
        else:
            cells = [(layer, None, v) for layer, v in self.recovery.items()]
        finite = [cell for cell in cells if math.isfinite(cell[2])]
        return max(finite, key=lambda cell: cell[2]) if finite else None

    def short(self):
        best = self.best()
        if best is None:
            return f"patch {self.component}: no finite recovery"
        layer, position, value = best
        if position is None:
            return f"best layer {layer}: {value:+.1f}%"
        return f"best layer {layer} @ {position}: {value:+.1f}%"


def recovery_style(value: float) -> str:
    """A cell's colour for a recovery %: green towards +100, red towards -100, plain near 0."""
    if not math.isfinite(value):
        return "dim"
    strength = min(abs(value) / 100.0, 1.0)
    if strength < 0.1:
        return ""
    level = int(round(40 + 160 * strength))
    background = f"rgb(0,{level},0)" if value > 0 else f"rgb({level},0,0)"
    return f"bold white on {background}" if strength >= 0.5 else f"white on {background}"


# ---- rebuilding ---------------------------------------------------------------------------

COMMON_KEYS = ("kind", "notes", "summary", "text")  # what to_data() puts in every result
BY_KIND = {"lens": LensResult, "predict": PredictResult, "patch": PatchResult}


def result_from_data(data: dict) -> Result:
    """The result object of a `to_data()` dict (as the daemon sends it, arrays with their
    bytes), to draw with `render()`. Raises ValueError when `data` is no result's form."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError(f"a result's data is a dict with a 'kind', got {type(data).__name__}")
    kind = data["kind"]
    fields = {k: v for k, v in data.items() if k not in COMMON_KEYS}
    notes = [str(note) for note in data.get("notes") or []]
    cls = BY_KIND.get(kind)
    if cls is None:  # the kinds of these three are many (save/let, tokens/stats/ls/..., prompt/load/...)
        if "arrays" in fields:
            cls = ValuesResult
        elif "columns" in fields and "rows" in fields:
            cls = TableResult
        elif "message" in fields:
            cls = TextResult
        else:
            raise ValueError(f"no result type has the fields of this {kind!r} result: {', '.join(fields) or 'none'} "
                             "(valid: arrays, columns and rows, message, or kind lens, predict or patch)")
    try:
        return cls.from_data(kind, fields, notes)
    except (KeyError, TypeError) as error:
        raise ValueError(f"this {kind!r} result's data is incomplete or malformed: {type(error).__name__}: {error}") from None
