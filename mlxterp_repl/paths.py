"""Where the daemon's files live: runtime directory, socket, pid, lock, log and connection file.

One daemon per runtime directory. The directory is private (0700) and owned by the
user; the socket inside it is 0600. Only directories mlxterp creates get their mode set:
one that exists and is not private is refused (docs/security.md). Lookup order for the directory:
$MLXTERP_RUNTIME_DIR, then $XDG_RUNTIME_DIR/mlxterp, then /tmp/mlxterp-<uid>.
$MLXTERP_SOCKET overrides the socket path alone.

Unix socket paths are limited (107 bytes on Linux, 103 on macOS); when the socket
path in the runtime directory would be longer, the socket goes to a short private
directory under /tmp named after a hash of the runtime directory, so every client
computes the same place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlxterp_repl import safe_files
from mlxterp_repl.safe_files import write_bytes

SOCKET_NAME = "daemon.sock"
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


class RuntimeDirError(OSError):
    """The runtime directory cannot be used safely (wrong owner or permissions)."""


@dataclass(frozen=True)
class DaemonPaths:
    """All the files one daemon uses. `runtime_dir` is private to the user."""

    runtime_dir: Path
    socket: Path
    pid_file: Path  # JSON; the live daemon holds an exclusive lock on it
    lock_file: Path  # clients hold this while starting a daemon, so only one starts
    log_file: Path
    connection_file: Path  # TCP host, port and token (0600), only when --tcp is used


def default_runtime_dir() -> Path:
    explicit = os.environ.get("MLXTERP_RUNTIME_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "mlxterp"
    return Path(tempfile.gettempdir()) / f"mlxterp-{os.getuid()}"


def daemon_paths(runtime_dir: str | Path | None = None, socket: str | Path | None = None) -> DaemonPaths:
    """The daemon's files for `runtime_dir` (default: see module docstring). Creates nothing."""
    rdir = Path(runtime_dir).expanduser() if runtime_dir else default_runtime_dir()
    rdir = rdir.absolute()
    if socket is None and not runtime_dir and os.environ.get("MLXTERP_SOCKET"):
        socket = os.environ["MLXTERP_SOCKET"]
    sock = Path(socket).expanduser().absolute() if socket else rdir / SOCKET_NAME
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        sock = short_socket_path(rdir)
    return DaemonPaths(
        runtime_dir=rdir,
        socket=sock,
        pid_file=rdir / "daemon.pid",
        lock_file=rdir / "daemon.lock",
        log_file=rdir / "daemon.log",
        connection_file=rdir / "connection.json",
    )


def short_socket_path(runtime_dir: Path) -> Path:
    """A short socket path for a runtime dir whose own path is too long to bind."""
    digest = hashlib.sha256(os.fsencode(runtime_dir)).hexdigest()[:12]
    return Path("/tmp") / f"mlxterp-{os.getuid()}-{digest}" / SOCKET_NAME


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or check an existing one is ours and private. A directory
    mlxterp did not create is never chmod-ed: one that is not private is refused."""
    if path.is_symlink() and not path.exists():
        raise RuntimeDirError(f"{path} is a symbolic link to nothing ({os.readlink(path)}); remove it or set "
                              "MLXTERP_RUNTIME_DIR to a directory of your own")
    created = False
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a directory (a link or a file); remove it or set MLXTERP_RUNTIME_DIR")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(
            f"{path} belongs to uid {info.st_uid}, not you (uid {os.getuid()}); "
            "set MLXTERP_RUNTIME_DIR to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        if not created:
            raise RuntimeDirError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):o}: other users could reach the daemon's socket and "
                f"files. mlxterp changes only directories it creates: run `chmod 700 {path}` or pick another "
                "(--runtime-dir, --socket, MLXTERP_RUNTIME_DIR, MLXTERP_SOCKET)")
        os.chmod(path, 0o700)  # (a umask wider than 077 on a directory we just made)
    return path


def open_private(path: Path) -> int:
    """Open (creating, 0600) a pid or lock file, never through a symbolic link."""
    try:
        return safe_files.open_private(path)
    except safe_files.UnsafePath as error:
        raise RuntimeDirError(str(error)) from None


def remove_socket(path: Path) -> None:
    """Unlink `path` only when `lstat` shows a socket there (never a file or a link someone put there)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(info.st_mode):
        path.unlink(missing_ok=True)


def prepare(paths: DaemonPaths) -> None:
    """Create the runtime directory (and the socket's directory, if elsewhere) privately."""
    ensure_private_dir(paths.runtime_dir)
    ensure_private_dir(paths.socket.parent)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the user only (0600), replacing it atomically."""
    write_bytes(path, text.encode(), overwrite=True)


def read_pid_file(paths: DaemonPaths) -> dict:
    """What the running daemon wrote about itself (pid, socket, model...), or {}."""
    try:
        return json.loads(paths.pid_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def daemon_alive(paths: DaemonPaths) -> bool:
    """True when a daemon holds the pid file's lock (the lock dies with its process)."""
    try:
        fd = os.open(paths.pid_file, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
