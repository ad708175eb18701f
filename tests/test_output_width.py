"""Output a person can read (issue 14, items 9-11): results fit the width they are drawn at,
row labels stay distinct, numbers are never cut, large results are summarised with a hint and
long prompts do not flood the screen."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mlxterp.results import ActivationPatching, LogitLens, TableResult, ValuesResult
from mlxterp_repl.dsl import Session, TraceCache, parse

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "examples" / "tour.mlxq"


def drawn(result, width: int) -> str:
    console = Console(width=width, color_system=None, file=io.StringIO(), highlight=False)
    console.print(result.render())
    return console.file.getvalue()


def tables(text: str) -> list[list[list[str]]]:
    """The body rows of every box table drawn in `text`, as lists of stripped cells."""
    found, rows, inside = [], [], False
    for line in text.splitlines():
        if line.startswith(("┡", "┏")):
            inside, rows = True, []
        elif line.startswith("└") and inside:
            found.append(rows)
            inside = False
        elif inside and line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return found


def check_readable(text: str, width: int, what: str, labels_distinct: bool = True) -> None:
    """No line over `width`; in every table the row labels are distinct and not cut, and no
    number is cut."""
    for line in text.splitlines():
        assert len(line) <= width, f"{what}: a line of {len(line)} columns at width {width}:\n{line}"
    for rows in tables(text):
        labels = [row[0] for row in rows if row[0]]
        assert not labels_distinct or len(labels) == len(set(labels)), f"{what}: row labels repeat at width {width}: {labels}"
        assert not any(label.endswith("…") for label in labels), f"{what}: a row label is cut: {labels}"
        for row in rows:
            for cell in row[1:]:
                # "65.…" or "-…": a number cut to fit
                assert not re.search(r"[\d.+-]…", cell), f"{what}: a number is cut at width {width}: {cell!r}"


@pytest.fixture(scope="module")
def tour_results(demo_model, tmp_path_factory):
    session = Session(demo_model, workdir=tmp_path_factory.mktemp("tour"),
                      loader=lambda source, layer_attr: demo_model)
    cache = TraceCache()
    return [(s.text, session.execute_statement(s, trace_cache=cache)) for s in parse(TOUR.read_text()).statements]


@pytest.mark.parametrize("width", [100, 60])
def test_every_tour_result_fits_the_width_with_distinct_labels(tour_results, width):
    for statement, result in tour_results:
        check_readable(drawn(result, width), width, statement)


def test_columns_left_out_to_fit_are_named_with_a_hint(tour_results):
    mlps = next(r for s, r in tour_results if s.startswith("save layers.*.mlp"))
    narrow = drawn(mlps, 60)
    assert "not shown" in narrow and "--width" in narrow
    wide = drawn(mlps, 140)
    assert "not shown" not in wide


def test_labels_with_a_common_prefix_keep_their_distinguishing_end():
    arrays = [(f"layers.{n}.self_attn.q_proj", np.full(128, float(n), np.float32)) for n in range(16)]
    text = drawn(ValuesResult(arrays, where="at 5"), 60)
    check_readable(text, 60, "q_proj values")
    for n in (1, 10, 15):
        assert re.search(rf"^│ {n}\b", text, re.M), text


def test_a_long_single_label_wraps_instead_of_being_cut():
    label = "layers.0.post_attention_layernorm.some_very_long_submodule_name"
    text = drawn(TableResult(["module", "type", "params"], [[label, "RMSNorm", 128]], kind="ls"), 40)
    assert all(len(line) <= 40 for line in text.splitlines())
    assert label in "".join(text.split()).replace("│", "")


def test_piped_output_is_not_forced_to_80_columns(tmp_path):
    script = tmp_path / "wide.mlxq"
    script.write_text('load demo\nprompt "The capital of France is"\nlens @ -1 top 8\n')
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    run = subprocess.run([sys.executable, "-m", "mlxterp_repl.cli", "run", "--local", str(script)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr
    assert max(len(line) for line in run.stdout.splitlines()) > 80  # the table at its natural width
    assert "not shown" not in run.stdout


@pytest.mark.slow
def test_the_tour_through_mlxterp_run_fits_60_columns(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mlxterp_repl.cli", "run", "--local", "--width", "60", str(TOUR)],
                         cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                         env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    check_readable(run.stdout, 60, "mlxterp run --width 60")
    assert "logit lens" in run.stdout and "patching mlp" in run.stdout


def test_width_is_the_option_else_columns_else_any_terminal_else_natural(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    from mlxterp_repl.runner import NATURAL_WIDTH, output_width

    assert output_width(None, {"COLUMNS": "72"}) == 72
    assert output_width(55, {"COLUMNS": "72"}) == 55
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 73, 0, 0))
    with open(slave, "w") as terminal, open(tmp_path / "piped.txt", "w") as piped:
        assert output_width(None, {}, streams=(piped, terminal)) == 73  # `mlxterp run x | less`
        assert output_width(None, {}, streams=(piped,)) == NATURAL_WIDTH  # no terminal at all
    os.close(master)


def test_a_241_position_patch_grid_is_summarised_by_its_strongest_entries():
    rng = np.random.default_rng(0)
    percent = rng.normal(0, 5, size=(4, 241))
    percent[2, 117] = 93.0
    result = ActivationPatching("mlp", "l2", [0, 1, 2, 3], percent, positions=list(range(241)),
                                tokens=[f"t{i}" for i in range(241)])
    text = drawn(result, 100)
    assert len(text.splitlines()) < 40
    assert "+93.0" in text and "117" in text
    assert "plot" in text and "--json" in text
    check_readable(text, 100, "patch grid", labels_distinct=False)  # rows: (layer, position) entries


def test_a_lens_with_many_ranks_shows_some_and_says_where_the_rest_are():
    k = 500
    ids = np.arange(2 * 1 * k).reshape(2, 1, k) % 50
    scores = -np.sort(-np.random.default_rng(0).normal(size=(2, 1, k)), axis=-1).astype(np.float32)
    lens = LogitLens([0, 1], [5], ["x"], ids, scores, {i: f"tok{i}" for i in range(50)}, single=True)
    text = drawn(lens, 100)
    assert len(text.splitlines()) < 30 and "500" in text and "--json" in text
    check_readable(text, 100, "lens top 500")


def test_a_long_prompt_does_not_flood(demo_model):
    session = Session(demo_model)
    prompt = " ".join(["The capital of France is Paris."] * 28)
    [result] = session.execute(f'prompt "{prompt}"')
    n = len(demo_model.encode(prompt))
    assert n > 180 and str(n) in result.message
    assert len(result.message) < 400 and "tokens" in result.message
    [saved] = session.execute("save layers.3 @ -1")
    assert len(saved.where) < 120 and "…" in saved.where
    text = drawn(saved, 100)
    assert len(text.splitlines()) < 12


def test_a_long_statement_is_echoed_by_its_start_and_end(demo_model, tmp_path):
    from mlxterp_repl.runner import run_script

    prompt = " ".join(["The capital of France is Paris."] * 25)
    out, err = io.StringIO(), io.StringIO()
    status = run_script(f'prompt "{prompt}"\n', Session(demo_model), out=out, err=err, width=80)
    assert status == 0, err.getvalue()
    text = out.getvalue()
    assert len(text) < 800 and "characters) …" in text and text.count("France") < 10
