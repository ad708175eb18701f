"""The library's results: what an analysis returns, as data that shows itself.

Each result is a small dataclass holding plain data (lists, numbers, strings and numpy
arrays) with these views of it:

* the plain structure the user guide documents, still reachable: a logit lens is
  ``{layer: [[(token_id, logit, token), ...] per position]}`` (``result[layer]``,
  iteration, ``.items()``, ``.to_dict()``), token predictions are a list of ids, a
  patching sweep is ``{layer: recovery %}``, attention patterns ``{layer: array}``;
* ``render()`` / ``__rich__``: a rich renderable for a terminal (``rich.print(result)``),
  whose tables (``FitTable``) fit the width they are drawn at: columns left out (and named)
  before a row label or a number is cut, large results summarised with where the rest is;
* ``_repr_html_()``: an HTML table for notebooks (with the plot embedded as a PNG when
  the result has one);
* ``summary(max_len)``: one line;
* ``to_data(text=False)``: a dict of plain data with its ``"kind"`` (arrays stay
  ``np.ndarray``; with ``text=True`` also the plain-text drawing), which
  ``Result.from_data`` / ``result_from_data`` turn back into the same object.

A subclass of ``Result`` that sets its own ``kind`` class attribute is registered for
``result_from_data`` by that kind once its module is imported; ``RESULT_MODULES`` names the
module of each kind defined elsewhere, which ``result_from_data`` imports when it needs it.

This module imports only numpy at load time (rich when something is drawn), so a
client that only draws results never loads mlx.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

SPARK = "▁▂▃▄▅▆▇█"
PALETTE = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta",
           "bright_green", "bright_yellow", "bright_blue", "bright_red"]
TEXT_WIDTH = 100  # columns of the plain-text drawing in to_data(text=True)["text"]
SHOWN_RANKS = 10  # ranks drawn per row of a one-position lens or of predictions; the data keeps all
GRID_RANKS = 3  # ranks stacked in a cell of the lens grid


# ---- small helpers --------------------------------------------------------------------------


def sparkline(values, width: int = 24) -> str:
    """The values as a row of block characters, averaged down to ``width`` cells."""
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


def array_stats(array) -> dict:
    """shape, norm, mean, std, min, max and the first few values of an array, as plain numbers."""
    array = as_numpy(array)
    flat = array.astype(np.float64).reshape(-1)
    if flat.size == 0:
        return {"shape": list(array.shape), "norm": 0.0, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0,
                "first": []}
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


def as_numpy(array) -> np.ndarray:
    """A numpy array of an mx.array (bfloat16 and other dtypes numpy lacks go through float32)."""
    if isinstance(array, np.ndarray):
        return array
    try:
        return np.asarray(array)
    except (TypeError, ValueError, RuntimeError):
        import mlx.core as mx

        return np.asarray(array.astype(mx.float32))


def number(value) -> str:
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


PROMPT_SHOWN = 48  # characters of a prompt quoted in a result's header
TOKENS_SHOWN = 16  # tokens listed where a prompt is set (the first 12 and the last 4 of a long one)


def prompt_label(text: str, max_len: int = PROMPT_SHOWN) -> str:
    """A prompt quoted for a header: whole when short, else its start and end around "…"."""
    quoted = repr(text)
    if len(quoted) <= max_len:
        return quoted
    keep = max(max_len - 3, 8)
    head, tail = keep * 2 // 3, keep - keep * 2 // 3
    return repr(text[:head]) [:-1] + "…" + repr(text[-tail:])[1:]


def token_listing(tokens: list[str], max_shown: int = TOKENS_SHOWN) -> str:
    """Tokens as one line; a long list shows its first and last ones and how many are between."""
    labels = [token_label(t) for t in tokens]
    if len(labels) <= max_shown:
        return " ".join(labels)
    tail = max_shown // 4
    head = max_shown - tail
    return " ".join(labels[:head]) + f" … ({len(labels) - head - tail} more) … " + " ".join(labels[-tail:])


def colour_of(token_id: int) -> str:
    return PALETTE[int(token_id) % len(PALETTE)]


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


def plain_text(renderable, width: int = TEXT_WIDTH) -> str:
    """A renderable drawn as plain text (no colour, no control codes), ``width`` columns wide."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False,
                      legacy_windows=False, force_terminal=False, force_jupyter=False)
    console.print(renderable)
    return console.file.getvalue()


