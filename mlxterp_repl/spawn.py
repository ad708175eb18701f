"""Finding, starting and connecting to the daemon: the Unix socket of a runtime directory
(starting the daemon there when none runs), or TCP with the connection file's token.

Starting is guarded by a lock file, so N clients racing produce exactly one daemon; a
socket or pid file left by a killed daemon is cleaned up.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p

START_TIMEOUT = 60.0


class DaemonNotRunning(ConnectionError):
    pass


def open_unix(files: daemon_files.DaemonPaths) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(files.socket))
    except OSError:
        sock.close()
        raise
    return sock


def remove_stale_files(files: daemon_files.DaemonPaths) -> None:
    """Delete the socket, pid and connection files of a daemon that is gone."""
    if daemon_files.daemon_alive(files):
        return
    daemon_files.remove_socket(files.socket)
    for path in (files.pid_file, files.connection_file):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def daemon_environment() -> dict:
    env = dict(os.environ)
    try:
        from mlxterp_repl import blas

        openblas = blas.should_reexec(env)
        if openblas:
            env = blas.preload_environment(openblas, env)
    except Exception:
        pass
    return env


# A daemon started for you (by `mlxterp run`, the REPL, an editor, `connect()`) stops after this
# many seconds with no client; MLXTERP_IDLE_TIMEOUT (0: never) sets another. `mlxterp serve` never does unless told.
AUTO_IDLE_TIMEOUT = 30 * 60


def spawn_daemon(files: daemon_files.DaemonPaths, model: str, extra_args: list[str] | None = None) -> subprocess.Popen:
    extra_args = list(extra_args or [])
    if "--idle-timeout" not in extra_args:
        extra_args += ["--idle-timeout", os.environ.get("MLXTERP_IDLE_TIMEOUT") or str(AUTO_IDLE_TIMEOUT)]
    args = [sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", str(files.runtime_dir),
            "--socket", str(files.socket), "--model", model, *extra_args]
    with open(files.log_file, "ab") as log:
        os.chmod(files.log_file, 0o600)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=daemon_environment(), close_fds=True)
    # Reap it when it exits, so no zombie outlives it in a long-lived client process.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def ensure_daemon(files: daemon_files.DaemonPaths, model: str = "demo", timeout: float = START_TIMEOUT,
                  extra_args: list[str] | None = None) -> socket.socket:
    """A connected socket to the daemon of `files`, starting one if none runs."""
    try:
        return open_unix(files)
    except OSError:
        pass
    daemon_files.prepare(files)
    deadline = time.monotonic() + timeout
    lock_fd = daemon_files.open_private(files.lock_file)
    try:
        while True:  # wait for the start lock, without blocking forever
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DaemonNotRunning(f"another process holds {files.lock_file} while starting the daemon")
                time.sleep(0.02)
        # Someone may have started it while we waited for the lock.
        try:
            return open_unix(files)
        except OSError:
            pass
        proc = None
        if not daemon_files.daemon_alive(files):
            remove_stale_files(files)
            proc = spawn_daemon(files, model, extra_args)
        while time.monotonic() < deadline:
            try:
                return open_unix(files)
            except OSError:
                pass
            if proc is not None and proc.poll() is not None:
                raise DaemonNotRunning(f"the daemon exited at start (code {proc.returncode}); "
                                       f"see {files.log_file}:\n{log_tail(files.log_file)}")
            time.sleep(0.01)
        raise DaemonNotRunning(f"the daemon did not open {files.socket} within {timeout:.0f} s; see {files.log_file}")
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_connection_file(files: daemon_files.DaemonPaths, connection_file: str | Path | None = None) -> dict:
    path = Path(connection_file) if connection_file else files.connection_file
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DaemonNotRunning(f"no connection file at {path}: start the daemon with `mlxterp serve --tcp HOST:PORT`")


def open_tcp(tcp: str) -> socket.socket:
    """A connected TCP socket to 'HOST:PORT' (IPv6 as '[::1]:PORT')."""
    return socket.create_connection(p.parse_host_port(tcp))
