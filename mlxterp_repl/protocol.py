"""The daemon's wire protocol: frames, messages, arrays, errors. See docs/protocol.md.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack,
which decode to a map. Requests carry `op` and `id`; every reply carries the
request's `id` and a `type`; each request ends with exactly one `done` reply.
Arrays travel as {"dtype", "shape", "data"} with little-endian C-order bytes: this module
alone owns that form (results hold numpy arrays; `pack` encodes them, `unpack_body`
decodes them).

This module imports nothing of mlxterp, never mlx, and numpy only when an array is
decoded, so clients and the daemon start fast.
"""

from __future__ import annotations

import asyncio
import struct
import sys

import msgpack

PROTOCOL_VERSION = 1


# The ops, and the fields a request of each may carry (in the order the clients' methods
# take them as positional arguments). The clients build their methods from this table and
# the daemon has one handler per entry (mlxterp_repl/ops.py); tests check the two agree.
# Adding an op: docs/protocol.md, "Adding an op".
OPS: dict[str, tuple[str, ...]] = {
    "hello": ("protocol", "client", "workdir", "token"),
    "exec": ("code", "full", "text", "workdir"),
    "complete": ("code", "offset"),
    "hover": ("code", "offset"),
    "modules": (),
    "tokens": ("text",),
    "bind": ("name", "array", "label"),
    "fetch": ("handle", "offset", "size"),
    "interrupt": ("target",),
    "ping": (),
    "stats": (),
    "shutdown": (),
}

# Reply types
PROGRESS, OUT, RESULT, ERROR, DONE = "progress", "out", "result", "error", "done"

# Error codes (the "code" field of an error reply)
BAD_FRAME = "bad_frame"            # not msgpack, or not a map
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"        # a field missing or of the wrong type
UNKNOWN_OP = "unknown_op"
NEED_HELLO = "need_hello"
BAD_TOKEN = "bad_token"
VERSION_MISMATCH = "version_mismatch"
QUERY_ERROR = "query_error"        # the query language rejected the text (has span, suggestions)
INTERRUPTED = "interrupted"
MODEL_ERROR = "model_error"        # the model failed to load
NOT_FOUND = "not_found"            # unknown fetch handle
BUSY = "busy"                      # too many connections: try again later
TOO_LARGE = "too_large"            # a request over a limit (exec text, statements, a prompt, memory)
INTERNAL = "internal"

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024      # what the daemon accepts from a client
CLIENT_MAX_FRAME = 512 * 1024 * 1024      # what a client accepts from the daemon
FETCH_CHUNK = 1024 * 1024                 # bytes per fetched chunk of a big array
INLINE_ARRAY_LIMIT = 256 * 1024           # arrays bigger than this are summarised


class ProtocolError(Exception):
    """A protocol-level failure, carrying an error `code` from the list above."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_data(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int):
        super().__init__(FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the limit of {limit} bytes",
                         size=size, limit=limit)


# --- frames -------------------------------------------------------------------

def pack(message: dict) -> bytes:
    """One message as a complete frame (header + msgpack body); numpy arrays in it are
    encoded as {"dtype", "shape", "data"}."""
    body = msgpack.packb(message, use_bin_type=True, default=_encode_other)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes, arrays: bool = False) -> dict:
    """Decode a frame body; raises ProtocolError(BAD_FRAME) unless it is a msgpack map.
    With `arrays`, the arrays in it (what clients receive) become numpy arrays."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False,
                                  object_hook=_decode_map if arrays else None)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for bad input
        raise ProtocolError(BAD_FRAME, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_FRAME, f"a message must be a msgpack map, got {type(message).__name__}")
    return message


async def read_frame(reader: asyncio.StreamReader, max_size: int = CLIENT_MAX_FRAME) -> bytes | None:
    """The next frame's body, or None at a clean end of stream. Raises FrameTooLarge."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ConnectionResetError("connection closed inside a frame header") from None
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("connection closed inside a frame") from None


def read_frame_sync(sock, max_size: int = CLIENT_MAX_FRAME) -> bytes | None:
    """Blocking twin of `read_frame` for a socket object."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    body = _recv_exactly(sock, size)
    if body is None:
        raise ConnectionResetError("connection closed inside a frame")
    return body


def _recv_exactly(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise ConnectionResetError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)


# --- messages -----------------------------------------------------------------

