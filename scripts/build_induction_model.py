"""Build the bundled induction model (mlxterp/assets/induction): weights set by hand.

A two-layer, attention-only GPT-2 (mlx-lm's ``gpt2``: hidden 176, 2 heads per layer,
learned positions; the MLPs are all zeros, so each block is x + attention(ln(x))) whose
weights are written down rather than trained, so that it is exactly the textbook circuit:

* layer 0, head 0 -- previous-token head: queries and keys read the position one-hots,
  key j answers query j + 1; its value writes the token of j into a "previous token"
  subspace of the residual stream;
* layer 1, head 0 -- induction head: the query is the current token, the key is the
  previous token written by layer 0 (K-composition), so position i attends to the
  position right after an earlier occurrence of its token, and the value copies that
  position's token into the logits (the answer of ``A B ... A -> B``);
* head 1 of each layer attends to the first position and writes nothing (a resting head).

The residual stream holds three one-hot blocks: the token (dims 0-63), the previous
token (64-127) and the position (128-168). Every token + position embedding then has
the same mean and variance, so each LayerNorm is one fixed scaling, which the biases
below undo exactly. (Trained two-layer models here learned shifted variants: a layer-0
head two or three tokens back matched by the layer-1 key, read one token back by its
value -- also induction, but not the pattern the standard score measures. A model with
the exact circuit is the better test fixture.)

The directory is an ordinary mlx-lm model directory (config.json, float16 safetensors,
a word-level tokenizer of 60 words), so ``InterpretableModel(path)`` and
``mlx_lm.load(path)`` load it; ``mlxterp.heads.induction_model()`` is the short way.

    .venv/bin/python scripts/build_induction_model.py [--out DIR]

It checks the built model: on repeated random words it must predict the second copy
(after its first word) with probability above MIN_COPY_PROBABILITY.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.gpt2 import Model, ModelArgs

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlxterp" / "assets" / "induction"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3
WORDS = (
    "cat dog sun moon tree rock fish bird lake hill rain snow wind fire salt milk bread corn "
    "rice leaf root seed star sand gold iron wood wool silk coal ship road door wall roof bell "
    "drum horn lamp rope coin ring king cook farm barn mill well gate path pond reef wave cave "
    "fern moss frog wolf bear deer"
).split()
assert len(WORDS) == len(set(WORDS)) == 60

VOCAB = len(SPECIAL_TOKENS) + len(WORDS)  # 64
POSITIONS = 41  # longest input: BOS + 20 words repeated twice
HIDDEN, HEADS = 176, 2
HEAD_DIM = HIDDEN // HEADS
TOKEN, PREVIOUS, POSITION = 0, VOCAB, 2 * VOCAB  # where each one-hot block starts
SHARPNESS = 30.0  # attention logit of the wanted key (others get 0): e^-30 leaks
COPY = 4.0  # how strongly the induction head writes the copied token (the current one has 1)
EPS = 1e-5
MIN_COPY_PROBABILITY = 0.95

MODEL_ARGS = dict(model_type="gpt2", n_embd=HIDDEN, n_head=HEADS, n_layer=2, n_ctx=POSITIONS,
                  n_positions=POSITIONS, layer_norm_epsilon=EPS, vocab_size=VOCAB)


def build_tokenizer():
    """Word-level tokenizer over WORDS that puts BOS in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def save_tokenizer(tokenizer, out):
    tokenizer.save(str(out / "tokenizer.json"))
    special = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast",
                  model_max_length=POSITIONS, clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def layer_norm_undone(ln, nonzeros: int):
    """Make ``ln`` map a residual of ``nonzeros`` ones (zeros elsewhere) to ``residual / std``."""
    mean = nonzeros / HIDDEN
    std = float(np.sqrt(nonzeros / HIDDEN - mean ** 2 + EPS))
    ln.weight = mx.ones((HIDDEN,))
    ln.bias = mx.full((HIDDEN,), mean / std)
    return std


