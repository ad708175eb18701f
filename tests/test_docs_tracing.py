"""Every code block of the tracing docs runs on the demo model."""

from doc_blocks import run_page


def test_tracing_page_runs(demo_model):
    namespace = run_page("tracing.md")
    assert namespace["hidden"].shape[-1] == demo_model.hidden_size
    assert namespace["grad"].shape == namespace["embeddings"].shape
