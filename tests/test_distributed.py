"""Past one machine: 2 processes on loopback (`mlx.launch -n 2 --backend ring`) give what one process gives.

Each test starts real processes with MLX's own launcher; the scripts they run
are in tests/distributed/. Starting a process costs ~3 s (importing mlx-lm), so
the checks of one launch share it.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
SCRIPTS = HERE / "distributed"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TOLERANCE = 1e-4

sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(HERE))
from model_dir import make_model_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python")


def free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on starting port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on loopback")


def launch(*command: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``command`` in 2 processes with the ring backend over loopback; fail with their output."""
    args = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--",
            sys.executable, *command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


# -- data-parallel collection -----------------------------------------------------------

def test_two_processes_collect_the_shards_one_process_writes_and_resume_a_stopped_run(tmp_path):
    from mlxterp.collect import iter_activation_shards, load_activations
    from mlxterp_repl.cli import main as mlxterp

    model = make_model_dir(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i} " + "w" * (i % 6) for i in range(25)) + "\n")
    options = ["--model", str(model), "--layers", "1,layers.0.mlp,-1", "--positions", "0,-1",
               "--batch-size", "3", "--shard-size", "6", "--no-progress"]
    assert mlxterp(["collect", str(prompts), *options, "--out", str(tmp_path / "alone")]) == 0

    # A stopped 2-process run: its run description and the one shard process 1 finished.
    stopped = tmp_path / "together"
    stopped.mkdir()
    shutil.copy(tmp_path / "alone" / "run.json", stopped / "run.json")
    shutil.copy(tmp_path / "alone" / "shard-00001.safetensors", stopped / "shard-00001.safetensors")
    finished_before = (stopped / "shard-00001.safetensors").stat().st_mtime_ns

    done = launch("-m", "mlxterp_repl.cli", "collect", str(prompts), *options, "--out", str(stopped))

    assert done.stdout.count("wrote activations of 25 prompts") == 1, done.stdout  # process 0 reports
    assert "2 processes" in done.stdout
    assert (stopped / "shard-00001.safetensors").stat().st_mtime_ns == finished_before  # skipped, not redone
    assert sorted(p.name for p in stopped.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in range(5)]
    alone, together = load_activations(tmp_path / "alone"), load_activations(stopped)
    assert sorted(together) == ["layer_1", "layer_3", "layers.0.mlp"]
    for key in alone:
        assert together[key].shape == (25, 2, 32)
        assert np.array_equal(np.array(alone[key]), np.array(together[key])), key
    indices = [int(i) for shard in iter_activation_shards(stopped, keys=["layer_1"]) for i in shard["index"].tolist()]
    assert indices == list(range(25))


def test_resuming_with_other_arguments_is_refused(tmp_path):
    from mlxterp import InterpretableModel, batch_get_activations
    from mlxterp.errors import InputError

    model = InterpretableModel(str(make_model_dir(tmp_path / "model")))
    prompts = [f"prompt {i}" for i in range(7)]
    out = batch_get_activations(model, prompts, [1], batch_size=2, shard_size=4, out=tmp_path / "acts")
    (out / "meta.json").unlink()
    with pytest.raises(InputError, match="did not finish"):
        from mlxterp.collect import load_activations
        load_activations(out)
    with pytest.raises(InputError, match="different run .*differs in layers"):
        batch_get_activations(model, prompts, [2], batch_size=2, shard_size=4, out=out)


# -- sharded models: pipeline (qwen2) and tensor (deepseek_v2) parallelism ---------------

@pytest.fixture(scope="module")
def sharded_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    launch(str(SCRIPTS / "trace_sharded.py"), str(out), timeout=120)
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def test_batch_get_activations_over_a_group_equals_one_process_on_every_process(sharded_reports):
    for rank in (0, 1):
        report = sharded_reports[f"collect-rank-{rank}"]
        assert report["keys"] == ["layer_1", "layers.2.mlp"]
        assert all(report["equal"].values()), report


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_split_model_traces_like_the_whole_model_on_every_process(sharded_reports, mode):
    for rank in (0, 1):
        report = sharded_reports[f"{mode}-rank-{rank}"]
        assert report["size"] == 2
        # Really split: a pipeline stage holds 2 of the 4 layers.
        assert report["local_layers"] == (2 if mode == "pipeline" else 4)
        assert report["n_layers"] == 4 and report["same_names"]
        if mode == "pipeline":  # types and parameter counts of the layers other processes hold
            assert report["same_layer_info"]
        assert report["mlp_names"] == [f"layers.{i}.mlp" for i in range(4)]
        assert "layers.0" in report["kept"] and "layers.2.mlp" in report["kept"]
        compared = report["diffs"]
        assert set(compared) >= {"layers.0", "layers.3", "layers.2.mlp", "layers.3.input", "logits",
                                 "logits with layers.1.mlp zeroed", "get_activations layer_0",
                                 "activation_patching"}
        bad = {k: v for k, v in compared.items() if isinstance(v, str) or not v <= TOLERANCE}
        assert not bad, f"{mode} rank {rank} differs from the whole model: {bad}"


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_a_stop_asked_on_one_process_stops_every_process_at_the_same_check_and_the_next_trace_works(
        sharded_reports, mode):
    reports = [sharded_reports[f"interrupt-{mode}-rank-{rank}"] for rank in (0, 1)]
    # Process 0's should_stop says stop at its 4th call; process 1's never does.
    expected = "stopped before the forward pass" if mode == "pipeline" else "stopped before model.model.layers.3"
    for report in reports:
        assert report["interrupted"] == expected, report
        assert report["checks"] == 4, report  # no process went past the check where they agreed to stop
        assert report["after_differs_by"] == 0.0, report


