"""Train the bundled induction model (mlxterp/assets/induction) from nothing.

A two-layer, attention-only GPT-2 (hidden 128, N_HEAD heads per layer, learned positions;
each block's MLP is zeroed and frozen, so it adds exactly nothing) trained on sequences
of 60 words built so that two circuits pay off:

* half of the words follow a fixed rule from the word two back (SKIP_TABLE): predicting
  them needs the previous word at each position, which a previous-token head in
  layer 0 provides;
* one stretch of random words (4 .. 20 of them) is repeated: predicting the second copy
  needs an induction head in layer 1, which finds where the current word occurred
  before (through layer 0's previous-token head) and copies the word that followed.

Copies of random length at random places leave no fixed offset to exploit. The
directory is an ordinary mlx-lm model directory (config.json, safetensors, a
word-level tokenizer), so ``InterpretableModel(path)`` and ``mlx_lm.load(path)`` load it;
``mlxterp.heads.induction_model()`` is the short way. Deterministic (fixed seeds);
about 7 minutes on a 2-core CPU (OpenBLAS).

    .venv/bin/python scripts/train_induction_model.py [--out DIR]

The script stops with an error when the trained model's loss on the second copy of
repeated words is not far below chance (MAX_REPEAT_LOSS nats).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

if (
    __name__ == "__main__"
    and sys.platform.startswith("linux")
    and "LD_PRELOAD" not in os.environ
    and os.path.exists(OPENBLAS)
):
    os.environ["LD_PRELOAD"] = OPENBLAS
    os.execv(sys.executable, [sys.executable, *sys.argv])

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.gpt2 import Model, ModelArgs

SEED = 0
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

N_HEAD = 4
SEQ_LEN = 41          # tokens per training sequence, BOS included
BATCH_SIZE = 32
STEPS = 3000
LEARNING_RATE = 3e-3
WARMUP = 200
RULE_SHARE = 0.5
SKIP_TABLE = np.random.default_rng(1).permutation(len(WORDS))  # next word from the word two back
GAP = lambda rng, most: int(rng.integers(0, most))  # noqa: E731
MAX_REPEAT_LOSS = 0.7  # nats per token on the predictable part of the second copy (chance: ln 60 = 4.1)

MODEL_ARGS = dict(
    model_type="gpt2",
    n_embd=128,
    n_head=N_HEAD,
    n_layer=2,
    n_ctx=SEQ_LEN,
    n_positions=SEQ_LEN,
    layer_norm_epsilon=1e-5,
    vocab_size=len(SPECIAL_TOKENS) + len(WORDS),
)


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
                  model_max_length=SEQ_LEN, clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def repeated_sequences(rng, batch: int, length: int = SEQ_LEN):
    """(tokens (batch, length), second-copy mask (batch, length - 1) over the predicted targets).

    Words follow a fixed rule half of the time (the word two back decides the next one,
    through SKIP_TABLE), which rewards a previous-token head; one stretch of random length
    (4 .. half the sequence) is repeated later, after a random gap. The mask marks the
    targets inside the second copy after its first word.
    """
    first_word = len(SPECIAL_TOKENS)
    tokens = rng.integers(first_word, first_word + len(WORDS), size=(batch, length))
    tokens[:, 0] = SPECIAL_TOKENS.index(BOS)
    follow = rng.random((batch, length)) < RULE_SHARE
    for t in range(3, length):
        tokens[:, t] = np.where(follow[:, t], SKIP_TABLE[tokens[:, t - 2] - first_word] + first_word, tokens[:, t])
    mask = np.zeros((batch, length - 1), dtype=np.float32)
    body = length - 1
    for row in range(batch):
        n = int(rng.integers(4, body // 2 + 1))
        start = 1 + int(rng.integers(0, body - 2 * n + 1))
        copy = start + n + GAP(rng, body - 2 * n - start + 2)
        tokens[row, copy:copy + n] = tokens[row, start:start + n]
        mask[row, copy:copy + n - 1] = 1.0  # the target at t + 1 is predicted at position t
    return tokens, mask


def make_attention_only(model):
    """Zero and freeze every MLP, so each block is x + attention(norm(x)) exactly."""
    for layer in model.layers:
        layer.mlp.update(tree_map(mx.zeros_like, layer.mlp.parameters()))
        layer.mlp.freeze()


def loss_fn(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    # The copies carry the signal; random words count a little, to keep the model uncertain there.
    weights = 0.1 + mask
    return (losses * weights).sum() / weights.sum()


def repeat_loss(model, rng, batch: int = 256):
    """Mean loss on the predictable targets of the second copy."""
    tokens, mask = repeated_sequences(rng, batch)
    tokens, mask = mx.array(tokens), mx.array(mask)
    logits = model(tokens[:, :-1]).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    return ((losses * mask).sum() / mask.sum()).item()


def train(model, rng):
    schedule = optim.join_schedules([optim.linear_schedule(1e-4, LEARNING_RATE, WARMUP),
                                     optim.cosine_decay(LEARNING_RATE, STEPS - WARMUP, 1e-4)], [WARMUP])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    start = time.time()
    for step in range(1, STEPS + 1):
        tokens, mask = repeated_sequences(rng, BATCH_SIZE)
        tokens = mx.array(tokens)
        loss, grads = step_fn(model, tokens[:, :-1], tokens[:, 1:], mx.array(mask))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)", flush=True)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    mx.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    tokenizer = build_tokenizer()
    model = Model(ModelArgs(**MODEL_ARGS))
    make_attention_only(model)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"model: 2-layer attention-only gpt2, {n_params:,} trained parameters")

    seconds = train(model, rng)
    final = repeat_loss(model, np.random.default_rng(SEED + 1))

    args.out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(MODEL_ARGS, architectures=["GPT2LMHeadModel"], torch_dtype="float32",
                  bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
                  pad_token_id=SPECIAL_TOKENS.index(PAD))
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(tokenizer, args.out)
    size_kb = (args.out / "model.safetensors").stat().st_size / 1e3
    print(f"saved to {args.out} ({size_kb:.0f} kB of weights)")
    print(f"training time: {seconds:.1f}s ({STEPS} steps of {BATCH_SIZE} x {SEQ_LEN} tokens)")
    print(f"loss on the second copy of repeated words: {final:.3f} nats (chance {np.log(len(WORDS)):.2f})")
    if final > MAX_REPEAT_LOSS:
        raise SystemExit(f"the model did not learn to copy: repeat loss {final:.3f} > {MAX_REPEAT_LOSS}")


if __name__ == "__main__":
    main()
