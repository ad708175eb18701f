"""Starting real daemons on private runtime directories for the daemon tests, and talking
to them over raw sockets. Never touches the user's runtime directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p

# The model the query tests run on; MLXTERP_TEST_MODEL points them at another one.
MODEL = os.environ.get("MLXTERP_TEST_MODEL", "demo")


def daemon_env(runtime_dir: Path) -> dict:
    env = dict(os.environ)
    env["MLXTERP_RUNTIME_DIR"] = str(runtime_dir)
    env.pop("MLXTERP_SOCKET", None)
    return env


class RunningDaemon:
    def __init__(self, proc: subprocess.Popen, files: daemon_files.DaemonPaths):
        self.proc = proc
        self.files = files

    def raw(self) -> "RawConnection":
        return RawConnection(self.files.socket)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.files.log_file.read_text(errors="replace")
        except OSError:
            return ""


def start_daemon(runtime_dir: Path, *args: str, model: str = "demo", timeout: float = 30.0) -> RunningDaemon:
    """`python -m mlxterp_repl.daemon` on `runtime_dir`, once its socket accepts connections."""
    files = daemon_files.daemon_paths(runtime_dir)
    daemon_files.prepare(files)
    log = open(files.log_file, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", str(runtime_dir), "--model", model, *args],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=daemon_env(runtime_dir))
    log.close()
    daemon = RunningDaemon(proc, files)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{daemon.log()}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(files.socket))
            return daemon
        except OSError:
            time.sleep(0.01)
    daemon.stop()
    raise RuntimeError(f"daemon did not listen within {timeout} s:\n{daemon.log()}")


class RawConnection:
    """A socket speaking frames by hand, to send the daemon what a good client never would."""

    def __init__(self, address, family=socket.AF_UNIX):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(address) if family == socket.AF_UNIX else address)
        self.ids = 0

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict) -> None:
        self.sock.sendall(p.pack(message))

    def receive(self) -> dict | None:
        body = p.read_frame_sync(self.sock)
        return None if body is None else p.unpack_body(body)

    def until_done(self, request_id) -> list[dict]:
        """Every frame for `request_id`, up to and including its `done`."""
        frames = []
        while True:
            message = self.receive()
            assert message is not None, f"connection closed before done of {request_id!r}; got {frames}"
            if message.get("id") == request_id:
                frames.append(message)
                if message["type"] == p.DONE:
                    return frames

    def request(self, op: str, **fields) -> list[dict]:
        self.ids += 1
        self.send({"op": op, "id": self.ids, **fields})
        return self.until_done(self.ids)

    def hello(self, **fields) -> dict:
        frames = self.request("hello", protocol=p.PROTOCOL_VERSION, **fields)
        assert frames[-1]["status"] == "ok", frames
        return frames[-1]["value"]

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


def errors_of(frames: list[dict]) -> list[dict]:
    return [f["error"] for f in frames if f["type"] == p.ERROR]
