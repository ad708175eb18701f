"""Results shown in the editor: one per line that ran, kept on the right line as text moves.

A result is pinned to a document line together with the text that line had when it ran.
Edits move it: lines inserted or deleted above shift it; an edit touching its line marks
it stale. It is shown as fresh only while its line still reads exactly as when it ran,
so a result never sits on the wrong line.

The text comes from the result's own `summary` when the daemon sends one; otherwise it
is made here from the result's plain data (kind, shape, norm, top token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STALE_MARK = "(stale) "


@dataclass
class InlineResult:
    line: int  # 0-based document line the result is shown at
    source: str  # the text of that line when it ran
    summary: str  # at most inline_max_length characters
    full: str  # markdown, for hover
    stale: bool = False

    def shown(self, max_len: int) -> str:
        text = self.summary
        if self.stale:
            text = clip(STALE_MARK + text, max_len)
        return text

    def to_data(self, max_len: int) -> dict:
        return {"line": self.line, "text": self.shown(max_len), "stale": self.stale, "full": self.full}


def clip(text: str, max_len: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


# --- text of a result ------------------------------------------------------------

def summary_text(data, max_len: int) -> str:
    """One line for the end of a line: the result's own summary, or one made from its data."""
    if isinstance(data, dict):
        for key in ("summary", "inline"):
            if isinstance(data.get(key), str) and data[key].strip():
                return clip(data[key], max_len)
        return clip(describe(data), max_len)
    return clip(str(data), max_len)


def describe(data: dict) -> str:
    """One line from a result's plain data (save/let arrays, lens, predict, patch, messages)."""
    arrays = data.get("arrays")
    if isinstance(arrays, list) and arrays and isinstance(arrays[0], dict):
        name = f"${data['name']} " if data.get("name") else ""
        first = arrays[0]
        norm = first.get("norm")
        norm_text = f" norm {norm:.3g}" if isinstance(norm, (int, float)) else ""
        more = f" +{len(arrays) - 1}" if len(arrays) > 1 else ""
        return f"{name}{tuple(first.get('shape', ()))}{norm_text}{more}"
    top = first_top(data)
    if top:
        return top
    recovery = data.get("recovery")
    if isinstance(recovery, dict) and recovery:
        finite = {k: v for k, v in recovery.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            best = max(finite, key=finite.get)
            return f"best layer {best}: {finite[best]:+.1f}%"
    array = first_array(data)
    if array is not None:
        norm = array_norm(array)
        return str(tuple(array.get("shape", ()))) + (f" norm {norm:.3g}" if norm is not None else "")
    for key in ("message", "text", "value"):
        if isinstance(data.get(key), (str, int, float)):
            return str(data[key])
    return str(data.get("kind") or "ok")


def first_array(value):
    if isinstance(value, dict):
        if "dtype" in value and "shape" in value:
            return value
        for item in value.values():
            found = first_array(item)
            if found is not None:
                return found
    elif isinstance(value, list):
        for item in value[:8]:
            found = first_array(item)
            if found is not None:
                return found
    return None


def array_norm(array: dict) -> float | None:
    stats = array.get("stats")
    if isinstance(stats, dict) and "norm" in stats:
        return float(stats["norm"])
    raw = array.get("data")
    if not isinstance(raw, (bytes, bytearray)):
        return None
    try:
        from mlxterp_repl import protocol

        values = protocol.decode_array(array).astype("float64")
        norm = float(math.sqrt(float((values * values).sum())))
        return norm if math.isfinite(norm) else None
    except Exception:  # noqa: BLE001 -- an unusual array only loses its norm
        return None


def first_top(data: dict) -> str | None:
    """`→ " Paris" 0.82`: the top token of the last row of a lens or predict result."""
    cell = None
    predictions = data.get("predictions")
    if isinstance(predictions, list) and predictions:  # lens: [layer][position] -> [top k]
        row = predictions[-1]
        cell = row[-1] if isinstance(row, list) and row and isinstance(row[-1], list) else None
    rows = data.get("rows")
    if cell is None and isinstance(rows, list) and rows and isinstance(rows[-1], dict):  # predict
        cell = rows[-1].get("predictions")
    if not isinstance(cell, list) or not cell or not isinstance(cell[0], dict):
        return None
    best = cell[0]
    text, score = best.get("token", best.get("text")), best.get("score")
    if not isinstance(text, str):
        return None
    layer = ""
    if isinstance(data.get("layers"), list) and data["layers"]:
        layer = f"layer {data['layers'][-1]} "
    score_text = f" {score:.2f}" if isinstance(score, (int, float)) else ""
    return f'{layer}→ "{text}"{score_text}'


def full_text(data, statement_text: str) -> str:
    """Markdown for hover: the statement and its whole result."""
    lines = [f"**{statement_text}**", ""]
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        lines += ["```", data["text"].rstrip(), "```"]
    else:
        lines += ["```", plain(data).rstrip(), "```"]
    return "\n".join(lines)


def plain(value, indent: int = 0, limit: int = 60) -> str:
    pad = "  " * indent
    if isinstance(value, dict) and "dtype" in value and "shape" in value:
        norm = array_norm(value)
        extra = f", norm {norm:.4g}" if norm is not None else ""
        stats = value.get("stats")
        if isinstance(stats, dict):
            extra += ", " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, (int, float)))
        return f"{pad}array {value.get('dtype')} {tuple(value.get('shape', ()))}{extra}\n"
    if isinstance(value, dict):
        out = []
        for key, item in list(value.items())[:limit]:
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{key}:\n{plain(item, indent + 1, limit)}")
            else:
                out.append(f"{pad}{key}: {item!r}\n")
        return "".join(out)
    if isinstance(value, list):
        out = [plain(item, indent, limit) if isinstance(item, (dict, list)) else f"{pad}- {item!r}\n"
               for item in value[:limit]]
        if len(value) > limit:
            out.append(f"{pad}... ({len(value) - limit} more)\n")
        return "".join(out)
    return f"{pad}{value!r}\n"


# --- keeping results on their lines ------------------------------------------------

def apply_edit(results: list[InlineResult], lines: list[str], start: tuple[int, int], end: tuple[int, int],
               text: str) -> list[str]:
    """Move results for one edit replacing start..end (line, code-point column) by `text`;
    the document's lines after the edit.

    A line whose own text the edit leaves whole (lines inserted above it, or a new line
    typed at its end) keeps its result, moved; a line the edit touches gets it marked stale.
    """
    (sl, sc), (el, ec) = start, end
    sl, el = max(0, min(sl, len(lines) - 1)), max(0, min(el, len(lines) - 1))
    added = text.count("\n")
    delta = added - (el - sl)
    for result in results:
        line = result.line
        if line < sl:
            continue
        if line > el:
            result.line += delta
        elif sl == el == line and sc == ec == len(lines[line]) and text.startswith("\n"):
            pass  # a new line typed at the end of this one
        elif el == line and ec == 0 and (lines[sl][:sc] + text).rsplit("\n", 1)[-1] == "":
            result.line = sl + added  # whole lines inserted or deleted above it
        else:
            result.stale = True
            result.line = min(line, sl + added)
    joined = lines[sl][:sc] + text + lines[el][ec:]
    return lines[:sl] + joined.split("\n") + lines[el + 1:]


def recheck(results: list[InlineResult], lines: list[str]) -> list[InlineResult]:
    """Drop results past the end; mark stale any whose line no longer reads as when it ran."""
    kept = []
    for result in results:
        if not 0 <= result.line < len(lines):
            continue
        if lines[result.line] != result.source:
            result.stale = True
        kept.append(result)
    return kept