def same(a, b) -> bool:
    """Equality of plain data that may hold numpy arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _strings_data(strings: dict) -> dict:
    ids = sorted(strings)
    return {"ids": ids, "texts": [strings[i] for i in ids]}


def _strings_from_data(data: dict) -> dict:
    return {int(i): t for i, t in zip(data["ids"], data["texts"])}


# ---- tables that fit the width they are drawn at ----------------------------------------------

WIDTH_HINT = "a wider terminal, --width N or --json shows them"
CUT_HEADER = 10  # columns a header that may be cut keeps at most (when its cells are narrower)
GRID_POSITIONS = 24  # a patching grid over more positions is shown as its strongest entries
STRONGEST = 12  # entries shown of such a grid


@dataclass
class Column:
    """One column of a ``FitTable``.

    ``drop``: 0 for a column always shown; when the table is too wide, the columns with the
    highest ``drop`` are left out first (the rightmost of equals first). ``shrink``: its cells
    (token texts) may be cut with "…" down to ``min_width``; numbers and row labels never are.
    """

    header: object  # str or rich Text
    justify: str = "left"
    drop: int = 0
    shrink: bool = False
    min_width: int = 6
    max_width: int | None = None  # of a shrinking column
    cut_header: bool = False  # the header may be cut with "…" to the cells' width (a token under a number)
    name: str = ""  # what notes call the column when its header is empty
    wrap: bool = False  # its cells may wrap at spaces onto more lines (down to ``min_width``)


def _cell_width(cell) -> int:
    from rich.cells import cell_len

    text = cell.plain if hasattr(cell, "plain") else str(cell)
    return max((cell_len(line) for line in text.split("\n")), default=0)


def _joined(rows, stacked: bool) -> list[list]:
    """Rows with each (main, detail) cell made one Text: on one line, or stacked on two."""
    from rich.text import Text

    def cell(value):
        if not isinstance(value, tuple):
            return value
        main, detail = (part if hasattr(part, "plain") else Text(str(part)) for part in value)
        return Text.assemble(main, "\n" if stacked else " ", detail)

    return [[cell(value) for value in row] for row in rows]


def _header_text(header) -> str:
    return " ".join((header.plain if hasattr(header, "plain") else str(header)).split())


def _common_ends(labels: list[str]) -> tuple[str, str]:
    """The longest prefix and suffix (ending/starting at a "." or a space) that all labels share,
    leaving every label something of its own."""
    if len(labels) < 2:
        return "", ""
    prefix = os.path.commonprefix(labels)
    cut = max(prefix.rfind("."), prefix.rfind(" "))
    prefix = prefix[: cut + 1] if cut >= 0 else ""
    rests = [label[len(prefix):] for label in labels]
    suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
    cut = min((i for i in (suffix.find("."), suffix.find(" ")) if i >= 0), default=-1)
    suffix = suffix[cut:] if cut >= 0 else ""
    if suffix and any(len(r) <= len(suffix) for r in rests):
        suffix = ""
    if prefix and any(len(label) <= len(prefix) for label in labels):
        prefix = ""
    return prefix, suffix


class FitTable:
    """A table that fits the width it is drawn at, without cutting a row label or a number.

    Too wide, it (1) leaves out the columns marked to go first, (2) drops the part of the row
    labels they all share (``layers.`` … ``.mlp``: the column header says so), (3) leaves out
    the other droppable columns, naming what it left out and where to see it; when even that
    does not fit, each row is drawn as a block of ``column: value`` lines. The title is a line
    of its own above the table, wrapped at the width rather than squeezed to the table's.
    """

    def __init__(self, columns: list[Column], rows: list[list], title=None, label: bool = True,
                 notes: list | None = None):
        self.columns = columns
        # A cell is a str, a rich Text, or a (main, detail) pair of Texts: "main detail" on one
        # line, or stacked on two when that lets the table keep its columns.
        self.rows = [[c if hasattr(c, "plain") or isinstance(c, tuple) else str(c) for c in row] for row in rows]
        self.title = title
        self.label = label  # the first column names the rows
        self.notes = list(notes or [])

    def __rich_console__(self, console, options):
        from rich.text import Text

        width = options.max_width
        if self.title:
            yield self.title if hasattr(self.title, "plain") else Text(str(self.title))
        yield from self._fitted(width)
        for note in self.notes:
            yield note if hasattr(note, "plain") else Text(str(note), style="dim")

    def _extent(self, index: int, rows, headers) -> tuple[int, int]:
        """(least, most) columns that column ``index`` can be drawn in."""
        column = self.columns[index]
        header = _cell_width(headers[index])
        cells = max([1] + [_cell_width(row[index]) for row in rows])
        if column.cut_header:  # the whole header when there is room, else cut down to CUT_HEADER
            return max(cells, min(header, CUT_HEADER)), max(cells, header)
        natural = max(header, cells)
        if column.shrink or column.wrap:
            most = min(natural, column.max_width) if column.max_width else natural
            return min(most, column.min_width), most
        return natural, natural

    def _allot(self, rows, headers, shown, width) -> dict[int, int]:
        """Columns given to each shown column: the least each needs, then what is left shared
        out among those that can use more."""
        extents = {i: self._extent(i, rows, headers) for i in shown}
        widths = {i: least for i, (least, _) in extents.items()}
        spare = width - (sum(widths.values()) + 3 * len(shown) + 1)
        growing = [i for i in shown if extents[i][1] > widths[i]]
        while spare > 0 and growing:
            for i in list(growing):
                if spare <= 0:
                    break
                widths[i] += 1
                spare -= 1
                if widths[i] >= extents[i][1]:
                    growing.remove(i)
        return widths

    def _fitted(self, width: int):
        from rich.text import Text

        rows, headers = _joined(self.rows, stacked=False), [c.header for c in self.columns]
        shown = list(range(len(self.columns)))

        def needed(rows, headers) -> int:
            return sum(self._extent(i, rows, headers)[0] for i in shown) + 3 * len(shown) + 1

        def drop_columns(at_least: int) -> None:
            while needed(rows, headers) > width:
                candidates = [i for i in shown if self.columns[i].drop >= at_least]
                if not candidates:
                    return
                worst = max(candidates, key=lambda i: (self.columns[i].drop, i))
                shown.remove(worst)

        if needed(rows, headers) > width:
            rows = _joined(self.rows, stacked=True)
        drop_columns(2)
        if self.label and needed(rows, headers) > width:
            rows, headers = self._shorter_labels(rows, headers)
        drop_columns(1)
        if needed(rows, headers) > width:  # one block per row, with its whole label
            yield from self._records(_joined(self.rows, stacked=False), [c.header for c in self.columns], width)
            return
        yield self._table(rows, headers, shown, self._allot(rows, headers, shown, width))
        left_out = [i for i in range(len(self.columns)) if i not in shown]
        if left_out:
            names = [_header_text(headers[i]) or self.columns[i].name or "(unnamed)" for i in left_out]
            if len(names) > 5:  # many (the first positions of a long prompt): the first and last of them
                names = [f"{len(names)} columns ({names[0]}", "…", f"{names[-1]})"]
            yield Text(f"not shown at {width} columns: {', '.join(names)}; {WIDTH_HINT}", style="dim")

    def _shorter_labels(self, rows, headers):
        from rich.text import Text

        labels = [row[0].plain if hasattr(row[0], "plain") else str(row[0]) for row in rows]
        prefix, suffix = _common_ends(labels)
        if not prefix and not suffix:
            return rows, headers
        new_rows = []
        for row, label in zip(rows, labels):
            short = label[len(prefix): len(label) - len(suffix)]
            style = row[0].style if hasattr(row[0], "style") else ""
            new_rows.append([Text(short, style=style)] + list(row[1:]))
        header = headers[0].plain if hasattr(headers[0], "plain") else str(headers[0])
        shared = f"{prefix}…{suffix}"
        return new_rows, [f"{header} {shared}".strip()] + list(headers[1:])

    def _table(self, rows, headers, shown, widths):
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for i in shown:
            column = self.columns[i]
            header = headers[i] if hasattr(headers[i], "plain") else Text(str(headers[i]))
            if column.shrink or column.cut_header:
                header = header.copy()
                header.no_wrap, header.overflow = True, "ellipsis"
            table.add_column(header, justify=column.justify, width=widths[i], no_wrap=not column.wrap,
                             overflow="fold" if column.wrap else "ellipsis")
        for row in rows:
            cells = []
            for i in shown:
                cell = row[i] if hasattr(row[i], "plain") else Text(str(row[i]))
                if self.columns[i].shrink:
                    cell = cell.copy()
                    cell.no_wrap, cell.overflow = True, "ellipsis"
                cells.append(cell)
            table.add_row(*cells)
        return table

    def _records(self, rows, headers, width):
        """Each row as a block: its label, then one ``column: value`` line per other column."""
        from rich.text import Text

        names = [_header_text(h) for h in headers]
        for row in rows:
            first = row[0] if hasattr(row[0], "plain") else Text(str(row[0]))
            yield Text(f"{names[0]}: " if names[0] else "", style="bold") + first if self.label else Text("─" * 3)
            for name, cell in zip(names[self.label:], row[self.label:]):
                cell = cell if hasattr(cell, "plain") else Text(str(cell))
                yield Text(f"  {name or '·'}: ") + cell


# ---- the base ---------------------------------------------------------------------------------

COMMON_KEYS = ("kind", "notes", "summary", "text")  # what to_data() puts in every result
BY_KIND: dict = {}  # kind -> the Result class that rebuilds it (every subclass naming its own kind)
# kind -> the module defining its class, for the kinds defined outside this module: result_from_data
# imports it on first need, so a client rebuilds any result without importing the analyses first.
# These modules import no mlx at load time (tests/test_dsl_analyses.py checks both).
RESULT_MODULES = {
    "lens_comparison": "mlxterp.lens_sae_results",
    "sae_metrics": "mlxterp.lens_sae_results",
    "feature_examples": "mlxterp.lens_sae_results",
    "active_features": "mlxterp.lens_sae_results",
    "heads": "mlxterp.heads",
    "causal_trace": "mlxterp.causal_tracing",
    "generation": "mlxterp.generation_results",
    "dla": "mlxterp.attribution_results",
    "head_patching": "mlxterp.attribution_results",
    "attribution": "mlxterp.attribution_results",
    "head_attention": "mlxterp.attribution_results",
}


@dataclass(eq=False)
class Result:
    """Base of every result: ``kind``, notes shown under it, and its views."""

    notes: list[str] = field(default_factory=list, kw_only=True)
    kind = "result"

    def __init_subclass__(cls, **kwargs):
        # A class naming its own kind is what result_from_data rebuilds for that kind. The generic
        # TextResult/TableResult/ValuesResult have kind as a field (one class, many kinds):
        # result_from_data knows them by their fields.
        super().__init_subclass__(**kwargs)
        own_field = "kind" in cls.__dict__.get("__annotations__", {})
        if isinstance(cls.__dict__.get("kind"), str) and not own_field:
            BY_KIND[cls.kind] = cls

    def data(self) -> dict:
        """The result's own fields as plain data (arrays as np.ndarray)."""
        return {}

    def to_data(self, text: bool = False) -> dict:
        """Plain data with the kind, notes and one-line summary; ``text`` adds the plain-text drawing."""
        data = {"kind": self.kind, **self.data(), "notes": list(self.notes), "summary": self.summary(40)}
        if text:
            data["text"] = plain_text(self.render())
        return data

    @classmethod
    def from_data(cls, data: dict) -> "Result":
        """The result whose ``to_data()`` gave ``data``."""
        raise NotImplementedError

    def body(self):
        from rich.text import Text

        return Text(self.short())

    def render(self):
        """A rich renderable: the body, then the notes dimmed."""
        from rich.console import Group
        from rich.text import Text

        return Group(self.body(), *[Text(note, style="dim") for note in self.notes])

    def __rich__(self):
        return self.render()

    def short(self) -> str:
        return self.kind

    def summary(self, max_len: int = 40) -> str:
        return shorten(self.short(), max_len)

    def table(self) -> tuple[str, list[str], list[list]]:
        """(title, columns, rows) of the result as one table, for HTML."""
        return "", [""], [[self.short()]]

    def _repr_html_(self) -> str:
        title, columns, rows = self.table()
        cell = lambda v: html.escape(number(v) if isinstance(v, float) else str(v))  # noqa: E731
        parts = [f"<table><caption style='text-align:left'>{html.escape(title)}</caption>" if title else "<table>",
                 "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr></thead><tbody>"]
        parts += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
        parts += [f"<p><small>{html.escape(note)}</small></p>" for note in self.notes]
        plot = getattr(self, "plot", None)
        if plot and os.path.isfile(plot):
            with open(plot, "rb") as handle:
                encoded = base64.b64encode(handle.read()).decode("ascii")
            parts.append(f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(plot)}'/>")
        return "\n".join(parts)

    def __eq__(self, other):
        if type(other) is type(self):
            return same(self.to_data(), other.to_data())
        if isinstance(self, Mapping) and isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None


