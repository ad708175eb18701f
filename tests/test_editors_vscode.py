"""The VS Code extension in editors/vscode: it packages into a .vsix offline, its TextMate
grammar gives the expected scopes, and it stays in step with the language and the server.

Needs node and npm (CI has them): the tests FAIL, not skip, when they are missing. `npm ci`
runs once per session into editors/vscode (from the npm cache when it can); packaging then
runs with npm in offline mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from mlxterp_repl.dsl.parser import FUNCTIONS, INTERVENTIONS, METRICS, STATEMENTS

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "editors" / "vscode"


@pytest.fixture(scope="module")
def node_modules():
    """editors/vscode with its dependencies installed by `npm ci` from package-lock.json."""
    missing = [tool for tool in ("node", "npm", "npx") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the VS Code extension tests need {', '.join(missing)} on PATH "
                    "(install Node.js 20 or newer, e.g. apt-get install nodejs npm)")
    done = subprocess.run(["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund"], cwd=EXTENSION,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return EXTENSION / "node_modules"


def tokenize(text: str, tmp_path: Path) -> list[list[dict]]:
    """Each line of `text` as [{text, scopes}] tokens, tokenised by vscode-textmate."""
    source = tmp_path / "sample.mlxq"
    source.write_text(text)
    done = subprocess.run(["node", str(EXTENSION / "scripts" / "tokenize.js"), str(source)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[str(source)]


def scope_of(line: list[dict], text: str) -> str:
    """The innermost scope of the (first) token whose text, stripped, is `text`."""
    for token in line:
        if token["text"].strip() == text:
            return token["scopes"][-1]
    raise AssertionError(f"no token {text!r} in {[t['text'] for t in line]}")


def test_vsix_builds_offline_with_the_language_client_inside(node_modules, tmp_path):
    out = tmp_path / "mlxq.vsix"
    env = dict(os.environ, npm_config_offline="true")
    done = subprocess.run(["npx", "--offline", "@vscode/vsce", "package", "--out", str(out)], cwd=EXTENSION,
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"vsce package failed:\n{done.stdout}\n{done.stderr}"
    with zipfile.ZipFile(out) as vsix:
        names = set(vsix.namelist())
        manifest = json.loads(vsix.read("extension/package.json"))
    for name in ("extension/extension.js", "extension/language-configuration.json",
                 "extension/syntaxes/mlxq.tmLanguage.json",
                 "extension/node_modules/vscode-languageclient/lib/node/main.js"):
        assert name in names
    assert not any(n.startswith("extension/scripts/") for n in names), "test scripts leaked into the .vsix"
    assert not any("/@vscode/vsce/" in n for n in names), "dev dependencies leaked into the .vsix"
    language = manifest["contributes"]["languages"][0]
    assert (language["id"], language["extensions"]) == ("mlxq", [".mlxq"])


def test_grammar_scopes_of_the_tour_example(node_modules, tmp_path):
    lines = (ROOT / "examples" / "tour.mlxq").read_text().splitlines()
    tokens = tokenize("\n".join(lines), tmp_path)

    def line_of(start: str) -> list[dict]:
        return tokens[next(i for i, line in enumerate(lines) if line.startswith(start))]

    assert scope_of(tokens[0], "#") == "punctuation.definition.comment.mlxq"
    assert tokens[0][-1]["scopes"][-1] == "comment.line.number-sign.mlxq"
    save = line_of("save layers.*.mlp @ -1 as $mlps")
    assert scope_of(save, "save") == "keyword.control.statement.mlxq"
    assert scope_of(save, "layers") == "entity.name.module.mlxq"
    assert scope_of(save, "*") == "keyword.operator.wildcard.mlxq"
    assert scope_of(save, "mlp") == "entity.name.module.mlxq"
    assert scope_of(save, "@") == "keyword.operator.position.mlxq"
    assert scope_of(save, "-1") == "constant.numeric.integer.mlxq"
    assert scope_of(save, "as") == "keyword.other.option.mlxq"
    assert scope_of(save, "mlps") == "variable.other.result.mlxq"
    prompt = line_of("prompt ")
    assert scope_of(prompt, "The capital of France is") == "string.quoted.double.mlxq"
    # `layers` is an option after `lens` but a module path before a dot
    lens = line_of("lens layers 8..15 plot to")
    assert scope_of(lens, "layers") == "keyword.other.option.mlxq"
    assert scope_of(lens, "..") == "keyword.operator.range.mlxq"
    assert scope_of(lens, "tour-output/lens.png") == "string.unquoted.path.mlxq"
    ranged = line_of("stats layers.0..3.mlp")
    assert [scope_of(ranged, t) for t in ("0", "..", "3")] == [
        "constant.numeric.integer.index.mlxq", "keyword.operator.range.mlxq", "constant.numeric.integer.index.mlxq"]
    patch = next(i for i, line in enumerate(lines) if line.startswith("patch mlp clean"))
    assert tokens[patch][-1]["scopes"][-1] == "punctuation.separator.continuation.line.mlxq"
    assert scope_of(tokens[patch + 1], "l2") == "constant.language.metric.mlxq"  # the continued line
    steer = line_of("with layers.3 scale 0.5")
    assert scope_of(steer, "scale") == "support.function.intervention.mlxq"
    assert scope_of(steer, "0.5") == "constant.numeric.float.mlxq"
    assert [t["text"] for t in steer if t["scopes"][-1] == "keyword.control.statement.mlxq"] == ["with", "save"]
    let = line_of("let $size = norm($v)")
    assert scope_of(let, "norm") == "support.function.builtin.mlxq"


def test_grammar_string_escapes_and_an_unterminated_string_end_at_the_line(node_modules, tmp_path):
    tokens = tokenize('prompt "say \\"hi\\" \\q\nprompt "open\nls\n', tmp_path)
    assert scope_of(tokens[0], '\\"') == "constant.character.escape.mlxq"
    assert scope_of(tokens[0], "\\q") == "invalid.illegal.escape.mlxq"
    assert scope_of(tokens[2], "ls") == "keyword.control.statement.mlxq"  # the open string did not run on


def test_grammar_knows_every_statement_intervention_function_and_metric(node_modules, tmp_path):
    """When the language grows, the grammar must grow with it (names come from the parser)."""
    lines = [f"{name} x" for name in STATEMENTS]
    lines += [f"with layers.1 {name} 1: lens" for name in INTERVENTIONS]
    lines += [f"let $a = {name}($b)" for name in FUNCTIONS]
    lines += [f"patch mlp clean \"a\" corrupt \"b\" metric {name}" for name in METRICS]
    tokens = tokenize("\n".join(lines), tmp_path)
    expected = ([(name, "keyword.control.statement.mlxq") for name in STATEMENTS]
                + [(name, "support.function.intervention.mlxq") for name in INTERVENTIONS]
                + [(name, "support.function.builtin.mlxq") for name in FUNCTIONS]
                + [(name, "constant.language.metric.mlxq") for name in METRICS])
    assert [scope_of(line, name) for line, (name, _) in zip(tokens, expected)] == [s for _, s in expected]


def test_extension_registers_the_commands_it_contributes():
    manifest = json.loads((EXTENSION / "package.json").read_text())
    source = (EXTENSION / "extension.js").read_text()
    contributed = {c["command"] for c in manifest["contributes"]["commands"]}
    registered = set(re.findall(r'registerCommand\("([^"]+)"', source))
    assert contributed == registered == {"mlxq.runLine", "mlxq.runFile", "mlxq.restartServer", "mlxq.showStatus"}
    settings = set(manifest["contributes"]["configuration"]["properties"])
    assert {"mlxq.command", "mlxq.model", "mlxq.daemonSocket"} <= settings
    # the server's run command, by the name the server registers
    from mlxterp_lsp.server import RUN_COMMAND

    assert f'const RUN_COMMAND = "{RUN_COMMAND}"' in source
    check = subprocess.run(["node", "--check", str(EXTENSION / "extension.js")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
