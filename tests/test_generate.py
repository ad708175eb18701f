"""Generation with interventions and per-step capture (mlxterp.generate) on the demo model."""

import mlx.core as mx
import numpy as np
import pytest

from architectures import ARCHITECTURES

from mlxterp import interventions as iv
from mlxterp.errors import InputError
from mlxterp.generate import Generation
from mlxterp.results import result_from_data

PROMPT = "The capital of France is"


def last_residual(model, prompt, layer):
    with model.trace(prompt):
        hidden = model.layers[layer].output.save()
    return hidden[0, -1]


def test_greedy_generation_matches_mlx_lm(demo_model):
    from mlx_lm.generate import generate_step

    ours = demo_model.generate(PROMPT, 6, stop_at_eos=False)
    prompt = mx.array(demo_model.encode(PROMPT))
    theirs = [int(token) for token, _ in generate_step(prompt, demo_model.model, max_tokens=6)]
    assert ours.tokens == theirs
    assert ours.text.startswith(" Paris")


def test_steering_vector_from_two_prompts_changes_the_capital(demo_model):
    # Germany minus France at the last position of layer 10, added at every step.
    vector = last_residual(demo_model, "The capital of Germany is", 10) - last_residual(demo_model, PROMPT, 10)
    steered = demo_model.generate(PROMPT, 3, interventions={"layers.10": iv.add_vector(vector)})
    assert steered.text.startswith(" Berlin"), steered.text
    assert steered.intervened == ["layers.10"]
    plain = demo_model.generate(PROMPT, 3)
    assert plain.text.startswith(" Paris")


def test_interventions_only_at_chosen_steps(demo_model):
    vector = last_residual(demo_model, "The capital of Germany is", 10) - last_residual(demo_model, PROMPT, 10)
    later = demo_model.generate(PROMPT, 3, interventions={"layers.10": iv.add_vector(vector)}, steps=[1, 2],
                                capture="layers.10")
    assert later.text.startswith(" Paris")  # step 0 (the prompt pass) was not steered
    plain = demo_model.generate(PROMPT, 3, capture="layers.10")
    # Step 0 equals the plain run; step 1 differs by the vector exactly (it is added to the output).
    np.testing.assert_allclose(later.activations["layers.10"][0], plain.activations["layers.10"][0], atol=1e-6)
    np.testing.assert_allclose(later.activations["layers.10"][1] - plain.activations["layers.10"][1],
                               np.array(vector)[None, None], atol=1e-4)


def test_capture_per_step_matches_a_trace_of_the_whole_text(demo_model):
    result = demo_model.generate(PROMPT, 4, capture=["layers.3", "output"], stop_at_eos=False)
    n_prompt = len(demo_model.encode(PROMPT))
    shapes = [a.shape for a in result.activations["layers.3"]]
    assert shapes[0] == (1, n_prompt, demo_model.hidden_size)
    assert all(s == (1, 1, demo_model.hidden_size) for s in shapes[1:]) and len(shapes) == 4
    # With the cache, step i's new position equals a full pass over prompt + generated tokens.
    ids = demo_model.encode(PROMPT) + result.tokens[:-1]
    with demo_model.trace([ids]):
        full = demo_model.layers[3].output.save()
    # float32 rounding only: a one-token step and a full pass sum in different orders (on the GPU,
    # 2.4e-4 apart at values near 680).
    np.testing.assert_allclose(result.stacked("layers.3"), np.array(full), rtol=1e-5, atol=1e-4)
    logits = result.activations["output"]
    assert [int(np.argmax(step[0, -1])) for step in logits] == result.tokens


def test_streaming_and_stopping(demo_model):
    seen = []
    result = demo_model.generate(PROMPT, 10, on_token=lambda step: seen.append((step.step, step.text)),
                                 should_stop=lambda: len(seen) >= 2, stop_at_eos=False)
    assert [s for s, _ in seen] == [0, 1]
    assert result.interrupted and result.stopped == "interrupted" and len(result.tokens) == 2
    assert "".join(t for _, t in seen) == result.text
    stream = demo_model.stream_generate(PROMPT, 3, stop_at_eos=False)
    first = next(stream)
    assert first.step == 0 and first.text == " Paris"


def test_sampling_with_a_seed_is_repeatable(demo_model):
    a = demo_model.generate(PROMPT, 6, temperature=1.5, seed=3, stop_at_eos=False)
    b = demo_model.generate(PROMPT, 6, temperature=1.5, seed=3, stop_at_eos=False)
    assert a.tokens == b.tokens and a.temperature == 1.5


def test_result_round_trips_and_draws(demo_model):
    result = demo_model.generate(PROMPT, 3, capture="layers.0")
    assert isinstance(result, Generation)
    again = result_from_data(result.to_data())
    assert again == result and again.text == result.text
    text = result.to_data(text=True)["text"]
    assert "Paris" in text and "layers.0" in text


@pytest.mark.parametrize("arguments, message", [
    (dict(prompt="", max_tokens=3), "empty"),
    (dict(prompt=PROMPT, max_tokens=0), "max_tokens"),
    (dict(prompt=PROMPT, max_tokens=3, temperature=-1), "temperature"),
    (dict(prompt=PROMPT, max_tokens=3, steps=[-1]), "steps"),
    (dict(prompt=PROMPT, max_tokens=3, interventions={"layers.0": 3}), "not a function"),
])
def test_bad_arguments_are_named(demo_model, arguments, message):
    with pytest.raises(InputError, match=message):
        demo_model.generate(**arguments)


