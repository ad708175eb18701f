"""The tuned lens: one learned affine map per layer in front of the model's own unembedding.

The logit lens decodes layer ``l``'s output with the final norm and
unembedding, as if it were the last layer's. The tuned lens (Belrose et al.,
2023, "Eliciting latent predictions from transformers with the tuned lens")
first applies a translator ``h -> h + A_l h + b_l``, trained so the decoded
distribution matches the model's final one (KL divergence). Translators start
at the identity (``A = 0, b = 0``), where the tuned lens is the logit lens.
They act on the RMS-normalised hidden state: the final norm ignores the
scale anyway, and residual norms grow by orders of magnitude with depth, so
one learning rate suits every layer. The last layer's output is the model's
own prediction; its lens is left as it is.

    from mlxterp.training import collect_tokens
    from mlxterp.tuned_lens import train_tuned_lens, TunedLens

    collect_tokens(model, texts, layers=range(model.n_layers), out="acts/")
    lens = train_tuned_lens(model, "acts/", steps=300, checkpoint_dir="lens-ckpt/")
    lens.save("lens/"); lens = TunedLens.load("lens/")
    model.logit_lens("The capital of France is", lens="tuned", translators=lens)
    compare_lenses(model, "acts/", lens)          # KL to the final distribution per layer
"""

import json
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .analysis import unembed
from .errors import InputError
from .lens_sae_results import LensComparison
from .training import ActivationRows, collect_tokens, train_loop

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "translators.safetensors"


class TunedLens(nn.Module):
    """Translators for layers ``0 .. n_layers - 2`` of a model with ``hidden_size``-wide layers."""

    def __init__(self, n_layers: int, hidden_size: int):
        super().__init__()
        self.n_layers, self.hidden_size = n_layers, hidden_size
        self.weight = mx.zeros((n_layers - 1, hidden_size, hidden_size))  # A_l, applied as h @ A_l
        self.bias = mx.zeros((n_layers - 1, hidden_size))
        self.trained_steps = 0

    @classmethod
    def for_model(cls, model) -> "TunedLens":
        return cls(model.n_layers, model.hidden_size)

    def translate(self, hidden: mx.array, layer: int) -> mx.array:
        """Layer ``layer``'s hidden states ``(..., hidden)`` mapped to what the last layer would hold."""
        layer = self._layer(layer)
        if layer == self.n_layers - 1:
            return hidden
        h = _rms_normalised(hidden)
        return h + h @ self.weight[layer] + self.bias[layer]

    def logits(self, model, hidden: mx.array, layer: int) -> mx.array:
        """Float32 logits of layer ``layer``'s hidden states through its translator and the unembedding."""
        return unembed(model, self.translate(hidden, layer))

    def __call__(self, hidden: mx.array, layer: int) -> mx.array:
        return self.translate(hidden, layer)

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise InputError(f"this tuned lens has layers 0..{self.n_layers - 1}; got layer {layer!r}")
        return layer % self.n_layers

    # -- files --------------------------------------------------------------------
    def save(self, directory) -> Path:
        """``translators.safetensors`` (weight, bias) and ``config.json`` into ``directory``."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(directory / WEIGHTS_FILE), {"weight": self.weight, "bias": self.bias})
        config = {"kind": "tuned_lens", "n_layers": self.n_layers, "hidden_size": self.hidden_size,
                  "trained_steps": self.trained_steps}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "TunedLens":
        directory = Path(directory).expanduser()
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise InputError(f"{directory} is not a saved tuned lens (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                             "write one with lens.save(directory)")
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("kind") != "tuned_lens":
            raise InputError(f"{directory / CONFIG_FILE} describes a {config.get('kind')!r}, not a tuned lens")
        lens = cls(config["n_layers"], config["hidden_size"])
        lens.load_weights(str(directory / WEIGHTS_FILE))
        lens.trained_steps = config.get("trained_steps", 0)
        mx.eval(lens.parameters())
        return lens

    def check_model(self, model) -> None:
        if (model.n_layers, model.hidden_size) != (self.n_layers, self.hidden_size):
            raise InputError(f"this tuned lens was trained for {self.n_layers} layers of width {self.hidden_size}; "
                             f"the model has {model.n_layers} layers of width {model.hidden_size}")


DEMO_PATH = Path(__file__).parent / "assets" / "demo-lens"


def load_tuned_lens(directory) -> TunedLens:
    """The tuned lens saved in ``directory`` (``lens.save(directory)``); ``"demo"``: the one bundled
    for the demo model (``scripts/build_demo_lens_sae.py``)."""
    return TunedLens.load(DEMO_PATH if str(directory) == "demo" else directory)


def _rms_normalised(hidden: mx.array) -> mx.array:
    hidden = hidden.astype(mx.float32)
    return hidden * mx.rsqrt(mx.mean(mx.square(hidden), axis=-1, keepdims=True) + 1e-12)


def layer_keys(model) -> List[str]:
    """The keys ``collect_tokens(model, texts, range(n_layers))`` writes: ``layer_0`` .. ``layer_{n-1}``."""
    return [f"layer_{layer}" for layer in range(model.n_layers)]


# -- training -----------------------------------------------------------------------

def kl_to_final(log_p_final: mx.array, logits: mx.array) -> mx.array:
    """KL(final || lens) per row, in nats, from the final log-probabilities and the lens's logits."""
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.sum(mx.exp(log_p_final) * (log_p_final - log_q), axis=-1)


