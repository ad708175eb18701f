"""Driving `mlxterp lsp` from tests: a pytest-lsp client on a real server process whose daemon
lives in a private runtime directory (never the user's)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from lsprotocol import types
from pytest_lsp import LanguageClient, client_capabilities
from pygls.protocol import default_converter
from pytest_lsp.client import DEFAULT_CLIENT_FEATURES, register_lsp_features

from mlxterp_repl import paths as daemon_files

CLIENTS = ["visual-studio-code", "neovim@v0.7.0"]
URI = "file:///tmp/mlxterp-test/query.mlxq"


def plain(value):
    """A JSON value as pygls hands it over (named tuples) turned back into dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def server_env(runtime_dir: Path) -> dict:
    env = dict(os.environ)
    env["MLXTERP_RUNTIME_DIR"] = str(runtime_dir)
    env.pop("MLXTERP_SOCKET", None)
    return env


SERVER = [sys.executable, "-m", "mlxterp_lsp"]
CLI_SERVER = [sys.executable, "-m", "mlxterp_repl.cli", "lsp", "--stdio"]  # as editors start it


async def start_server(runtime_dir: Path, client_name: str = "visual-studio-code", options: dict | None = None,
                       command: list[str] = SERVER, capabilities: types.ClientCapabilities | None = None
                       ) -> LanguageClient:
    """A server process initialized as `client_name` would, with its inlay-hint refreshes answered."""
    client = LanguageClient(converter_factory=default_converter)
    client.results_notifications = []
    client.inlay_refreshes = 0
    client.versions = {}

    def on_diagnostics(ls, params: types.PublishDiagnosticsParams):
        client.diagnostics[params.uri] = params.diagnostics
        client.versions[params.uri] = params.version

    register_lsp_features(client, {**DEFAULT_CLIENT_FEATURES, types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS: on_diagnostics})

    @client.feature("mlxterp/results")
    def on_results(ls, params):
        client.results_notifications.append(plain(params))

    @client.feature(types.WORKSPACE_INLAY_HINT_REFRESH)
    def on_refresh(ls, params):
        client.inlay_refreshes += 1

    await client.start_io(*command, env=server_env(runtime_dir))
    await client.initialize_session(types.InitializeParams(
        capabilities=capabilities or client_capabilities(client_name),
        initialization_options={"debounceMs": 20, **(options or {})}))
    return client


async def stop_server(client: LanguageClient) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), 10)
    finally:
        await client.stop()


def open_document(client: LanguageClient, text: str, uri: str = URI, version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="mlxq", version=version, text=text)))


def change_document(client: LanguageClient, version: int, start: tuple[int, int], end: tuple[int, int], text: str,
                    uri: str = URI) -> None:
    change = types.TextDocumentContentChangePartial(
        range=types.Range(types.Position(*start), types.Position(*end)), text=text)
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        types.VersionedTextDocumentIdentifier(uri=uri, version=version), [change]))


async def wait_for(condition, timeout: float = 30.0, interval: float = 0.02):
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def diagnostics_for(client: LanguageClient, version: int, uri: str = URI, timeout: float = 30.0,
                          where=lambda diagnostics: True):
    """The diagnostics published for `version` of the document that satisfy `where`."""
    def ready():
        found = client.diagnostics.get(uri)
        return found is not None and client_version(client, uri) == version and where(found) and [found]
    return (await wait_for(ready, timeout))[0]


def client_version(client: LanguageClient, uri: str):
    return client.versions.get(uri)


def stop_daemon(runtime_dir: Path, timeout: float = 10.0) -> None:
    """Stop whatever daemon runs on `runtime_dir` (the server may have started it)."""
    files = daemon_files.daemon_paths(runtime_dir)
    info = daemon_files.read_pid_file(files)
    pid = info.get("pid")
    if not pid or not daemon_files.daemon_alive(files):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon_files.daemon_alive(files):
        os.kill(pid, signal.SIGKILL)


def daemon_pid(runtime_dir: Path):
    return daemon_files.read_pid_file(daemon_files.daemon_paths(runtime_dir)).get("pid")