class LayerMapping(Mapping):
    """The ``{layer: value}`` face of a result: ``result[layer]``, iteration, ``items()``, ``to_dict()``."""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def __getitem__(self, layer):
        return self.to_dict()[layer]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer) -> bool:
        return layer in self.layers


def _common(data: dict) -> dict:
    return {"notes": [str(n) for n in data.get("notes") or []]}


# ---- generic results (the query language's messages, tables and values) -----------------------


@dataclass(eq=False)
class TextResult(Result):
    """A message (``prompt``, ``steer``, ``load``, ``help`` ...), with its fields as data."""

    message: str
    kind: str = "text"
    fields: dict = field(default_factory=dict)

    def data(self):
        return {"message": self.message, **self.fields}

    @classmethod
    def from_data(cls, data):
        rest = {k: v for k, v in data.items() if k not in COMMON_KEYS + ("message",)}
        return cls(data["message"], kind=data["kind"], fields=rest, **_common(data))

    def body(self):
        from rich.text import Text

        return Text(self.message)

    def short(self):
        return self.message.split("\n", 1)[0]

    def table(self):
        return "", [self.kind], [[line] for line in self.message.splitlines()]


@dataclass(eq=False)
class TableResult(Result):
    """Rows under named columns (``tokens``, ``ls``, ``info``, ``help``, ``export``)."""

    columns: list[str]
    rows: list[list]
    kind: str = "table"
    title: str = ""
    fields: dict = field(default_factory=dict)

    def data(self):
        return {"title": self.title, "columns": list(self.columns), "rows": [list(r) for r in self.rows], **self.fields}

    @classmethod
    def from_data(cls, data):
        rest = {k: v for k, v in data.items() if k not in COMMON_KEYS + ("title", "columns", "rows")}
        return cls(list(data["columns"]), [list(r) for r in data["rows"]], kind=data["kind"],
                   title=data.get("title", ""), fields=rest, **_common(data))

    def body(self):
        from rich.text import Text

        columns = [Column(name, justify="right" if self.rows and isinstance(self.rows[0][index], (int, float))
                          and not isinstance(self.rows[0][index], bool) else "left")
                   for index, name in enumerate(self.columns)]
        rows = [[Text(number(v) if isinstance(v, float) else str(v)) for v in row] for row in self.rows]
        return FitTable(columns, rows, title=Text(self.title) if self.title else None)

    def short(self):
        if self.kind == "tokens":
            return f"{len(self.rows)} tokens: " + " ".join(token_label(r[2]) for r in self.rows)
        return f"{self.title or self.kind}: {len(self.rows)} rows"

    def table(self):
        return self.title, list(self.columns), [list(r) for r in self.rows]


