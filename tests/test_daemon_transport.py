"""The transport layer on its own terms: the array wire form (protocol.py), the one
`host:port` parser, the op table the clients and the daemon share, and the sync client's
`interrupt()` from another thread against a real daemon running a slow query."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import numpy as np
import pytest

from daemon_support import MODEL, start_daemon
from mlxterp_repl import ops
from mlxterp_repl import protocol as p
from mlxterp_repl.client import AsyncClient, Client, DaemonError, connect, connect_async

SENTENCE = "The capital of France is Paris and the capital of Germany is Berlin."


def slow_query(tag: str, statements: int = 20) -> str:
    """Statements that each trace a ~240-token input of their own: seconds of model work."""
    return "\n".join(f'save layers.15 @ -1 in "{tag} {i} ' + " ".join([SENTENCE] * 15) + '"'
                     for i in range(statements))


# --- arrays on the wire ------------------------------------------------------------

def frame_body(message: dict) -> bytes:
    frame = p.pack(message)
    (size,) = p.HEADER.unpack(frame[:p.HEADER.size])
    assert size == len(frame) - p.HEADER.size
    return frame[p.HEADER.size:]


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float64),                      # 0-d stays 0-d
    np.arange(6, dtype=">i4").reshape(2, 3),              # big-endian: sent little-endian
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    np.zeros((0, 5), dtype=np.float16),
    np.array([True, False]),
])
def test_numpy_arrays_travel_as_dtype_shape_and_little_endian_bytes(array):
    body = frame_body({"result": {"kind": "save", "values": [{"array": array}]}})
    wire = msgpack.unpackb(body, raw=False)["result"]["values"][0]["array"]
    assert set(wire) == {"dtype", "shape", "data"}
    assert wire["shape"] == list(array.shape)
    assert wire["data"] == array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
    back = p.unpack_body(body, arrays=True)["result"]["values"][0]["array"]
    assert isinstance(back, np.ndarray) and back.shape == array.shape
    assert np.array_equal(back, array)


def test_bfloat16_bytes_come_back_as_float32():
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    top_halves = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    body = msgpack.packb({"a": {"dtype": "bfloat16", "shape": [3], "data": top_halves}}, use_bin_type=True)
    back = p.unpack_body(body, arrays=True)["a"]
    assert back.dtype == np.float32 and back.tolist() == [1.0, -2.5, 3.140625]


def test_numpy_scalars_are_sent_as_plain_numbers():
    body = frame_body({"score": np.float32(0.25), "id": np.int64(7)})
    assert msgpack.unpackb(body, raw=False) == {"score": 0.25, "id": 7}


def test_without_arrays_the_wire_form_is_left_as_is():
    body = frame_body({"a": np.ones(2, dtype=np.int8)})
    assert p.unpack_body(body) == {"a": {"dtype": "int8", "shape": [2], "data": b"\x01\x01"}}


def test_a_bad_array_on_the_wire_names_what_is_wrong():
    body = msgpack.packb({"a": {"dtype": "float32", "shape": [3], "data": b"\x00" * 5}}, use_bin_type=True)
    with pytest.raises(p.ProtocolError, match=r"do not fit shape \[3\]"):
        p.unpack_body(body, arrays=True)
    body = msgpack.packb({"a": {"dtype": "float99", "shape": [1], "data": b"\x00"}}, use_bin_type=True)
    with pytest.raises(p.ProtocolError, match="unknown array dtype 'float99'"):
        p.unpack_body(body, arrays=True)


def test_a_big_array_summary_carries_a_handle_and_statistics():
    array = np.linspace(-1, 3, 100, dtype=np.float32).reshape(4, 25)
    summary = p.summarise_array(array, "b9")
    assert summary["handle"] == "b9" and summary["nbytes"] == 400
    assert summary["dtype"] == "float32" and summary["shape"] == [4, 25]
    assert summary["stats"]["min"] == pytest.approx(-1) and summary["stats"]["max"] == pytest.approx(3)
    assert np.array_equal(p.decode_array(summary, p.encode_array(array)["data"]), array)


# --- host:port ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:7420", ("127.0.0.1", 7420)),
    ("localhost:0", ("localhost", 0)),
    (":7000", ("127.0.0.1", 7000)),
    ("7000", ("127.0.0.1", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
])
def test_host_port_forms(text, expected):
    assert p.parse_host_port(text) == expected


@pytest.mark.parametrize("text, message", [
    ("::1:7000", "IPv6 address needs brackets"),
    ("[::1]7000", "expected HOST:PORT"),
    ("[::1]", "expected HOST:PORT"),
    ("host:", "expected HOST:PORT"),
    ("host:port", "expected HOST:PORT"),
    ("host:-1", "expected HOST:PORT"),
    ("host:70000", "must be 0..65535"),
    ("", "expected HOST:PORT"),
])
def test_bad_host_port_says_what_would_be_valid(text, message):
    with pytest.raises(ValueError, match=message):
        p.parse_host_port(text)


def test_host_port_written_and_read_back():
    for host, port in [("127.0.0.1", 1), ("::1", 7420)]:
        assert p.parse_host_port(p.format_host_port(host, port)) == (host, port)


def test_serve_refuses_a_bad_tcp_address_with_a_usage_message(tmp_path, capsys):
    from mlxterp_repl.daemon import serve_main

    with pytest.raises(SystemExit) as exited:
        serve_main(["--runtime-dir", str(tmp_path), "--tcp", "::1:7000"])
    assert exited.value.code == 2
    assert "--tcp: an IPv6 address needs brackets, as in [::1]:7420" in capsys.readouterr().err


# --- one op table ---------------------------------------------------------------

def test_every_op_has_one_daemon_handler_and_a_method_on_both_clients():
    assert set(ops.HANDLERS) == set(p.OPS)
    for name in p.OPS:
        assert callable(getattr(Client, name)) and callable(getattr(AsyncClient, name))
        assert asyncio.iscoroutinefunction(getattr(AsyncClient, name))
        assert not asyncio.iscoroutinefunction(getattr(Client, name))
    where = {name: entry.runs_on for name, entry in ops.HANDLERS.items()}
    assert where["exec"] == "worker"
    for name in ("hello", "interrupt", "ping", "stats", "fetch", "shutdown", "complete", "hover", "modules"):
        assert where[name] == "loop", name  # never queued behind a running query


def test_registering_a_handler_for_an_op_missing_from_the_table_fails():
    with pytest.raises(ValueError, match="not in protocol.OPS"):
        ops.op("frobnicate")(lambda daemon, conn, message: None)


# --- against a real daemon -------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = start_daemon(tmp_path_factory.mktemp("rt"), "--tcp", "[::1]:0", model=MODEL)
    with connect(runtime_dir=running.files.runtime_dir, autostart=False) as client:
        client.exec('tokens "warm up"')  # waits until the model is loaded
    yield running
    running.stop()


@pytest.fixture
def client(daemon):
    with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as c:
        yield c


def test_generated_op_methods_send_their_fields(client):
    client.exec('prompt "The capital of France is"')
    assert client.tokens()["strings"][-1] == " is"
    assert client.tokens("Paris")["text"] == "Paris"
    assert client.ping()["pong"] is True
    labels = [item["label"] for item in client.complete("save layers.8.", 14)]
    assert "mlp" in labels
    with pytest.raises(TypeError, match="unexpected field 'colour'"):
        client.tokens(colour="red")


def test_interrupt_from_another_thread_stops_a_streaming_exec(client):
    outcome = {}

    def run():
        started = time.monotonic()
        try:
            client.exec(slow_query("interrupt from a thread", 400))  # seconds even on a GPU
            outcome["error"] = None
        except DaemonError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    assert client.interrupt() is False  # nothing running yet
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while client.running is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # well inside the query
    assert client.interrupt() is True
    worker.join(30)
    assert not worker.is_alive()
    error = outcome["error"]
    assert error is not None and error.code == p.INTERRUPTED, outcome
    assert outcome["seconds"] < 5
    # the connection and its session go on; the interrupt's own reply did not confuse the next request
    assert client.ping()["pong"] is True
    assert client.stats()["queued"] == 0
    [saved] = client.exec('save layers.2 @ -1 in "short"')
    assert saved["kind"] == "save"


def test_a_tcp_daemon_on_ipv6_loopback_takes_the_token_from_the_connection_file(daemon):
    import json

    info = json.loads(daemon.files.connection_file.read_text())
    assert info["host"] == "::1"
    with connect(connection_file=daemon.files.connection_file) as client:
        assert client.ping()["pong"] is True
    with connect(tcp=f"[::1]:{info['port']}", token=info["token"]) as client:
        assert client.stats()["tcp"] == f"[::1]:{info['port']}"


async def test_the_async_client_speaks_tcp_with_brackets(daemon):
    import json

    info = json.loads(daemon.files.connection_file.read_text())
    client = await connect_async(tcp=f"[::1]:{info['port']}", runtime_dir=daemon.files.runtime_dir)
    try:
        assert (await client.ping())["pong"] is True
        assert (await client.tokens("Paris"))["text"] == "Paris"
    finally:
        await client.close()
