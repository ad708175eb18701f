"""The attention viewer: one standalone HTML file to browse attention patterns offline.

``attention_viewer(model, text)`` computes the exact patterns of every layer
(``mlxterp.attention``) and writes a single HTML file with the data, the script
and the styles inline: it opens from disk in any browser, with no network, CDN
or server. In it you pick a layer and a head (or click a head's thumbnail),
hover a cell of the query x key heatmap to read the probability of that token
pair, and hover a token of the prompt to shade the tokens it attends to.
With ``scores=`` (a ``HeadScores``) each head's previous-token, first-token and
induction scores are shown next to it.

``attention_html`` builds the page from patterns you already have.
"""

from __future__ import annotations

import html
import json
from typing import Optional

import numpy as np

from .errors import InputError
from .results import as_numpy

MAX_CELLS = 4_000_000  # layers x heads x query x key above which the page would be too heavy to open


def attention_viewer(model, text: str, *, layers=None, save_path=None, scores=None,
                     title: Optional[str] = None) -> str:
    """Write the interactive viewer of ``text``'s attention patterns; returns the HTML file's path.

    Args:
        model: an ``InterpretableModel`` whose attention ``get_attention_patterns`` supports.
        text: one prompt.
        layers: a layer index or list of them; ``None`` for all.
        save_path: where to write the page (default: a new file in ~/.cache/mlxterp/plots).
        scores: a ``HeadScores`` (``mlxterp.heads.head_scores``) to show beside each head.
        title: the page's heading (default: the prompt).
    """
    from .attention import get_attention_patterns

    if not isinstance(text, str):
        raise InputError(f"attention_viewer takes one prompt string, got {type(text).__name__}")
    patterns = get_attention_patterns(model, text, layers=layers)
    tokens = model.token_strings(model.encode(text)) if model.tokenizer is not None else None
    page = attention_html(patterns, tokens, title=title or text, scores=scores)
    path = _output_path(save_path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def attention_html(patterns, tokens=None, *, title: str = "attention", scores=None) -> str:
    """The viewer page for ``patterns`` (``{layer: (1, heads, L, L) or (heads, L, L)}``, or an
    ``AttentionPatterns``); ``tokens`` label the positions (default: their indices)."""
    layers = list(patterns)
    if not layers:
        raise InputError("no attention patterns to show (no layers)")
    arrays = []
    for layer in layers:
        array = as_numpy(patterns[layer]).astype(np.float32)
        if array.ndim == 4:
            array = array[0]  # the first prompt of a batch
        if array.ndim != 3 or array.shape[1] != array.shape[2]:
            raise InputError(f"the pattern of layer {layer} has shape {array.shape}; expected (heads, L, L) "
                             "or (batch, heads, L, L)")
        arrays.append(array)
    heads, length = arrays[0].shape[0], arrays[0].shape[1]
    if len(layers) * heads * length * length > MAX_CELLS:
        raise InputError(f"{len(layers)} layers x {heads} heads x {length}x{length} positions is too much for one "
                         "page; pass fewer layers= or a shorter prompt")
    if tokens is None:
        tokens = [str(i) for i in range(length)]
    if len(tokens) != length:
        raise InputError(f"{len(tokens)} token labels for patterns over {length} positions")
    data = {
        "title": title,
        "tokens": list(tokens),
        "layers": [int(layer) for layer in layers],
        "heads": int(heads),
        # probabilities in units of 1e-4, row-major (query, key), one list per layer and head
        "patterns": [[np.rint(a[h] * 10000).astype(int).reshape(-1).tolist() for h in range(heads)] for a in arrays],
        "scores": _scores_for(scores, layers, heads),
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (PAGE.replace("{{title}}", html.escape(title))
            .replace("{{style}}", STYLE).replace("{{data}}", payload).replace("{{script}}", SCRIPT))


def _scores_for(scores, layers, heads) -> dict:
    """{kind: [[score per head] per layer of the page]} for the layers ``scores`` has."""
    if scores is None:
        return {}
    table = {}
    for kind in scores.kinds:
        rows = []
        for layer in layers:
            if layer in scores.layers and scores.n_heads == heads:
                rows.append([round(scores.score(kind, layer, h), 4) for h in range(heads)])
            else:
                rows.append(None)
        table[kind] = rows
    return table


def _output_path(save_path) -> str:
    from .plots import _output_path as output_path

    return output_path(save_path, "attention", suffix=".html")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}}</title>