STATS_COLUMNS = ["module", "shape", "norm", "mean", "std", "min", "max"]


@dataclass(eq=False)
class ActivationStats(Result, Mapping):
    """Statistics of activations, one row per module: ``{label: {shape, norm, mean, std, min, max, first}}``.

    ``rows`` gives them as table rows ``[label, shape, norm, mean, std, min, max]``.
    """

    stats: dict  # {label: array_stats(...)}
    title: str = ""
    kind = "stats"

    @classmethod
    def of(cls, arrays, title: str = "") -> "ActivationStats":
        """The statistics of ``arrays``: a {label: array} mapping or (label, array) pairs."""
        pairs = arrays.items() if isinstance(arrays, Mapping) else arrays
        return cls({label: array_stats(array) for label, array in pairs}, title=title)

    @property
    def rows(self) -> list[list]:
        return [[label, str(tuple(s["shape"])), s["norm"], s["mean"], s["std"], s["min"], s["max"]]
                for label, s in self.stats.items()]

    def __getitem__(self, label):
        return self.stats[label]

    def __iter__(self):
        return iter(self.stats)

    def __len__(self):
        return len(self.stats)

    def to_dict(self) -> dict:
        return {label: dict(s) for label, s in self.stats.items()}

    def data(self):
        return {"title": self.title, "stats": [{"label": label, **s} for label, s in self.stats.items()]}

    @classmethod
    def from_data(cls, data):
        stats = {row["label"]: {k: v for k, v in row.items() if k != "label"} for row in data["stats"]}
        return cls(stats, title=data.get("title", ""), **_common(data))

    def body(self):
        return stats_table(self.title, [(label, s, None) for label, s in self.stats.items()])

    def short(self):
        return f"{self.title or 'stats'}: {len(self.stats)} modules"

    def table(self):
        return self.title, STATS_COLUMNS + ["first values"], [
            row + [" ".join(number(v) for v in self.stats[row[0]]["first"])] for row in self.rows]


