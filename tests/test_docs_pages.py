"""Every python block of the docs pages runs, in order, on the demo model.

docs/examples.md mirrors the user guide; docs/interventions.md and
docs/analysis.md are the library's own pages. Blocks of one page share a
namespace, as a reader running them one after another would.
"""

import re
from pathlib import Path

from doc_blocks import python_blocks, run_mlxq_blocks, run_page, runnable_blocks


def test_interventions_page_runs(tmp_path, monkeypatch):
    namespace = run_page("interventions.md", tmp_path, monkeypatch)
    # the page's first block shows zeroing a layer changes the logits
    assert (abs(namespace["zeroed"] - namespace["plain"])).max().item() > 0


def test_analysis_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("analysis.md", tmp_path, monkeypatch)
    assert namespace["everything"]["layer_8"].shape[0] == 100
    printed = capsys.readouterr().out
    png = re.search(r"Saved the logit lens heatmap to (\S+\.png)", printed)
    assert png and Path(png.group(1)).stat().st_size > 1000


def test_examples_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("examples.md", tmp_path, monkeypatch)
    model = namespace["model"]
    assert namespace["activations"]["layer_3"].shape == (len(namespace["large_list"]), model.hidden_size)
    assert namespace["final_results"].shape == (1000, model.hidden_size)


def test_tracing_page_runs(tmp_path, monkeypatch, demo_model):
    namespace = run_page("tracing.md", tmp_path, monkeypatch)
    assert namespace["hidden"].shape[-1] == demo_model.hidden_size
    assert namespace["grad"].shape == namespace["embeddings"].shape
    assert set(namespace["trace"].activations) == {"model.model.layers.3"}  # the keep="saved" example


def test_quickstart_runs_except_the_block_loading_the_readers_own_model(tmp_path, monkeypatch, capsys):
    blocks = runnable_blocks("quickstart.md")
    assert len(python_blocks("quickstart.md")) - len(blocks) == 1  # only the hub-id / own-directory block
    namespace = run_page("quickstart.md", tmp_path, monkeypatch, blocks)
    assert set(namespace["recovery"]) == set(range(16))
    assert "Paris" in capsys.readouterr().out


def test_daemon_page_python_client_runs_against_a_private_daemon(tmp_path, monkeypatch, capsys):
    from mlxterp_repl.client import connect

    monkeypatch.setenv("MLXTERP_RUNTIME_DIR", str(tmp_path / "runtime"))
    try:
        namespace = run_page("daemon.md", tmp_path, monkeypatch, blocks=[0])
        assert namespace["saved"]["kind"] == "save"
    finally:
        with connect(autostart=False) as daemon:
            daemon.shutdown()


def test_names_page_runs(tmp_path, monkeypatch):
    namespace = run_page("names.md", tmp_path, monkeypatch)
    assert namespace["table"].n_layers == namespace["model"].n_layers


def test_tuned_lens_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("tuned-lens.md", tmp_path, monkeypatch)
    comparison = namespace["comparison"]
    assert all(t < p for t, p in zip(comparison.tuned_lens_kl[:-1], comparison.logit_lens_kl[:-1]))
    assert (tmp_path / "demo-lens" / "translators.safetensors").exists()
    assert namespace["tuned"].notes == ["tuned lens: demo-lens"]  # the query-language section
    assert [namespace["bundled"][layer][0][2] for layer in (9, 10, 11)] == [" Paris"] * 3


def test_sae_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("sae.md", tmp_path, monkeypatch)
    assert namespace["metrics"].explained_variance > 0.8
    assert namespace["features"].shape == (1, 6, 4 * 128)
    assert "[[" in capsys.readouterr().out  # top-activating examples printed with their token marked
    assert namespace["top"] not in namespace["ablated"].features  # the query-language section


def test_heads_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("heads.md", tmp_path, monkeypatch)
    layer, _, score = namespace["scores"].top("induction", 1)[0]
    assert layer == 1 and score > 0.5
    page = (tmp_path / "attention.html").read_text()
    assert "https://" not in page and "http://" not in page
    assert namespace["found"].top("induction", 1)[0][:2] == (1, 0)  # the query-language section
    assert (tmp_path / "demo-heads.png").stat().st_size > 1000


def test_causal_tracing_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_page("causal-tracing.md", tmp_path, monkeypatch)
    trace = namespace["trace"]
    assert trace.answer == " Paris" and trace.corrupted_probability < trace.clean_probability - 0.2
    assert (tmp_path / "causal-trace.png").stat().st_size > 1000
    assert namespace["traced"].best("residual")[1] == 4  # the query-language section: ' France', layers 0..7
    assert (tmp_path / "causal-query.png").stat().st_size > 1000


def test_performance_page_runs(tmp_path, monkeypatch, capsys):
    from mlxterp import analysis

    namespace = run_page("performance.md", tmp_path, monkeypatch)
    assert set(namespace["recovery"]) == set(range(namespace["model"].n_layers))
    assert analysis.patch_budget_bytes is None
    assert namespace["model"].device.split()[0] in ("cpu", "gpu")


def test_coming_from_page_runs_its_python_and_query_language_blocks(tmp_path, monkeypatch, demo_model):
    namespace = run_page("coming-from.md", tmp_path, monkeypatch)
    assert namespace["heads"]["layers.8.attn.z"].shape == (1, 6, 4, 32)
    assert not (namespace["ablated"] == namespace["logits"]).all().item()
    results = run_mlxq_blocks("coming-from.md", demo_model)
    assert sum(len(r) for r in results) == 13
    assert results[0][5].notes == ["interventions: layers.4.mlp_out zero"]
    assert results[1][3].notes == ["interventions: layers.6.resid_post add $japan * 0.5 @ -1"]


def test_generation_page_runs_its_python_and_query_language_blocks(tmp_path, monkeypatch, demo_model):
    namespace = run_page("generation.md", tmp_path, monkeypatch)
    assert namespace["steered"].text.startswith(" Berlin")
    assert namespace["later"].text.startswith(" Paris")
    assert namespace["short"].interrupted
    (results,) = run_mlxq_blocks("generation.md", demo_model)
    generated = [r for r in results if r.kind == "generation"]
    assert generated[1].text.startswith(" Berlin") and len(generated[2].tokens) == 20


def test_attribution_page_runs_its_python_and_query_language_blocks(tmp_path, monkeypatch, demo_model):
    namespace = run_page("attribution.md", tmp_path, monkeypatch)
    assert abs(namespace["dla"].total - namespace["dla"].logit) < 1e-3
    assert (tmp_path / "dla-heads.png").stat().st_size > 1000 and (tmp_path / "heads.png").stat().st_size > 1000
    (results,) = run_mlxq_blocks("attribution.md", demo_model)
    assert [r.kind for r in results] == ["prompt", "dla", "attribution", "head_patching", "head_patching",
                                         "head_attention"]
