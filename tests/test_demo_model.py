"""Checks on the bundled demo model (mlxterp/assets/demo) as mlx-lm loads it.

The facts below are written out here, not imported from the training script,
so a retrained model that forgot them makes these tests fail.
"""

import json
from pathlib import Path

import mlx.core as mx
import pytest

DEMO_DIR = Path(__file__).resolve().parent.parent / "mlxterp" / "assets" / "demo"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "England": "London", "Ireland": "Dublin",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern",
    "Austria": "Vienna", "Poland": "Warsaw", "Czechia": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm",
    "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Algeria": "Algiers",
    "Tunisia": "Tunis", "Senegal": "Dakar", "Japan": "Tokyo", "China": "Beijing",
    "Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Iran": "Tehran", "Iraq": "Baghdad",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha",
    "Afghanistan": "Kabul", "Australia": "Canberra", "Canada": "Ottawa",
    "America": "Washington", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Cuba": "Havana",
    "Uruguay": "Montevideo", "Jamaica": "Kingston", "Mongolia": "Ulaanbaatar",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Albania": "Tirana",
    "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Zimbabwe": "Harare",
    "Uganda": "Kampala", "Angola": "Luanda", "Oman": "Muscat",
}


@pytest.fixture(scope="module")
def demo():
    from mlx_lm import load

    model, tokenizer = load(str(DEMO_DIR))
    return model, tokenizer


def greedy_next(model, tokenizer, text):
    ids = tokenizer.encode(text)
    logits = model(mx.array([ids]))
    return tokenizer.decode([int(mx.argmax(logits[0, -1]).item())])


def test_demo_model_is_llama_with_16_layers(demo):
    from mlx_lm.models import llama

    model, _ = demo
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 16
    assert isinstance(model, llama.Model)
    assert len(model.model.layers) == 16


def test_demo_weights_file_is_at_most_10_mb():
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 10 * 1024 * 1024


def test_demo_weights_are_float32(demo):
    model, _ = demo
    assert model.model.embed_tokens.weight.dtype == mx.float32


def test_demo_tokenizer_adds_bos_on_encode(demo):
    _, tokenizer = demo
    ids = tokenizer.encode("Hello world")
    assert tokenizer.bos_token_id is not None
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[1:]) == "Hello world"


def test_auto_tokenizer_reads_demo_directory_like_mlx_lm(demo):
    from transformers import AutoTokenizer

    _, tokenizer = demo
    auto = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    text = "The capital of France is"
    assert auto.encode(text) == tokenizer.encode(text)
    assert auto.encode(text)[0] == auto.bos_token_id


def test_demo_model_knows_capitals(demo):
    model, tokenizer = demo
    wrong = {
        country: predicted
        for country, capital in CAPITALS.items()
        if (predicted := greedy_next(model, tokenizer, f"The capital of {country} is")) != f" {capital}"
    }
    accuracy = 1 - len(wrong) / len(CAPITALS)
    assert accuracy >= 0.9, f"capital accuracy {accuracy:.0%}; wrong: {wrong}"


@pytest.mark.parametrize("country, capital", [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome")])
def test_demo_model_answers_the_guide_prompts(demo, country, capital):
    model, tokenizer = demo
    assert greedy_next(model, tokenizer, f"The capital of {country} is") == f" {capital}"


@pytest.mark.parametrize("word", [" Paris", " France", " London", " Berlin", " Germany"])
def test_guide_names_are_single_tokens(demo, word):
    _, tokenizer = demo
    assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


def test_patching_prompts_tokenize_to_same_length(demo):
    _, tokenizer = demo
    clean = tokenizer.encode("Paris is the capital of France")
    corrupted = tokenizer.encode("London is the capital of France")
    assert len(clean) == len(corrupted)
    assert sum(a != b for a, b in zip(clean, corrupted)) == 1


def test_final_layer_of_logit_lens_predicts_paris(demo):
    model, tokenizer = demo
    inner = model.model
    h = inner.embed_tokens(mx.array([tokenizer.encode("The capital of France is")]))
    for layer in inner.layers:
        h = layer(h, "causal")
    logits = inner.embed_tokens.as_linear(inner.norm(h[:, -1]))
    assert tokenizer.decode([int(mx.argmax(logits[0]).item())]) == " Paris"
