"""`mlxterp collect --layers` reads the library's layer forms (lists in brackets included), and the
demo corpus shipped as an asset is the one scripts/train_demo_model.py builds."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from mlxterp import InterpretableModel, get_activations
from mlxterp.collect import load_activations
from mlxterp.training import DEMO_CORPUS, demo_texts
from mlxterp_repl.cli import main as mlxterp

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Hello world"]


@pytest.fixture(scope="module")
def model():
    return InterpretableModel("demo")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def collect(prompts: Path, layers: str, out: Path, *extra: str) -> int:
    return mlxterp(["collect", str(prompts), "--layers", layers, "--out", str(out), "--no-progress", *extra])


def test_a_bracket_list_in_a_module_name_writes_every_module_it_names(model, prompts, tmp_path, capsys):
    assert collect(prompts, "layers.[1,2].attn", tmp_path / "acts") == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert list(meta["keys"]) == ["layers.1.self_attn", "layers.2.self_attn"]
    written = load_activations(tmp_path / "acts")
    for layer in (1, 2):
        alone = get_activations(model, PROMPTS, f"layers.{layer}.self_attn")[f"layers.{layer}.self_attn"]
        assert written[f"layers.{layer}.self_attn"].shape == (2, model.hidden_size)
        assert np.allclose(np.array(written[f"layers.{layer}.self_attn"]), np.array(alone), atol=1e-5)
    assert not np.allclose(np.array(written["layers.1.self_attn"]), np.array(written["layers.2.self_attn"]))


def test_bracket_lists_mix_with_indices_ranges_and_names(prompts, tmp_path, capsys):
    layers = "0..1,layers.[1,2].attn,-1,layers.3.mlp"
    assert collect(prompts, layers, tmp_path / "acts") == 0, capsys.readouterr().err
    keys = list(json.loads((tmp_path / "acts" / "meta.json").read_text())["keys"])
    assert keys == ["layer_0", "layer_1", "layers.1.self_attn", "layers.2.self_attn", "layer_15", "layers.3.mlp"]


def test_every_token_collection_takes_bracket_lists_too(prompts, tmp_path, capsys):
    assert collect(prompts, "layers.[0,1].mlp", tmp_path / "acts", "--positions", "all") == 0, capsys.readouterr().err
    keys = list(json.loads((tmp_path / "acts" / "meta.json").read_text())["keys"])
    assert [k for k in keys if k.startswith("layers.")] == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.parametrize("layers, named", [("layers.[1,a].attn", "[1,a]"), ("layers.[1,99].attn", "99"),
                                           ("", "no layers given")])
def test_bad_layers_get_a_one_line_error_naming_them(prompts, tmp_path, capsys, layers, named):
    assert collect(prompts, layers, tmp_path / "acts") == 1
    err = capsys.readouterr().err
    assert err.startswith("mlxterp collect: ") and named in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "acts" / "meta.json").exists()


# -- the demo corpus asset ------------------------------------------------------------------

def test_the_shipped_demo_corpus_is_what_the_training_script_builds():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    built = sorted({text for text, _ in script.build_corpus(random.Random(script.SEED))})
    assert DEMO_CORPUS.read_text(encoding="utf-8").splitlines() == built, (
        "mlxterp/assets/demo/corpus.txt is stale: training the demo model rewrites it; without retraining, "
        "call save_corpus(build_corpus(random.Random(SEED)), out) of scripts/train_demo_model.py")


def test_demo_texts_are_the_corpus_sentences_in_a_seeded_order():
    sentences = set(DEMO_CORPUS.read_text(encoding="utf-8").splitlines())
    assert len(sentences) > 1000
    first, again, other = demo_texts(1), demo_texts(1), demo_texts(2)
    assert first == again and first != other
    assert set(first) == sentences and len(first) == len(sentences)
