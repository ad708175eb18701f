"""Results shown in the editor: one per line that ran, kept on the right line as text moves.

A result is pinned to a document line together with the text that line had when it ran.
Edits move it: lines inserted or deleted above shift it; an edit touching its line marks
it stale. It is shown as fresh only while its line still reads exactly as when it ran,
so a result never sits on the wrong line.

The text is the result's own: its `summary` inline and its plain-text rendering (`text`)
on hover, both of which every result's data carries (`mlxterp_repl.dsl.results`), so a
result reads the same here as in the terminal.
"""

from __future__ import annotations

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
    """One line for the end of a line: the result's own summary (its kind if it has none)."""
    if isinstance(data, dict):
        summary = data.get("summary")
        return clip(summary if isinstance(summary, str) and summary.strip() else data.get("kind") or "ok", max_len)
    return clip(str(data), max_len)


def full_text(data, statement_text: str) -> str:
    """Markdown for hover: the statement and its whole result, as the terminal draws it."""
    text = data.get("text") if isinstance(data, dict) else None
    body = text if isinstance(text, str) else summary_text(data, 200)
    return "\n".join([f"**{statement_text}**", "", "```", body.rstrip(), "```"])


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
