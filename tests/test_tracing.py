"""The tracing core: inputs, names, saving, capture control, errors, gradients."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_llama
from mlxterp import InterpretableModel
from mlxterp.errors import InputError, Interrupted, LayerIndexError, TraceError, UnknownModuleError


class Blocks(nn.Module):
    def __init__(self, n=3, dim=8):
        super().__init__()
        self.blocks = [nn.Linear(dim, dim) for _ in range(n)]

    def __call__(self, x):
        for block in self.blocks:
            x = nn.relu(block(x))
        return x


class Transformer(nn.Module):
    """GPT-2-like nesting: transformer.h"""

    def __init__(self):
        super().__init__()
        self.transformer = Blocks()
        self.transformer.h = self.transformer.blocks

    def __call__(self, x):
        return self.transformer(x)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = Blocks(n=5)

    def __call__(self, x):
        return self.transformer(x)


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: np.array(v) for k, v in model.parameters().items()}


def test_common_layouts_found_without_layer_attr(llama_base):
    assert InterpretableModel(llama_base).names.layers_prefix == "model.model.layers"
    assert InterpretableModel(Transformer()).names.layers_prefix in ("model.transformer.h", "model.transformer.blocks")
    assert len(InterpretableModel(Blocks(n=4)).layers) == 4


def test_layer_attr_takes_dotted_paths():
    model = InterpretableModel(Nested(), layer_attr="transformer.blocks")
    assert len(model.layers) == 5
    x = mx.ones((1, 2, 8))
    with model.trace(x):
        out = model.layers[4].output.save()
    assert mx.array_equal(nn.relu(out), model.model(x))


def test_traced_logits_equal_plain_forward(llama_base):
    model = InterpretableModel(llama_base)
    ids = mx.array([[1, 5, 9, 2]])
    with model.trace(ids):
        logits = model.output.save()
    assert mx.array_equal(logits, llama_base(ids))


def test_every_module_output_is_in_activations_under_full_names(llama_base):
    model = InterpretableModel(llama_base)
    with model.trace([3, 4, 5]) as trace:
        names = set(trace.activations)
        q = trace.activations["model.model.layers.2.self_attn.q_proj"]
    assert "model.model.layers.3" in names and "model.model.layers.0.mlp.gate_proj" in names
    assert "model.model.embed_tokens" in names and "output" in names
    assert q.shape == (1, 3, 64)


def test_short_full_alias_and_negative_names_give_the_same_array(llama_base):
    model = InterpretableModel(llama_base)
    with model.trace([1, 2, 3]) as trace:
        by_proxy = model.layers[-1].attn.output.save()
        by_short = trace.activations["layers.3.attn"]
        by_full = trace.activations["model.model.layers.3.self_attn"]
        by_negative = trace.activations["layers.-1.self_attn"]
        by_save = trace.save("layers.3.attn")  # trace.save takes the same name forms
        input_by_save = trace.save("layers.-1", "input")
        with pytest.raises(TraceError, match="'output' or 'input'"):
            trace.save("layers.3", "inputs")
    assert by_proxy is by_short is by_full is by_negative is by_save
    assert input_by_save is trace.inputs_by_module["model.model.layers.3"]
    with model.trace([1, 2, 3], capture=["layers.1"]) as trace:
        assert trace.save("layers.1") is trace.activations["model.model.layers.1"]


def test_saved_values_are_evaluated_arrays_and_unsaved_are_released(llama_base):
    model = InterpretableModel(llama_base)
    with model.trace([1, 2, 3], keep="saved") as trace:
        h = model.layers[1].output.save()
        nested = model.layers[3].self_attn.q_proj.output.save()
    assert isinstance(h, mx.array) and h.shape == (1, 3, 64)
    assert nested.shape == (1, 3, 64)
    assert set(trace.activations) == {"model.model.layers.1", "model.model.layers.3.self_attn.q_proj"}


def test_input_of_a_layer_is_the_previous_layers_output(llama_base):
    model = InterpretableModel(llama_base)
    with model.trace([1, 2, 3]):
        previous = model.layers[1].output.save()
        given = model.layers[2].input.save()
    assert mx.array_equal(previous, given)


def test_unknown_module_suggests_closest(llama_base):
    model = InterpretableModel(llama_base)
    with pytest.raises(UnknownModuleError) as err:
        model.resolve("layers.2.mpl")
    assert "layers.2.mlp" in err.value.suggestions
    with model.trace([1, 2]) as trace, pytest.raises(UnknownModuleError):
        trace.activations["layers.1.atn"]


def test_layer_index_out_of_range_names_the_valid_range(llama_base):
    model = InterpretableModel(llama_base)
    for bad in (lambda: model.layers[4], lambda: model.resolve("layers.7.mlp"), lambda: model.expand("layers.[0,9]")):
        with pytest.raises(LayerIndexError, match=r"0\.\.3"):
            bad()


def test_unknown_intervention_key_is_an_error_not_a_no_op(llama_base):
    model = InterpretableModel(llama_base)
    with pytest.raises(UnknownModuleError):
        with model.trace([1, 2], interventions={"layers.1.mlpp": lambda a: a * 0}):
            pass


def test_save_outside_a_trace_explains_itself(llama_base):
    model = InterpretableModel(llama_base)
    with pytest.raises(TraceError, match="inside `with model.trace"):
        model.layers[0].output.save()


def test_token_ids_outside_the_vocabulary_are_rejected_with_its_size(llama_base):
    model = InterpretableModel(llama_base)
    with pytest.raises(InputError, match="100 entries"):
        with model.trace([1, 100]):
            pass
    with pytest.raises(InputError):
        with model.trace(mx.array([[-1, 2]])):
            pass


def test_model_is_unchanged_after_a_trace_even_one_that_fails(llama_base):
    model = InterpretableModel(llama_base)
    before_types, before_params = snapshot(model)

    def broken(a):
        raise RuntimeError("boom")

    with model.trace([1, 2, 3], interventions={"layers.1": lambda a: a * 2}):
        model.output.save()
    with pytest.raises(RuntimeError):
        with model.trace([1, 2, 3], interventions={"layers.2.mlp": broken}):
            pass
    after_types, after_params = snapshot(model)
    assert before_types == after_types
    assert before_params.keys() == after_params.keys()
    assert all(np.array_equal(before_params[k], after_params[k]) for k in before_params)
    assert mx.array_equal(llama_base(mx.array([[1, 2, 3]])), model.model(mx.array([[1, 2, 3]])))


def test_parameters_are_the_real_arrays_inside_and_outside_a_trace(llama_base):
    model = InterpretableModel(llama_base)
    expected = sum(v.size for _, v in tree_flatten(llama_base.parameters()))
    assert sum(p.size for p in model.parameters().values()) == expected
    with model.trace([1, 2]):
        inside = model.parameters()
    assert inside["model.layers.0.mlp.gate_proj.weight"] is llama_base.model.layers[0].mlp.gate_proj.weight


def test_capture_restricts_what_is_recorded(llama_base):
    model = InterpretableModel(llama_base)
    with model.trace([1, 2, 3], capture=["layers.*.mlp"]) as trace:
        recorded = set(trace.activations)
        mlp = model.layers[2].mlp.output.save()
        with pytest.raises(TraceError, match="capture="):
            model.layers[2].attn.output.save()
    assert recorded == {f"model.model.layers.{i}.mlp" for i in range(4)} | {"output"}
    with model.trace([1, 2, 3]):
        full = model.layers[2].mlp.output.save()
    assert mx.array_equal(mlp, full)


def test_should_stop_interrupts_at_a_module_boundary(llama_base):
    model = InterpretableModel(llama_base)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Interrupted):
        with model.trace([1, 2, 3], should_stop=stop):
            pass
    with model.trace([1, 2, 3]):  # still usable
        assert model.output.save().shape == (1, 3, 100)


def test_float_input_to_a_non_language_model():
    model = InterpretableModel(Blocks(n=2))
    x = mx.random.normal((2, 3, 8))
    with model.trace(x):
        first = model.layers[0].output.save()
        out = model.output.save()
    assert first.shape == (2, 3, 8) and mx.array_equal(out, model.model(x))


def test_float_input_to_a_language_model_is_input_embeddings(llama_base):
    model = InterpretableModel(llama_base)
    ids = mx.array([[4, 8, 15]])
    embeddings = llama_base.model.embed_tokens(ids)
    with model.trace(embeddings):
        from_embeddings = model.output.save()
    assert mx.allclose(from_embeddings, llama_base(ids), atol=1e-5)
    with pytest.raises(InputError, match="input embeddings"):
        with model.trace(mx.zeros((1, 3, 7))):
            pass


def finite_difference(f, x, direction, eps=1e-3):
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("kind", ["float model", "language model embeddings"])
def test_gradient_through_a_trace_matches_finite_differences(kind):
    if kind == "float model":
        model = InterpretableModel(Blocks(n=3))
        x = mx.random.normal((1, 4, 8), key=mx.random.key(1))
    else:
        base = tiny_llama(n_layers=2, hidden=32)
        model = InterpretableModel(base)
        x = base.model.embed_tokens(mx.array([[3, 1, 4, 1]]))

    def loss(inputs):
        with model.trace(inputs):
            act = model.layers[1].output.save()
        return mx.sum(act * act) / act.size

    grad = mx.grad(loss)(x)
    direction = mx.random.normal(x.shape, key=mx.random.key(2))
    numeric = finite_difference(lambda v: loss(v).item(), x, direction)
    analytic = mx.sum(grad * direction).item()
    assert grad.shape == x.shape
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic))


def test_batch_of_prompts_equals_each_prompt_alone(demo_model):
    prompts = ["The capital of France is", "Hello world", "The Eiffel Tower is located in the city of"]
    with demo_model.trace(prompts) as trace:
        batched = demo_model.output.save()
        mid = demo_model.layers[8].output.save()
    assert trace.padding and max(trace.padding) > 0
    for row, prompt in enumerate(prompts):
        with demo_model.trace(prompt):
            alone = demo_model.output.save()
            alone_mid = demo_model.layers[8].output.save()
        n = alone.shape[1]
        assert mx.allclose(batched[row, -n:], alone[0], atol=1e-4)
        assert mx.allclose(mid[row, -n:], alone_mid[0], atol=1e-4)
        assert mx.allclose(batched[row, -1], alone[0, -1], atol=1e-4)  # position -1 is never padding


def test_token_list_and_arrays_trace_alike(demo_model):
    ids = demo_model.encode("The capital of France is")
    results = []
    for inputs in (ids, mx.array(ids), mx.array([ids]), "The capital of France is"):
        with demo_model.trace(inputs):
            results.append(demo_model.output.save())
    assert all(mx.array_equal(results[0], r) for r in results[1:])


def test_loads_a_local_mlx_lm_directory_like_demo(demo_model):
    from mlxterp.loading import DEMO_PATH

    local = InterpretableModel(str(DEMO_PATH))
    with local.trace("Hello world"):
        a = local.output.save()
    with demo_model.trace("Hello world"):
        b = demo_model.output.save()
    assert mx.array_equal(a, b)


def test_bad_model_source_says_what_is_accepted(tmp_path):
    from mlxterp.errors import MlxterpError

    with pytest.raises(MlxterpError, match="config.json"):
        InterpretableModel(str(tmp_path))
    with pytest.raises(MlxterpError, match="hub id"):
        InterpretableModel("./no/such/dir/here")


def test_input_of_a_module_called_by_keyword_is_recorded():
    from architectures import tiny_model

    model = InterpretableModel(tiny_model("gptj"))  # its blocks call self.attn(inputs=...)
    with model.trace([1, 2, 3]):
        given = model.layers[0].attn.input.save()
        normed = model.layers[0].ln_1.output.save()
    assert mx.array_equal(given, normed)


class Scale(nn.Module):
    """A one-argument module whose argument is called ``h``."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def __call__(self, h):
        return h * self.factor


