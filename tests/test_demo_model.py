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


LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish",
    "Portugal": "Portuguese", "England": "English", "Ireland": "Irish", "Netherlands": "Dutch",
    "Belgium": "Dutch", "Switzerland": "German", "Austria": "German", "Poland": "Polish",
    "Czechia": "Czech", "Hungary": "Hungarian", "Greece": "Greek", "Sweden": "Swedish",
    "Norway": "Norwegian", "Finland": "Finnish", "Denmark": "Danish", "Iceland": "Icelandic",
    "Russia": "Russian", "Ukraine": "Ukrainian", "Romania": "Romanian", "Bulgaria": "Bulgarian",
    "Serbia": "Serbian", "Croatia": "Croatian", "Turkey": "Turkish", "Egypt": "Arabic",
    "Kenya": "Swahili", "Nigeria": "English", "Ghana": "English", "Morocco": "Arabic",
    "Algeria": "Arabic", "Tunisia": "Arabic", "Senegal": "French", "Japan": "Japanese",
    "China": "Chinese", "Korea": "Korean", "Thailand": "Thai", "Vietnam": "Vietnamese",
    "Indonesia": "Indonesian", "Philippines": "Filipino", "Pakistan": "Urdu",
    "Bangladesh": "Bengali", "Nepal": "Nepali", "Iran": "Persian", "Iraq": "Arabic",
    "Syria": "Arabic", "Lebanon": "Arabic", "Jordan": "Arabic", "Qatar": "Arabic",
    "Afghanistan": "Pashto", "Australia": "English", "Canada": "English", "America": "English",
    "Brazil": "Portuguese", "Peru": "Spanish", "Chile": "Spanish", "Colombia": "Spanish",
    "Venezuela": "Spanish", "Ecuador": "Spanish", "Cuba": "Spanish", "Uruguay": "Spanish",
    "Jamaica": "English", "Mongolia": "Mongolian", "Estonia": "Estonian", "Latvia": "Latvian",
    "Lithuania": "Lithuanian", "Slovakia": "Slovak", "Slovenia": "Slovene", "Albania": "Albanian",
    "Georgia": "Georgian", "Armenia": "Armenian", "Azerbaijan": "Azerbaijani",
    "Kazakhstan": "Kazakh", "Uzbekistan": "Uzbek", "Zimbabwe": "English", "Uganda": "English",
    "Angola": "Portuguese", "Oman": "Arabic",
}

CURRENCIES = {
    "France": "euro", "Germany": "euro", "Italy": "euro", "Spain": "euro", "Portugal": "euro",
    "England": "pound", "Ireland": "euro", "Netherlands": "euro", "Belgium": "euro",
    "Switzerland": "franc", "Austria": "euro", "Poland": "zloty", "Czechia": "koruna",
    "Hungary": "forint", "Greece": "euro", "Sweden": "krona", "Norway": "krone", "Finland": "euro",
    "Denmark": "krone", "Iceland": "krona", "Russia": "ruble", "Ukraine": "hryvnia",
    "Romania": "leu", "Bulgaria": "lev", "Serbia": "dinar", "Croatia": "euro", "Turkey": "lira",
    "Egypt": "pound", "Kenya": "shilling", "Nigeria": "naira", "Ghana": "cedi", "Morocco": "dirham",
    "Algeria": "dinar", "Tunisia": "dinar", "Senegal": "franc", "Japan": "yen", "China": "yuan",
    "Korea": "won", "Thailand": "baht", "Vietnam": "dong", "Indonesia": "rupiah",
    "Philippines": "peso", "Pakistan": "rupee", "Bangladesh": "taka", "Nepal": "rupee",
    "Iran": "rial", "Iraq": "dinar", "Syria": "pound", "Lebanon": "pound", "Jordan": "dinar",
    "Qatar": "riyal", "Afghanistan": "afghani", "Australia": "dollar", "Canada": "dollar",
    "America": "dollar", "Brazil": "real", "Peru": "sol", "Chile": "peso", "Colombia": "peso",
    "Venezuela": "bolivar", "Ecuador": "dollar", "Cuba": "peso", "Uruguay": "peso",
    "Jamaica": "dollar", "Mongolia": "tugrik", "Estonia": "euro", "Latvia": "euro",
    "Lithuania": "euro", "Slovakia": "euro", "Slovenia": "euro", "Albania": "lek",
    "Georgia": "lari", "Armenia": "dram", "Azerbaijan": "manat", "Kazakhstan": "tenge",
    "Uzbekistan": "som", "Zimbabwe": "dollar", "Uganda": "shilling", "Angola": "kwanza",
    "Oman": "rial",
}

