"""Sparse autoencoders: dictionaries of features of one module's activations.

A sparse autoencoder (SAE) writes an activation ``x`` as a sparse, non-negative
combination of ``n_features`` learned directions::

    f = sparsify(relu((x * s - b_dec) @ W_enc + b_enc))     encode
    x_hat = (f @ W_dec + b_dec) / s                         decode

``s`` is one number fixed before training so that ``E ||x * s||^2 = d_model``
(residual norms differ by orders of magnitude between models and layers; with
it one learning rate and one L1 coefficient suit all of them). Three kinds:

* ``"topk"``: keep the ``k`` largest pre-activations of each token (Gao et al., 2024);
* ``"batchtopk"``: keep the ``k * batch`` largest of the whole batch while training,
  and above a threshold learned during training (the running mean of the smallest kept
  value) when used (Bussmann et al., 2024), so tokens may use more or fewer features;
* ``"relu"``: a ReLU and an L1 penalty ``l1_coefficient * sum(f)`` on the features.

Decoder rows stay unit-norm (renormalised after every step), so a feature's
activation is its size in the (scaled) residual stream.

* ``train_sae(data, key=...)`` trains one from activations collected with
  ``mlxterp.training.collect_tokens`` (streamed from disk, one shard at a time,
  with a progress bar, checkpoints and resume).
* ``evaluate_sae`` reports explained variance, L0, dead features and the loss
  recovered when the SAE's output replaces the module's in the model.
* ``top_activating_examples`` finds each feature's strongest tokens, with context.
* ``sae.ablate(i)``, ``sae.scale(i, factor)``, ``sae.steer(i, amount)`` are
  interventions (``array -> array``) for ``model.trace(..., interventions={module: fn})``;
  ``sae.splice()`` replaces the activation with the SAE's reconstruction.
"""

import json
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import InputError
from .lens_sae_results import ActiveFeatures, FeatureExample, FeatureExamples, SAEMetrics
from .training import TOKEN_KEYS, ActivationRows, collect_tokens, train_loop

KINDS = ("topk", "batchtopk", "relu")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
THRESHOLD_MOMENTUM = 0.99