def test_unknown_capture_name_is_named(demo_model):
    with pytest.raises(Exception, match="layer 99 is out of range"):
        demo_model.generate(PROMPT, 2, capture="layers.99")


# ---- the query language, through a real daemon ------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from daemon_support import start_daemon

    running = start_daemon(tmp_path_factory.mktemp("rt"))
    yield running
    running.stop()


def test_generate_streams_tokens_and_steering_changes_them(daemon):
    from mlxterp_repl import protocol as p

    raw = daemon.raw()
    raw.hello()
    frames = raw.request("exec", code='prompt "The capital of France is"\ngenerate 20 ignore_eos')
    assert frames[-1]["status"] == "ok", frames[-1]
    out = [f["text"] for f in frames if f["type"] == p.OUT]
    (result,) = [f["result"] for f in frames if f["type"] == p.RESULT and f["result"]["kind"] == "generation"]
    assert len(result["tokens"]) == 20
    assert out[0] == "The capital of France is" and "".join(out[1:]).strip() == "".join(result["token_texts"]).strip()
    assert any(f["type"] == p.PROGRESS and f.get("stage") == "generate" for f in frames)
    steered = raw.request("exec", code=(
        'save layers.10 @ -1 in "The capital of Germany is" as $de\nsave layers.10 @ -1 as $fr\n'
        "let $v = $de - $fr\nwith layers.10 add $v: generate 3"))
    (result,) = [f["result"] for f in steered if f["type"] == p.RESULT and f["result"]["kind"] == "generation"]
    assert "".join(result["token_texts"]).startswith(" Berlin")
    raw.close()


def test_interrupt_stops_generation_between_tokens(daemon):
    from mlxterp_repl import protocol as p

    raw = daemon.raw()
    raw.hello()
    raw.send({"op": "exec", "id": "gen", "code": 'generate 240 ignore_eos in "The capital of France is"'})
    while True:  # wait for the first streamed token, then interrupt
        frame = raw.receive()
        if frame.get("id") == "gen" and frame["type"] == p.OUT and frame["text"] != "The capital of France is":
            break
    raw.send({"op": "interrupt", "id": "stop", "target": "gen"})
    frames = raw.until_done("gen")
    assert frames[-1]["status"] == "interrupted", frames[-1]
    tokens = [f for f in frames if f["type"] == p.OUT]
    assert len(tokens) < 200  # it stopped mid-way
    (error,) = [f["error"] for f in frames if f["type"] == p.ERROR]
    assert "stopped after" in error["message"] and "of 240 tokens" in error["message"]
    # A generation that runs to its end is not reported interrupted.
    done = raw.request("exec", code='generate 2 in "The capital of France is"')
    assert done[-1]["status"] == "ok"
    raw.close()


def test_hook_points_are_captured_and_intervened_on_per_step(demo_model):
    result = demo_model.generate(PROMPT, 3, capture=["layers.2.attn.z", "layers.2.resid_pre"], stop_at_eos=False,
                                 interventions={"layers.5.attn.z.head[1]": iv.zero_out})
    assert [a.shape for a in result.activations["layers.2.attn.z"]][1:] == [(1, 1, 4, 32)] * 2
    ids = demo_model.encode(PROMPT) + result.tokens[:-1]
    with demo_model.trace([ids], interventions={"layers.5.attn.z.head[1]": iv.zero_out}) as tr:
        z = tr.activations["layers.2.attn.z"]
        logits = demo_model.output.save()
    np.testing.assert_allclose(result.stacked("layers.2.attn.z"), np.array(z), atol=1e-4)
    assert [int(t) for t in np.argmax(np.array(logits[0, len(demo_model.encode(PROMPT)) - 1:]), -1)] == result.tokens
    with pytest.raises(Exception, match="cannot be captured during generation"):
        demo_model.generate(PROMPT, 2, capture="layers.2.attn.pattern")


# ---- the architecture battery ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_with_the_cache_equals_full_passes_on_every_architecture(arch):
    """With mlx-lm's prompt cache (KV, rotating, recurrent: make_prompt_cache picks) and an intervention
    at every step, each step equals a full forward pass over the text so far, and so do the captures."""
    from architectures import tiny_model
    from mlxterp import InterpretableModel

    model = InterpretableModel(tiny_model(arch))
    ids = [1, 5, 9, 14, 3, 7]
    steer = {"layers.0": iv.add_vector(mx.ones((model.hidden_size,)) * 0.5)}
    result = model.generate(ids, 4, interventions=steer, capture="layers.1", stop_at_eos=False)
    with model.trace([ids + result.tokens[:-1]], interventions=steer):
        logits = model.output.save()
        hidden = model.layers[1].output.save()
    expected = np.argmax(np.array(logits[0, len(ids) - 1:].astype(mx.float32)), axis=-1).tolist()
    assert result.tokens == expected
    np.testing.assert_allclose(result.stacked("layers.1"), np.array(hidden.astype(mx.float32)), atol=1e-4)