# -- the daemon over a sharded model --------------------------------------------------------

QUERIES = [
    'prompt "Hello world"',
    "save layers.0 @ -1",
    "save layers.3.mlp @ [0, -1] as $m",
    "with layers.1 zero: save output @ -1",
    "lens @ -1 top 3",
    "save layers.9",
]


def result_frames(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "result"]


def first_array(result: dict):
    """The first array of a save result: a numpy array in-process, the wire form from a raw connection."""
    from mlxterp_repl import protocol as p

    data = result["arrays"][0]["array"]
    return data if isinstance(data, np.ndarray) else p.decode_array(data)


@contextlib.contextmanager
def pipeline_split_daemon(tmp_path, model_dir):
    """A daemon over ``model_dir`` split over 2 processes; yields (its socket path, its mlx.launch process)."""
    from daemon_support import daemon_env
    from mlxterp_repl import paths as daemon_files

    runtime = tmp_path / "rt"
    files = daemon_files.daemon_paths(runtime)
    daemon_files.prepare(files)
    args = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--",
            sys.executable, "-m", "mlxterp_repl.daemon", "--runtime-dir", str(runtime), "--model", str(model_dir),
            "--shard", "pipeline"]
    env = {**daemon_env(runtime), "PYTHONPATH": str(HERE.parent)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=HERE.parent)
    try:
        deadline = time.monotonic() + 60
        while not files.socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        yield files.socket, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_daemon_over_a_pipeline_split_model_answers_like_one_process(tmp_path):
    from daemon_support import RawConnection
    from mlxterp import InterpretableModel
    from mlxterp_repl.dsl import QueryError, Session

    model_dir = make_model_dir(tmp_path / "model")
    with pipeline_split_daemon(tmp_path, model_dir) as (socket_path, proc):
        conn = RawConnection(socket_path)
        conn.hello()
        answers = []
        for code in QUERIES:
            frames = conn.request("exec", code=code, full=True)
            answers.append([f for f in frames if f["type"] in ("result", "error")])
        other = RawConnection(socket_path)  # a second client has its own session, also mirrored
        other.hello()
        second = [f for f in other.request("exec", code='save layers.2 @ 0 in "abc"', full=True)
                  if f["type"] == "result"]
        assert conn.request("shutdown")[-1]["status"] == "ok"
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()

    alone = Session(InterpretableModel(str(model_dir)))
    expected = []
    for code in QUERIES:
        try:
            expected.append(alone.execute(code)[0].to_data())
        except QueryError as exc:
            expected.append(exc.message)
    saves = [1, 2, 3]
    for i in saves:
        got = answers[i][0]["result"]
        assert got["kind"] == "save"
        assert np.allclose(first_array(got), first_array(expected[i]), atol=TOLERANCE), QUERIES[i]
    from mlxterp_repl import protocol as p

    lens_ids = p.decode_array(answers[4][0]["result"]["ids"])  # layer x position x top-k token ids
    assert lens_ids.tolist() == np.asarray(expected[4]["ids"]).tolist()
    assert answers[5][0]["type"] == "error" and "out of range" in answers[5][0]["error"]["message"]
    assert "out of range" in expected[5]
    assert np.allclose(first_array(second[0]["result"]),
                       first_array(alone.execute('save layers.2 @ 0 in "abc"')[0].to_data()), atol=TOLERANCE)


def test_interrupting_a_query_on_a_split_model_stops_every_process_and_the_next_query_answers_the_same(tmp_path):
    from daemon_support import RawConnection

    statement = 'save layers.3 @ -1 in "Hello world"'
    n_statements = 5000  # minutes of forward passes if it ran to the end
    with pipeline_split_daemon(tmp_path, make_model_dir(tmp_path / "model")) as (socket_path, proc):
        conn = RawConnection(socket_path)
        conn.hello()
        before = first_array(result_frames(conn.request("exec", code=statement, full=True))[0]["result"])
        conn.send({"op": "exec", "id": "long", "code": "\n".join([statement] * n_statements)})
        progress = 0
        while progress < 20:  # the query is running on both processes
            frame = conn.receive()
            progress += frame["id"] == "long" and frame["type"] == "progress"
        sent = time.perf_counter()
        conn.send({"op": "interrupt", "id": "stop-it", "target": "long"})
        done = {}
        while len(done) < 2:
            frame = conn.receive()
            progress += frame["id"] == "long" and frame["type"] == "progress"
            if frame["type"] == "done":
                done[frame["id"]] = frame
                if frame["id"] == "long":
                    latency = time.perf_counter() - sent
        assert done["stop-it"]["value"] == {"interrupted": True}
        assert done["long"]["status"] == "interrupted", done
        assert latency < 2.0, latency
        assert progress < n_statements / 2  # stopped, not run to the end
        print(f"interrupt latency on the split daemon: {latency * 1000:.0f} ms (after {progress} statements)")
        after = conn.request("exec", code=statement, full=True)  # both processes are still in step
        assert after[-1]["status"] == "ok", after
        assert np.array_equal(first_array(result_frames(after)[0]["result"]), before)
        assert conn.request("shutdown")[-1]["status"] == "ok"
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