<style>{{style}}</style>
</head>
<body>
<h1>Attention: <span id="title"></span></h1>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span class="hint">arrow keys: &larr;&rarr; head, &uarr;&darr; layer</span>
</div>
<div id="thumbs"></div>
<div class="main">
  <div><canvas id="grid"></canvas><div id="readout">hover a cell: query &rarr; key</div></div>
  <div class="side">
    <h2>Prompt</h2>
    <p class="hint">hover a token: shade what it attends to in this head</p>
    <div id="tokens"></div>
    <h2>Scores of this head</h2>
    <table id="scores"></table>
  </div>
</div>
<script id="data" type="application/json">{{data}}</script>
<script>{{script}}</script>
</body>
</html>
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin: 1em 0 0.3em; }
.controls label { margin-right: 1em; } .hint { color: #777; font-size: 0.85em; }
#thumbs { display: flex; flex-wrap: wrap; gap: 6px; margin: 0.8em 0; }
#thumbs figure { margin: 0; text-align: center; font-size: 0.75em; cursor: pointer; }
#thumbs canvas { border: 2px solid #ddd; image-rendering: pixelated; }
#thumbs figure.on canvas { border-color: #d62728; }
.main { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
#readout { font-family: monospace; margin-top: 0.4em; min-height: 1.3em; }
#tokens span { display: inline-block; padding: 2px 3px; margin: 1px; border: 1px solid #eee;
  font-family: monospace; white-space: pre; cursor: default; }
#tokens span.query { outline: 2px solid #d62728; }
#scores td { padding: 1px 8px; font-family: monospace; }
.side { max-width: 32em; }
"""

SCRIPT = r"""
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const n = data.tokens.length, cell = Math.max(8, Math.min(28, Math.floor(560 / n)));
const labelSpace = 110;
let layerIndex = 0, head = 0, hover = null, tokenQuery = null;
const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
const grid = document.getElementById("grid"), ctx = grid.getContext("2d");
document.getElementById("title").textContent = data.title;

function show(token) { return JSON.stringify(token).slice(1, -1); }
function prob(li, h, q, k) { return data.patterns[li][h][q * n + k] / 10000; }
function colour(p) {
  const v = Math.round(255 * (1 - Math.sqrt(p)));
  return "rgb(" + v + "," + v + ",255)";
}
function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text; select.appendChild(o);
}
data.layers.forEach((layer, i) => option(layerSelect, i, layer));
for (let h = 0; h < data.heads; h++) option(headSelect, h, h);

function drawGrid() {
  grid.width = labelSpace + n * cell + 4; grid.height = labelSpace + n * cell + 4;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, grid.width, grid.height);
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
    ctx.fillStyle = colour(prob(layerIndex, head, q, k));
    ctx.fillRect(labelSpace + k * cell, labelSpace + q * cell, cell - 1, cell - 1);
  }
  ctx.fillStyle = "#222"; ctx.font = Math.min(12, cell - 1) + "px monospace";
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let q = 0; q < n; q++) ctx.fillText(show(data.tokens[q]).slice(0, 12), labelSpace - 4, labelSpace + q * cell + cell / 2);
  for (let k = 0; k < n; k++) {
    ctx.save(); ctx.translate(labelSpace + k * cell + cell / 2, labelSpace - 4); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left"; ctx.fillText(show(data.tokens[k]).slice(0, 12), 0, 0); ctx.restore();
  }
  ctx.font = "11px sans-serif"; ctx.textAlign = "left"; ctx.fillStyle = "#777";
  ctx.fillText("query \u2193  key \u2192", 2, 10);
  if (hover) {
    ctx.strokeStyle = "#d62728"; ctx.lineWidth = 1;
    ctx.strokeRect(labelSpace, labelSpace + hover[0] * cell, n * cell, cell);
    ctx.strokeRect(labelSpace + hover[1] * cell, labelSpace, cell, n * cell);
  }
}

