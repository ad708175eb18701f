"""Starting, finding, securing and stopping the daemon: lock and pid files, stale files
of a killed daemon, private permissions, the socket-path length fallback, TCP tokens."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from daemon_support import RawConnection, daemon_env, errors_of, start_daemon
from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p
from mlxterp_repl.client import DaemonNotRunning, connect


def kill_daemon_of(files) -> None:
    info = daemon_files.read_pid_file(files)
    if info.get("pid"):
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
        time.sleep(0.01)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_runtime_dir_is_0700_and_socket_0600(tmp_path):
    runtime = tmp_path / "rt"
    daemon = start_daemon(runtime)
    try:
        assert mode(runtime) == 0o700
        assert stat.S_ISSOCK(os.stat(daemon.files.socket).st_mode)
        assert mode(daemon.files.socket) == 0o600
        assert mode(daemon.files.pid_file) == 0o600
    finally:
        daemon.stop()
    assert not daemon.files.socket.exists() and not daemon.files.pid_file.exists()


def test_a_group_readable_runtime_dir_given_is_refused_and_left_alone(tmp_path):
    runtime = tmp_path / "open"
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    with pytest.raises(daemon_files.RuntimeDirError, match="chmod 700"):
        daemon_files.prepare(daemon_files.daemon_paths(runtime))
    assert mode(runtime) == 0o755  # not mlxterp's directory: its mode is not changed


def test_runtime_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTERP_RUNTIME_DIR", str(tmp_path / "mine"))
    assert daemon_files.daemon_paths().socket == tmp_path / "mine" / "daemon.sock"
    monkeypatch.delenv("MLXTERP_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert daemon_files.daemon_paths().runtime_dir == tmp_path / "mlxterp"
    monkeypatch.setenv("MLXTERP_SOCKET", str(tmp_path / "s.sock"))
    assert daemon_files.daemon_paths().socket == tmp_path / "s.sock"


def test_a_runtime_dir_too_long_for_a_socket_falls_back_to_a_short_path(tmp_path):
    runtime = tmp_path / ("d" * 60) / ("e" * 60)
    files = daemon_files.daemon_paths(runtime)
    assert len(os.fsencode(runtime / "daemon.sock")) > daemon_files.MAX_SOCKET_PATH
    assert len(os.fsencode(files.socket)) <= daemon_files.MAX_SOCKET_PATH
    assert files.pid_file.parent == runtime
    daemon = start_daemon(runtime)
    try:
        with connect(runtime_dir=runtime, autostart=False) as client:
            assert client.ping()["pong"]
        assert mode(files.socket.parent) == 0o700 and mode(files.socket) == 0o600
    finally:
        daemon.stop()


def test_racing_clients_start_exactly_one_daemon(tmp_path):
    runtime = tmp_path / "race"
    script = ("import sys; from mlxterp_repl.client import connect\n"
              "c = connect(runtime_dir=sys.argv[1]); print(c.hello['daemon_id'], c.hello['pid'])")
    clients = [subprocess.Popen([sys.executable, "-c", script, str(runtime)], stdout=subprocess.PIPE, text=True,
                                env=daemon_env(runtime)) for _ in range(6)]
    answers = set()
    try:
        for proc in clients:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            answers.add(out.strip())
        assert len(answers) == 1, answers
        daemon_id, pid = answers.pop().split()
        files = daemon_files.daemon_paths(runtime)
        assert daemon_files.read_pid_file(files)["pid"] == int(pid)
        log = files.log_file.read_text()
        assert log.count("listening on") == 1 and "already running" not in log
    finally:
        kill_daemon_of(daemon_files.daemon_paths(runtime))


def test_a_second_daemon_on_the_same_runtime_dir_refuses_to_start(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30, env=daemon_env(tmp_path))
        assert second.returncode == 1
        assert "already running" in second.stderr and str(daemon.proc.pid) in second.stderr
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()


def test_stale_socket_and_pid_file_of_a_killed_daemon_are_cleaned_up(tmp_path):
    with connect(runtime_dir=tmp_path) as client:
        first_id = client.hello["daemon_id"]
    files = daemon_files.daemon_paths(tmp_path)
    kill_daemon_of(files)
    assert files.socket.exists() and files.pid_file.exists()  # what a SIGKILL leaves behind
    assert not daemon_files.daemon_alive(files)
    try:
        with connect(runtime_dir=tmp_path) as client:
            assert client.hello["daemon_id"] != first_id
            assert client.ping()["pong"]
        assert json.loads(files.pid_file.read_text())["daemon_id"] != first_id
    finally:
        kill_daemon_of(files)


def test_status_and_stop_commands(tmp_path):
    env = daemon_env(tmp_path)

    def mlxterp(*args):
        return subprocess.run([sys.executable, "-c", "import sys; from mlxterp_repl import commands; "
                               f"sys.exit(commands.{args[0]}_main(sys.argv[1:]))", *args[1:]],
                              capture_output=True, text=True, timeout=30, env=env)

    absent = mlxterp("status")
    assert absent.returncode == 1 and "no daemon running" in absent.stderr
    daemon = start_daemon(tmp_path)
    try:
        shown = mlxterp("status")
        assert shown.returncode == 0
        assert f"pid {daemon.proc.pid}" in shown.stdout and "model   demo" in shown.stdout
        stopped = mlxterp("stop")
        assert stopped.returncode == 0 and "stopped daemon" in stopped.stdout
        assert daemon.proc.wait(5) == 0
        assert not daemon.files.socket.exists() and not daemon.files.pid_file.exists()
    finally:
        daemon.stop()


def test_connect_without_autostart_says_no_daemon_runs(tmp_path):
    with pytest.raises(DaemonNotRunning, match="mlxterp serve"):
        connect(runtime_dir=tmp_path, autostart=False)


def test_tcp_needs_the_token_from_the_0600_connection_file(tmp_path):
    daemon = start_daemon(tmp_path, "--tcp", ":0")
    try:
        files = daemon.files
        assert mode(files.connection_file) == 0o600
        info = json.loads(files.connection_file.read_text())
        assert info["host"] == "127.0.0.1"  # loopback unless asked otherwise
        address = (info["host"], info["port"])

        no_token = RawConnection(address, socket.AF_INET)
        frames = no_token.request("ping")
        assert errors_of(frames)[0]["code"] == p.NEED_HELLO
        assert no_token.closed_by_peer()

        wrong = RawConnection(address, socket.AF_INET)
        frames = wrong.request("hello", protocol=p.PROTOCOL_VERSION, token="guess")
        assert errors_of(frames)[0]["code"] == p.BAD_TOKEN
        assert wrong.closed_by_peer()

        with connect(tcp=f"{info['host']}:{info['port']}", runtime_dir=tmp_path) as client:
            assert client.ping()["pong"]
            assert client.stats()["tcp"] == f"127.0.0.1:{info['port']}"
    finally:
        daemon.stop()
    assert not files.connection_file.exists()


def test_idle_timeout_stops_the_daemon_only_once_no_client_is_connected(tmp_path):
    daemon = start_daemon(tmp_path, "--idle-timeout", "1")
    try:
        with connect(runtime_dir=tmp_path, autostart=False) as client:
            time.sleep(2.5)  # past the timeout, but a client is connected
            assert client.ping()["pong"]
        deadline = time.monotonic() + 10
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.proc.returncode == 0
        assert "--idle-timeout" in daemon.log()
        assert not daemon.files.socket.exists()
    finally:
        daemon.stop()


def test_a_daemon_whose_model_failed_to_load_stops_when_its_last_client_leaves(tmp_path):
    daemon = start_daemon(tmp_path, model=str(tmp_path / "no-such-model"))
    try:
        with connect(runtime_dir=tmp_path, autostart=False) as client:
            # Generous: on the GPU machine importing the loader's libraries alone took over 10 s.
            deadline = time.monotonic() + 60
            while client.hello["model"]["state"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
                client.hello = client.call("hello", protocol=p.PROTOCOL_VERSION)
            assert client.hello["model"]["state"] == "failed"
            assert "no-such-model" in client.hello["model"]["error"]
            time.sleep(1.0)
            assert client.ping()["pong"]  # still serving the client that is told why
        deadline = time.monotonic() + 10
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.proc.returncode == 0
    finally:
        daemon.stop()
