"""Queries through a real daemon on the demo model: results and arrays, the shared trace
cache, per-connection sessions, completion and hover that never run the model,
interrupts, clients that vanish mid-query, and the asyncio client."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from daemon_support import MODEL, errors_of, start_daemon
from mlxterp_repl import protocol as p
from mlxterp_repl.client import DaemonError, connect, connect_async

SENTENCE = "The capital of France is Paris and the capital of Germany is Berlin."


def long_text(tag: str) -> str:
    """About 240 tokens: a forward pass with every module captured takes 0.1 to 1 s (OpenBLAS or not)."""
    return f"{tag} " + " ".join([SENTENCE] * 15)


def long_query(tag: str, statements: int = 400) -> str:
    """Statements each tracing a long input of its own (no cache hits): seconds of work however
    fast the device (a GPU runs one in milliseconds); the tests interrupt them early."""
    return "\n".join(f'save layers.15 @ -1 in "{long_text(f"{tag} {i}")}"' for i in range(statements))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = start_daemon(tmp_path_factory.mktemp("rt"), model=MODEL)
    with connect(runtime_dir=running.files.runtime_dir, autostart=False) as client:
        client.exec('tokens "warm up"')  # waits until the model is loaded
        running.model = client.call("hello", protocol=p.PROTOCOL_VERSION)["model"]
    yield running
    running.stop()


@pytest.fixture
def client(daemon):
    with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as c:
        yield c


def forward_passes(client) -> int:
    return client.stats()["forward_count"]


def only_array(result: dict) -> np.ndarray:
    [entry] = result["arrays"]
    return entry["array"]


def results_of(frames: list[dict]) -> list[dict]:
    return [f["result"] for f in frames if f["type"] == "result"]


def start_exec(connection, request_id, code: str) -> None:
    """Send an exec and wait until the worker reports it running."""
    connection.send({"op": "exec", "id": request_id, "code": code})
    while True:
        message = connection.receive()
        if message["id"] == request_id and message["type"] == "progress" and message.get("stage") != "load":
            return


def test_exec_streams_results_tagged_with_the_request_id_then_done(daemon):
    hidden = daemon.model["hidden_size"]
    raw = daemon.raw()
    raw.hello()
    frames = raw.request("exec", code='prompt "The capital of France is"\nsave layers.8 @ "France"')
    assert {f["id"] for f in frames} == {raw.ids}
    assert [f["index"] for f in frames if f["type"] == "result"] == [0, 1]
    results = results_of(frames)
    assert [r["kind"] for r in results] == ["prompt", "save"]
    array = results[1]["arrays"][0]["array"]
    assert array["dtype"] == "float32" and array["shape"] == [hidden] and len(array["data"]) == hidden * 4
    assert frames[-1] == {"id": raw.ids, "type": "done", "status": "ok"}
    raw.close()


def test_saved_values_come_back_as_numpy_or_mlx_arrays(daemon, client):
    hidden = daemon.model["hidden_size"]
    client.exec('prompt "The capital of France is"')
    [saved] = client.exec('save layers.8 @ "France"')
    array = only_array(saved)
    assert isinstance(array, np.ndarray) and array.shape == (hidden,) and array.dtype == np.float32
    assert np.isclose(np.linalg.norm(array), saved["arrays"][0]["norm"], rtol=1e-5)
    with connect(runtime_dir=daemon.files.runtime_dir, autostart=False, arrays="mlx") as mlx_client:
        import mlx.core as mx

        [again] = mlx_client.exec('save layers.8 @ "France" in "The capital of France is"')
        assert isinstance(only_array(again), mx.array)
        assert np.allclose(np.array(only_array(again)), array)


def test_a_second_question_about_the_same_prompt_does_not_run_the_model_again(daemon, client):
    client.exec('prompt "The capital of Spain is"')
    before = forward_passes(client)
    client.exec('save layers.8 @ -1')
    assert forward_passes(client) == before + 1
    client.exec('save layers.3 @ "Spain"\nstats layers.*.mlp @ -1\npredict layers.15 @ -1 top 3')
    assert forward_passes(client) == before + 1
    with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as other:
        other.exec('save layers.2.mlp @ -1 in "The capital of Spain is"')  # another session, same input
    assert forward_passes(client) == before + 1
    client.exec('with layers.4 zero: save layers.8 @ -1')  # other interventions: another trace
    client.exec('save layers.8 @ -1 in "The capital of Italy is"')  # another input
    assert forward_passes(client) == before + 3
    assert client.stats()["cache"]["hits"] >= 4


def test_the_norm_of_a_vector_comes_back_0d_with_its_summary_and_text(client):
    [_, norm] = client.exec('save layers.6 @ -1 in "The capital of France is" as $x\nlet $n = norm($x)', text=True)
    value = only_array(norm)
    assert isinstance(value, np.ndarray) and value.shape == ()
    assert np.isclose(float(value), norm["arrays"][0]["norm"], rtol=1e-5)
    assert norm["summary"].startswith("$n () norm ")
    assert "│ norm(layers.6) │    () │" in norm["text"]
    assert "text" not in client.exec("let $m = norm($x)")[0]  # drawn only when asked for


def test_load_of_a_model_the_daemon_holds_reuses_it(client):
    client.exec("load demo")
    before = forward_passes(client)
    client.exec('save layers.3 @ -1 in "The capital of Chile is"')  # new input: one forward pass
    assert forward_passes(client) == before + 1  # ... of the daemon's own model, not of a second copy
    [info] = client.exec("info")
    cache = dict(info["rows"])["trace cache"]
    assert re.fullmatch(r"\d+ entr(y|ies), \d+\.\d MiB used of \d+ MiB", cache), cache
    assert info["cache"]["entries"] == client.stats()["cache"]["entries"] >= 1


def test_each_connection_has_its_own_prompt_and_variables(daemon, client):
    client.exec('prompt "The capital of France is"\nsave layers.8 @ -1 as $mine')
    with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as other:
        assert other.tokens()["ids"] == []  # no prompt in this session
        with pytest.raises(DaemonError, match=r"\$mine is not defined"):
            other.exec("predict $mine")
        other.exec('prompt "Berlin is"\nsave layers.2 @ -1 as $mine')
        assert other.tokens()["text"] == "Berlin is"
    assert client.tokens()["text"] == "The capital of France is"
    [prediction] = client.exec("predict $mine top 1")
    assert prediction["kind"] == "predict"
    assert f"({daemon.model['hidden_size']},)" in client.hover("predict $mine", 10)["text"]


def test_query_errors_carry_the_span_and_suggestions_and_the_session_goes_on(client):
    code = 'prompt "The capital of France is"\nsave layrs.8 @ -1'
    with pytest.raises(DaemonError) as caught:
        client.exec(code)
    error = caught.value
    assert error.code == p.QUERY_ERROR
    assert error.span == {"line": 2, "col": 6, "end_line": 2, "end_col": 13}
    assert "layers.8" in error.suggestions
    assert [r["kind"] for r in error.results] == ["prompt"]  # what ran before the error
    assert "^^^^^^^" in error.render(code)
    [saved] = client.exec("save layers.8 @ -1")
    assert saved["kind"] == "save"


def test_completion_and_hover_never_run_the_model_nor_change_the_session(client):
    client.exec('prompt "The capital of Japan is"\nsave layers.5 @ -1 as $five')
    before = client.stats()
    labels = [c["label"] for c in client.complete("save layers.8.")]
    assert {"mlp", "self_attn", "attn"} <= set(labels)
    assert "$five" in [c["label"] for c in client.complete("predict $f")]
    assert '"Japan"' in [c["label"] for c in client.complete('save layers.8 @ "Ja')]  # a token of the prompt
    hover = client.hover("save layers.8.mlp @ -1", 9)
    assert hover["module"] == "layers.8.mlp" and "MLP" in hover["text"] and "parameters" in hover["text"]
    assert client.hover("save layers.8 @ -1", 1) is None  # "save" is no module
    client.modules()
    client.tokens("Hello world")
    after = client.stats()
    assert after["forward_count"] == before["forward_count"]
    assert client.tokens()["text"] == "The capital of Japan is"
    assert [c["label"] for c in client.complete("predict $")] == ["$five"]


def test_modules_lists_types_params_and_output_shapes_once_traced(daemon, client):
    hidden = daemon.model["hidden_size"]
    client.exec('save layers.8 @ -1 in "The capital of Peru is"')
    listing = client.modules()
    assert listing["n_layers"] == daemon.model["n_layers"] and listing["hidden_size"] == hidden
    by_name = {m["name"]: m for m in listing["modules"]}
    assert by_name["layers.8.mlp"]["type"] == "MLP" and by_name["layers.8.mlp"]["params"] > 0
    assert by_name["layers.8"]["shape"] == [1, 6, hidden]  # <s> The capital of Peru is


def test_tokens_of_a_text_and_of_the_session_prompt(client):
    assert client.tokens() == {"text": None, "ids": [], "strings": []}
    tokens = client.tokens("The capital of France is")
    assert tokens["strings"] == ["<s>", "The", " capital", " of", " France", " is"]
    assert len(tokens["ids"]) == 6


def test_big_arrays_are_summarised_then_fetched_in_chunks(daemon, client):
    code = 'save output @ * in "' + " ".join([SENTENCE] * 4) + '"'
    reply = client.exec_reply(code)
    summary = reply.results[0]["arrays"][0]["array"]
    assert "data" not in summary and summary["handle"]
    assert summary["nbytes"] > p.INLINE_ARRAY_LIMIT and summary["shape"][1] == daemon.model["vocab_size"]
    assert set(summary["stats"]) == {"min", "max", "mean", "std"}
    full = client.exec_reply(code, full=True).results[0]["arrays"][0]["array"]  # inline: a numpy array
    fetched = only_array(client.exec(code)[0])
    assert isinstance(full, np.ndarray) and fetched.shape == full.shape == tuple(summary["shape"])
    assert np.array_equal(fetched, full)
    assert np.isclose(fetched.max(), summary["stats"]["max"])


def test_interrupt_is_acknowledged_at_once_and_leaves_session_and_daemon_usable(daemon):
    raw = daemon.raw()
    raw.hello()
    raw.request("exec", code='prompt "The capital of Chile is"\nsave layers.3 @ -1 as $x')
    x_before = results_of(raw.request("exec", code="save layers.3 @ -1"))[0]["arrays"][0]["array"]["data"]
    x_hover = raw.request("hover", code="predict $x", offset=9)[-1]["value"]["text"]  # shape, norm, mean
    # Hundreds of forward passes before the one that would set $x: slow enough on any device (a GPU
    # runs one in milliseconds); the interrupt lands long before the last statement.
    start_exec(raw, "long", long_query("interrupt") + f'\nsave layers.15 @ -1 in "{long_text("last")}" as $x')
    time.sleep(0.05)
    sent = time.perf_counter()
    raw.send({"op": "interrupt", "id": "stop-it", "target": "long"})
    ack = raw.until_done("stop-it")
    assert time.perf_counter() - sent < 0.3  # the query it stops runs for seconds
    assert ack[-1]["value"] == {"interrupted": True}
    frames = raw.until_done("long")
    assert frames[-1]["status"] == "interrupted"
    assert errors_of(frames)[0]["code"] == p.INTERRUPTED
    assert time.perf_counter() - sent < 1.0  # stopped at a module boundary, not at the end
    # $x and the prompt are what they were; the daemon goes on
    again = raw.request("exec", code="save layers.3 @ -1\npredict $x top 1")
    assert again[-1]["status"] == "ok"
    assert results_of(again)[0]["arrays"][0]["array"]["data"] == x_before
    assert raw.request("tokens")[-1]["value"]["text"] == "The capital of Chile is"
    assert raw.request("hover", code="predict $x", offset=9)[-1]["value"]["text"] == x_hover
    raw.close()


def test_quick_ops_are_answered_while_a_query_runs_and_a_queued_query_can_be_dropped(daemon, client):
    busy = daemon.raw()
    busy.hello()
    start_exec(busy, "long", f'save layers.15 @ -1 in "{long_text("lanes")}"')
    waiting = daemon.raw()
    waiting.hello()
    waiting.send({"op": "exec", "id": "queued", "code": 'save layers.1 @ -1 in "queued"'})
    started = time.perf_counter()
    assert client.ping()["pong"]
    assert client.complete("save layers.1")
    assert client.stats()["queued"] == 2
    waiting.send({"op": "interrupt", "id": "drop", "target": "queued"})
    frames = waiting.until_done("queued")
    assert frames[-1]["status"] == "interrupted"
    assert time.perf_counter() - started < 0.5  # none of it waited for the running query
    assert busy.until_done("long")[-1]["status"] == "ok"
    busy.close()
    waiting.close()


def test_a_client_vanishing_mid_query_stops_its_work_and_leaves_others_unchanged(daemon, client):
    client.exec('prompt "The capital of Kenya is"\nsave layers.4 @ -1 as $kept')
    quitter = daemon.raw()
    quitter.hello()
    start_exec(quitter, "long", f'save layers.15 @ -1 in "{long_text("vanish")}"')
    quitter.close()
    deadline = time.monotonic() + 5
    while client.stats()["queued"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.stats()["queued"] == 0
    assert client.tokens()["text"] == "The capital of Kenya is"
    [prediction] = client.exec("predict $kept top 2")
    assert prediction["kind"] == "predict"


async def test_async_client_streams_replies_and_cancelling_interrupts(daemon):
    client = await connect_async(runtime_dir=daemon.files.runtime_dir, autostart=False)
    try:
        assert client.hello["protocol"] == p.PROTOCOL_VERSION
        kinds = [frame["type"] async for frame in client.stream("exec", code='save layers.2 @ -1 in "Hi"')]
        assert kinds[-1] == "done" and "result" in kinds and "progress" in kinds
        labels, pong = await asyncio.gather(client.complete("save layers.2."), client.ping())
        assert "mlp" in [c["label"] for c in labels] and pong["pong"]
        task = asyncio.ensure_future(client.exec(long_query("async")))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if (await client.call("stats"))["queued"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await client.call("stats"))["queued"] == 0
    finally:
        await client.close()


def test_many_clients_querying_at_once_each_get_their_own_answers(daemon):
    errors, answers = [], {}

    def ask(i):
        try:
            with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as c:
                c.exec(f'prompt "The capital of France is"\nsave layers.{i % 16} @ -1 as $v{i}')
                [saved] = c.exec(f"save layers.{i % 16} @ -1")
                answers[i] = (only_array(saved), [v["label"] for v in c.complete("predict $")])
        except Exception as exc:  # recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    for i, (array, variables) in answers.items():
        assert variables == [f"$v{i}"]
        assert np.array_equal(array, answers[i % 16][0])


def test_ctrl_c_in_the_python_client_interrupts_the_query_and_keeps_the_connection(daemon, tmp_path):
    script = (
        "import sys\n"
        "from mlxterp_repl.client import connect\n"
        "c = connect(runtime_dir=sys.argv[1], autostart=False)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    c.exec(open(sys.argv[2]).read())\n"
        "    print('finished', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', c.ping()['pong'], c.stats()['queued'], flush=True)\n"
    )
    code = tmp_path / "long.mlxq"  # a file: the query is longer than one command-line argument may be
    code.write_text(long_query("ctrl-c"))
    child = subprocess.Popen([sys.executable, "-c", script, str(daemon.files.runtime_dir), str(code)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.4)
    started = time.perf_counter()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=10)
    assert out.strip() == "interrupted True 0"
    assert time.perf_counter() - started < 1.0