function drawThumbs() {
  const box = document.getElementById("thumbs"); box.textContent = "";
  const size = Math.max(1, Math.floor(64 / n)) * n;
  for (let h = 0; h < data.heads; h++) {
    const fig = document.createElement("figure"), c = document.createElement("canvas");
    c.width = n; c.height = n; c.style.width = size + "px"; c.style.height = size + "px";
    const g = c.getContext("2d");
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
      g.fillStyle = colour(prob(layerIndex, h, q, k)); g.fillRect(k, q, 1, 1);
    }
    const caption = document.createElement("figcaption"); caption.textContent = "head " + h;
    fig.appendChild(c); fig.appendChild(caption);
    if (h === head) fig.className = "on";
    fig.addEventListener("click", () => select(layerIndex, h));
    box.appendChild(fig);
  }
}

function drawTokens() {
  const box = document.getElementById("tokens"); box.textContent = "";
  data.tokens.forEach((token, i) => {
    const span = document.createElement("span"); span.textContent = token;
    span.title = i + ": " + show(token);
    if (tokenQuery !== null) {
      if (i === tokenQuery) span.className = "query";
      else if (i <= tokenQuery) span.style.background = colour(prob(layerIndex, head, tokenQuery, i));
    }
    span.addEventListener("mouseenter", () => { tokenQuery = i; drawTokens(); });
    box.appendChild(span);
  });
  box.onmouseleave = () => { tokenQuery = null; drawTokens(); };
}

function drawScores() {
  const table = document.getElementById("scores"); table.textContent = "";
  const kinds = Object.keys(data.scores);
  if (!kinds.length) { table.textContent = "(no scores given)"; return; }
  kinds.forEach(kind => {
    const row = table.insertRow(), values = data.scores[kind][layerIndex];
    row.insertCell().textContent = kind.replace("_", "-");
    row.insertCell().textContent = values ? values[head].toFixed(3) : "n/a";
  });
}

function select(li, h) {
  layerIndex = li; head = h; layerSelect.value = li; headSelect.value = h; hover = null;
  drawGrid(); drawThumbs(); drawTokens(); drawScores();
  document.getElementById("readout").textContent = "hover a cell: query \u2192 key";
}

grid.addEventListener("mousemove", event => {
  const rect = grid.getBoundingClientRect();
  const k = Math.floor((event.clientX - rect.left - labelSpace) / cell);
  const q = Math.floor((event.clientY - rect.top - labelSpace) / cell);
  if (q < 0 || k < 0 || q >= n || k >= n) return;
  hover = [q, k]; drawGrid();
  document.getElementById("readout").textContent = "layer " + data.layers[layerIndex] + " head " + head +
    ": query " + q + " '" + show(data.tokens[q]) + "' \u2192 key " + k + " '" + show(data.tokens[k]) +
    "': " + prob(layerIndex, head, q, k).toFixed(4);
});
layerSelect.addEventListener("change", () => select(Number(layerSelect.value), head));
headSelect.addEventListener("change", () => select(layerIndex, Number(headSelect.value)));
document.addEventListener("keydown", event => {
  const moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [1, 0], ArrowDown: [-1, 0]};
  const move = moves[event.key];
  if (!move || event.target.tagName === "SELECT") return;
  const li = Math.min(data.layers.length - 1, Math.max(0, layerIndex + move[0]));
  const h = Math.min(data.heads - 1, Math.max(0, head + move[1]));
  event.preventDefault(); select(li, h);
});
select(0, 0);
"""
