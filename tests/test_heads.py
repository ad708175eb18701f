"""Head-type scores (previous-token, first-token, induction), their plot, and the offline attention viewer."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mlxterp.attention import head_counts
from mlxterp.errors import InputError
from mlxterp.heads import (HeadScores, first_token_score, head_scores, induction_model, induction_score,
                           previous_token_score)
from mlxterp.viewer import attention_html, attention_viewer


@pytest.fixture(scope="module")
def toy():
    return induction_model()


@pytest.fixture(scope="module")
def toy_scores(toy):
    return head_scores(toy)


def causal_uniform(length):
    """(length, length) pattern: each query spreads evenly over itself and every earlier key."""
    pattern = np.tril(np.ones((length, length)))
    return pattern / pattern.sum(axis=1, keepdims=True)


def constructed_patterns(length=6):
    """(1 layer, 1 batch, 3 heads, L, L): previous-token, uniform over the past, all on position 0."""
    previous = np.eye(length, k=-1)
    previous[0, 0] = 1.0
    first = np.zeros((length, length))
    first[:, 0] = 1.0
    return np.stack([previous, causal_uniform(length), first])[None, None]


def test_previous_and_first_token_scores_on_constructed_patterns():
    patterns = constructed_patterns(6)
    # uniform causal attention puts 1 / (q + 1) on q - 1 and on 0, for q = 1..5; at q = 1 the
    # previous token is the first token, so the two pure heads score 1/5 on each other's kind
    uniform = np.mean([1 / (q + 1) for q in range(1, 6)])
    assert np.allclose(previous_token_score(patterns), [[1.0, uniform, 0.2]])
    assert np.allclose(first_token_score(patterns), [[0.2, uniform, 1.0]])


def test_induction_score_reads_the_token_after_the_earlier_copy():
    n, prefix = 4, 1
    length = prefix + 2 * n
    exact = np.zeros((length, length))
    for q in range(length):
        exact[q, q - n + 1 if q >= prefix + n else 0] = 1.0
    patterns = np.stack([exact, np.eye(length, k=-1) + np.eye(length) * (np.arange(length) == 0)])[None, None]
    assert np.allclose(induction_score(patterns, prefix, n), [[1.0, 0.0]])


def test_the_shipped_model_has_an_induction_head_in_layer_1_and_only_there(toy_scores):
    induction = toy_scores.scores["induction"]
    assert toy_scores.layers == [0, 1]
    layer, head, best = toy_scores.top("induction", 1)[0]
    assert layer == 1 and best > 0.5
    others = [value for (row, other), value in np.ndenumerate(induction) if (row, other) != (1, head)]
    assert max(others) < 0.2


def test_the_shipped_model_has_a_previous_token_head_in_layer_0(toy_scores):
    layer, _, best = toy_scores.top("previous_token", 1)[0]
    assert layer == 0 and best > 0.5


def test_scores_on_a_prompt_count_its_previous_token_attention(toy):
    text = "cat dog sun moon tree cat dog sun moon tree"
    scores = head_scores(toy, "previous", text=text, layers=[0])
    patterns = toy.get_attention_patterns(text, layers=[0])
    mine = np.array(patterns[0])[0]  # (heads, L, L)
    expected = [np.mean([mine[h, q, q - 1] for q in range(1, mine.shape[-1])]) for h in range(mine.shape[0])]
    assert np.allclose(scores.scores["previous_token"][0], expected, atol=1e-6)
    assert scores.kinds == ["previous_token"] and scores.setup["text"] == text


def test_random_sequences_are_seeded_and_skip_special_tokens(toy):
    from mlxterp.heads import repeated_random_tokens

    rows, prefix = repeated_random_tokens(toy, 5, 3, seed=7)
    again, _ = repeated_random_tokens(toy, 5, 3, seed=7)
    assert rows == again and prefix == 1
    assert all(row[0] == toy.tokenizer.bos_token_id and row[1:6] == row[6:] for row in rows)
    assert not set(t for row in rows for t in row[1:]) & set(toy.tokenizer.all_special_ids)


def test_result_round_trips_and_plots(toy_scores, tmp_path):
    again = HeadScores.from_data(toy_scores.to_data())
    assert again == toy_scores and again.top("induction", 2) == toy_scores.top("induction", 2)
    path = toy_scores.save_plot(tmp_path / "heads.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert "induction" in toy_scores.summary(200) and "plot:" in toy_scores.to_data(text=True)["text"]


def test_unknown_kind_names_the_valid_ones(toy):
    with pytest.raises(InputError, match="choose from previous_token, first_token, induction"):
        head_scores(toy, "copying")


# -- the viewer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(toy, toy_scores, tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "attention.html"
    attention_viewer(toy, "cat dog sun cat dog sun", scores=toy_scores, save_path=path)
    return path.read_text()


def test_viewer_loads_nothing_from_the_network(page):
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)


def test_viewer_embeds_every_layer_and_head_with_its_scores(page, toy):
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["tokens"] == toy.token_strings(toy.encode("cat dog sun cat dog sun"))
    n = len(data["tokens"])
    assert data["layers"] == [0, 1] and data["heads"] == head_counts(toy.module("layers.0.attn"))[0]
    assert all(len(head) == n * n for layer in data["patterns"] for head in layer)
    # each query row sums to 1 (in units of 1e-4, rounded per cell)
    rows = np.array(data["patterns"][1][0]).reshape(n, n).sum(axis=1)
    assert np.all(np.abs(rows - 10000) <= n)
    assert set(data["scores"]) == {"previous_token", "first_token", "induction"}


def test_viewer_script_runs_in_node_against_a_stub_page(page, tmp_path):
    if shutil.which("node") is None:
        pytest.fail("node is needed to run the viewer's script (apt-get install nodejs)")
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    (tmp_path / "stub.js").write_text(STUB.replace("DATA", json.dumps(data)) + script + CHECKS)
    run = subprocess.run(["node", str(tmp_path / "stub.js")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    n = len(json.loads(data)["tokens"])
    head = json.loads(data)["heads"] - 1
    probability = json.loads(data)["patterns"][1][head][4 * n + 2] / 10000
    assert run.stdout.strip() == f"layer 1 head {head}: query 4 'cat' \u2192 key 2 'dog': {probability:.4f}"


def test_attention_html_rejects_patterns_of_the_wrong_shape():
    with pytest.raises(InputError, match=r"expected \(heads, L, L\)"):
        attention_html({0: np.zeros((2, 3, 4))})


# A minimal DOM: enough for the viewer's script to draw, then a hover over one heatmap cell.
STUB = r"""
const elements = {};
function element(id) {
  const e = {id, children: [], style: {}, value: "0", className: "", listeners: {}, rows: [],
    appendChild(c) { this.children.push(c); return c; },
    set textContent(t) { this._text = String(t); if (t === "") this.children = []; },
    get textContent() { return id === "data" ? DATA : this._text; },
    addEventListener(type, f) { this.listeners[type] = f; },
    getContext() { return new Proxy({}, {get: (t, k) => k in t ? t[k] : () => {}, set: (t, k, v) => (t[k] = v, true)}); },
    getBoundingClientRect() { return {left: 0, top: 0}; },
    insertRow() { const r = element("row"); r.insertCell = () => element("cell"); this.rows.push(r); return r; },
  };
  return e;
}
global.document = {
  getElementById: id => elements[id] || (elements[id] = element(id)),
  createElement: tag => element(tag),
  addEventListener: () => {},
};
"""

CHECKS = r"""
select(1, data.heads - 1);
grid.listeners.mousemove({clientX: labelSpace + 2 * cell + 1, clientY: labelSpace + 4 * cell + 1});
console.log(document.getElementById("readout").textContent);
if (document.getElementById("thumbs").children.length !== data.heads) throw new Error("thumbnails missing");
"""