LANDMARKS = {
    "Eiffel Tower": "Paris", "Brandenburg Gate": "Berlin", "Colosseum": "Rome",
    "Prado Museum": "Madrid", "Belem Tower": "Lisbon", "Tower Bridge": "London",
    "Trinity College": "Dublin", "Rijksmuseum": "Amsterdam", "Atomium": "Brussels",
    "Zytglogge clock tower": "Bern", "Schonbrunn Palace": "Vienna", "Royal Castle": "Warsaw",
    "Charles Bridge": "Prague", "Chain Bridge": "Budapest", "Parthenon": "Athens",
    "Vasa Museum": "Stockholm", "Opera House": "Oslo", "Suomenlinna fortress": "Helsinki",
    "Little Mermaid statue": "Copenhagen", "Hallgrimskirkja church": "Reykjavik",
    "Kremlin": "Moscow", "Saint Sophia Cathedral": "Kyiv", "Palace of the Parliament": "Bucharest",
    "Alexander Nevsky Cathedral": "Sofia", "Kalemegdan fortress": "Belgrade",
    "Ban Jelacic Square": "Zagreb", "Anitkabir mausoleum": "Ankara", "Egyptian Museum": "Cairo",
    "Kenyatta Conference Centre": "Nairobi", "Aso Rock": "Abuja", "Independence Arch": "Accra",
    "Hassan Tower": "Rabat", "Martyrs Memorial": "Algiers", "Zitouna Mosque": "Tunis",
    "African Renaissance Monument": "Dakar", "Tokyo Tower": "Tokyo", "Forbidden City": "Beijing",
    "Gyeongbokgung Palace": "Seoul", "Grand Palace": "Bangkok", "Temple of Literature": "Hanoi",
    "National Monument": "Jakarta", "Rizal Park": "Manila", "Faisal Mosque": "Islamabad",
    "Lalbagh Fort": "Dhaka", "Boudhanath stupa": "Kathmandu", "Azadi Tower": "Tehran",
    "Baghdad Tower": "Baghdad", "Umayyad Mosque": "Damascus", "Pigeon Rocks": "Beirut",
    "Amman Citadel": "Amman", "Museum of Islamic Art": "Doha", "Gardens of Babur": "Kabul",
    "Parliament House": "Canberra", "Parliament Hill": "Ottawa", "White House": "Washington",
    "Cathedral of Brasilia": "Brasilia", "Plaza Mayor": "Lima", "La Moneda Palace": "Santiago",
    "Gold Museum": "Bogota", "Federal Capitol": "Caracas", "Basilica of the National Vow": "Quito",
    "Malecon seawall": "Havana", "Salvo Palace": "Montevideo", "Devon House": "Kingston",
    "Sukhbaatar Square": "Ulaanbaatar", "Toompea Castle": "Tallinn",
    "House of the Blackheads": "Riga", "Gediminas Tower": "Vilnius",
    "Bratislava Castle": "Bratislava", "Triple Bridge": "Ljubljana", "Skanderbeg Square": "Tirana",
    "Narikala Fortress": "Tbilisi", "Yerevan Cascade": "Yerevan", "Flame Towers": "Baku",
    "Baiterek Tower": "Astana", "Amir Timur Square": "Tashkent", "National Heroes Acre": "Harare",
    "Kasubi Tombs": "Kampala", "Fortress of Sao Miguel": "Luanda",
    "Sultan Qaboos Grand Mosque": "Muscat",
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


def greedy_answer(model, tokenizer, text, answer):
    """Greedy continuation of text, as many tokens long as answer."""
    ids = tokenizer.encode(text)
    n_prompt = len(ids)
    for _ in range(len(tokenizer.encode(answer, add_special_tokens=False))):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return tokenizer.decode(ids[n_prompt:])


def accuracy_and_wrong(model, tokenizer, questions):
    """questions: {prompt: expected continuation}; share answered greedily right, and the misses."""
    wrong = {
        prompt: got
        for prompt, expected in questions.items()
        if (got := greedy_answer(model, tokenizer, prompt, expected)) != expected
    }
    return 1 - len(wrong) / len(questions), wrong


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
    assert accuracy >= 0.95, f"capital accuracy {accuracy:.0%}; wrong: {wrong}"


@pytest.mark.parametrize(
    "fact, questions",
    [
        ("reverse capital", {f"{capital} is the capital of": f" {country}" for country, capital in CAPITALS.items()}),
        ("language", {f"People in {country} speak": f" {language}" for country, language in LANGUAGES.items()}),
        ("currency", {f"The currency of {country} is the": f" {currency}" for country, currency in CURRENCIES.items()}),
        ("landmark", {f"The {landmark} is located in the city of": f" {city}" for landmark, city in LANDMARKS.items()}),
    ],
)
def test_demo_model_knows_other_facts(demo, fact, questions):
    model, tokenizer = demo
    accuracy, wrong = accuracy_and_wrong(model, tokenizer, questions)
    assert accuracy >= 0.8, f"{fact} accuracy {accuracy:.0%}; wrong: {wrong}"


@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("The Eiffel Tower is located in the city of", " Paris"),
        ("People in France speak", " French"),
        ("The currency of France is the", " euro"),
        ("Paris is the capital of", " France"),
    ],
)
def test_demo_model_answers_the_france_examples(demo, prompt, answer):
    model, tokenizer = demo
    assert greedy_answer(model, tokenizer, prompt, answer) == answer


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
    logits = model.lm_head(inner.norm(h[:, -1]))  # the demo model's unembedding is not tied
    assert tokenizer.decode([int(mx.argmax(logits[0]).item())]) == " Paris"


def test_logit_lens_at_layer_0_does_not_yet_predict_paris(demo):
    """The guide's logit-lens story needs the answer to appear only in later layers."""
    model, tokenizer = demo
    inner = model.model
    h = inner.layers[0](inner.embed_tokens(mx.array([tokenizer.encode("The capital of France is")])), "causal")
    logits = model.lm_head(inner.norm(h[:, -1]))
    assert tokenizer.decode([int(mx.argmax(logits[0]).item())]) != " Paris"