def stats_table(title: str, entries):
    """The stats table drawn for ``stats`` and ``save``: (label, stats, array or None) per row;
    an array adds its sparkline before the first values."""
    from rich.text import Text

    columns = [Column(""), Column("shape", "right", drop=1)]
    columns += [Column(name, "right", drop=0 if name in ("norm", "mean") else 1) for name in ("norm", "mean", "std", "min",
                                                                                            "max")]
    columns += [Column("values", drop=2, wrap=True, min_width=16)]
    rows = []
    for label, s, array in entries:
        count = int(np.prod(s["shape"])) if s["shape"] else 1
        first = " ".join(number(v) for v in s["first"][:4]) + (" …" if count > 4 else "")
        values = Text(first)
        if array is not None:
            values = Text(sparkline(array, width=16), style="cyan") + Text(" " + first)
        rows.append([Text(str(label)), str(tuple(s["shape"])), number(s["norm"]), number(s["mean"]),
                     number(s["std"]), number(s["min"]), number(s["max"]), values])
    return FitTable(columns, rows, title=Text(title) if title else None)


@dataclass(eq=False)
class ValuesResult(Result):
    """Arrays with their statistics: the query language's ``save`` (captured activations) and
    ``let`` (arithmetic on them); ``name`` is the ``$name`` they were kept as."""

    arrays: list[tuple[str, np.ndarray]]  # (label: module short name or expression, values)
    kind: str = "save"
    name: str | None = None
    where: str = ""  # which positions of which input, for the title

    def data(self):
        return {"name": self.name, "where": self.where,
                "arrays": [{"label": label, **array_stats(a), "array": as_numpy(a)} for label, a in self.arrays]}

    @classmethod
    def from_data(cls, data):
        arrays = []
        for entry in data["arrays"]:
            array = entry["array"]
            if not isinstance(array, np.ndarray):
                raise ValueError("this array came without its values (a fetch handle: fetch them from the daemon "
                                 "first)" if isinstance(array, dict) and "handle" in array else
                                 f"an array of a {data['kind']!r} result is a {type(array).__name__}, not an array")
            arrays.append((entry["label"], array))
        return cls(arrays, kind=data["kind"], name=data.get("name"), where=data.get("where", ""), **_common(data))

    def title(self) -> str:
        return (f"${self.name} = " if self.name else "") + self.where

    def body(self):
        return stats_table(self.title(), [(label, array_stats(a), a) for label, a in self.arrays])

    def short(self):
        prefix = f"${self.name} " if self.name else ""
        if len(self.arrays) == 1:
            s = array_stats(self.arrays[0][1])
            return f"{prefix}{tuple(s['shape'])} norm {number(s['norm'])} mean {number(s['mean'])}"
        norms = [array_stats(a)["norm"] for _, a in self.arrays]
        return f"{prefix}{len(self.arrays)} arrays, norm {number(min(norms))}..{number(max(norms))}"

    def table(self):
        return ActivationStats.of(self.arrays, self.title()).table()


# ---- token predictions ---------------------------------------------------------------------------


def _prediction_cells(ids, scores, strings) -> list[tuple]:
    return [(int(i), float(s), strings.get(int(i), str(int(i)))) for i, s in zip(ids, scores)]