def build_weights(model):
    """Write the circuit into ``model`` (see the module docstring); returns nothing."""
    gpt = model.model
    wte = np.zeros((VOCAB, HIDDEN), np.float32)
    wte[np.arange(VOCAB), TOKEN + np.arange(VOCAB)] = 1.0
    wpe = np.zeros((POSITIONS, HIDDEN), np.float32)
    wpe[np.arange(POSITIONS), POSITION + np.arange(POSITIONS)] = 1.0
    gpt.wte.weight, gpt.wpe.weight = mx.array(wte), mx.array(wpe)
    beta = SHARPNESS * np.sqrt(HEAD_DIM)  # undoes the 1/sqrt(head_dim) of the scores

    for index, block in enumerate(gpt.h):
        # layer 0 sees token + position (2 ones), layer 1 also the previous token (3 ones)
        std = layer_norm_undone(block.ln_1, 2 if index == 0 else 3)
        q, k, v = (np.zeros((HIDDEN, HIDDEN), np.float32) for _ in range(3))
        q_bias = np.zeros(HIDDEN, np.float32)
        out = np.zeros((HIDDEN, HIDDEN), np.float32)
        if index == 0:  # head 0: previous token
            for position in range(POSITIONS):
                q[position, POSITION + position] = beta * std
                if position + 1 < HEAD_DIM:
                    k[position + 1, POSITION + position] = std
            for token in range(VOCAB):
                v[token, TOKEN + token] = std
                out[PREVIOUS + token, token] = 1.0
        else:  # head 0: induction
            for token in range(VOCAB):
                q[token, TOKEN + token] = beta * std
                k[token, PREVIOUS + token] = std
                v[token, TOKEN + token] = std
                out[TOKEN + token, token] = COPY
        # head 1: a constant query meets a key only position 0 has; it writes nothing
        q_bias[HEAD_DIM] = beta
        k[HEAD_DIM, POSITION + 0] = std
        block.attn.c_attn.weight = mx.array(np.concatenate([q, k, v]))
        block.attn.c_attn.bias = mx.array(np.concatenate([q_bias, np.zeros(2 * HIDDEN, np.float32)]))
        block.attn.c_proj.weight = mx.array(out)
        block.attn.c_proj.bias = mx.zeros((HIDDEN,))
        for linear in (block.mlp.c_fc, block.mlp.c_proj):
            linear.weight = mx.zeros_like(linear.weight)
            linear.bias = mx.zeros_like(linear.bias)
        block.ln_2.weight, block.ln_2.bias = mx.ones((HIDDEN,)), mx.zeros((HIDDEN,))
    gpt.ln_f.weight, gpt.ln_f.bias = mx.ones((HIDDEN,)), mx.zeros((HIDDEN,))


def copy_probability(model, seed: int = 0, batch: int = 64, length: int = 20) -> float:
    """Mean probability of the right word on the second copy of repeated random words."""
    rng = np.random.default_rng(seed)
    first = len(SPECIAL_TOKENS)
    words = np.stack([rng.permutation(len(WORDS))[:length] + first for _ in range(batch)])
    tokens = np.concatenate([np.full((batch, 1), SPECIAL_TOKENS.index(BOS)), words, words], axis=1)
    probabilities = mx.softmax(model(mx.array(tokens)).astype(mx.float32), axis=-1)
    targets = mx.array(tokens[:, length + 2:])  # the second copy after its first word
    picked = mx.take_along_axis(probabilities[:, length + 1:-1], targets[..., None], axis=-1)
    return float(picked.mean().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    model = Model(ModelArgs(**MODEL_ARGS))
    build_weights(model)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    probability = copy_probability(model)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(MODEL_ARGS, architectures=["GPT2LMHeadModel"], torch_dtype="float16",
                  bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
                  pad_token_id=SPECIAL_TOKENS.index(PAD))
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(build_tokenizer(), args.out)
    size_kb = (args.out / "model.safetensors").stat().st_size / 1e3
    print(f"saved to {args.out} ({size_kb:.0f} kB of weights)")
    print(f"probability of the right word on the second copy of 20 repeated random words: {probability:.4f}")
    if probability < MIN_COPY_PROBABILITY:
        raise SystemExit(f"the built model does not copy: {probability:.4f} < {MIN_COPY_PROBABILITY}")


if __name__ == "__main__":
    main()
