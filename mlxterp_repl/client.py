"""Clients of the daemon: `connect()` (synchronous, for notebooks and scripts) and
`connect_async()` (asyncio, for the REPL and the language server).

Both start the daemon on first use when none is running. Starting is guarded by a lock
file, so N clients racing produce exactly one daemon; a socket or pid file left by a
killed daemon is cleaned up. Arrays come back as numpy arrays (or MLX arrays with
`arrays="mlx"`); big ones are fetched in chunks.

    from mlxterp_repl.client import connect
    with connect() as daemon:
        [result] = daemon.exec('prompt "The capital of France is"\\nsave layers.8 @ "France"')[-1:]
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p

START_TIMEOUT = 60.0


class DaemonError(Exception):
    """An error reply from the daemon: `code` (see protocol.py), message, and for query
    errors the `span` and `suggestions`."""

    def __init__(self, data: dict):
        self.data = dict(data)
        self.code = data.get("code", p.INTERNAL)
        self.message = data.get("message", "")
        self.span = data.get("span")
        self.suggestions = list(data.get("suggestions") or [])
        super().__init__(self.message)

    def to_query_error(self):
        """The query-language error this stands for (so it renders with the source), or None."""
        if self.span is None:
            return None
        from mlxterp_repl.dsl.errors import QueryError, Span

        return QueryError(self.message, Span(**self.span), self.suggestions)

    def render(self, source: str | None = None) -> str:
        query_error = self.to_query_error()
        if query_error is not None and source is not None:
            return query_error.render(source)
        text = self.message
        if self.suggestions:
            text += "\n  valid here: " + ", ".join(self.suggestions)
        return text


class DaemonNotRunning(ConnectionError):
    pass


@dataclass
class Reply:
    """Everything the daemon sent for one request, in order of arrival."""

    request_id: object
    value: object = None
    status: str = "ok"
    results: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    out: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def add(self, message: dict) -> bool:
        """Take one frame; True when it was the final `done`."""
        kind = message.get("type")
        if kind == p.DONE:
            self.status = message.get("status", "ok")
            self.value = message.get("value")
            return True
        if kind == p.RESULT:
            self.results.append(message.get("result"))
        elif kind == p.PROGRESS:
            self.progress.append(message)
        elif kind == p.OUT:
            self.out.append(message.get("text", ""))
        elif kind == p.ERROR:
            self.errors.append(message.get("error") or {})
        return False

    def raise_for_error(self) -> None:
        if self.errors:
            raise DaemonError(self.errors[0])


# --- finding and starting the daemon ----------------------------------------

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
    for path in (files.socket, files.pid_file, files.connection_file):
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


def spawn_daemon(files: daemon_files.DaemonPaths, model: str, extra_args: list[str] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", str(files.runtime_dir),
            "--socket", str(files.socket), "--model", model, *(extra_args or [])]
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
    lock_fd = os.open(files.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
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
    host, _, port = tcp.rpartition(":")
    return socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)))


# --- arrays in results -------------------------------------------------------

def decode_arrays(value, fetch=None, arrays: str = "numpy"):
    """Turn every array in a result into numpy (or MLX); big ones are fetched with `fetch(summary)`."""

    def on_array(data):
        if "data" in data:
            array = p.decode_array(data)
        elif fetch is not None:
            array = p.decode_array(data, fetch(data))
        else:
            return data  # left as a summary: dtype, shape, handle, stats
        if arrays == "mlx":
            import mlx.core as mx

            return mx.array(array)
        return array

    return p.walk_arrays(value, on_array)


# --- synchronous client ------------------------------------------------------

class Client:
    """A blocking connection to the daemon. Not thread-safe: one request at a time."""

    def __init__(self, sock: socket.socket, token: str | None = None, arrays: str = "numpy",
                 files: daemon_files.DaemonPaths | None = None):
        self.sock = sock
        self.arrays = arrays
        self.files = files
        self.ids = itertools.count(1)
        self.hello = self.call("hello", **({"token": token} if token else {}), protocol=p.PROTOCOL_VERSION,
                               client="mlxterp_repl.client", workdir=os.getcwd())

    # plumbing
    def send(self, message: dict) -> None:
        self.sock.sendall(p.pack(message))

    def receive(self) -> dict:
        body = p.read_frame_sync(self.sock)
        if body is None:
            raise ConnectionError("the daemon closed the connection")
        return p.unpack_body(body)

    def request(self, op: str, on_frame=None, **fields) -> Reply:
        """Send one request; collect its frames until `done`. Ctrl-C interrupts it on the daemon."""
        request_id = next(self.ids)
        self.send({"op": op, "id": request_id, **fields})
        reply = Reply(request_id)
        interrupted = False
        while True:
            try:
                message = self.receive()
            except KeyboardInterrupt:
                if interrupted or op != "exec":
                    raise
                interrupted = True
                self.send({"op": "interrupt", "id": f"interrupt-{request_id}", "target": request_id})
                continue
            if message.get("id") != request_id:
                if message.get("type") == p.ERROR and message.get("id") is None:
                    raise DaemonError(message.get("error") or {})
                continue  # e.g. the reply to our own interrupt
            if on_frame is not None:
                on_frame(message)
            if reply.add(message):
                break
        if interrupted:
            raise KeyboardInterrupt
        return reply

    def call(self, op: str, **fields):
        reply = self.request(op, **fields)
        reply.raise_for_error()
        return reply.value

    # ops
    def exec(self, code: str, fetch: bool = True, full: bool = False, on_frame=None, text: bool = False) -> list:
        """Run query-language text; its results as plain data with arrays decoded
        (``text=True`` adds each result's plain-text drawing).

        Raises DaemonError when a statement fails (`error.render(code)` draws it)."""
        reply = self.request("exec", code=code, full=full, on_frame=on_frame, text=text)
        results = [decode_arrays(r, self.fetch_array if fetch else None, self.arrays) for r in reply.results]
        if reply.errors:
            error = DaemonError(reply.errors[0])
            error.results = results
            raise error
        return results

    def exec_reply(self, code: str, full: bool = False, on_frame=None) -> Reply:
        """The raw reply of an exec (results left as the daemon sent them)."""
        return self.request("exec", code=code, full=full, on_frame=on_frame)

    def fetch_array(self, summary: dict) -> bytes:
        total, chunks = summary["nbytes"], []
        offset = 0
        while offset < total:
            value = self.call("fetch", handle=summary["handle"], offset=offset, size=p.FETCH_CHUNK)
            chunks.append(value["data"])
            offset += len(value["data"])
            if not value["data"]:
                break
        return b"".join(chunks)

    def complete(self, code: str, offset: int | None = None) -> list[dict]:
        return self.call("complete", code=code, offset=len(code) if offset is None else offset)["items"]

    def hover(self, code: str, offset: int):
        return self.call("hover", code=code, offset=offset)

    def modules(self) -> dict:
        return self.call("modules")

    def tokens(self, text: str | None = None) -> dict:
        return self.call("tokens", **({} if text is None else {"text": text}))

    def ping(self) -> dict:
        return self.call("ping")

    def stats(self) -> dict:
        return self.call("stats")

    def shutdown(self) -> None:
        self.call("shutdown")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(model: str = "demo", runtime_dir: str | Path | None = None, socket_path: str | Path | None = None,
            tcp: str | None = None, token: str | None = None, connection_file: str | Path | None = None,
            autostart: bool = True, arrays: str = "numpy", timeout: float = START_TIMEOUT) -> Client:
    """Connect to the daemon (starting it with `model` when none runs and `autostart`).

    `tcp="host:port"` connects over TCP instead, with `token` or the one from the
    connection file. `arrays="mlx"` returns MLX arrays instead of numpy ones.
    """
    files = daemon_files.daemon_paths(runtime_dir, socket_path)
    if tcp or connection_file:
        if token is None or tcp is None:
            info = read_connection_file(files, connection_file)
            token = token or info["token"]
            tcp = tcp or f"{info['host']}:{info['port']}"
        return Client(open_tcp(tcp), token=token, arrays=arrays, files=files)
    if autostart:
        sock = ensure_daemon(files, model, timeout)
    else:
        try:
            sock = open_unix(files)
        except OSError:
            raise DaemonNotRunning(f"no daemon is running (no socket at {files.socket}); start one with "
                                   "`mlxterp serve`") from None
    return Client(sock, arrays=arrays, files=files)


# --- asyncio client ----------------------------------------------------------

class AsyncClient:
    """An asyncio connection: many requests in flight, replies routed by id.

        client = await connect_async()
        async for frame in client.stream("exec", code='save layers.8 @ -1'):
            ...                      # progress / out / result / error, then done
        await client.interrupt(request_id)
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.ids = itertools.count(1)
        self.queues: dict[object, asyncio.Queue] = {}
        self.hello: dict | None = None
        self.reader_task = asyncio.get_running_loop().create_task(self.read_loop())
        self.closed = False

    async def read_loop(self) -> None:
        try:
            while True:
                body = await p.read_frame(self.reader)
                if body is None:
                    break
                message = p.unpack_body(body)
                queue = self.queues.get(message.get("id"))
                if queue is not None:
                    queue.put_nowait(message)
        except (ConnectionError, p.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            for request_id, queue in list(self.queues.items()):
                queue.put_nowait(p.error_reply(request_id, p.INTERNAL, "connection to the daemon lost"))
                queue.put_nowait(p.done_reply(request_id, "error"))

    def start(self, op: str, **fields) -> object:
        """Send a request; its id. Read its frames with `frames(id)`."""
        if self.closed:
            raise ConnectionError("the connection to the daemon is closed")
        request_id = next(self.ids)
        self.queues[request_id] = asyncio.Queue()
        self.writer.write(p.pack({"op": op, "id": request_id, **fields}))
        return request_id

    async def frames(self, request_id):
        queue = self.queues[request_id]
        try:
            while True:
                message = await queue.get()
                yield message
                if message.get("type") == p.DONE:
                    return
        finally:
            self.queues.pop(request_id, None)

    async def stream(self, op: str, **fields):
        async for message in self.frames(self.start(op, **fields)):
            yield message

    async def request(self, op: str, **fields) -> Reply:
        request_id = self.start(op, **fields)
        reply = Reply(request_id)
        try:
            async for message in self.frames(request_id):
                reply.add(message)
        except asyncio.CancelledError:
            if op == "exec" and not self.closed:
                self.start("interrupt", target=request_id)
            raise
        return reply

    async def call(self, op: str, **fields):
        reply = await self.request(op, **fields)
        reply.raise_for_error()
        return reply.value

    async def exec(self, code: str, full: bool = False, text: bool = False) -> Reply:
        """The whole reply of an exec; results as sent (big arrays as summaries)."""
        return await self.request("exec", code=code, full=full, text=text)

    async def interrupt(self, request_id) -> dict:
        return await self.call("interrupt", target=request_id)

    async def complete(self, code: str, offset: int | None = None) -> list[dict]:
        return (await self.call("complete", code=code, offset=len(code) if offset is None else offset))["items"]

    async def hover(self, code: str, offset: int):
        return await self.call("hover", code=code, offset=offset)

    async def modules(self) -> dict:
        return await self.call("modules")

    async def tokens(self, text: str | None = None) -> dict:
        return await self.call("tokens", **({} if text is None else {"text": text}))

    async def ping(self) -> dict:
        return await self.call("ping")

    async def close(self) -> None:
        self.writer.close()
        self.reader_task.cancel()
        try:
            await self.reader_task
        except BaseException:
            pass


async def connect_async(model: str = "demo", runtime_dir: str | Path | None = None,
                        socket_path: str | Path | None = None, tcp: str | None = None, token: str | None = None,
                        autostart: bool = True, timeout: float = START_TIMEOUT) -> AsyncClient:
    """Connect with asyncio; starts the daemon like `connect()` (in a thread, not blocking the loop)."""
    files = daemon_files.daemon_paths(runtime_dir, socket_path)
    if tcp:
        if token is None:
            info = read_connection_file(files)
            token = info["token"]
        host, _, port = tcp.rpartition(":")
        reader, writer = await asyncio.open_connection(host or "127.0.0.1", int(port), limit=2**16)
    else:
        if autostart:
            sock = await asyncio.get_running_loop().run_in_executor(None, ensure_daemon, files, model, timeout)
        else:
            try:
                sock = open_unix(files)
            except OSError:
                raise DaemonNotRunning(f"no daemon is running (no socket at {files.socket})") from None
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**16)
    client = AsyncClient(reader, writer)
    fields = {"protocol": p.PROTOCOL_VERSION, "client": "mlxterp_repl.client.async", "workdir": os.getcwd()}
    if token:
        fields["token"] = token
    try:
        client.hello = await client.call("hello", **fields)
    except BaseException:
        await client.close()
        raise
    return client


# --- `mlxterp status` and `mlxterp stop` ------------------------------------

def _command_parser(name: str, description: str):
    import argparse

    parser = argparse.ArgumentParser(prog=f"mlxterp {name}", description=description)
    parser.add_argument("--runtime-dir", help="the daemon's runtime directory (default: as `mlxterp serve`)")
    parser.add_argument("--socket", help="the daemon's socket path")
    return parser


def _megabytes(n) -> str:
    return f"{n / 1e6:.1f} MB"


def status_text(stats: dict) -> str:
    model = stats.get("model", {})
    lines = [f"daemon {stats['daemon_id']} running (pid {stats['pid']}, up {stats['uptime']:.0f} s)",
             f"socket  {stats['socket']}"]
    if stats.get("tcp"):
        lines.append(f"tcp     {stats['tcp']} (token in the connection file)")
    state = model.get("state", "?")
    detail = ""
    if state == "ready" and "n_layers" in model:
        detail = f" ({model['n_layers']} layers, hidden size {model.get('hidden_size', '?')})"
    elif state == "loading":
        detail = f" ({model.get('message', '')}, {100 * model.get('progress', 0):.0f}%)"
    elif state == "failed":
        detail = f": {model.get('error', '')}"
    lines.append(f"model   {model.get('name', '?')}: {state}{detail}")
    lines.append(f"clients {stats['connections']} connected, {stats['sessions']} with a session, "
                 f"{stats['queued']} queries running or queued")
    cache = stats.get("cache")
    if cache:
        used = cache.get("bytes", cache.get("nbytes"))
        parts = [f"{cache.get('entries', '?')} traces"]
        if used is not None:
            parts.append(f"{_megabytes(used)} of {_megabytes(cache['budget'])}")
        if "hits" in cache:
            parts.append(f"{cache['hits']} hits, {cache.get('misses', 0)} misses")
        lines.append("cache   " + ", ".join(parts))
    if "forward_count" in stats:
        lines.append(f"forward passes run: {stats['forward_count']}")
    return "\n".join(lines)


def status_main(argv: list[str] | None = None) -> int:
    options = _command_parser("status", "Show whether the daemon runs, its model and clients.").parse_args(argv)
    files = daemon_files.daemon_paths(options.runtime_dir, options.socket)
    try:
        with connect(runtime_dir=options.runtime_dir, socket_path=options.socket, autostart=False) as client:
            print(status_text(client.stats()))
    except (DaemonNotRunning, ConnectionError) as exc:
        stale = " (a stale socket from a dead daemon is there)" if files.socket.exists() else ""
        print(f"no daemon running at {files.socket}{stale}", file=sys.stderr)
        return 1
    return 0


def stop_main(argv: list[str] | None = None) -> int:
    parser = _command_parser("stop", "Stop the daemon.")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait before killing it")
    options = parser.parse_args(argv)
    files = daemon_files.daemon_paths(options.runtime_dir, options.socket)
    info = daemon_files.read_pid_file(files)
    try:
        with connect(runtime_dir=options.runtime_dir, socket_path=options.socket, autostart=False) as client:
            daemon_id, pid = client.hello["daemon_id"], client.hello["pid"]
            client.shutdown()
    except (DaemonNotRunning, ConnectionError):
        if not daemon_files.daemon_alive(files):
            remove_stale_files(files)
            print(f"no daemon running at {files.socket}", file=sys.stderr)
            return 1
        daemon_id, pid = info.get("daemon_id", "?"), info.get("pid")
        if pid:
            os.kill(pid, 15)
    deadline = time.monotonic() + options.timeout
    while daemon_files.daemon_alive(files) and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon_files.daemon_alive(files) and pid:
        os.kill(pid, 9)
        time.sleep(0.1)
    remove_stale_files(files)
    print(f"stopped daemon {daemon_id} (pid {pid})")
    return 0


# --- a session in the daemon, for `mlxterp run` -------------------------------

class RemoteResult:
    """A result as the daemon sent it, with the views `mlxterp run` uses."""

    def __init__(self, data: dict):
        self.data = data
        self.kind = data.get("kind")

    def to_data(self) -> dict:
        return self.data

    def render(self):
        from mlxterp_repl.dsl.results import result_from_data

        return result_from_data(self.data).render()


class RemoteSession:
    """Runs parsed statements in the daemon, one exec each, with the interface of
    `Session.execute_statement`: results come back, errors are QueryErrors whose spans
    point into the whole script (so they render exactly as in-process ones do)."""

    def __init__(self, client: Client):
        self.client = client

    def execute_statement(self, statement, **_ignored):
        from mlxterp_repl.dsl.errors import QueryError, Span

        span = statement.span
        reply = self.client.request("exec", code=statement.text, full=True, text=True, workdir=os.getcwd())
        if reply.errors:
            error = DaemonError(reply.errors[0])
            if error.code == p.INTERRUPTED:
                raise KeyboardInterrupt
            if error.span is None:
                raise QueryError(error.message, span, error.suggestions)
            where = error.span

            def shift(line, col):
                return line + span.line - 1, col + (span.col - 1 if line == 1 else 0)

            line, col = shift(where["line"], where["col"])
            end_line, end_col = shift(where["end_line"], where["end_col"])
            raise QueryError(error.message, Span(line, col, end_line, end_col), error.suggestions)
        [data] = reply.results
        return RemoteResult(data)
