"""The language server's pieces that need no process: documents cut into statements, results
kept on their lines through edits, inline text, settings; and arbitrary text through them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxterp_lsp.checks import parse_findings, variable_findings
from mlxterp_lsp.documents import Document, from_client, split_chunks, to_client
from mlxterp_lsp.inline import InlineResult, apply_edit, full_text, recheck, summary_text
from mlxterp_lsp.link import Settings
from mlxterp_repl.dsl.results import TableResult, TextResult


def result_at(line, lines):
    return InlineResult(line=line, source=lines[line], summary="r", full="r")


def test_continued_line_is_one_statement_with_document_positions():
    document = Document("u", 'prompt "x"\nsave layers.1 \\\n  @ -1 as $a\nlens')
    assert [c.line0 for c in document.chunks] == [0, 1, 3]
    save = document.statement_at(2)
    assert save is document.statement_at(1) and save.last_line == 2
    assert save.range(save.statement.name) == (2, 10, 2, 12)


def test_backslash_inside_a_string_or_comment_does_not_continue():
    assert len(split_chunks(['prompt "a \\', "lens"])) == 2
    assert len(split_chunks(["# note \\", "lens"])) == 2
    assert len(split_chunks(["save layers.1 \\  ", "@ -1"])) == 1


def test_inserting_lines_above_moves_results_and_keeps_them_fresh():
    lines = ["a", "b", "c"]
    results = [result_at(i, lines) for i in range(3)]
    lines = apply_edit(results, lines, (1, 0), (1, 0), "new\nlines\n")
    assert [r.line for r in results] == [0, 3, 4]
    assert recheck(results, lines) == results and not any(r.stale for r in results)


def test_typing_on_a_line_marks_only_its_result_stale():
    lines = ["a", "b", "c"]
    results = [result_at(i, lines) for i in range(3)]
    lines = apply_edit(results, lines, (1, 1), (1, 1), "x")
    assert [r.stale for r in results] == [False, True, False]
    assert lines == ["a", "bx", "c"]


def test_new_line_typed_at_the_end_keeps_the_result_and_deleting_lines_moves_the_rest_up():
    lines = ["a", "b", "c", "d"]
    results = [result_at(i, lines) for i in range(4)]
    lines = apply_edit(results, lines, (0, 1), (0, 1), "\n")
    assert [r.line for r in results] == [0, 2, 3, 4] and not any(r.stale for r in results)
    lines = apply_edit(results, lines, (1, 0), (3, 0), "")  # delete the new line and "b"
    assert lines == ["a", "c", "d"]
    assert [(r.line, r.stale) for r in results] == [(0, False), (1, True), (1, False), (2, False)]


def test_recheck_marks_a_result_stale_when_its_line_text_differs():
    results = [InlineResult(line=0, source="save layers.1", summary="r", full="r")]
    assert recheck(results, ["save layers.2"])[0].stale
    assert recheck([InlineResult(line=5, source="x", summary="r", full="r")], ["x"]) == []


def test_inline_text_is_at_most_the_limit_and_marks_staleness():
    data = TextResult("a message much longer than forty characters, going on and on").to_data()
    assert len(summary_text(data, 40)) == 40 and summary_text(data, 40).startswith("a message much")
    assert len(summary_text(data, 20)) == 20
    stale = InlineResult(line=0, source="", summary=summary_text(data, 40), full="", stale=True)
    assert stale.shown(40).startswith("(stale)") and len(stale.shown(40)) <= 40
    assert summary_text({"summary": "(1, 128) norm 12.3"}, 40) == "(1, 128) norm 12.3"


def test_hover_shows_the_result_as_the_terminal_draws_it():
    table = TableResult(["position", "id", "token"], [[0, 1, "<s>"], [1, 84, "The"]], kind="tokens", title="'The'")
    hover = full_text(table.to_data(text=True), "tokens")  # as the daemon sends it to the editor
    assert hover.startswith("**tokens**")
    assert "│        1 │ 84 │ The   │" in hover  # the table itself, not a dump of its data


# The layer, module-path and token rules the checks apply are mlxterp.core's (tests/test_core_paths.py,
# tests/test_core_positions.py); tests/test_agreement.py shows the checks agree with the evaluator.


def test_settings_take_known_options_and_ignore_bad_values():
    settings_ = Settings.from_options({"model": "/m", "debounceMs": 5, "autostart": "yes", "inlineMaxLength": -3})
    assert settings_.model == "/m" and settings_.debounce_ms == 5
    assert settings_.autostart is True and settings_.inline_max_length == 40
    assert Settings.from_options(None) == Settings()


def test_columns_convert_to_utf16_and_back():
    line = 'prompt "😀 x"'
    assert to_client(line, 10, True) == 11 and from_client(line, 11, True) == 10
    assert to_client(line, 10, False) == 10


PIECES = ["save", "lens", "prompt", "let", "with", "steer", "patch", "layers", ".", "..", "*", "@", "$x", "$",
          '"', "\\", "\n", " ", "#", "-1", "8", ":", ",", "=", "mlp", "attn", "in", "as", "top", "(", ")", "😀", "\r", "\t"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=40), st.data())
def test_arbitrary_text_never_breaks_the_document_checks_or_edits(pieces, data):
    text = "".join(pieces)
    document = Document("u", text)
    for finding in parse_findings(document) + variable_findings(document):
        line, col, end_line, end_col = finding.range
        assert 0 <= line <= end_line < len(document.lines) + 1
    for line in range(len(document.lines)):
        chunk = document.chunk_at(line)
        assert chunk is not None and document.chunk_offset(chunk, line, 10**6) <= len(chunk.text)
        document.statement_at(line)
        document.prompt_before(line)
        document.variables_before(line)
    lines = document.lines
    results = [result_at(i, lines) for i in range(len(lines))]
    sl = data.draw(st.integers(0, len(lines) - 1))
    el = data.draw(st.integers(sl, len(lines) - 1))
    sc = data.draw(st.integers(0, len(lines[sl])))
    ec = data.draw(st.integers(0, len(lines[el])))
    if sl == el and ec < sc:
        sc, ec = ec, sc
    new = apply_edit(results, lines, (sl, sc), (el, ec), data.draw(st.text(max_size=5)))
    for result in recheck(results, new):
        assert 0 <= result.line < len(new)
        assert result.stale or new[result.line] == result.source
