"""The daemon's protocol over a real Unix socket: handshake, framing, and bad input of
every kind answered with an error while the daemon keeps serving everyone else."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import msgpack
import pytest

from daemon_support import RawConnection, errors_of, start_daemon
from mlxterp_repl import protocol as p

MAX_FRAME = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = start_daemon(tmp_path_factory.mktemp("rt"), "--max-frame", str(MAX_FRAME))
    yield running
    running.stop()


@pytest.fixture
def conn(daemon):
    connection = daemon.raw()
    connection.hello()
    yield connection
    connection.close()


def ping_ok(connection) -> bool:
    frames = connection.request("ping")
    return frames[-1]["type"] == "done" and frames[-1]["value"]["pong"] is True


def test_hello_reports_version_ops_daemon_and_model(daemon):
    connection = daemon.raw()
    started = time.perf_counter()
    value = connection.hello(client="test")
    elapsed = time.perf_counter() - started
    assert value["protocol"] == p.PROTOCOL_VERSION
    assert {"hello", "exec", "complete", "hover", "modules", "tokens", "interrupt", "ping", "shutdown"} <= set(value["ops"])
    assert len(value["daemon_id"]) >= 8
    assert value["model"]["name"] == "demo"
    assert value["model"]["state"] in ("loading", "ready", "failed")
    assert elapsed < 0.5
    connection.close()


def test_hello_is_answered_at_once_while_the_model_loads(tmp_path):
    fresh = start_daemon(tmp_path)
    try:
        connection = fresh.raw()
        started = time.perf_counter()
        value = connection.hello()
        assert time.perf_counter() - started < 0.2
        # importing mlx and loading weights takes far longer than binding the socket
        assert value["model"]["state"] == "loading"
        assert 0.0 <= value["model"]["progress"] < 1.0 and value["model"]["message"]
    finally:
        fresh.stop()


def test_every_reply_carries_the_request_id_and_ends_with_done(conn):
    conn.send({"op": "ping", "id": "abc"})
    conn.send({"op": "stats", "id": 77})
    first, second = conn.until_done("abc"), conn.until_done(77)
    assert [f["id"] for f in first] == ["abc"] and first[-1]["type"] == "done"
    assert second[-1]["value"]["connections"] >= 1


def test_ops_before_hello_are_refused(daemon):
    connection = daemon.raw()
    frames = connection.request("ping")
    assert errors_of(frames)[0]["code"] == p.NEED_HELLO
    assert frames[-1]["status"] == "error"
    connection.hello()
    assert ping_ok(connection)
    connection.close()


def test_protocol_version_mismatch_is_refused_with_the_daemons_version(daemon):
    connection = daemon.raw()
    frames = connection.request("hello", protocol=999)
    error = errors_of(frames)[0]
    assert error["code"] == p.VERSION_MISMATCH and error["protocol"] == p.PROTOCOL_VERSION
    connection.close()


def test_malformed_frame_gets_an_error_and_the_connection_keeps_serving(conn):
    garbage = b"\xc1\xc1\xc1 definitely not msgpack"
    conn.send_bytes(struct.pack(">I", len(garbage)) + garbage)
    reply = conn.receive()
    assert reply["type"] == "error" and reply["id"] is None
    assert reply["error"]["code"] == p.BAD_FRAME
    assert ping_ok(conn)


def test_a_message_that_is_not_a_map_is_refused(conn):
    body = msgpack.packb([1, 2, 3])
    conn.send_bytes(struct.pack(">I", len(body)) + body)
    reply = conn.receive()
    assert reply["error"]["code"] == p.BAD_FRAME and "map" in reply["error"]["message"]
    assert ping_ok(conn)


def test_oversize_frame_is_refused_and_only_that_connection_is_dropped(daemon, conn):
    other = daemon.raw()
    other.hello()
    other.send_bytes(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
    reply = other.receive()
    assert reply["error"]["code"] == p.FRAME_TOO_LARGE
    assert reply["error"]["limit"] == MAX_FRAME
    assert other.closed_by_peer()
    assert ping_ok(conn)


def test_unknown_op_is_named_and_the_valid_ops_listed(conn):
    frames = conn.request("frobnicate")
    error = errors_of(frames)[0]
    assert error["code"] == p.UNKNOWN_OP
    assert "frobnicate" in error["message"] and "exec" in error["valid"]
    assert frames[-1] == {"id": conn.ids, "type": "done", "status": "error"}


@pytest.mark.parametrize("fields, field", [
    ({"op": "exec", "code": 42}, "code"),
    ({"op": "complete", "code": "save lay", "offset": "end"}, "offset"),
    ({"op": "complete", "code": "save lay", "offset": 99}, "offset"),
    ({"op": "interrupt", "target": [1, 2]}, "target"),
    ({"op": "fetch", "handle": 3}, "handle"),
    ({"op": 12}, "op"),
])
def test_fields_of_the_wrong_type_are_named_in_the_error(conn, fields, field):
    conn.ids += 1
    conn.send({"id": conn.ids, **fields})
    frames = conn.until_done(conn.ids)
    error = errors_of(frames)[0]
    assert error["code"] == p.BAD_REQUEST
    assert f"'{field}'" in error["message"]
    assert ping_ok(conn)


def test_a_request_without_an_id_is_refused(conn):
    conn.send({"op": "ping"})
    reply = conn.receive()
    assert reply["id"] is None and reply["error"]["code"] == p.BAD_REQUEST and "'id'" in reply["error"]["message"]
    assert ping_ok(conn)


def test_unknown_fetch_handle_is_not_found(conn):
    error = errors_of(conn.request("fetch", handle="b999"))[0]
    assert error["code"] == p.NOT_FOUND


def test_interrupting_nothing_says_so(conn):
    frames = conn.request("interrupt", target="no-such-request")
    assert frames[-1]["value"]["interrupted"] is False


def test_a_client_vanishing_mid_frame_leaves_the_daemon_serving(daemon, conn):
    quitter = daemon.raw()
    quitter.hello()
    body = p.pack({"op": "ping", "id": 1})
    quitter.send_bytes(body[: len(body) // 2])  # half a frame, then gone
    quitter.close()
    gone = daemon.raw()
    gone.hello()
    gone.send({"op": "exec", "id": 1, "code": 'save layers.0 @ -1'})
    gone.close()  # asked for work, never reads the answer
    time.sleep(0.1)
    assert ping_ok(conn)
    assert daemon.proc.poll() is None


def test_a_hundred_clients_at_once_are_all_served(daemon):
    n = 100
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def client(i):
        try:
            connection = daemon.raw()
            barrier.wait(10)
            connection.hello()
            frames = connection.request("stats")
            results[i] = frames[-1]["value"]["connections"]
            connection.close()
        except Exception as exc:  # recorded, asserted below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    failures = [r for r in results if not isinstance(r, int)]
    assert not failures, failures[:3]
    assert max(results) > 1  # they really were connected at the same time
    time.sleep(0.2)
    survivor = daemon.raw()
    survivor.hello()
    assert survivor.request("stats")[-1]["value"]["connections"] == 1  # all hundred were let go
    survivor.close()


def test_bad_input_in_one_connection_leaves_another_untouched(daemon, conn):
    before = conn.request("stats")[-1]["value"]["connections"]
    for junk in (b"\x00\x00\x00\x03abc", struct.pack(">I", 5) + msgpack.packb("hello")):
        bad = daemon.raw()
        bad.send_bytes(junk)
        bad.close()
    time.sleep(0.1)
    assert ping_ok(conn)
    assert conn.request("stats")[-1]["value"]["connections"] == before


def junk_value(rng: random.Random):
    return rng.choice([None, True, -1, 2**40, 1.5, "", "layers.8", "\x00\u2603", b"\xff\x00", [1, [2]], {"a": {}},
                       "save layers.8 @ -1", "x" * 300])


def test_random_frames_get_errors_and_never_take_the_daemon_down(daemon, conn):
    rng = random.Random(6)
    ops = [op for op in p.OPS if op != "shutdown"] + ["nope", 7, None]
    expected_done, expected_anonymous = set(), 0
    for i in range(300):
        if rng.random() < 0.25:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            if body[0] & 0xF0 == 0x80:  # a fixmap: might decode; keep the count exact
                body = b"\xc1" + body
            conn.send_bytes(struct.pack(">I", len(body)) + body)
            expected_anonymous += 1
            continue
        message = {"op": rng.choice(ops), "id": rng.choice([f"junk-{i}", i + 1000, None, 1.5, [i]])}
        for field in rng.sample(["code", "offset", "target", "handle", "text", "protocol", "full", "size"], 3):
            message[field] = junk_value(rng)
        conn.send(message)
        if isinstance(message["id"], (str, int)):
            expected_done.add(message["id"])
        else:
            expected_anonymous += 1
    conn.send({"op": "ping", "id": "last"})
    expected_done.add("last")
    anonymous = 0
    while expected_done or anonymous < expected_anonymous:
        reply = conn.receive()
        assert reply is not None, "the daemon hung up"
        if reply["id"] is None:
            anonymous += 1
        elif reply["type"] == "done":
            expected_done.discard(reply["id"])
    assert anonymous == expected_anonymous and not expected_done
    assert ping_ok(conn)
    assert daemon.proc.poll() is None