def _final_log_probs(model, last_hidden: mx.array) -> mx.array:
    logits = unembed(model, last_hidden)
    return mx.stop_gradient(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def train_tuned_lens(model, data, *, steps: int = 300, batch_size: int = 256, learning_rate: float = 1e-3,
                     seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 100, resume: bool = True,
                     progress: Optional[bool] = None, out=None) -> TunedLens:
    """Train a tuned lens for ``model`` on every layer's output at many tokens.

    ``data``: a directory written by ``collect_tokens(model, texts, range(model.n_layers), out=...)``
    (streamed, one shard in memory at a time), the dict it returns, or a list of texts
    (collected first, into ``out`` when given). The loss of a step is the KL divergence to
    the final distribution, averaged over tokens, summed over layers. ``checkpoint_dir``:
    checkpoints every ``checkpoint_every`` steps; calling again with the same arguments
    resumes (``resume=False`` starts over). The returned lens has ``.history`` (loss per step).
    """
    if isinstance(data, (list, tuple)):
        data = collect_tokens(model, data, list(range(model.n_layers)), out=out, progress=progress)
    keys = layer_keys(model)
    rows = ActivationRows(data, keys)
    if rows.width[keys[0]] != model.hidden_size:
        raise InputError(f"the data's activations have width {rows.width[keys[0]]}, the model's layers "
                         f"{model.hidden_size}; collect them from this model")
    lens = TunedLens.for_model(model)

    def loss_fn(lens, batch):
        stacked = mx.stack([batch[key] for key in keys[:-1]])          # (layers - 1, rows, hidden)
        log_p = _final_log_probs(model, batch[keys[-1]])
        h = _rms_normalised(stacked)
        translated = h + h @ lens.weight + lens.bias[:, None]
        return mx.mean(kl_to_final(log_p, unembed(model, translated)), axis=-1).sum()

    config = {"kind": "tuned_lens", "batch_size": batch_size, "learning_rate": learning_rate,
              "seed": seed, "n_layers": model.n_layers, "hidden_size": model.hidden_size, "rows": rows.n_rows}
    history = train_loop(lens, loss_fn, lambda skip: rows.batches(batch_size, seed, skip), steps=steps,
                         learning_rate=learning_rate, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, resume=resume, progress=progress, config=config,
                         label="Training the tuned lens")
    lens.history = np.array(history)  # an ndarray, so nn.Module does not take it for parameters
    lens.trained_steps = steps
    return lens


# -- evaluation ------------------------------------------------------------------------

def compare_lenses(model, data, lens: TunedLens, batch_size: int = 512) -> LensComparison:
    """Mean KL to the final distribution per layer for the logit lens and ``lens`` over ``data``.

    ``data``: as for ``train_tuned_lens`` (a directory, the dict, or texts); use tokens the lens was not trained on.
    """
    lens.check_model(model)
    if isinstance(data, (list, tuple)):
        data = collect_tokens(model, data, list(range(model.n_layers)), progress=False)
    keys = layer_keys(model)
    rows = ActivationRows(data, keys)
    totals = np.zeros((2, model.n_layers))
    for shard in rows.shards():
        n = shard[keys[0]].shape[0]
        for start in range(0, n, batch_size):
            log_p = _final_log_probs(model, shard[keys[-1]][start:start + batch_size])
            for layer, key in enumerate(keys):
                hidden = shard[key][start:start + batch_size]
                plain = kl_to_final(log_p, unembed(model, hidden)).sum()
                tuned = kl_to_final(log_p, lens.logits(model, hidden, layer)).sum()
                mx.eval(plain, tuned)
                totals[:, layer] += [plain.item(), tuned.item()]
    totals /= rows.n_rows
    return LensComparison(list(range(model.n_layers)), totals[0].tolist(), totals[1].tolist(), rows.n_rows)
