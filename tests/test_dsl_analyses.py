"""The tuned lens, sparse autoencoders, head scores and causal tracing in the query language:
`lens tuned DIR`, `sae load DIR`, `features PATH`, the feature interventions `ablate`, `amplify`
and `inject`, `heads`, `causal`. Each statement runs on the demo model through a real Session
and gives what the library call gives; `heads` and `features` also through a real daemon,
drawn by the REPL; every result kind rebuilds from its data in a process without mlx.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

from mlxterp.results import RESULT_MODULES, result_from_data
from mlxterp_repl.dsl.errors import QueryError
from mlxterp_repl.dsl.evaluator import Session, TraceCache

PROMPT = "The capital of France is"
TEXTS = ["The capital of France is Paris.", "The capital of Japan is Tokyo.", "People in Spain speak Spanish.",
         "The currency of Japan is the yen.", "Berlin is the capital of Germany.", "The capital of Peru is Lima."]


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_model):
    """A tuned lens with random translators and an SAE of layers.8 trained for a few steps, saved."""
    from mlxterp.sae import train_sae
    from mlxterp.training import collect_tokens
    from mlxterp.tuned_lens import TunedLens

    root = tmp_path_factory.mktemp("analyses")
    lens = TunedLens.for_model(demo_model)
    lens.weight = 0.05 * mx.random.normal(lens.weight.shape, key=mx.random.key(1))
    lens.bias = 0.1 * mx.random.normal(lens.bias.shape, key=mx.random.key(2))
    lens.save(root / "lens")
    acts = collect_tokens(demo_model, TEXTS, [8], progress=False)
    sae = train_sae(acts, key="layer_8", n_features=64, k=4, steps=20, batch_size=32, progress=False)
    sae.save(root / "sae")
    return root


@pytest.fixture
def session(demo_model, files):
    session = Session(demo_model, workdir=files)
    session.execute(f'prompt "{PROMPT}"')
    return session


def only(session, text, **options):
    (result,) = session.execute(text, **options)
    return result


def same_arrays(a, b) -> bool:
    return a.shape == b.shape and np.allclose(a, b, atol=1e-5)


# ---- tuned lens --------------------------------------------------------------------------------


def test_lens_tuned_decodes_through_the_saved_translators(session, demo_model, files):
    from mlxterp.tuned_lens import TunedLens

    result = only(session, "lens tuned lens @ -1 top 3 layers 0..5")
    library = demo_model.logit_lens(PROMPT, layers=range(6), top_k=3, position=-1, lens="tuned",
                                    translators=TunedLens.load(files / "lens"))
    plain = only(session, "lens @ -1 top 3 layers 0..5")
    assert np.array_equal(result.ids, library.ids)
    assert not np.array_equal(result.ids, plain.ids)  # the translators changed what layers decode to
    assert "tuned lens: lens" in result.notes
    assert list(session.tuned_lenses) == [str(files / "lens")]
    only(session, 'lens tuned "lens" @ -1')  # the same directory: not loaded again
    assert len(session.tuned_lenses) == 1


def test_lens_tuned_demo_is_the_bundled_lens_and_beats_the_logit_lens_on_its_answer(session, demo_model):
    tuned = only(session, "lens tuned demo @ -1 top 1 layers 9..11")
    plain = only(session, "lens @ -1 top 1 layers 9..11")
    paris = demo_model.encode(" Paris")[-1]
    # the bundled lens reads " Paris" from layer 9 on; the logit lens only from layer 12 (README)
    assert all(tuned.ids[i][0][0] == paris for i in range(3))
    assert not any(plain.ids[i][0][0] == paris for i in range(3))


def test_lens_tuned_on_a_directory_without_a_lens_says_what_is_missing(session):
    with pytest.raises(QueryError) as error:
        session.execute("lens tuned nowhere @ -1")
    assert "not a saved tuned lens" in error.value.message and error.value.suggestions == ["demo"]
    assert (error.value.span.col, error.value.span.end_col) == (12, 19)


# ---- sparse autoencoders -----------------------------------------------------------------------


def test_features_are_the_librarys_active_features(session, demo_model, files):
    from mlxterp.sae import active_features, load_sae

    loaded = only(session, "sae load sae")
    assert loaded.kind == "sae" and loaded.rows == [["layers.8", "topk", 64, 4, "sae"]]
    result = only(session, 'features layers.8 @ "France" top 5')
    library = active_features(demo_model, load_sae(files / "sae"), PROMPT, position=4, top=5)
    assert result.kind == "active_features"
    assert (result.features, result.position) == (library.features, 4)
    assert np.allclose(result.activations, library.activations)
    assert only(session, "features layers.8").position == len(demo_model.encode(PROMPT)) - 1  # default @ -1


@pytest.mark.parametrize("written, call", [("ablate {f}", lambda sae, f: sae.ablate(f)),
                                           ("amplify {f} 3", lambda sae, f: sae.scale(f, 3.0)),
                                           ("inject {f} -2.5", lambda sae, f: sae.steer(f, -2.5))])
def test_feature_interventions_are_the_saes_own(session, demo_model, files, written, call):
    from mlxterp.sae import load_sae

    sae = load_sae(files / "sae")
    session.execute("sae load sae")
    feature = only(session, "features layers.8 @ -1 top 1").features[0]
    result = only(session, f"with layers.8 {written.format(f=feature)}: save output @ -1")
    with demo_model.trace(PROMPT, interventions={"layers.8": call(sae, feature)}) as tr:
        expected = np.array(tr.save("output")[0, -1].astype(mx.float32))
    plain = only(session, "save output @ -1").arrays[0][1]
    assert same_arrays(result.arrays[0][1], expected)
    assert not same_arrays(result.arrays[0][1], plain)


def test_ablating_a_feature_removes_it_from_the_features_read_under_with(session):
    session.execute("sae load demo")
    top = only(session, "features layers.8 @ -1 top 3").features[0]
    after = only(session, f"with layers.8 ablate {top}: features layers.8 @ -1 top 3")
    assert top not in after.features
    assert any("ablate" in note for note in after.notes)


def test_the_trace_cache_tells_two_saes_of_one_module_apart(session):
    cache = TraceCache()
    query = "with layers.8 inject 3 8: save output @ -1"
    session.execute("sae load sae")
    first = only(session, query, trace_cache=cache).arrays[0][1]
    session.execute("sae load demo")  # another SAE for layers.8: feature 3 is another direction
    second = only(session, query, trace_cache=cache).arrays[0][1]
    assert not same_arrays(first, second)


def test_sae_errors_name_what_is_wrong_and_what_is_valid(session, files):
    with pytest.raises(QueryError) as error:
        session.execute("features layers.8")
    assert "no SAE is loaded for layers.8" in error.value.message and error.value.suggestions == ["sae load demo"]
    session.execute("sae load sae")
    with pytest.raises(QueryError) as error:
        session.execute("with layers.8 ablate 64: lens @ -1")
    assert "features 0..63" in error.value.message
    with pytest.raises(QueryError) as error:
        session.execute("with layers.8 ablate 1.5: lens @ -1")
    assert "whole number" in error.value.message
    with pytest.raises(QueryError) as error:
        session.execute("features layers.7 @ -1")
    assert "no SAE is loaded for layers.7" in error.value.message and error.value.suggestions == ["layers.8"]
    with pytest.raises(QueryError) as error:
        session.execute("features layers.8 @ 1:3")
    assert "one position" in error.value.message
    with pytest.raises(QueryError) as error:
        session.execute("sae load nowhere")
    assert "not a saved SAE" in error.value.message
    listed = only(session, "sae")
    assert [row[0] for row in listed.rows] == ["layers.8"]


def test_an_sae_for_a_module_of_another_width_is_refused(session, files):
    from mlxterp.sae import load_sae

    sae = load_sae(files / "sae")
    sae.module = "layers.8.mlp.gate_proj"  # the MLP's intermediate width; the SAE reads the hidden size
    sae.save(files / "sae-elsewhere")
    width = only(session, "save layers.8.mlp.gate_proj @ -1").arrays[0][1].shape[-1]
    assert width != 128
    with pytest.raises(QueryError) as error:
        session.execute("sae load sae-elsewhere")
    assert error.value.message == f"this SAE reads activations of width 128; layers.8.mlp.gate_proj outputs width {width}"


# ---- heads and causal tracing --------------------------------------------------------------------


def test_heads_gives_the_librarys_head_scores(session, demo_model, files):
    from mlxterp.heads import head_scores

    result = only(session, "heads induction layers 0..2 plot to heads.png")
    library = head_scores(demo_model, "induction", layers=[0, 1, 2])
    assert result.kinds == ["induction"] and result.layers == [0, 1, 2]
    assert same_arrays(result.scores["induction"], library.scores["induction"])
    assert result.plot == str(files / "heads.png") and (files / "heads.png").stat().st_size > 1000
    previous = only(session, f'heads previous in "{PROMPT}" layers 0')
    assert same_arrays(previous.scores["previous_token"],
                       head_scores(demo_model, "previous", text=PROMPT, layers=[0]).scores["previous_token"])
    assert only(session, "heads first layers 1").kinds == ["first_token"]
    assert only(session, "heads layers 1").kinds == ["previous_token", "first_token", "induction"]


def test_heads_finds_the_induction_head_of_the_induction_model():
    from mlxterp.heads import induction_model

    session = Session(induction_model())
    result = only(session, "heads induction")
    assert result.top("induction", 1)[0][:2] == (1, 0) and result.score("induction", 1, 0) > 0.5


def test_causal_singles_out_the_subjects_last_token_and_is_the_librarys_trace(session, demo_model, files):
    from mlxterp.causal_tracing import causal_trace

    result = only(session, 'causal subject "France" answer " Paris" plot to trace.png')
    library = causal_trace(demo_model, PROMPT, "France", " Paris")
    assert result.kinds == ["residual", "mlp", "attn"] and result.answer == " Paris"
    for kind in result.kinds:
        assert same_arrays(result.probabilities[kind], library.probabilities[kind])
    early = result.probabilities["residual"][:8]  # layers 0..7: restoring ' France' (position 4) helps most
    assert int(np.argmax(early.max(axis=0))) == 4 and early.max() > result.corrupted_probability + 0.3
    assert (files / "trace.png").stat().st_size > 1000
    other = only(session, 'causal "The capital of Japan is" subject "Japan" layers 4..6')
    assert other.layers == [4, 5, 6] and other.answer == " Tokyo"  # default answer: the clean top token


def test_causal_errors_point_at_the_subject_or_the_answer(session):
    with pytest.raises(QueryError) as error:
        session.execute('causal subject "Franc"')
    assert "spells the subject" in error.value.message and (error.value.span.col, error.value.span.end_col) == (16, 23)
    assert "4:' France'" in error.value.suggestions
    with pytest.raises(QueryError) as error:
        session.execute('causal subject "France" answer " Paris is"')
    assert error.value.span.col == 32


# ---- results in any client ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_kind(demo_model, files):
    """One result of each kind the new statements give, and the library's own lens-and-SAE results."""
    from mlxterp.lens_sae_results import FeatureExample, FeatureExamples, LensComparison, SAEMetrics

    session = Session(demo_model, workdir=files)
    session.execute(f'prompt "{PROMPT}"\nsae load demo')
    results = [only(session, q) for q in ("features layers.8 @ -1 top 4", "heads layers 0..1",
                                          'causal subject "France" layers 7..8', "sae")]
    results += [LensComparison([0, 1], [1.5, 0.2], [0.4, 0.1], 10),
                SAEMetrics(0.99, 16.0, 3, 512, 100, 1.2, 1.3, 7.5, 0.98),
                FeatureExamples("layers.8", {3: [FeatureExample(2.5, 0, 4, [" of"], " France", [" is"])]}, 50)]
    return results