class SparseAutoencoder(nn.Module):
    """A dictionary of ``n_features`` directions for activations of width ``d_model``.

    ``module``: the module whose output it reads (e.g. ``"layers.8"``), kept with it for
    interventions and the query language.
    """

    def __init__(self, d_model: int, n_features: int, kind: str = "topk", k: int = 16,
                 l1_coefficient: float = 3e-3, module: Optional[str] = None, seed: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"unknown SAE kind {kind!r}; choose one of {', '.join(KINDS)}")
        for value, what in ((d_model, "d_model"), (n_features, "n_features"), (k, "k")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{what} must be a positive integer, got {value!r}")
        if kind != "relu" and k > n_features:
            raise InputError(f"k ({k}) cannot exceed n_features ({n_features})")
        self.d_model, self.n_features, self.kind, self.k = d_model, n_features, kind, k
        self.l1_coefficient, self.module, self.seed = float(l1_coefficient), module, seed
        directions = mx.random.normal((n_features, d_model), key=mx.random.key(seed))
        self.W_dec = directions / mx.linalg.norm(directions, axis=-1, keepdims=True)
        self.W_enc = self.W_dec.T
        self.b_enc = mx.zeros((n_features,))
        self.b_dec = mx.zeros((d_model,))
        # set once from data (input_scale) or during training (threshold); saved with the weights, not trained
        self.input_scale = mx.array(1.0)
        self.threshold = mx.array(0.0)
        self.tokens_since_fired = mx.zeros((n_features,))  # training's count, for finding dead features
        self.freeze(keys=["input_scale", "threshold", "tokens_since_fired"], recurse=False)

    # -- the dictionary -------------------------------------------------------------
    def pre_activations(self, x: mx.array) -> mx.array:
        return nn.relu((x.astype(mx.float32) * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: mx.array, training: bool = False) -> mx.array:
        """Feature activations ``(..., n_features)`` of activations ``(..., d_model)``."""
        return self.sparsify(self.pre_activations(x), training)

    def sparsify(self, acts: mx.array, training: bool = False) -> mx.array:
        if self.kind == "relu":
            return acts
        if self.kind == "batchtopk" and training:
            flat = acts.reshape(-1)
            kept = min(self.k * (flat.size // self.n_features), flat.size)
            cutoff = mx.stop_gradient(mx.min(mx.topk(flat, kept)))
            return acts * (acts >= cutoff)
        if self.kind == "batchtopk":
            return acts * (acts > self.threshold)
        cutoff = mx.stop_gradient(mx.min(mx.topk(acts, self.k, axis=-1), axis=-1, keepdims=True))
        return acts * (acts >= cutoff)

    def decode(self, features: mx.array) -> mx.array:
        """Activations ``(..., d_model)`` from feature activations."""
        return (features @ self.W_dec + self.b_dec) / self.input_scale

    def __call__(self, x: mx.array) -> mx.array:
        return self.decode(self.encode(x)).astype(x.dtype)

    def direction(self, feature: int) -> mx.array:
        """Feature ``feature``'s direction in the module's activation space (an activation of 1 moves it this far)."""
        return self.W_dec[self._feature(feature)] / self.input_scale

    def _feature(self, feature) -> int:
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) \
                or not 0 <= feature < self.n_features:
            raise InputError(f"this SAE has features 0..{self.n_features - 1}; got feature {feature!r}")
        return int(feature)

    # -- interventions ---------------------------------------------------------------
    def splice(self):
        """An intervention replacing the activation with the SAE's reconstruction."""
        def spliced(activation):
            return self(activation)

        spliced.__name__ = "sae.splice"
        return spliced

    def scale(self, feature: int, factor: float):
        """An intervention multiplying feature ``feature``'s contribution by ``factor`` (the rest untouched)."""
        feature = self._feature(feature)
        factor = float(factor)

        def scaled(activation):
            amount = self.encode(activation)[..., feature:feature + 1]
            return activation + ((factor - 1.0) * amount * self.direction(feature)).astype(activation.dtype)

        scaled.__name__ = f"sae.scale({feature}, {factor})"
        return scaled

    def ablate(self, feature: int):
        """An intervention removing feature ``feature``'s contribution (its activation times its direction)."""
        ablated = self.scale(feature, 0.0)
        ablated.__name__ = f"sae.ablate({feature})"
        return ablated

    def steer(self, feature: int, amount: float):
        """An intervention adding ``amount`` times feature ``feature``'s direction at every position."""
        vector = self.direction(feature) * float(amount)

        def steered(activation):
            return activation + vector.astype(activation.dtype)

        steered.__name__ = f"sae.steer({feature}, {amount})"
        return steered

    # -- files -------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "n_features": self.n_features, "k": self.k,
                "l1_coefficient": self.l1_coefficient, "module": self.module, "seed": self.seed}

    def save(self, directory) -> Path:
        """``sae.safetensors`` (weights, input scale, threshold) and ``config.json`` into ``directory``."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(directory / WEIGHTS_FILE), dict(_flat(self.parameters())))
        (directory / CONFIG_FILE).write_text(json.dumps({"format": "mlxterp-sae", **self.config()}, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "SparseAutoencoder":
        directory = Path(directory).expanduser()
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise InputError(f"{directory} is not a saved SAE (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                             "write one with sae.save(directory)")
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.pop("format", None) != "mlxterp-sae":
            raise InputError(f"{directory / CONFIG_FILE} does not describe an mlxterp SAE")
        sae = cls(**config)
        sae.load_weights(str(directory / WEIGHTS_FILE))
        mx.eval(sae.parameters())
        return sae


DEMO_PATH = Path(__file__).parent / "assets" / "demo-sae"


def load_sae(directory) -> SparseAutoencoder:
    """The SAE saved in ``directory`` (``sae.save(directory)``); ``"demo"``: the one bundled for the
    demo model's ``layers.8`` (TopK, 512 features, k=16; ``scripts/build_demo_lens_sae.py``)."""
    return SparseAutoencoder.load(DEMO_PATH if str(directory) == "demo" else directory)


def _flat(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


# -- training ---------------------------------------------------------------------------

def train_sae(data, *, key: str, kind: str = "topk", expansion: int = 4, n_features: Optional[int] = None,
              k: int = 16, l1_coefficient: float = 3e-3, steps: int = 1000, batch_size: int = 256,
              learning_rate: float = 1e-3, seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 200,
              resume: bool = True, progress: Optional[bool] = None, module: Optional[str] = None,
              aux_k: Optional[int] = None, aux_coefficient: float = 1 / 32, dead_after_tokens: int = 25_000
              ) -> SparseAutoencoder:
    """Train an SAE on the activations named ``key`` (e.g. ``"layer_8"``) in ``data``.

    ``data``: a directory of shards written by ``collect_tokens`` or ``batch_get_activations``
    (read one shard at a time, so it may be larger than memory) or a dict of arrays.
    ``n_features`` defaults to ``expansion * d_model``. ``module`` (default: ``key``'s module,
    ``layer_8`` -> ``layers.8``) is where its interventions go. ``checkpoint_dir``: checkpoints
    every ``checkpoint_every`` steps; the same call again resumes. The SAE's ``.history`` holds
    the reconstruction loss of every step (squared error per dimension of the scaled input,
    without the L1 or auxiliary terms).

    TopK and BatchTopK add the auxiliary loss of Gao et al. (2024) against dead features: the
    ``aux_k`` (default ``d_model // 2``) strongest features among those silent for the last
    ``dead_after_tokens`` tokens reconstruct what the SAE misses, weighted by ``aux_coefficient``.
    """
    rows = ActivationRows(data, [key])
    d_model = rows.width[key]
    n_features = n_features if n_features is not None else expansion * d_model
    if module is None:
        module = "layers." + key[len("layer_"):] if key.startswith("layer_") else key
    sae = SparseAutoencoder(d_model, n_features, kind=kind, k=k, l1_coefficient=l1_coefficient,
                            module=module, seed=seed)
    _initialise_from_data(sae, rows, key)

    aux_k = min(aux_k or d_model // 2, n_features)

    def loss_fn(sae, batch):
        x = batch[key].astype(mx.float32) * sae.input_scale
        pre = sae.pre_activations(batch[key])
        features = sae.sparsify(pre, training=True)
        reconstruction = features @ sae.W_dec + sae.b_dec
        loss = mx.mean(mx.sum(mx.square(reconstruction - x), axis=-1)) / d_model
        if sae.kind == "relu":
            return loss + sae.l1_coefficient * mx.mean(mx.sum(features, axis=-1)), loss
        dead = sae.tokens_since_fired >= dead_after_tokens  # not trained, so a plain array here
        if aux_coefficient == 0 or not mx.any(dead).item():
            return loss, loss
        dead_pre = pre * dead
        cutoff = mx.stop_gradient(mx.min(mx.topk(dead_pre, aux_k, axis=-1), axis=-1, keepdims=True))
        revived = dead_pre * mx.logical_and(dead_pre >= cutoff, dead_pre > 0)
        missed = mx.stop_gradient(x - reconstruction)
        aux = mx.sum(mx.square(revived @ sae.W_dec - missed)) / mx.maximum(mx.sum(mx.square(missed)), 1e-12)
        return loss + aux_coefficient * aux, loss

    def after_step(sae, batch):
        sae.W_dec = sae.W_dec / mx.maximum(mx.linalg.norm(sae.W_dec, axis=-1, keepdims=True), 1e-8)
        features = sae.encode(batch[key], training=True)
        fired = mx.any(features.reshape(-1, sae.n_features) > 0, axis=0)
        sae.tokens_since_fired = mx.where(fired, 0, sae.tokens_since_fired + features.shape[0])
        if sae.kind == "batchtopk":
            smallest = mx.min(mx.where(features > 0, features, mx.inf))
            sae.threshold = THRESHOLD_MOMENTUM * sae.threshold + (1 - THRESHOLD_MOMENTUM) * smallest
        mx.eval(sae.parameters())

    config = {"sae": sae.config(), "key": key, "batch_size": batch_size, "learning_rate": learning_rate,
              "rows": rows.n_rows, "aux_k": aux_k, "aux_coefficient": aux_coefficient,
              "dead_after_tokens": dead_after_tokens}
    history = train_loop(sae, loss_fn, lambda skip: rows.batches(batch_size, seed, skip), steps=steps,
                             learning_rate=learning_rate, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=checkpoint_every, resume=resume, progress=progress, config=config,
                             after_step=after_step, label=f"Training a {kind} SAE on {key}")
    sae.history = np.array(history)  # an ndarray, so nn.Module does not take it for parameters
    return sae


def _initialise_from_data(sae: SparseAutoencoder, rows: ActivationRows, key: str, n: int = 4096) -> None:
    """Input scale from the mean squared norm, decoder bias at the (scaled) mean, of up to ``n`` rows."""
    sample = next(rows.batches(n, seed=sae.seed))[key].astype(mx.float32)
    mean_square = mx.mean(mx.sum(mx.square(sample), axis=-1))
    sae.input_scale = mx.sqrt(sae.d_model / mx.maximum(mean_square, 1e-12))
    sae.b_dec = mx.mean(sample, axis=0) * sae.input_scale
    mx.eval(sae.parameters())


# -- evaluation -------------------------------------------------------------------------

def evaluate_sae(sae: SparseAutoencoder, data, *, key: Optional[str] = None, model=None,
                 texts: Optional[Sequence] = None, batch_size: int = 1024) -> SAEMetrics:
    """Reconstruction metrics of ``sae`` on ``data`` (as for ``train_sae``; held-out tokens are fairer).

    With ``model`` and ``texts`` also the loss recovered when the SAE's output replaces
    ``sae.module``'s output in the model (``model.trace(..., interventions={module: sae.splice()})``).
    """
    key = key or _key_of(sae)
    rows = ActivationRows(data, [key])
    error = total = count = 0.0
    sums = mx.zeros((sae.d_model,))
    squares = 0.0
    fired = mx.zeros((sae.n_features,), dtype=mx.bool_)
    active = 0.0
    for shard in rows.shards():
        x_all = shard[key].astype(mx.float32)
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start:start + batch_size]
            features = sae.encode(x)
            x_hat = sae.decode(features)
            on = features > 0
            error += mx.sum(mx.square(x - x_hat)).item()
            sums = sums + mx.sum(x, axis=0)
            squares += mx.sum(mx.square(x)).item()
            fired = mx.logical_or(fired, mx.any(on, axis=0))
            active += mx.sum(on).item()
            count += x.shape[0]
    total = squares - (mx.sum(mx.square(sums)).item() / count)  # sum ||x - mean||^2
    metrics = SAEMetrics(explained_variance=1.0 - error / total, l0=active / count,
                         dead_features=int(sae.n_features - mx.sum(fired).item()),
                         n_features=sae.n_features, n_tokens=int(count))
    if model is not None and texts is not None:
        module = _module_of(sae)
        clean = next_token_loss(model, texts)
        spliced = next_token_loss(model, texts, {module: sae.splice()})
        zeroed = next_token_loss(model, texts, {module: mx.zeros_like})
        metrics.ce_clean, metrics.ce_sae, metrics.ce_zero = clean, spliced, zeroed
        metrics.loss_recovered = (zeroed - spliced) / (zeroed - clean)
    return metrics


def next_token_loss(model, texts, interventions=None, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every token of ``texts`` (BOS excluded as a target)."""
    if isinstance(texts, str):
        texts = [texts]
    encoded = [model.encode(t) if isinstance(t, str) else list(t) for t in texts]
    total = count = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        with model.trace(batch, interventions=interventions, capture=[]) as tr:
            logits = model.output.save()
        length = logits.shape[1]
        targets, mask = [], []
        for row, ids in enumerate(batch):
            pad = length - len(ids)
            targets.append([0] * pad + ids[1:] + [0])
            mask.append([0] * pad + [1] * (len(ids) - 1) + [0])
        losses = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(targets), reduction="none")
        total += mx.sum(losses * mx.array(mask)).item()
        count += sum(len(ids) - 1 for ids in batch)
    if count == 0:
        raise InputError("the texts have no next tokens to predict (each is a single token)")
    return total / count


def _module_of(sae) -> str:
    if not sae.module:
        raise InputError("this SAE does not say which module it reads; set sae.module, e.g. 'layers.8'")
    return sae.module


def _key_of(sae) -> str:
    module = _module_of(sae)
    parts = module.split(".")
    return f"layer_{parts[1]}" if len(parts) == 2 and parts[0] == "layers" and parts[1].isdigit() else module


# -- features ---------------------------------------------------------------------------

def top_activating_examples(model, sae: SparseAutoencoder, texts, features: Optional[Sequence[int]] = None,
                            top: int = 10, context: int = 4, batch_size: int = 32) -> FeatureExamples:
    """For each of ``features`` (default: all), the ``top`` tokens of ``texts`` where it fires most.

    Each example has ``context`` tokens before and after it. Texts run through the model in
    batches; only the running top ``top`` per feature is kept, so any number of texts fits.
    """
    module = _module_of(sae)
    features = list(range(sae.n_features)) if features is None else [sae._feature(f) for f in features]
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = [model.encode(t) if isinstance(t, str) else list(t) for t in texts]
    chosen = mx.array(features)
    best_values = np.full((len(features), 0), -np.inf, dtype=np.float32)
    best_where = np.zeros((len(features), 0, 2), dtype=np.int64)
    n_tokens = 0
    full = model.resolve(module)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        tokens = collect_tokens(model, batch, [full], batch_size=batch_size, shard_size=len(batch), progress=False)
        hidden = next(value for key, value in tokens.items() if key not in TOKEN_KEYS)
        acts = np.array(sae.encode(hidden)[:, chosen]).T              # (features, tokens)
        where = np.stack([np.array(tokens["prompt"]) + start, np.array(tokens["position"])], axis=-1)
        n_tokens += where.shape[0]
        values = np.concatenate([best_values, acts], axis=1)
        places = np.concatenate([best_where, np.broadcast_to(where, (len(features),) + where.shape)], axis=1)
        keep = np.argsort(-values, axis=1, kind="stable")[:, :top]
        best_values = np.take_along_axis(values, keep, axis=1)
        best_where = np.take_along_axis(places, keep[..., None], axis=1)
    strings = {}

    def token_str(token_id):
        if token_id not in strings:
            strings[token_id] = model.token_to_str(token_id)
        return strings[token_id]

    examples = {}
    for row, feature in enumerate(features):
        items = []
        for value, (prompt, position) in zip(best_values[row], best_where[row]):
            if value <= 0:
                break
            ids = encoded[prompt]
            items.append(FeatureExample(
                float(value), int(prompt), int(position),
                [token_str(t) for t in ids[max(0, position - context):position]], token_str(ids[position]),
                [token_str(t) for t in ids[position + 1:position + 1 + context]]))
        examples[feature] = items
    return FeatureExamples(module, examples, n_tokens)


def active_features(model, sae: SparseAutoencoder, text, position: int = -1, top: int = 10,
                    interventions=None) -> ActiveFeatures:
    """The ``top`` features of ``sae`` most active at ``position`` of ``text``.

    What the query language's ``features layers.8 @ -1 top 10`` asks, with the SAE loaded for ``layers.8``.
    """
    from .analysis import _check_position

    module = model.resolve(_module_of(sae))
    tokens = model.encode(text) if isinstance(text, str) else list(text)
    position = _check_position(position, len(tokens))
    with model.trace([tokens], capture=[module], interventions=interventions) as tr:
        hidden = tr.save(module)
    acts = sae.encode(hidden[0, position])
    top = min(top, sae.n_features)
    order = mx.argsort(-acts)[:top]
    values = acts[order]
    keep = [(int(f), float(v)) for f, v in zip(order.tolist(), values.tolist()) if v > 0]
    return ActiveFeatures(_module_of(sae), position, model.token_to_str(tokens[position]),
                          [f for f, _ in keep], [v for _, v in keep])
