"""`mlxterp run`: results per statement, the first error ends the run, --json and --keep-going."""

import io
import json
from pathlib import Path

import numpy as np

from mlxterp_repl.dsl import Session
from mlxterp_repl.runner import main, run_script

TOUR = Path(__file__).resolve().parent.parent / "examples" / "tour.mlxq"
SCRIPT = 'prompt "The capital of France is"\nsave layers.8 @ "Germany"\nsav layers.8\nsave layers.8 @ -1\n'


def run(source, model, **options):
    out, err = io.StringIO(), io.StringIO()
    status = run_script(source, Session(model), out=out, err=err, **options)
    return status, out.getvalue(), err.getvalue()


def test_a_syntax_error_anywhere_runs_nothing(demo_model):
    status, out, err = run(SCRIPT, demo_model)
    assert status == 1
    assert out == ""
    assert err.startswith("line 3, column 1: 'sav' is not a statement")


def test_first_error_stops_the_script_with_status_1(demo_model):
    status, out, err = run(SCRIPT.replace("sav layers.8", "save layers.8"), demo_model)
    assert status == 1
    assert "prompt set" in out and "4: save" not in out
    assert err.startswith("line 2, column 17: no token of the input matches 'Germany'")
    assert "valid here: 0:" in err
    assert '  2 | save layers.8 @ "Germany"' in err and "^^^^^^^^^" in err


def test_keep_going_reports_every_error_and_runs_the_rest(demo_model):
    status, out, err = run(SCRIPT, demo_model, keep_going=True)
    assert status == 1
    assert "line 2, column 17" in err and "line 3, column 1: 'sav' is not a statement" in err
    assert "4: save layers.8 @ -1" in out


def test_json_prints_one_object_per_statement_with_values(demo_model):
    status, out, _ = run(SCRIPT, demo_model, as_json=True, keep_going=True)
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["line"], r["ok"]) for r in records] == [(1, True), (2, False), (3, False), (4, True)]
    assert records[1]["error"]["span"] == {"line": 2, "col": 17, "end_line": 2, "end_col": 26}
    array = records[3]["result"]["arrays"][0]["array"]
    assert array["encoding"] == "base64"
    import base64

    values = np.frombuffer(base64.b64decode(array["data"]), dtype=array["dtype"]).reshape(array["shape"])
    with demo_model.trace("The capital of France is"):
        expected = demo_model.layers[8].output.save()
    np.testing.assert_allclose(values, np.array(expected)[0, -1], rtol=1e-6)


def test_the_tour_runs_every_statement(demo_model, tmp_path, monkeypatch):
    from mlxterp_repl.dsl import STATEMENTS, parse

    source = TOUR.read_text()
    used = {type(s).__name__.lower() for s in parse(source).statements}
    assert used == set(STATEMENTS)
    monkeypatch.chdir(tmp_path)
    # `load demo` is the tour's first statement; reuse the loaded demo model to keep the test fast
    source = source.replace("load demo\n", "", 1)
    status, out, err = run(source, demo_model, as_json=True)
    assert status == 0, err
    kinds = [json.loads(line)["result"]["kind"] for line in out.splitlines()]
    assert "patch" in kinds and "lens" in kinds
    assert (tmp_path / "tour-output" / "lens.png").exists()
    assert (tmp_path / "tour-output" / "mlps.safetensors").exists()


def test_command_line_missing_file_is_status_2(capsys):
    assert main(["/nonexistent/x.mlxq"]) == 2
    assert "no such file" in capsys.readouterr().err
