"""What the docs say a command prints or does, executed: the outputs in docs/examples.md's
comments, the error messages shown in docs/repl.md and docs/lsp.md, repl.md's interrupt claim,
dsl.md's word on `patch` under interventions, and quickstart's `make demo`. When one fails,
either the behaviour or the page is wrong; fix whichever is."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import threading
import time

import numpy as np
import pytest

from daemon_support import daemon_env, start_daemon
from doc_blocks import DOCS, python_blocks

ROOT = DOCS.parent


def doc(page: str) -> str:
    return (DOCS / page).read_text()


def claimed_output(code: str) -> list[str]:
    """The lines a block's comments say it prints: `# Output: X`, or `# Output:` then `# X` lines.
    A trailing `  (note)` is the page's remark, not output; `...` stands for lines left out."""
    claims, lines = [], code.splitlines()
    for index, line in enumerate(lines):
        found = re.match(r"\s*# Output:\s*(.*)$", line)
        if not found:
            continue
        following = [found.group(1)] if found.group(1) else []
        if not following:
            for line_after in lines[index + 1:]:
                comment = re.match(r"\s*#\s?(.*\S)\s*$", line_after)
                if not comment:
                    break
                following.append(comment.group(1))
        claims += [re.sub(r"\s{2,}\(.*\)$", "", claim).strip() for claim in following if claim.strip() != "..."]
    return claims


def test_examples_page_prints_what_its_comments_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    checked = 0
    for line, code in python_blocks("examples.md"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"examples.md:{line}", "exec"), namespace)
        said = " ".join(printed.getvalue().split())
        for claim in claimed_output(code):
            assert " ".join(claim.split()) in said, (
                f"docs/examples.md line {line}: the comment says it prints {claim!r}; it printed:\n"
                f"{printed.getvalue()}")
            checked += 1
    assert checked >= 30  # the token ids, the predictions, the shapes


def test_the_typo_message_in_repl_md_is_what_a_typo_gets(demo_model):
    from mlxterp_repl.dsl import QueryError, Session

    shown = re.search(r"mlxterp> (prompt [^\n]*)\n([^\n]*)\nmlxterp> (save layers\.8\.mpl)\n(.*?)\n```", doc("repl.md"), re.S)
    session = Session(demo_model)
    [prompt] = session.execute(shown.group(1))
    assert prompt.to_data(text=True)["text"].strip() == shown.group(2)
    code, page = shown.group(3), shown.group(4).splitlines()
    with pytest.raises(QueryError) as raised:
        session.execute(code)
    real = raised.value.render(code).splitlines()
    assert len(page) == len(real)
    for said, printed in zip(page, real):  # the page shortens long lists with "..."
        assert printed.startswith(said.split("...")[0].rstrip(" ,")), (said, printed)


def test_the_diagnostics_table_of_lsp_md_quotes_real_messages(demo_model):
    from mlxterp_lsp import checks
    from mlxterp_lsp.documents import Document
    from mlxterp_repl.dsl import QueryError, Session

    def findings(text: str, check) -> str:
        document = Document("file:///claims.mlxq", text)
        if check is None:
            return checks.parse_findings(document)[0].message
        if check == "names":
            return checks.variable_findings(document)[0].message
        [located] = document.statements
        return next(f.message for path, prefix in checks.module_paths(located.statement)
                    for f in checks.path_findings(demo_model.names.table, located, path, prefix))

    session = Session(demo_model)
    with pytest.raises(QueryError) as token:
        session.execute('prompt "The capital of France is"\nsave layers.8 @ "Berlin"')
    with pytest.raises(QueryError) as position:
        session.execute("save layers.8 @ 9")
    real = [findings("sav layers.8\n", None),
            findings("predict $london\nsave layers.8 @ -1 as $london\n", "names"),
            findings("save layers.3.mpl @ -1\n", "paths"),
            findings("save layers.40 @ -1\n", "paths"),
            token.value.message, position.value.message]
    rows = re.findall(r"^\| [^|]+ \| (?:yes|no) \| `(.*)` \|$", doc("lsp.md"), re.M)
    assert len(rows) == len(real), rows
    for said, printed in zip(rows, real):
        assert printed.startswith(said.split("...")[0].rstrip(" ,")), (said, printed)


def test_patch_runs_under_the_steering_and_says_so_but_not_in_a_with(demo_model):
    from mlxterp_repl.dsl import QueryError, Session

    page = doc("dsl.md")
    assert "its result lists it (`interventions: layers.4 scale 0.5`)" in page
    assert "`patch` cannot follow `with`" in page
    session = Session(demo_model)
    query = 'patch mlp clean "Paris is the capital of France" corrupt "London is the capital of France" layers 0..5'
    [plain] = session.execute(query)
    session.execute("steer layers.4 scale 0.5")
    [steered] = session.execute(query)
    assert "interventions: layers.4 scale 0.5" in steered.to_data(text=True)["text"]
    assert not np.allclose(steered.to_data()["percent"], plain.to_data()["percent"])
    with pytest.raises(QueryError, match="'patch' cannot follow 'with'; these can: save, lens"):
        session.execute("with layers.4 zero: " + query)


@pytest.mark.slow
def test_ctrl_c_brings_the_prompt_back_within_a_fraction_of_a_second_even_in_a_patch(tmp_path):
    from mlxterp_repl.client import DaemonError, connect

    page = doc("repl.md")
    assert "the prompt comes back within a\nfraction of a second" in page and "`patch`" in page
    served = start_daemon(tmp_path / "rt")
    long_text = "Paris is the capital of France. " * 20
    try:
        with connect(runtime_dir=tmp_path / "rt", autostart=False) as daemon:
            daemon.exec('prompt "The capital of France is"\nsave layers.8 @ -1 as $kept')
            started = time.monotonic()
            stopped = {}

            def interrupt_soon():
                time.sleep(1.0)
                stopped["at"] = time.monotonic()
                daemon.interrupt()

            threading.Thread(target=interrupt_soon, daemon=True).start()
            with pytest.raises((DaemonError, KeyboardInterrupt)):
                daemon.exec(f'patch mlp clean "{long_text}" corrupt "{long_text.replace("Paris", "Rome")}" @ * force')
            back = time.monotonic()
            assert back - stopped["at"] < 0.5, f"the prompt came back {back - stopped['at']:.2f} s after Ctrl-C"
            assert back - started < 5
            # the daemon stays up, with the session as it was
            [predicted] = daemon.exec("predict $kept top 3")
            assert "Paris" in str(predicted)
    finally:
        served.stop()


@pytest.mark.slow
def test_make_demo_runs_the_tour_and_says_how_to_stop_the_daemon(tmp_path):
    quickstart = doc("quickstart.md")
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    [script] = re.findall(r"mlxterp run (\S+)", recipe)
    assert f"`{script}`" in quickstart and "`make demo`" in quickstart  # the page names what it runs
    env = daemon_env(tmp_path / "rt")
    env["COLUMNS"] = "100"
    # -o: use the .venv as it is (make would otherwise reinstall it when pyproject.toml is newer)
    done = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed-from-pyproject", "demo"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "logit lens" in done.stdout and "Paris" in done.stdout
        assert "stops   after 30 minutes with no client" in done.stdout  # `mlxterp status`
        last = done.stdout.strip().splitlines()[-1]
        assert "mlxterp stop" in last and "stops it" in last, last
    finally:
        subprocess.run([str(ROOT / ".venv" / "bin" / "mlxterp"), "stop"], env=env, capture_output=True, timeout=60)