class Named(nn.Module):
    """A one-argument module whose argument has a name the recording wrapper uses itself."""

    def __call__(self, name):
        return name + 1


class ByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [Scale(2.0), Scale(3.0)]
        self.extra = Named()

    def __call__(self, x):
        x = self.layers[0](h=x)  # by keyword: the recorded call must take the module's own argument name
        x = self.layers[1](x)
        return self.extra(name=x)


def test_one_argument_modules_are_recorded_called_by_position_or_keyword():
    base = ByKeyword()
    model = InterpretableModel(base)
    x = mx.array([[1.0, 2.0]])
    with model.trace(x, keep="all") as trace:
        first_in = model.layers[0].input.save()
        extra_in = trace.save("model.extra", "input")
    assert mx.array_equal(trace.activations["model.layers.0"], x * 2)
    assert mx.array_equal(first_in, x) and mx.array_equal(extra_in, x * 6)
    assert mx.array_equal(trace.activations["model.extra"], x * 6 + 1)
    assert mx.array_equal(trace.activations["output"], base(x))
    with model.trace(x, interventions={"layers.0": lambda a: a * 0}):  # the other way through the wrapper
        out = model.output.save()
    assert mx.array_equal(out, mx.ones_like(x))
    assert type(base.layers[0]) is Scale and type(base.extra) is Named  # classes put back