@dataclass(eq=False)
class TokenPredictions(Result, Sequence):
    """Top tokens decoded from hidden states (or logits), one row per state.

    As a list it is what ``get_token_predictions`` documents: token ids (``(id, logit)``
    pairs with ``return_scores=True``) for one state, a list of such lists for a batch.
    ``predictions`` has ``(id, logit, token)`` triples per row; ``labels`` name the rows.
    """

    ids: np.ndarray  # (rows, k) token ids
    scores: np.ndarray  # (rows, k) logits, float32
    strings: dict = field(default_factory=dict)  # {token id: token text}
    labels: list[str] | None = None
    single: bool = False  # one hidden state was given: the list is that row's
    return_scores: bool = False
    kind = "predict"

    @property
    def predictions(self) -> list[list[tuple]]:
        return [_prediction_cells(i, s, self.strings) for i, s in zip(self.ids, self.scores)]

    @property
    def rows(self) -> list[tuple[str, list[tuple]]]:
        """(label, [(id, logit, token), ...]) per row."""
        labels = self.labels or [str(n) for n in range(len(self.ids))]
        return list(zip(labels, self.predictions))

    def to_list(self) -> list:
        rows = [[(int(i), float(s)) for i, s in zip(ids, scores)] if self.return_scores else [int(i) for i in ids]
                for ids, scores in zip(self.ids, self.scores)]
        return rows[0] if self.single else rows

    def __getitem__(self, index):
        return self.to_list()[index]

    def __len__(self):
        return len(self.to_list())

    def __iter__(self):
        return iter(self.to_list())

    def __eq__(self, other):
        if isinstance(other, list):
            return self.to_list() == other
        return Result.__eq__(self, other)

    __hash__ = None

    @classmethod
    def join(cls, parts: list["TokenPredictions"]) -> "TokenPredictions":
        """One result of the rows of several (labels kept)."""
        k = min(p.ids.shape[1] for p in parts)
        labels = [label for p in parts for label, _ in p.rows]
        strings = {i: t for p in parts for i, t in p.strings.items()}
        return cls(np.concatenate([p.ids[:, :k] for p in parts]), np.concatenate([p.scores[:, :k] for p in parts]),
                   strings, labels=labels, return_scores=True)

    def data(self):
        return {"ids": np.asarray(self.ids), "scores": np.asarray(self.scores), "strings": _strings_data(self.strings),
                "labels": self.labels, "single": self.single, "return_scores": self.return_scores}

    @classmethod
    def from_data(cls, data):
        return cls(np.asarray(data["ids"]), np.asarray(data["scores"]), _strings_from_data(data["strings"]),
                   labels=data.get("labels"), single=bool(data.get("single")),
                   return_scores=bool(data.get("return_scores")), **_common(data))

    def body(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        k = min(self.ids.shape[1] if self.ids.ndim == 2 else 0, SHOWN_RANKS)
        columns = [Column("")] + [Column(f"top {rank + 1}", drop=rank) for rank in range(k)]
        rows = [[Text(label)] + [(Text(token_label(t), style=colour_of(i)), Text(f"{s:.2f}", style=colour_of(i)))
                                 for i, s, t in predictions[:k]] for label, predictions in self.rows]
        table = FitTable(columns, rows)
        if self.ids.ndim == 2 and self.ids.shape[1] > k:
            return Group(table, Text(f"showing the top {k} of {self.ids.shape[1]}; all are in the result's data "
                                     "(--json, to_data())", style="dim"))
        return table

    def short(self):
        if not len(self.ids):
            return "no predictions"
        _, predictions = self.rows[-1]
        return " ".join(f"{token_label(t)} {s:.1f}" for _, s, t in predictions[:3])

    def table(self):
        k = min(self.ids.shape[1] if self.ids.ndim == 2 else 0, SHOWN_RANKS)
        return "", [""] + [f"top {r + 1}" for r in range(k)], [
            [label] + [f"{token_label(t)} {s:.2f}" for _, s, t in p[:k]] for label, p in self.rows]


# ---- logit lens ------------------------------------------------------------------------------------


@dataclass(eq=False)
class LogitLens(Result, LayerMapping):
    """What each layer's output decodes to at each shown position: ``{layer: [[(id, logit, token)]
    per position]}``; with one ``position`` asked for, ``{layer: [(id, logit, token), ...]}``.

    ``ids``/``scores`` are arrays (layers, positions, k); ``positions`` the prompt positions
    shown, ``tokens`` the input token at each.
    """

    layers: list[int]
    positions: list[int]
    tokens: list[str]
    ids: np.ndarray
    scores: np.ndarray
    strings: dict = field(default_factory=dict)
    single: bool = False
    plot: str | None = None
    kind = "lens"

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def predictions(self) -> list[list[list[tuple]]]:
        """[layer][position] -> [(id, logit, token), ...]."""
        return self.top(self.top_k)

    def top(self, k: int) -> list[list[list[tuple]]]:
        """[layer][position] -> the first ``k`` of [(id, logit, token), ...]."""
        return [[_prediction_cells(i[:k], s[:k], self.strings) for i, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(self.ids, self.scores)]

    def to_dict(self) -> dict:
        return {layer: row[0] if self.single else row for layer, row in zip(self.layers, self.predictions)}

    def __getitem__(self, layer):
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this logit lens (layers {self.layers})")
        index = self.layers.index(layer)
        row = [_prediction_cells(i, s, self.strings) for i, s in zip(self.ids[index], self.scores[index])]
        return row[0] if self.single else row

    def data(self):
        return {"layers": list(self.layers), "positions": list(self.positions), "tokens": list(self.tokens),
                "ids": np.asarray(self.ids), "scores": np.asarray(self.scores),
                "strings": _strings_data(self.strings), "single": self.single, "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        return cls([int(n) for n in data["layers"]], [int(p) for p in data["positions"]], list(data["tokens"]),
                   np.asarray(data["ids"]), np.asarray(data["scores"]), _strings_from_data(data["strings"]),
                   single=bool(data.get("single")), plot=data.get("plot"), **_common(data))

    def save_plot(self, save_path=None, max_display_tokens: int = 15, figsize=(16, 10), cmap: str = "viridis") -> str:
        """Draw the heatmap (layers x the last ``max_display_tokens`` shown positions) into a PNG;
        its path, also kept as ``plot``."""
        from .plots import plot_logit_lens

        grid = {layer: row for layer, row in zip(self.layers, self.top(1))}
        self.plot = plot_logit_lens(grid, self.tokens, max_display_tokens=max_display_tokens, figsize=figsize,
                                    cmap=cmap, save_path=save_path)
        return self.plot

    def body(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        k = self.top_k
        if len(self.positions) == 1:
            shown = min(k, SHOWN_RANKS)
            title = Text(f"logit lens at position {self.positions[0]} ({token_label(self.tokens[0])})")
            columns = [Column("layer", "right")] + [Column(f"top {rank + 1}", drop=rank) for rank in range(shown)]
            rows = [[str(layer)] + [(Text(token_label(t), style=colour_of(i)), Text(f"{s:.2f}", style=colour_of(i)))
                                    for i, s, t in row[0]] for layer, row in zip(self.layers, self.top(shown))]
        else:
            # Too narrow, the token cells are cut ("…") and then the first positions left out
            # (named under the table); the layer column never is.
            shown = min(k, GRID_RANKS)
            what = "top token" if shown == 1 else f"top {shown} tokens"
            title = Text(f"logit lens: {what} per layer (rows) and position (columns)")
            n = len(self.positions)
            columns = [Column("layer", "right")] + [
                Column(Text(f"{position}\n{token_label(token)}"), shrink=True, max_width=14, drop=n - index)
                for index, (position, token) in enumerate(zip(self.positions, self.tokens))]
            rows = []
            for layer, row in zip(self.layers, self.top(shown)):
                cells = []
                for cell in row:
                    text = Text()
                    for rank, (i, _, t) in enumerate(cell):
                        text.append(("\n" if rank else "") + token_label(t), style=colour_of(i))
                    cells.append(text)
                rows.append([str(layer)] + cells)
        table = FitTable(columns, rows, title=title)
        parts = [table]
        if k > shown:
            parts.append(Text(f"showing the top {shown} of {k} per cell; all {k} are in the result's data "
                              "(--json, to_data())", style="dim"))
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts) if len(parts) > 1 else table

    def short(self):
        if not self.layers or not self.positions:
            return "logit lens: nothing shown"
        token_id, score = int(self.ids[-1, -1, 0]), float(self.scores[-1, -1, 0])
        return f"layer {self.layers[-1]}: {token_label(self.strings.get(token_id, str(token_id)))} {score:.2f}"

    def table(self):
        columns = ["layer"] + [f"{p} {token_label(t)}" for p, t in zip(self.positions, self.tokens)]
        k = min(self.top_k, SHOWN_RANKS)
        rows = [[layer] + [" ".join(f"{token_label(t)} ({s:.2f})" for _, s, t in cell) for cell in row]
                for layer, row in zip(self.layers, self.top(k))]
        shown = f"top {k} of {self.top_k}" if k < self.top_k else f"top {k}"
        return f"logit lens: the {shown} tokens per layer and position", columns, rows


# ---- activation patching ---------------------------------------------------------------------------


@dataclass(eq=False)
class ActivationPatching(Result, LayerMapping):
    """Recovery % of patching one component per layer: ``{layer: recovery %}``, or with
    positions ``{layer: {position: recovery %}}`` (``percent`` is the (layers,) or
    (layers, positions) array)."""

    component: str
    metric: str
    layers: list[int]
    percent: np.ndarray  # recovery %: (layers,) or (layers, positions)
    positions: list[int] | None = None  # None: one value per layer
    tokens: list[str] = field(default_factory=list)  # the clean prompt's token at each position
    corrupt_tokens: list[str] = field(default_factory=list)  # the corrupted prompt's token there
    answers: list[str] | None = None  # (clean, corrupted) for metric logit_diff
    plot: str | None = None
    kind = "patch"

    @property
    def recovery(self) -> dict:
        return self.to_dict()

    def to_dict(self) -> dict:
        if self.positions is None:
            return {layer: float(v) for layer, v in zip(self.layers, self.percent)}
        return {layer: {p: float(v) for p, v in zip(self.positions, row)} for layer, row in zip(self.layers, self.percent)}

    def data(self):
        return {"component": self.component, "metric": self.metric, "layers": list(self.layers),
                "percent": np.asarray(self.percent), "positions": self.positions, "tokens": list(self.tokens),
                "corrupt_tokens": list(self.corrupt_tokens), "answers": self.answers, "plot": self.plot}

    @classmethod
    def from_data(cls, data):
        positions = data.get("positions")
        answers = data.get("answers")
        return cls(data["component"], data["metric"], [int(n) for n in data["layers"]], np.asarray(data["percent"]),
                   positions=None if positions is None else [int(p) for p in positions],
                   tokens=list(data.get("tokens") or []), corrupt_tokens=list(data.get("corrupt_tokens") or []),
                   answers=list(answers) if answers else None, plot=data.get("plot"), **_common(data))

    def save_plot(self, save_path=None) -> str:
        """A bar chart per layer (or a layer x position heatmap) as a PNG; its path, also kept as ``plot``."""
        from .plots import plot_patching

        labels = dict(zip(self.positions, self.tokens)) if self.positions and self.tokens else None
        self.plot = plot_patching(self.to_dict(), title=f"Activation patching: {self.component} ({self.metric})",
                                  position_labels=labels, save_path=save_path)
        return self.plot

    def title(self, what: str):
        from rich.text import Text

        metric = self.metric
        if self.answers:
            metric += f" {token_label(self.answers[0])} vs {token_label(self.answers[1])}"
        return Text(f"patching {self.component} ({metric}): recovery % {what}")

    def body(self):
        from rich.console import Group
        from rich.text import Text

        table = self.bars() if self.positions is None else self.grid()
        if self.plot:
            return Group(table, Text(f"plot: {self.plot}", style="dim"))
        return table

    def bars(self):
        from rich.text import Text

        finite = [abs(float(v)) for v in self.percent if math.isfinite(v)]
        scale = max(finite + [1e-9])
        rows = []
        for layer, value in zip(self.layers, self.percent.tolist()):
            width = int(round(abs(value) / scale * 30)) if math.isfinite(value) else 0
            rows.append([str(layer), f"{value:+.1f}%", Text("█" * width, style="green" if value >= 0 else "red")])
        columns = [Column("layer", "right"), Column("recovery", "right"), Column("", drop=1, name="bars")]
        return FitTable(columns, rows, title=self.title("per layer"))

    def position_label(self, index: int) -> str:
        clean = self.tokens[index] if self.tokens else ""
        corrupt = self.corrupt_tokens[index] if self.corrupt_tokens else clean
        return token_label(clean) if clean == corrupt else f"{token_label(clean)}/{token_label(corrupt)}"

    def grid(self):
        from rich.text import Text

        if len(self.positions) > GRID_POSITIONS:
            return self.strongest()
        n = len(self.positions)
        columns = [Column("layer", "right")] + [
            Column(Text(f"{position}\n{self.position_label(index)}" if self.tokens else str(position)), "right",
                   drop=n - index, cut_header=True) for index, position in enumerate(self.positions)]
        rows = [[str(layer)] + [Text(f"{v:+.1f}", style=recovery_style(v)) for v in row]
                for layer, row in zip(self.layers, self.percent.tolist())]
        return FitTable(columns, rows, title=self.title("per layer (rows) and position (columns)"))

    def strongest(self):
        """A grid too large to read, as its strongest entries (largest |recovery|) and where the rest are."""
        from rich.text import Text

        cells = [(float(v), layer, index) for layer, row in zip(self.layers, self.percent.tolist())
                 for index, v in enumerate(row) if math.isfinite(v)]
        cells.sort(key=lambda cell: -abs(cell[0]))
        rows = [[str(layer), str(self.positions[index]), Text(self.position_label(index)) if self.tokens else "",
                 Text(f"{v:+.1f}%", style=recovery_style(v))] for v, layer, index in cells[:STRONGEST]]
        columns = [Column("layer", "right"), Column("position", "right"),
                   Column("token", shrink=True, max_width=24, min_width=8), Column("recovery", "right")]
        total = len(self.layers) * len(self.positions)
        note = Text(f"the {min(STRONGEST, len(cells))} strongest of {total} entries ({len(self.layers)} layers x "
                    f"{len(self.positions)} positions); `plot` draws them all, --json (to_data()) has every value",
                    style="dim")
        return FitTable(columns, rows, title=self.title("per layer and position: strongest entries"), label=False,
                        notes=[note])

    def best(self):
        """(layer, position or None, value) of the highest finite recovery, or None."""
        if self.positions is None:
            cells = [(layer, None, float(v)) for layer, v in zip(self.layers, self.percent)]
        else:
            cells = [(layer, p, float(v)) for layer, row in zip(self.layers, self.percent)
                     for p, v in zip(self.positions, row)]
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

    def table(self):
        title = self.title("per layer").plain
        if self.positions is None:
            return title, ["layer", "recovery %"], [[layer, float(v)] for layer, v in zip(self.layers, self.percent)]
        columns = ["layer"] + [f"{p} {token_label(t)}" for p, t in zip(self.positions, self.tokens or
                                                                         [""] * len(self.positions))]
        return title, columns, [[layer] + [float(v) for v in row] for layer, row in zip(self.layers, self.percent)]


# ---- attention patterns -----------------------------------------------------------------------------


@dataclass(eq=False)
class AttentionPatterns(Result, LayerMapping):
    """Attention probabilities ``{layer: (batch, heads, query, key)}`` (mx.array from the
    library, np.ndarray once rebuilt from data); ``tokens`` are the first row's tokens."""

    layers: list[int]
    patterns: list
    tokens: list[str] | None = None
    kind = "attention"

    def to_dict(self) -> dict:
        return dict(zip(self.layers, self.patterns))

    def __getitem__(self, layer):
        if layer not in self.layers:
            raise KeyError(f"layer {layer} has no pattern here (layers {self.layers})")
        return self.patterns[self.layers.index(layer)]

    def data(self):
        return {"layers": list(self.layers), "patterns": [as_numpy(p) for p in self.patterns], "tokens": self.tokens}

    @classmethod
    def from_data(cls, data):
        return cls([int(n) for n in data["layers"]], [np.asarray(p) for p in data["patterns"]],
                   tokens=data.get("tokens"), **_common(data))

    def strongest(self, layer) -> list[tuple[int, int, float]]:
        """(head, key position, probability) of the key each head of ``layer`` attends most from the
        last query position of the first row."""
        last = as_numpy(self[layer])[0, :, -1, :]
        return [(head, int(row.argmax()), float(row.max())) for head, row in enumerate(last)]

    def _key_label(self, key: int) -> str:
        return f"{key} {token_label(self.tokens[key])}" if self.tokens and key < len(self.tokens) else str(key)

    def body(self):
        from rich.table import Table
        from rich.text import Text

        columns = [Column("layer", "right"), Column("shape", drop=1), Column("head", "right"), Column("key"),
                   Column("probability", "right"), Column("last row", drop=2)]
        rows = []
        for layer in self.layers:
            shape = str(tuple(self[layer].shape))
            last = as_numpy(self[layer])[0, :, -1, :]
            for head, key, probability in self.strongest(layer):
                rows.append([str(layer) if head == 0 else "", shape if head == 0 else "", str(head), self._key_label(key),
                             f"{probability:.3f}", Text(sparkline(last[head], width=32), style="cyan")])
        return FitTable(columns, rows, title=Text("attention from the last position: the key each head attends most"),
                        label=False)

    def short(self):
        if not self.layers:
            return "attention: no layers"
        return f"attention: {len(self.layers)} layers, {tuple(self[self.layers[0]].shape)}"

    def table(self):
        rows = [[layer, head, self._key_label(key), probability] for layer in self.layers
                for head, key, probability in self.strongest(layer)]
        return "attention from the last position", ["layer", "head", "key", "probability"], rows


# ---- rebuilding ---------------------------------------------------------------------------------------


def result_from_data(data: dict) -> Result:
    """The result object of a ``to_data()`` dict (arrays as np.ndarray), to draw or use.
    Raises ValueError when ``data`` is no result's form."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError(f"a result's data is a dict with a 'kind', got {type(data).__name__}")
    kind = data["kind"]
    if kind not in BY_KIND and kind in RESULT_MODULES:
        import importlib

        importlib.import_module(RESULT_MODULES[kind])
    cls = BY_KIND.get(kind)
    if cls is None:  # the generic ones carry many kinds (save/let, tokens/ls/..., prompt/load/...)
        if "arrays" in data:
            cls = ValuesResult
        elif "columns" in data and "rows" in data:
            cls = TableResult
        elif "message" in data:
            cls = TextResult
        else:
            fields = [k for k in data if k not in COMMON_KEYS]
            raise ValueError(f"no result type has the fields of this {kind!r} result: {', '.join(fields) or 'none'} "
                             f"(valid: arrays, columns and rows, message, or kind {', '.join(BY_KIND)})")
    try:
        return cls.from_data(data)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"this {kind!r} result's data is incomplete or malformed: {type(error).__name__}: {error}") from None
