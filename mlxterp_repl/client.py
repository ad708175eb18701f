"""Clients of the daemon, transport only: `connect()` (synchronous, for notebooks and
scripts) and `connect_async()` (asyncio, for the REPL and the language server).

Both start the daemon on first use when none is running (mlxterp_repl/spawn.py). Both
get one method per op of `protocol.OPS` (`client.ping()`, `client.tokens(text)`, ...),
built from that one table; `exec` is written out because it streams. Arrays come back
as numpy arrays (or MLX arrays with `arrays="mlx"`); big ones are fetched in chunks.

    from mlxterp_repl.client import connect
    with connect() as daemon:
        [result] = daemon.exec('prompt "The capital of France is"\\nsave layers.8 @ "France"')[-1:]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p
from mlxterp_repl.spawn import (START_TIMEOUT, DaemonNotRunning, ensure_daemon, open_tcp, open_unix,
                                read_connection_file)

__all__ = ["Client", "AsyncClient", "DaemonError", "DaemonNotRunning", "Reply", "connect", "connect_async"]


class DaemonError(Exception):
    """An error reply from the daemon: `code` (see protocol.py), message, and for query
    errors the `span` ({line, col, end_line, end_col}) and `suggestions`."""

    def __init__(self, data: dict):
        self.data = dict(data)
        self.code = data.get("code", p.INTERNAL)
        self.message = data.get("message", "")
        self.span = data.get("span")
        self.suggestions = list(data.get("suggestions") or [])
        super().__init__(self.message)

    def render(self, source: str | None = None) -> str:
        """The error for a terminal: a query error is drawn by the query language (line, the
        span underlined, suggestions); others as their message and suggestions."""
        if self.span is not None and source is not None:
            from mlxterp_repl.dsl.errors import QueryError

            return QueryError.from_data(self.data).render(source)
        text = self.message
        if self.suggestions:
            text += "\n  valid here: " + ", ".join(self.suggestions)
        return text


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


# --- one method per op, from protocol.OPS ----------------------------------------

# The part of `done.value` an op's method returns, where not the whole value.
ANSWER = {"complete": "items"}


def request_fields(op: str, args: tuple, kwargs: dict) -> dict:
    """The request fields of a call `client.<op>(*args, **kwargs)`; fields given as None are left out."""
    names = p.OPS[op]
    if len(args) > len(names):
        raise TypeError(f"{op}() takes at most {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    fields = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{op}() got an unexpected field {name!r}; its fields: {', '.join(names) or 'none'}")
        if name in fields:
            raise TypeError(f"{op}() got {name!r} twice")
        fields[name] = value
    return {k: v for k, v in fields.items() if v is not None}


def answer(op: str, value):
    return value[ANSWER[op]] if op in ANSWER and isinstance(value, dict) else value


def op_method(op: str, is_async: bool):
    doc = f"The daemon's `{op}` op (fields: {', '.join(p.OPS[op]) or 'none'}); see docs/protocol.md."
    if is_async:
        async def method(self, *args, **kwargs):
            return answer(op, await self.call(op, **request_fields(op, args, kwargs)))
    else:
        def method(self, *args, **kwargs):
            return answer(op, self.call(op, **request_fields(op, args, kwargs)))
    method.__name__ = method.__qualname__ = op
    method.__doc__ = doc
    return method


def with_op_methods(cls):
    """Give `cls` a method per op of protocol.OPS that it does not write out itself."""
    for op in p.OPS:
        if op not in cls.__dict__:
            setattr(cls, op, op_method(op, asyncio.iscoroutinefunction(cls.call)))
    return cls


# --- synchronous client ------------------------------------------------------

@with_op_methods
class Client:
    """A blocking connection to the daemon: one request at a time, except `interrupt()`,
    which may be called from another thread while a request streams."""

    def __init__(self, sock: socket.socket, token: str | None = None, arrays: str = "numpy",
                 files: daemon_files.DaemonPaths | None = None):
        self.sock = sock
        self.arrays = arrays
        self.files = files
        self.ids = itertools.count(1)
        self.sending = threading.Lock()  # whole frames only, also when interrupt() sends from another thread
        self.running = None              # id of the request in flight
        self.hello = self.call("hello", token=token, protocol=p.PROTOCOL_VERSION,
                               client="mlxterp_repl.client", workdir=os.getcwd())

    # plumbing
    def send(self, message: dict) -> None:
        frame = p.pack(message)
        with self.sending:
            self.sock.sendall(frame)

    def receive(self) -> dict:
        body = p.read_frame_sync(self.sock)
        if body is None:
            raise ConnectionError("the daemon closed the connection")
        return p.unpack_body(body, arrays=True)

    def request(self, op: str, on_frame=None, **fields) -> Reply:
        """Send one request; collect its frames until `done`. Ctrl-C interrupts it on the daemon."""
        request_id = next(self.ids)
        self.send({"op": op, "id": request_id, **{k: v for k, v in fields.items() if v is not None}})
        reply = Reply(request_id)
        interrupted = False
        self.running = request_id
        try:
            while True:
                try:
                    message = self.receive()
                except KeyboardInterrupt:
                    if interrupted or op != "exec":
                        raise
                    interrupted = True
                    self.interrupt(request_id)
                    continue
                if message.get("id") != request_id:
                    if message.get("type") == p.ERROR and message.get("id") is None:
                        raise DaemonError(message.get("error") or {})
                    continue  # e.g. the reply to an interrupt
                if on_frame is not None:
                    on_frame(message)
                if reply.add(message):
                    break
        finally:
            self.running = None
        if interrupted:
            raise KeyboardInterrupt
        return reply

    def call(self, op: str, **fields):
        reply = self.request(op, **fields)
        reply.raise_for_error()
        return reply.value

    def interrupt(self, target=None) -> bool:
        """Ask the daemon to stop request `target` (default: the one in flight). Safe to call
        from another thread while `exec` waits; that `exec` then raises DaemonError with code
        `interrupted`. False when nothing was running."""
        target = self.running if target is None else target
        if target is None:
            return False
        self.send({"op": "interrupt", "id": f"interrupt-{next(self.ids)}", "target": target})
        return True

    # ops written out
    def exec(self, code: str, fetch: bool = True, full: bool = False, on_frame=None, text: bool = False,
             workdir: str | None = None) -> list:
        """Run query-language text; its results as plain data with arrays decoded
        (``text=True`` adds each result's plain-text drawing).

        Raises DaemonError when a statement fails (the results before it are on `error.results`)."""
        reply = self.request("exec", code=code, full=full, on_frame=on_frame, text=text, workdir=workdir)
        results = [self.fetch_arrays(r) if fetch else r for r in reply.results]
        if self.arrays == "mlx":
            results = [to_mlx(r) for r in results]
        if reply.errors:
            error = DaemonError(reply.errors[0])
            error.results = results
            raise error
        return results

    def exec_reply(self, code: str, full: bool = False, on_frame=None) -> Reply:
        """The raw reply of an exec (big arrays left as fetch-handle summaries)."""
        return self.request("exec", code=code, full=full, on_frame=on_frame)

    def fetch_arrays(self, value):
        """`value` with every fetch-handle summary replaced by its array, fetched in chunks."""
        def fetch(summary):
            if p.is_array(summary):
                return summary
            return p.decode_array(summary, self.fetch_array(summary))

        return p.walk_arrays(value, fetch)

    def fetch_array(self, summary: dict) -> bytes:
        """The bytes of one array sent as a summary with a `handle`."""
        total, chunks = summary["nbytes"], []
        offset = 0
        while offset < total:
            value = self.call("fetch", handle=summary["handle"], offset=offset, size=p.FETCH_CHUNK)
            chunks.append(value["data"])
            offset += len(value["data"])
            if not value["data"]:
                break
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_mlx(value):
    """Every numpy array in `value` as an MLX array (for `connect(arrays="mlx")`)."""
    import mlx.core as mx

    return p.walk_arrays(value, lambda array: mx.array(array) if p.is_array(array) else array)


def connect(model: str = "demo", runtime_dir: str | Path | None = None, socket_path: str | Path | None = None,
            tcp: str | None = None, token: str | None = None, connection_file: str | Path | None = None,
            autostart: bool = True, arrays: str = "numpy", timeout: float = START_TIMEOUT) -> Client:
    """Connect to the daemon (starting it with `model` when none runs and `autostart`).

    `tcp="host:port"` (`"[::1]:7420"` for IPv6) connects over TCP instead, with `token` or
    the one from the connection file. `arrays="mlx"` returns MLX arrays instead of numpy ones.
    """
    files = daemon_files.daemon_paths(runtime_dir, socket_path)
    if tcp or connection_file:
        if token is None or tcp is None:
            info = read_connection_file(files, connection_file)
            token = token or info["token"]
            tcp = tcp or p.format_host_port(info["host"], info["port"])
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

@with_op_methods
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
                message = p.unpack_body(body, arrays=True)
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
        fields = {k: v for k, v in fields.items() if v is not None}
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

    async def exec(self, code: str, full: bool = False, text: bool = False, workdir: str | None = None) -> Reply:
        """The whole reply of an exec; results as sent (big arrays as summaries)."""
        return await self.request("exec", code=code, full=full, text=text, workdir=workdir)

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
            token = read_connection_file(files)["token"]
        host, port = p.parse_host_port(tcp)
        reader, writer = await asyncio.open_connection(host, port, limit=2**16)
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
    try:
        client.hello = await client.call("hello", protocol=p.PROTOCOL_VERSION, client="mlxterp_repl.client.async",
                                         workdir=os.getcwd(), token=token)
    except BaseException:
        await client.close()
        raise
    return client
