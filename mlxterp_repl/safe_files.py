"""Writing files a query names, safely: the one place for where such a file may go and how
it is written. See docs/security.md.

- `resolve_under(root, name)`: the path of `name` inside `root`, refusing what would leave it
  (absolute paths, `~`, `..`) and any symbolic link on the way.
- `replacing(path, overwrite)`: a context manager giving a temporary file in the target's own
  directory (created exclusively, never through a symlink); on success it is fsynced and
  renamed over the target in one step, on any error removed. So a crash (even `kill -9`)
  leaves the old file whole, and a full disk leaves no partial file.
- `open_private(path, flags)`: open with O_NOFOLLOW and mode 0600 (pid, lock files).

Every file written this way gets mode FILE_MODE, whatever the process umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

FILE_MODE = 0o600  # exports and plots: readable by their owner only


class UnsafePath(ValueError):
    """A file name that would write outside the allowed root, or through a symlink."""


class DiskFull(OSError):
    """The disk (or quota) filled up while writing; nothing partial was left behind."""


def resolve_under(root: str | os.PathLike, name: str) -> Path:
    """`name` (relative) inside the directory `root`; raises UnsafePath naming the problem.
    Directories on the way that do not exist yet are fine (`make_parents` creates them)."""
    text = str(name)
    if not text.strip():
        raise UnsafePath("the file name is empty")
    if "\x00" in text:
        raise UnsafePath("the file name contains a NUL character")
    if text.startswith("~"):
        raise UnsafePath(f"{text!r} starts with '~': name a file relative to {root} instead")
    if os.path.isabs(text):
        raise UnsafePath(f"{text!r} is an absolute path: files are written under {root}; name one relative to it")
    parts = Path(text).parts
    if ".." in parts:
        raise UnsafePath(f"{text!r} contains '..': files are written under {root} and may not leave it")
    base = Path(os.path.realpath(root))
    path = base
    for part in parts:
        path = path / part
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePath(f"{path} is a symbolic link: mlxterp does not write through links "
                             "(name the real file)")
    return path


def make_parents(path: Path) -> None:
    """Create the missing directories above `path` (mode 0755). `mkdir` never follows a link,
    and `resolve_under` has checked the existing ones."""
    missing = []
    parent = path.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary file name next to `path` (same suffix, so writers that pick a format
    by suffix work); rename it over `path` when the block ends without error."""
    path = Path(path)
    directory = path.parent
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePath(f"{path} is a symbolic link: mlxterp does not write through links")
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{path} exists and is not a regular file")
        if not overwrite:
            raise FileExistsError(errno.EEXIST, f"{path} already exists; add `overwrite` to the statement to "
                                                "replace it", str(path))
    tmp = directory / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        sync_directory(directory)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(error.errno, f"the disk is full: {path} was not written (nothing partial is left)",
                           str(path)) from None
        raise


def sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    with replacing(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def open_private(path: str | os.PathLike, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """os.open with O_NOFOLLOW (a link here is refused) and mode 0600."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; remove it (mlxterp opens its own files only)") from None
        raise
