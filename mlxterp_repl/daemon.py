"""The daemon: one process, one model, many clients. See docs/daemon.md and docs/protocol.md.

An asyncio event loop serves connections (Unix socket, and TCP when asked). All MLX work
-- loading the model, running queries -- happens on ONE worker thread, so the model is
never touched by two requests at once. Which op runs where is declared with its handler
in ops.py (`runs_on`): quick ops are answered on the loop, never queued behind a
running query. Each connection has its own query-language Session; the trace cache is
shared by all of them.

This module does not import mlx: the worker imports it while loading the model, so the
socket is up and `hello` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import itertools
import json
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlxterp_repl import ops, sharded
from mlxterp_repl import paths as daemon_files
from mlxterp_repl import protocol as p
from mlxterp_repl.safe_files import UnsafePath

DEFAULT_CACHE_MB = 512
BLOB_BUDGET = 256 * 1024 * 1024  # bytes of fetchable big arrays kept, all connections together
MAX_UNREAD_OUTPUT = 512 * 1024 * 1024  # replies not yet read, all clients together: the furthest behind is dropped
# Before a valid `hello` on TCP (docs/security.md): small frames, a deadline, a connection cap.
PREAUTH_MAX_FRAME = 4096
HANDSHAKE_TIMEOUT = 5.0
MAX_TCP_CONNECTIONS = 32
ACCEPT_ERROR_INTERVAL = 60.0  # seconds between two log lines about failing accepts
BACKPRESSURE = 64 * 1024 * 1024  # unread replies of one client above which its next request waits
LARGE_LOOP_INPUT = 16 * 1024  # complete/hover/tokens input above this runs on a side thread


class Job:
    """One running or queued exec: the flag its query polls at module boundaries."""

    def __init__(self, request_id):
        self.request_id = request_id
        self.stop = threading.Event()    # polled by the worker
        self.stopped = asyncio.Event()   # awaited on the loop, so a queued job ends at once
        self.started = False             # set by the worker when it picks the job up
        self.replies: list[dict] = []    # replies the worker leaves for the loop to send before `done`

    def interrupt(self) -> None:
        self.stop.set()
        self.stopped.set()


class Connection:
    """One client: its socket, its session and its requests in flight."""

    def __init__(self, number: int, writer: asyncio.StreamWriter, is_tcp: bool, peers: dict | None = None):
        self.number = number
        self.peers = peers if peers is not None else {}  # every connection (the output budget is global)
        self.writer = writer
        self.is_tcp = is_tcp
        self.greeted = False
        self.session = None          # created on the worker at the first exec
        self.jobs: dict = {}         # request id -> Job
        self.pending: set = set()    # request ids being handled
        self.blobs: OrderedDict[str, bytes] = OrderedDict()
        self.blob_counter = itertools.count(1)
        self.closed = False
        self.close_after = False  # set when a reply must be the last one (a bad TCP token)
        self.workdir: Path | None = None  # the client's directory: where relative file names in queries point
        self.output_shapes: dict[str, list[int]] = {}  # full module name -> shape, from this session's last trace

    def send(self, message: dict) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write(p.pack(message))
            unread = {conn: conn.unread() for conn in (self, *self.peers.values())}
            if sum(unread.values()) > MAX_UNREAD_OUTPUT and max(unread, key=unread.get) is self:
                log(f"connection {self.number} does not read its replies; dropping it")
                self.closed = True
                self.writer.transport.abort()
        except Exception:  # a client gone mid-write is not the daemon's problem
            self.closed = True

    def unread(self) -> int:
        try:
            return self.writer.transport.get_write_buffer_size()
        except Exception:
            return 0

    def keep_blob(self, data: bytes, others=()) -> str:
        """Keep `data` for `fetch`; the oldest blobs (this connection's first) go past the budget,
        which all connections share (`others`: every connection)."""
        handle = f"b{next(self.blob_counter)}"
        self.blobs[handle] = data
        others = [c for c in others if c is not self]
        total = sum(len(b) for c in (self, *others) for b in c.blobs.values())
        for conn in (*others, self):
            while total > BLOB_BUDGET and conn.blobs and (conn is not self or len(conn.blobs) > 1):
                total -= len(conn.blobs.popitem(last=False)[1])
        return handle


class Daemon:
    def __init__(self, files: daemon_files.DaemonPaths, model_spec: str = "demo", tcp: str | None = None,
                 max_frame: int = p.DEFAULT_MAX_FRAME, cache_mb: float = DEFAULT_CACHE_MB,
                 shard: str | None = None, group=None, idle_timeout: float | None = None,
                 write_root: str | None = None, models: list[str] | None = None, remote_load: bool = False,
                 max_exec_chars: int = ops.MAX_EXEC_CHARS, max_statements: int = ops.MAX_STATEMENTS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_tcp_connections: int = MAX_TCP_CONNECTIONS):
        self.files = files
        # docs/security.md: where TCP sessions may write, what they may load, how much one exec may hold
        self.write_root = Path(write_root).resolve() if write_root else None
        self.tcp_models = set(models or ()) | {model_spec}
        self.remote_load = remote_load
        self.max_exec_chars, self.max_statements = max_exec_chars, max_statements
        self.handshake_timeout, self.max_tcp_connections = handshake_timeout, max_tcp_connections
        self.side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlxterp-side")  # large complete/hover/tokens
        self.last_accept_error = 0.0
        self.idle_timeout = idle_timeout  # seconds with no client before the daemon stops itself; None: never
        self.shard, self.group = shard, group  # a model split over mlx.launch processes (mlxterp_repl.sharded)
        self.model_spec = model_spec
        self.tcp = tcp
        self.max_frame = max_frame
        self.cache_bytes = int(cache_mb * 1024 * 1024)
        self.daemon_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxterp-worker")
        self.connections: dict[int, Connection] = {}
        self.numbers = itertools.count(1)
        self.token = secrets.token_urlsafe(32) if tcp else None
        self.tcp_address: tuple[str, int] | None = None
        # model state, written by the worker, read by the loop
        self.model = None
        self.trace_cache = None
        self.models = weakref.WeakValueDictionary()  # (source, layer_attr) -> a loaded model, shared by sessions
        self.module_infos: dict[int, list[dict]] = {}  # id(model) -> model.module_info(), read on the loop
        self.load_state = "loading"
        self.load_progress = 0.0
        self.load_message = "starting"
        self.load_error: str | None = None
        self.queued = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.model_ready: asyncio.Future | None = None
        self.load_waiters: set[tuple[Connection, object]] = set()
        self.stopping: asyncio.Event | None = None
        self.pid_fd: int | None = None

    # --- lifecycle -----------------------------------------------------------

    def claim(self) -> None:
        """Take the pid file's lock: exactly one daemon per runtime directory."""
        daemon_files.prepare(self.files)
        fd = daemon_files.open_private(self.files.pid_file)
        # A client checking whether a daemon lives holds a shared lock for an instant: retry briefly.
        for _attempt in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            os.close(fd)
            other = daemon_files.read_pid_file(self.files)
            raise SystemExit(
                f"mlxterp daemon already running (pid {other.get('pid', '?')}, socket {self.files.socket}); "
                "use `mlxterp stop` first"
            ) from None
        self.pid_fd = fd

    def write_pid_file(self) -> None:
        info = {"pid": os.getpid(), "socket": str(self.files.socket), "daemon_id": self.daemon_id,
                "model": self.model_spec, "started": self.started}
        if self.tcp_address:
            info["tcp"] = p.format_host_port(*self.tcp_address)
        os.ftruncate(self.pid_fd, 0)
        os.pwrite(self.pid_fd, json.dumps(info).encode(), 0)

    def cleanup(self) -> None:
        daemon_files.remove_socket(self.files.socket)
        for path in (self.files.connection_file, self.files.pid_file):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self.pid_fd is not None:
            os.close(self.pid_fd)
            self.pid_fd = None

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.model_ready = self.loop.create_future()
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        # The lock on the pid file is ours, so a socket left here is a dead daemon's.
        daemon_files.remove_socket(self.files.socket)
        self.loop.set_exception_handler(self.loop_error)
        # TCP first: once the Unix socket answers, everything (connection file included) is ready.
        servers = []
        if self.tcp:
            host, port = p.parse_host_port(self.tcp)
            tcp_server = await asyncio.start_server(lambda r, w: self.handle(r, w, is_tcp=True), host, port)
            self.tcp_address = tcp_server.sockets[0].getsockname()[:2]
            daemon_files.write_private(self.files.connection_file, json.dumps(
                {"host": self.tcp_address[0], "port": self.tcp_address[1], "token": self.token,
                 "pid": os.getpid(), "daemon_id": self.daemon_id}))
            servers.append(tcp_server)
            log(f"TCP on {p.format_host_port(*self.tcp_address)}; token in {self.files.connection_file}")
            if not is_loopback(host):
                log(f"warning: {host} is not loopback. Anyone who reaches it with the token can run any query on "
                    f"the model, read its outputs, " + (f"write files under {self.write_root}" if self.write_root
                                                          else "(no --write-root: not write files)")
                    + (", and load any model or path this account can read" if self.remote_load
                       else f", and load only {sorted(self.tcp_models)}") + ". The traffic is not encrypted.")
        self.write_pid_file()
        old_umask = os.umask(0o177)  # the socket is created 0600, with no window where it is wider
        try:
            unix_server = await asyncio.start_unix_server(
                lambda r, w: self.handle(r, w, is_tcp=False), path=str(self.files.socket), limit=2**16)
        finally:
            os.umask(old_umask)
        os.chmod(self.files.socket, 0o600)
        servers.append(unix_server)
        log(f"daemon {self.daemon_id} (pid {os.getpid()}) listening on {self.files.socket}")
        self.loop.run_in_executor(self.worker, self.load_model)
        idle_watch = self.loop.create_task(self.stop_when_idle())
        try:
            await self.stopping.wait()
        finally:
            log("shutting down")
            idle_watch.cancel()
            for server in servers:
                server.close()
            for conn in list(self.connections.values()):
                for job in conn.jobs.values():
                    job.stop.set()
                conn.writer.close()
            if self.shard:  # the other processes leave once the queries before this are done
                stop = self.worker.submit(sharded.announce, {"op": "stop"}, self.group)
                await asyncio.wrap_future(stop)  # before os._exit ends this process
            self.cleanup()

    # --- the model (worker thread) -------------------------------------------

    def set_load(self, state: str, progress: float, message: str) -> None:
        self.load_state, self.load_progress, self.load_message = state, progress, message
        log(f"model: {message}")
        self.loop.call_soon_threadsafe(self.report_load)

    def load_model(self) -> None:
        try:
            self.set_load("loading", 0.05, "importing mlx")
            from mlxterp import InterpretableModel

            self.set_load("loading", 0.3, f"loading model {self.model_spec}")
            model = (sharded.load(self.model_spec, self.shard, self.group) if self.shard
                     else InterpretableModel(self.model_spec))
            self.set_load("loading", 0.8, "reading the module tree")
            self.module_infos[id(model)] = model.module_info()
            self.models[(self.model_spec, "layers")] = model
            from mlxterp_repl.dsl.evaluator import Session, TraceCache  # noqa: F401 (imported here, off the loop)

            self.trace_cache = TraceCache(budget_bytes=self.cache_bytes) if not self.shard else None
            self.model = model
            # What is loaded now lives as long as the daemon: keep the collector's full passes (which
            # hold the interpreter lock, stalling the event loop) from walking it again and again.
            gc.collect()
            gc.freeze()
            self.set_load("ready", 1.0, f"model {self.model_spec} ready")
        except BaseException as exc:  # noqa: BLE001 -- any failure must reach the clients, not kill the daemon
            self.load_error = f"could not load model {self.model_spec!r}: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
            self.set_load("failed", self.load_progress, self.load_error)

    def load_shared(self, source: str, layer_attr: str = "layers"):
        """On the worker, for a session's `load`: a model the daemon already holds is reused
        (loading it again would take seconds and double the memory); a new one joins them."""
        from mlxterp_repl.dsl.evaluator import load_model

        key = (source, layer_attr)
        model = self.models.get(key)
        if model is None:
            model = load_model(source, layer_attr)
            self.models[key] = model
        return model

    def report_load(self) -> None:
        """On the loop: tell requests waiting for the model how loading goes."""
        for conn, request_id in list(self.load_waiters):
            conn.send(p.reply(request_id, p.PROGRESS, stage="load", message=self.load_message,
                              fraction=self.load_progress))
        if self.load_state in ("ready", "failed") and not self.model_ready.done():
            self.model_ready.set_result(self.load_state)

    async def need_session(self, conn: Connection, request_id):
        """The connection's session (made at first need), once the model is loaded."""
        await self.need_model(conn, request_id)
        if conn.session is None:
            from mlxterp_repl.dsl import Session

            conn.session = Session(self.model, workdir=conn.workdir, loader=lambda *a: self.load_for(conn, *a))
            self.confine(conn)
        return conn.session

    def confine(self, conn: Connection) -> None:
        """Where the connection's session may write (docs/security.md): a local client under
        its own working directory, a TCP client under --write-root or nowhere."""
        session = conn.session
        if session is None:
            return
        if conn.is_tcp:
            session.workdir = session.write_root = self.write_root
            session.may_write = self.write_root is not None
            if not self.remote_load:  # (nor can it read directories elsewhere: `sae load`, `lens tuned`)
                session.read_root, session.may_read = self.write_root, self.write_root is not None
        else:
            session.workdir = conn.workdir
            session.write_root = conn.workdir or Path.cwd()

    def load_for(self, conn: Connection, source: str, layer_attr: str = "layers"):
        """A session's `load`: a TCP client loads only the models named at serve time, and
        learns nothing about other paths (no probing), unless --remote-load was given."""
        if conn.is_tcp and not self.remote_load and source not in self.tcp_models:
            from mlxterp.errors import MlxterpError

            raise MlxterpError(f"a TCP client may load only the models the daemon was started with "
                               f"({', '.join(sorted(self.tcp_models))}); start it with --models NAME,... "
                               "to allow others")
        return self.load_shared(source, layer_attr)

    async def need_model(self, conn: Connection, request_id):
        if not self.model_ready.done():
            self.load_waiters.add((conn, request_id))
            conn.send(p.reply(request_id, p.PROGRESS, stage="load", message=self.load_message,
                              fraction=self.load_progress))
            try:
                await asyncio.shield(self.model_ready)
            finally:
                self.load_waiters.discard((conn, request_id))
        if self.load_state != "ready":
            raise p.ProtocolError(p.MODEL_ERROR, self.load_error or "the model is not loaded")
        return self.model

    def model_summary(self) -> dict:
        info = {"name": self.model_spec, "state": self.load_state, "progress": self.load_progress,
                "message": self.load_message}
        if self.load_error:
            info["error"] = self.load_error
        if self.model is not None:
            for key in ("n_layers", "hidden_size", "vocab_size"):
                try:
                    info[key] = getattr(self.model, key)
                except Exception:
                    pass
            import mlx.core as mx  # loaded with the model already; imported here so hello stays light before

            info["device"] = self.model.device  # e.g. "cpu", "gpu (cuda: NVIDIA H200)"
            info["memory"] = mx.get_active_memory()
        return info

    async def stop_when_idle(self) -> None:
        """Stop once no client has been connected (and nothing has run) for `idle_timeout` seconds,
        or as soon as the last client leaves when the model failed to load: such a daemon only
        told its clients why, and the next client should start a fresh one."""
        idle_since = time.monotonic()
        while not self.stopping.is_set():
            await asyncio.sleep(0.25 if not self.idle_timeout else min(1.0, self.idle_timeout / 4))
            failed = self.load_state == "failed"
            limit = 0.0 if failed else self.idle_timeout
            if self.connections or self.queued:
                idle_since = time.monotonic()
            elif limit is not None and time.monotonic() - idle_since >= limit:
                log("the model failed to load and no client is left: stopping" if failed
                    else f"no client for {self.idle_timeout:g} s (--idle-timeout): stopping")
                self.stopping.set()

    # --- connections ---------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, is_tcp: bool) -> None:
        if not is_tcp and not same_user(writer):
            writer.close()
            return
        conn = Connection(next(self.numbers), writer, is_tcp, self.connections)
        if is_tcp and sum(c.is_tcp for c in self.connections.values()) >= self.max_tcp_connections:
            conn.send(p.error_reply(None, p.BUSY, f"the daemon serves at most {self.max_tcp_connections} TCP "
                                                  "connections at once; try again later"))
            writer.close()
            return
        self.connections[conn.number] = conn
        deadline = time.monotonic() + self.handshake_timeout
        try:
            while not conn.closed:
                if conn.unread() > BACKPRESSURE:  # a client that does not read its replies sends no more work
                    try:
                        await writer.drain()
                    except (ConnectionError, OSError):
                        break
                # Before a valid hello on TCP: tiny frames, a deadline, and any error hangs up.
                preauth = conn.is_tcp and not conn.greeted
                try:
                    if preauth:
                        body = await asyncio.wait_for(p.read_frame(reader, PREAUTH_MAX_FRAME),
                                                      max(0.0, deadline - time.monotonic()))
                    else:
                        body = await p.read_frame(reader, self.max_frame)
                except p.FrameTooLarge as exc:
                    # The rest of the stream cannot be trusted to be framed: say why, then hang up.
                    conn.send(p.error_reply(None, exc.code, exc.message, **exc.extra))
                    break
                except asyncio.TimeoutError:
                    conn.send(p.error_reply(None, p.NEED_HELLO, f"no valid 'hello' within {self.handshake_timeout:g} s"))
                    break
                except (ConnectionError, OSError):
                    break
                if body is None:
                    break
                try:
                    message = p.unpack_body(body)
                except p.ProtocolError as exc:
                    conn.send(p.error_reply(None, exc.code, exc.message))
                    if preauth:
                        break
                    continue
                self.dispatch(conn, message)
                if preauth and not conn.greeted:  # the first request was not a good hello
                    conn.closed = True
        finally:
            conn.closed = True
            for job in conn.jobs.values():
                job.stop.set()  # nobody is waiting for these any more
            self.connections.pop(conn.number, None)
            if self.shard:
                self.worker.submit(sharded.announce, {"op": "close", "conn": conn.number}, self.group)
            try:
                writer.close()
            except Exception:
                pass

    def dispatch(self, conn: Connection, message: dict) -> None:
        request_id = message.get("id")
        op = message.get("op")
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            conn.send(p.error_reply(
                None, p.BAD_REQUEST,
                f"every request needs an 'id' (string or integer), got {type(request_id).__name__}"))
            return
        if not isinstance(op, str):
            self.fail(conn, request_id, p.BAD_REQUEST, f"'op' must be a string naming one of: {', '.join(p.OPS)}")
            return
        if op not in ops.HANDLERS:
            self.fail(conn, request_id, p.UNKNOWN_OP, f"unknown op {op!r}; valid ops: {', '.join(p.OPS)}",
                      valid=list(p.OPS))
            return
        if not conn.greeted and op != "hello":
            self.fail(conn, request_id, p.NEED_HELLO, "send 'hello' first")
            if conn.is_tcp:
                conn.closed = True
                conn.writer.close()
            return
        if request_id in conn.pending:
            self.fail(conn, request_id, p.BAD_REQUEST, f"request id {request_id!r} is already in use")
            return
        entry = ops.HANDLERS[op]
        if entry.check is not None:
            checked = self.outcome(entry.check, message, self)
            if checked[0] == "error":
                self.finish(conn, request_id, checked)
                return
        conn.pending.add(request_id)
        if entry.runs_on == "loop" and not entry.needs_session:
            # Answered right here on the loop: no task, no queue.
            self.finish(conn, request_id, self.outcome(entry.handler, self, conn, message))
        else:
            self.loop.create_task(self.run_later(entry, conn, message))

    async def run_later(self, entry: ops.Op, conn: Connection, message: dict) -> None:
        """An op that waits for the session (the model) first, or runs on the worker."""
        try:
            await self.need_session(conn, message["id"])
        except p.ProtocolError as exc:
            outcome = ("error", exc)
        else:
            if entry.runs_on == "worker":
                outcome = await self.on_worker(entry, conn, message)
            elif input_size(message) > LARGE_LOOP_INPUT:  # (complete, hover, tokens of long text)
                outcome = await self.loop.run_in_executor(self.side, self.outcome, entry.handler, self, conn, message)
            else:
                outcome = self.outcome(entry.handler, self, conn, message)
        self.finish(conn, message["id"], outcome)
        try:
            await conn.writer.drain()
        except Exception:
            pass

    async def on_worker(self, entry: ops.Op, conn: Connection, message: dict):
        """Queue the op on the model worker as an interruptible job; a job interrupted while
        still queued is answered at once (the worker skips it when its turn comes)."""
        request_id = message["id"]
        job = Job(request_id)
        conn.jobs[request_id] = job
        self.queued += 1

        def run():
            job.started = True
            if job.stop.is_set():
                return ("error", p.ProtocolError(p.INTERRUPTED, "interrupted before it started"))
            return self.outcome(entry.handler, self, conn, message, job)

        work = self.loop.run_in_executor(self.worker, run)
        stopped = self.loop.create_task(job.stopped.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and not job.started:
                work.add_done_callback(lambda _: None)
                return ("error", p.ProtocolError(p.INTERRUPTED, "interrupted before it started"))
            outcome = await work
            for reply in job.replies:
                conn.send(reply)
            return outcome
        finally:
            stopped.cancel()
            self.queued -= 1
            conn.jobs.pop(request_id, None)

    def outcome(self, handler, *args):
        """("ok", value) or ("error", ProtocolError) of one handler call; a bug is logged and
        answered as `internal`, never taking the daemon down."""
        try:
            return ("ok", handler(*args))
        except p.ProtocolError as exc:
            return ("error", exc)
        except Exception as exc:  # noqa: BLE001
            log(traceback.format_exc())
            return ("error", p.ProtocolError(p.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def send_threadsafe(self, conn: Connection, message: dict) -> None:
        """Send a reply from the worker thread (in order with the replies the loop sends)."""
        self.loop.call_soon_threadsafe(conn.send, message)

    def stop_soon(self) -> None:
        async def later():
            await asyncio.sleep(0.05)  # let the done reply leave first
            self.stopping.set()
        self.loop.create_task(later())

    def fail(self, conn, request_id, code, message, **extra) -> None:
        conn.send(p.error_reply(request_id, code, message, **extra))
        conn.send(p.done_reply(request_id, "error"))

    def finish(self, conn, request_id, outcome) -> None:
        conn.pending.discard(request_id)
        status, value = outcome
        if status == "ok":
            conn.send(p.done_reply(request_id, "ok", value))
        else:
            conn.send(p.reply(request_id, p.ERROR, error=value.to_data()))
            conn.send(p.done_reply(request_id, "interrupted" if value.code == p.INTERRUPTED else "error"))
        if conn.close_after:
            conn.closed = True
            conn.writer.close()

    def note_model(self, conn: Connection) -> None:
        """On the worker, after a query: the module tree of a newly loaded model, and the output
        shapes of the trace the query used (the cache's most recently used one)."""
        model = conn.session.model
        if model is not None and id(model) not in self.module_infos:
            self.module_infos[id(model)] = model.module_info()
            weakref.finalize(model, self.module_infos.pop, id(model), None)
        shapes = latest_shapes(self.trace_cache)
        if shapes:
            conn.output_shapes = shapes

    def shrink(self, conn: Connection, data, full: bool):
        """Big arrays leave as a handle + statistics; the client fetches the bytes on demand."""
        if full:
            return data

        def on_array(array):
            if p.is_array(array) and array.nbytes > p.INLINE_ARRAY_LIMIT:
                blob = p.encode_array(array)["data"]
                return p.summarise_array(array, conn.keep_blob(blob, list(self.connections.values())))
            return array

        return p.walk_arrays(data, on_array)

    def completion_context(self, session):
        """What completion knows, from plain data: never runs the model, never changes the session.
        (Not session.completion_context(): that walks the module tree, which a running trace may be wrapping.)"""
        from mlxterp_repl.dsl import CompletionContext

        model = session.model
        prompt_tokens = []
        if session.prompt is not None and model.tokenizer is not None:
            prompt_tokens = model.token_strings(model.encode(session.prompt))
        return CompletionContext(modules=self.module_infos.get(id(model), []), n_layers=model.n_layers,
                                 variables=list(session.variables), prompt_tokens=prompt_tokens)


    def loop_error(self, loop, context: dict) -> None:
        """asyncio's errors: a failing accept (out of descriptors, ...) is logged at most once a
        minute, not once per connection attempt; anything else as asyncio logs it."""
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last_accept_error >= ACCEPT_ERROR_INTERVAL:
            self.last_accept_error = now
            log(f"event loop: {context.get('message')}: {context.get('exception')!r} "
                f"(further such errors are not logged for {ACCEPT_ERROR_INTERVAL:g} s)")


# --- helpers -----------------------------------------------------------------

def input_size(message: dict) -> int:
    """Characters of text a request carries for complete/hover/tokens."""
    text = message.get("code", message.get("text"))
    return len(text) if isinstance(text, str) else 0


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost (a name: resolved by the system to loopback)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log(text: str) -> None:
    print(f"[mlxterp daemon {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def latest_shapes(cache) -> dict[str, list[int]]:
    """Output shapes (full name -> shape) of the most recently used trace in the cache."""
    if cache is None:
        return {}
    shapes = cache.report()["shapes"]
    return shapes[-1] if shapes else {}


def same_user(writer: asyncio.StreamWriter) -> bool:
    """On Linux, refuse Unix-socket peers that run as another user (belt and braces over 0600)."""
    sock = writer.get_extra_info("socket")
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or so_peercred is None:
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    except OSError:
        return True
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


# --- command line ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxterp serve", description="Run the mlxterp daemon in the foreground.")
    parser.add_argument("--model", default="demo", help="model to load: demo, a local mlx-lm directory or a hub id")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (loopback unless a host is given); "
                                                           "clients need the token from the connection file")
    parser.add_argument("--runtime-dir", help="directory for the socket, pid and lock files "
                                              "(default: $MLXTERP_RUNTIME_DIR, $XDG_RUNTIME_DIR/mlxterp, /tmp/mlxterp-UID)")
    parser.add_argument("--socket", help="socket path (default: daemon.sock in the runtime directory)")
    parser.add_argument("--max-frame", type=int, default=int(os.environ.get("MLXTERP_MAX_FRAME", p.DEFAULT_MAX_FRAME)),
                        help="largest request frame accepted, in bytes")
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_MB, help="memory budget of the trace cache")
    idle = os.environ.get("MLXTERP_IDLE_TIMEOUT")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS", default=float(idle) if idle else None,
                        help="stop after this many seconds with no client connected (default: never; "
                             "also MLXTERP_IDLE_TIMEOUT)")
    parser.add_argument("--write-root", metavar="DIR",
                        help="TCP clients may write files (export, plot to) only under DIR; without it they "
                             "cannot write (local clients write under their own working directory)")
    parser.add_argument("--models", metavar="NAME,...", default="",
                        help="models a TCP client may `load` besides --model (names or paths, comma-separated)")
    parser.add_argument("--remote-load", action="store_true",
                        help="let TCP clients load any model or path this account can read (off by default)")
    parser.add_argument("--max-exec-chars", type=int, default=ops.MAX_EXEC_CHARS,
                        help="longest query text one exec may carry, in characters")
    parser.add_argument("--max-statements", type=int, default=ops.MAX_STATEMENTS,
                        help="most statements one exec may run")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT, metavar="SECONDS",
                        help="a TCP client that sends no valid hello within this is disconnected")
    parser.add_argument("--max-tcp-connections", type=int, default=MAX_TCP_CONNECTIONS,
                        help="TCP connections served at once; more are refused politely")
    parser.add_argument("--shard", choices=sharded.MODES,
                        help="split the model over the processes of mlx.launch with mlx-lm's pipeline or tensor "
                             "parallelism; process 0 serves (docs/scale.md)")
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.tcp:
        try:
            p.parse_host_port(options.tcp)
        except ValueError as exc:
            parser.error(f"--tcp: {exc}")
    group = None
    if options.shard:
        group = sharded.start()
        if group.rank() != 0:
            return sharded.follow(options.model, options.shard, group)
    if options.write_root and not os.path.isdir(options.write_root):
        parser.error(f"--write-root: {options.write_root} is not a directory")
    files = daemon_files.daemon_paths(options.runtime_dir, options.socket)
    daemon = Daemon(files, model_spec=options.model, tcp=options.tcp, max_frame=options.max_frame,
                    cache_mb=options.cache_mb, shard=options.shard, group=group,
                    idle_timeout=options.idle_timeout if options.idle_timeout and options.idle_timeout > 0 else None,
                    write_root=options.write_root, models=[m for m in options.models.split(",") if m],
                    remote_load=options.remote_load, max_exec_chars=options.max_exec_chars,
                    max_statements=options.max_statements, handshake_timeout=options.handshake_timeout,
                    max_tcp_connections=options.max_tcp_connections)
    try:
        daemon.claim()
    except daemon_files.RuntimeDirError as exc:
        print(f"mlxterp serve: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        asyncio.run(daemon.serve())
    except (UnsafePath, OSError) as exc:  # a file of its own it cannot write (a link planted in its place, a full disk)
        print(f"mlxterp serve: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon.cleanup()
    sys.stderr.flush()
    # The worker may be inside a long MLX call; do not wait for it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(serve_main())