def reply(request_id, type_: str, **fields) -> dict:
    return {"id": request_id, "type": type_, **fields}


def error_reply(request_id, code: str, message: str, **extra) -> dict:
    return reply(request_id, ERROR, error={"code": code, "message": message, **extra})


def done_reply(request_id, status: str = "ok", value=None) -> dict:
    message = reply(request_id, DONE, status=status)
    if value is not None:
        message["value"] = value
    return message


# --- arrays -------------------------------------------------------------------
# Results carry numpy arrays (`Result.to_data()`); on the wire an array is
# {"dtype", "shape", "data": little-endian C-order bytes}. `pack` encodes them,
# `unpack_body(body, arrays=True)` decodes them back, so no client sees the wire form.

def is_array_data(value) -> bool:
    """True for the wire form of an array: a map with dtype, shape and data (or a fetch handle)."""
    return isinstance(value, dict) and "dtype" in value and "shape" in value and ("data" in value or "handle" in value)


def is_array(value) -> bool:
    """True for a numpy array (without importing numpy when nothing imported it yet)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def encode_array(array) -> dict:
    """numpy array -> wire form. (Not np.ascontiguousarray: that makes a 0-d array 1-d.)"""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes(order="C")}


def decode_array(data: dict, data_bytes: bytes | None = None):
    """Wire form -> numpy array (with the bytes of a fetched handle when given).
    bfloat16 (no numpy dtype) comes back as float32. Raises ProtocolError(BAD_REQUEST) for
    a dtype numpy does not know or bytes that do not fit the shape."""
    import numpy as np

    raw = data_bytes if data_bytes is not None else data.get("data")
    if raw is None:
        raise ProtocolError(BAD_REQUEST, "this array came without its bytes (a fetch handle: fetch them first)")
    shape = tuple(int(n) for n in data["shape"])
    try:
        if data["dtype"] == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        dtype = np.dtype(data["dtype"]).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    except TypeError:
        raise ProtocolError(BAD_REQUEST, f"unknown array dtype {data['dtype']!r}") from None
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"array bytes do not fit shape {list(shape)}: {exc}") from None


def _decode_map(value: dict):
    """msgpack's object_hook: wire arrays that carry their bytes become numpy arrays."""
    if "data" in value and "dtype" in value and "shape" in value and isinstance(value["data"], bytes):
        return decode_array(value)
    return value


def _encode_other(value):
    """msgpack's default hook: numpy arrays and scalars."""
    if is_array(value):
        return encode_array(value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__} to the daemon's clients")


def summarise_array(array, handle: str) -> dict:
    """A big numpy array as a fetch handle plus its dtype, shape, size and a few statistics."""
    summary = {"dtype": array.dtype.name, "shape": list(array.shape), "handle": handle, "nbytes": int(array.nbytes)}
    try:
        values = array.astype("float64", copy=False)
        if values.size:
            summary["stats"] = {
                "min": float(values.min()), "max": float(values.max()),
                "mean": float(values.mean()), "std": float(values.std()),
            }
    except Exception:
        pass
    return summary


def walk_arrays(value, on_array):
    """Rebuild `value` with every numpy array and every fetch-handle summary replaced by
    on_array(it)."""
    if is_array(value) or (isinstance(value, dict) and "handle" in value and is_array_data(value)):
        return on_array(value)
    if isinstance(value, dict):
        return {k: walk_arrays(v, on_array) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [walk_arrays(v, on_array) for v in value]
    return value


# --- addresses ------------------------------------------------------------------

def parse_host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT', ':PORT' or 'PORT' -> (host, port); the host defaults to
    loopback. Raises ValueError naming what was wrong and what would be valid."""
    usage = f"expected HOST:PORT (e.g. 127.0.0.1:7420, [::1]:7420, or :0 for any free port), got {text!r}"
    text = str(text).strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or not rest.startswith(":"):
            raise ValueError(usage)
        port = rest[1:]
    elif text.count(":") > 1:
        raise ValueError(f"an IPv6 address needs brackets, as in [::1]:7420; {usage}")
    else:
        host, _, port = text.rpartition(":")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(usage)
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"the port must be 0..65535, got {number} in {text!r}")
    return host or default_host, number


def format_host_port(host: str, port: int) -> str:
    """(host, port) -> 'HOST:PORT', with an IPv6 host in brackets: the form parse_host_port reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