def test_every_result_rebuilds_from_its_data_and_draws_the_same(every_kind):
    for result in every_kind:
        data = result.to_data(text=True)
        rebuilt = result_from_data(data)
        assert type(rebuilt) is type(result) and rebuilt == result, result.kind
        assert rebuilt.to_data(text=True)["text"] == data["text"]


def test_a_process_without_mlx_rebuilds_and_draws_every_kind(every_kind, tmp_path):
    datas = [r.to_data() for r in every_kind]
    (tmp_path / "data.pickle").write_bytes(pickle.dumps(datas))
    program = textwrap.dedent(f"""
        import pickle, sys
        from rich.console import Console
        from mlxterp.results import result_from_data
        datas = pickle.loads(open({str(tmp_path / "data.pickle")!r}, "rb").read())
        console = Console(file=open("/dev/null", "w"), width=100)
        for data in datas:
            result = result_from_data(data)
            assert type(result).__name__ != "TableResult" or data["kind"] == "sae", data["kind"]
            console.print(result)
            print(data["kind"], type(result).__name__, result.summary(60))
        assert "mlx" not in sys.modules and "mlx.core" not in sys.modules, sorted(m for m in sys.modules if "mlx" in m)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kinds = [line.split()[0] for line in done.stdout.splitlines()]
    assert kinds == [r.kind for r in every_kind]
    assert "ActiveFeatures" in done.stdout and "CausalTrace" in done.stdout and "HeadScores" in done.stdout


def test_every_kind_of_the_analyses_modules_has_its_module_named_and_none_imports_mlx():
    import mlxterp.attribution  # noqa: F401
    import mlxterp.causal_tracing  # noqa: F401
    import mlxterp.generate  # noqa: F401
    import mlxterp.heads  # noqa: F401
    import mlxterp.sae  # noqa: F401
    import mlxterp.tuned_lens  # noqa: F401
    from mlxterp.results import BY_KIND

    # every result kind defined outside mlxterp.results is named there, so any client rebuilds it
    defined = {kind: cls.__module__ for kind, cls in BY_KIND.items() if cls.__module__ != "mlxterp.results"}
    assert {kind: RESULT_MODULES.get(kind) for kind in defined} == defined
    assert all(BY_KIND[kind].__module__ == module for kind, module in RESULT_MODULES.items())
    program = "import sys\n" + "".join(f"import {m}\n" for m in sorted(set(RESULT_MODULES.values()))) + \
              "assert 'mlx' not in sys.modules, sorted(m for m in sys.modules if m.startswith('mlx.'))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- through a real daemon, drawn by the REPL ------------------------------------------------------


@pytest.mark.slow
def test_heads_and_features_through_a_daemon_drawn_by_the_repl(tmp_path, demo_model):
    from daemon_support import start_daemon
    from mlxterp.heads import head_scores
    from mlxterp.sae import active_features, load_sae
    from mlxterp_repl.client import connect
    from mlxterp_repl.repl import QueryHistory, Repl
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    daemon = start_daemon(tmp_path / "rt")
    try:
        with connect(runtime_dir=daemon.files.runtime_dir, autostart=False) as client:
            heads, _, features = client.exec(f'heads induction layers 0..1\nsae load demo\n'
                                              f'features layers.8 @ -1 top 5 in "{PROMPT}"', text=True)
            console = Console(file=io.StringIO(), width=100, highlight=False)
            with create_pipe_input() as pipe:
                repl = Repl(client, console=console, history=QueryHistory(tmp_path / "history"), input=pipe,
                            output=DummyOutput(), use_pager=False)
                repl.show_result(heads)
                repl.show_result(features)
        drawn = console.file.getvalue()
    finally:
        daemon.stop()
    expected = head_scores(demo_model, "induction", layers=[0, 1])
    assert heads["kind"] == "heads" and same_arrays(heads["scores"]["induction"], expected.scores["induction"])
    library = active_features(demo_model, load_sae("demo"), PROMPT, top=5)
    assert features["kind"] == "active_features" and features["features"] == library.features
    assert "induction" in drawn and "cannot display" not in drawn
    assert f"{library.features[0]}" in drawn and "top 5 features of" in drawn
    assert result_from_data(heads) == expected and heads["text"].startswith("head scores")


# ---- the language server's checks --------------------------------------------------------------------


def test_language_server_checks_the_new_statements_modules_and_layers(demo_model):
    from mlxterp_lsp.checks import layers_findings, module_paths, parse_findings, path_findings
    from mlxterp_lsp.documents import Document

    text = ("sae load demo\nfeatures layers.99 @ -1\nwith layers.8.mpl amplify 3 2: lens @ -1\n"
            "heads induction layers 0..40\ncausal subject \"France\" layers 2..3\nheads indction\n")
    document = Document("file:///analyses.mlxq", text)
    table = demo_model.names.table
    findings = parse_findings(document)
    for located in document.statements:
        for path, prefix in module_paths(located.statement):
            findings += path_findings(table, located, path, prefix)
        findings += layers_findings(table, located)
    found = sorted((f.range[0], f.code) for f in findings)
    assert found == [(1, "layer-index"), (2, "unknown-module"), (3, "layer-index"), (5, "parse")], findings
    unknown = next(f for f in findings if f.code == "unknown-module")
    assert "layers.8.mlp" in unknown.suggestions