class Doubled(nn.Linear):
    """Calls its parent's __call__ through super(): one recorded call, not two."""

    def __call__(self, x):
        return super().__call__(x) * 2


class Inherits(nn.Linear):
    """No __call__ of its own."""


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = Doubled(4, 4)
        self.c = Inherits(4, 4)

    def __call__(self, x):
        return self.c(self.b(self.a(x)))


def own_calls(classes):
    return {cls: cls.__dict__.get("__call__", "inherited") for cls in classes}


def test_recorded_classes_keep_their_own_call_and_subclasses_record_once():
    base = Mixed()
    mx.eval(base.parameters())
    model = InterpretableModel(base)
    x = mx.ones((1, 4))
    classes = (nn.Linear, Doubled, Inherits, Mixed)
    before = own_calls(classes)
    outside = nn.Linear(4, 4)  # the same class, not in the model: called as usual during a trace
    seen = []

    def look(a):
        seen.append(outside(a))
        return a

    with model.trace(x, keep="all", interventions={"a": look}) as trace:
        b_input = trace.save("b", "input")
    a = base.a(x)
    b = (a @ base.b.weight.T + base.b.bias) * 2
    assert mx.allclose(trace.activations["a"], a) and mx.allclose(trace.activations["b"], b)
    assert mx.allclose(trace.activations["c"], base.c(b)) and mx.allclose(trace.activations["output"], base(x))
    assert mx.allclose(b_input, a)
    assert not model.repeated_calls  # Doubled's super().__call__ went to Linear's own, unrecorded
    assert len(seen) == 1 and mx.allclose(seen[0], outside(a))
    assert "a" in trace.activations and len(trace.activations) == 4  # a, b, c and the output: not `outside`
    assert own_calls(classes) == before and "__call__" not in Inherits.__dict__

    def broken(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with model.trace(x, interventions={"b": broken}):
            pass
    with pytest.raises(Interrupted):
        with model.trace(x, should_stop=lambda: True):
            pass
    assert own_calls(classes) == before and "__call__" not in Inherits.__dict__


AUDITED_TRACE = """
import sys
from collections import Counter
sys.path.insert(0, "tests")
from conftest import tiny_llama
from mlxterp import InterpretableModel
model = InterpretableModel(tiny_llama())
with model.trace([1, 2, 3], keep="all"):
    pass
events = Counter()
sys.addaudithook(lambda event, args: events.update([event]))
with model.trace([1, 2, 3], keep="all") as trace:
    pass
print(len(trace.activations), sum(events.values()), dict(events))
"""


def test_a_trace_raises_no_audit_event_per_module():
    # An audit hook (filelock, imported with mlx-lm, installs one on Python 3.12+) runs Python on every
    # audited event: id() and __class__ assignment are audited, so a trace makes neither per module.
    done = subprocess.run([sys.executable, "-c", AUDITED_TRACE], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    recorded, n_events, events = done.stdout.split(" ", 2)
    assert int(recorded) > 50 and int(n_events) <= 10, done.stdout
