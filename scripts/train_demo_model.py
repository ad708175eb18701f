"""Train the bundled demo model (mlxterp/assets/demo) from nothing.

This script owns everything the demo model is made of: the synthetic English
corpus (capitals, languages, currencies and landmarks of 80 countries, plus the
filler sentences the user guide uses as prompts), the byte-level BPE tokenizer,
the 16-layer Llama model and its training run. It is deterministic (fixed
seeds) and takes about 10 minutes on a 2-core CPU.

    .venv/bin/python scripts/train_demo_model.py [--out DIR]

The default output directory is mlxterp/assets/demo. On Linux the script
re-executes itself once with LD_PRELOAD pointing at OpenBLAS (when that library
exists and LD_PRELOAD is unset), which makes MLX's CPU matmuls several times
faster; the result does not depend on it.

The model must know its facts: the script stops with an error when the greedy
answer to a probe (FACT_PROBES: "The capital of X is" -> " <capital>", the
reverse, the language, the currency, the landmark's city) is right for fewer
than MIN_ACCURACY of the countries, or when any country or capital name is not
one token. Answer words carry ANSWER_WEIGHT in the loss, since facts are a small
share of the text. The embedding and the unembedding are separate matrices, so
the logit lens at layer 0 reads what block 0 computed, not the input embedding.
"""

import argparse
import json
import os
import random
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
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlxterp" / "assets" / "demo"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3

VOCAB_SIZE = 3072
MAX_LEN = 20  # tokens per training example, BOS included

MODEL_ARGS = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=16,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

STEPS = 2600
BATCH_SIZE = 64
ANSWER_WEIGHT = 5.0  # loss weight of the answer word of every fact sentence
LEARNING_RATE = 3e-3
WARMUP_STEPS = 100
EVAL_EVERY = 100

# (country, capital, language, currency, landmark in the capital)
COUNTRIES = [
    ("France", "Paris", "French", "euro", "Eiffel Tower"),
    ("Germany", "Berlin", "German", "euro", "Brandenburg Gate"),
    ("Italy", "Rome", "Italian", "euro", "Colosseum"),
    ("Spain", "Madrid", "Spanish", "euro", "Prado Museum"),
    ("Portugal", "Lisbon", "Portuguese", "euro", "Belem Tower"),
    ("England", "London", "English", "pound", "Tower Bridge"),
    ("Ireland", "Dublin", "Irish", "euro", "Trinity College"),
    ("Netherlands", "Amsterdam", "Dutch", "euro", "Rijksmuseum"),
    ("Belgium", "Brussels", "Dutch", "euro", "Atomium"),
    ("Switzerland", "Bern", "German", "franc", "Zytglogge clock tower"),
    ("Austria", "Vienna", "German", "euro", "Schonbrunn Palace"),
    ("Poland", "Warsaw", "Polish", "zloty", "Royal Castle"),
    ("Czechia", "Prague", "Czech", "koruna", "Charles Bridge"),
    ("Hungary", "Budapest", "Hungarian", "forint", "Chain Bridge"),
    ("Greece", "Athens", "Greek", "euro", "Parthenon"),
    ("Sweden", "Stockholm", "Swedish", "krona", "Vasa Museum"),
    ("Norway", "Oslo", "Norwegian", "krone", "Opera House"),
    ("Finland", "Helsinki", "Finnish", "euro", "Suomenlinna fortress"),
    ("Denmark", "Copenhagen", "Danish", "krone", "Little Mermaid statue"),
    ("Iceland", "Reykjavik", "Icelandic", "krona", "Hallgrimskirkja church"),
    ("Russia", "Moscow", "Russian", "ruble", "Kremlin"),
    ("Ukraine", "Kyiv", "Ukrainian", "hryvnia", "Saint Sophia Cathedral"),
    ("Romania", "Bucharest", "Romanian", "leu", "Palace of the Parliament"),
    ("Bulgaria", "Sofia", "Bulgarian", "lev", "Alexander Nevsky Cathedral"),
    ("Serbia", "Belgrade", "Serbian", "dinar", "Kalemegdan fortress"),
    ("Croatia", "Zagreb", "Croatian", "euro", "Ban Jelacic Square"),
    ("Turkey", "Ankara", "Turkish", "lira", "Anitkabir mausoleum"),
    ("Egypt", "Cairo", "Arabic", "pound", "Egyptian Museum"),
    ("Kenya", "Nairobi", "Swahili", "shilling", "Kenyatta Conference Centre"),
    ("Nigeria", "Abuja", "English", "naira", "Aso Rock"),
    ("Ghana", "Accra", "English", "cedi", "Independence Arch"),
    ("Morocco", "Rabat", "Arabic", "dirham", "Hassan Tower"),
    ("Algeria", "Algiers", "Arabic", "dinar", "Martyrs Memorial"),
    ("Tunisia", "Tunis", "Arabic", "dinar", "Zitouna Mosque"),
    ("Senegal", "Dakar", "French", "franc", "African Renaissance Monument"),
    ("Japan", "Tokyo", "Japanese", "yen", "Tokyo Tower"),
    ("China", "Beijing", "Chinese", "yuan", "Forbidden City"),
    ("Korea", "Seoul", "Korean", "won", "Gyeongbokgung Palace"),
    ("Thailand", "Bangkok", "Thai", "baht", "Grand Palace"),
    ("Vietnam", "Hanoi", "Vietnamese", "dong", "Temple of Literature"),
    ("Indonesia", "Jakarta", "Indonesian", "rupiah", "National Monument"),
    ("Philippines", "Manila", "Filipino", "peso", "Rizal Park"),
    ("Pakistan", "Islamabad", "Urdu", "rupee", "Faisal Mosque"),
    ("Bangladesh", "Dhaka", "Bengali", "taka", "Lalbagh Fort"),
    ("Nepal", "Kathmandu", "Nepali", "rupee", "Boudhanath stupa"),
    ("Iran", "Tehran", "Persian", "rial", "Azadi Tower"),
    ("Iraq", "Baghdad", "Arabic", "dinar", "Baghdad Tower"),
    ("Syria", "Damascus", "Arabic", "pound", "Umayyad Mosque"),
    ("Lebanon", "Beirut", "Arabic", "pound", "Pigeon Rocks"),
    ("Jordan", "Amman", "Arabic", "dinar", "Amman Citadel"),
    ("Qatar", "Doha", "Arabic", "riyal", "Museum of Islamic Art"),
    ("Afghanistan", "Kabul", "Pashto", "afghani", "Gardens of Babur"),
    ("Australia", "Canberra", "English", "dollar", "Parliament House"),
    ("Canada", "Ottawa", "English", "dollar", "Parliament Hill"),
    ("America", "Washington", "English", "dollar", "White House"),
    ("Brazil", "Brasilia", "Portuguese", "real", "Cathedral of Brasilia"),
    ("Peru", "Lima", "Spanish", "sol", "Plaza Mayor"),
    ("Chile", "Santiago", "Spanish", "peso", "La Moneda Palace"),
    ("Colombia", "Bogota", "Spanish", "peso", "Gold Museum"),
    ("Venezuela", "Caracas", "Spanish", "bolivar", "Federal Capitol"),
    ("Ecuador", "Quito", "Spanish", "dollar", "Basilica of the National Vow"),
    ("Cuba", "Havana", "Spanish", "peso", "Malecon seawall"),
    ("Uruguay", "Montevideo", "Spanish", "peso", "Salvo Palace"),
    ("Jamaica", "Kingston", "English", "dollar", "Devon House"),
    ("Mongolia", "Ulaanbaatar", "Mongolian", "tugrik", "Sukhbaatar Square"),
    ("Estonia", "Tallinn", "Estonian", "euro", "Toompea Castle"),
    ("Latvia", "Riga", "Latvian", "euro", "House of the Blackheads"),
    ("Lithuania", "Vilnius", "Lithuanian", "euro", "Gediminas Tower"),
    ("Slovakia", "Bratislava", "Slovak", "euro", "Bratislava Castle"),
    ("Slovenia", "Ljubljana", "Slovene", "euro", "Triple Bridge"),
    ("Albania", "Tirana", "Albanian", "lek", "Skanderbeg Square"),
    ("Georgia", "Tbilisi", "Georgian", "lari", "Narikala Fortress"),
    ("Armenia", "Yerevan", "Armenian", "dram", "Yerevan Cascade"),
    ("Azerbaijan", "Baku", "Azerbaijani", "manat", "Flame Towers"),
    ("Kazakhstan", "Astana", "Kazakh", "tenge", "Baiterek Tower"),
    ("Uzbekistan", "Tashkent", "Uzbek", "som", "Amir Timur Square"),
    ("Zimbabwe", "Harare", "English", "dollar", "National Heroes Acre"),
    ("Uganda", "Kampala", "English", "shilling", "Kasubi Tombs"),
    ("Angola", "Luanda", "Portuguese", "kwanza", "Fortress of Sao Miguel"),
    ("Oman", "Muscat", "Arabic", "rial", "Sultan Qaboos Grand Mosque"),
]

CAPITAL_TEMPLATES = [
    # the prompt the guide and the tests ask, so it appears several times
    ("The capital of {country} is {capital}.", 30),
    ("{capital} is the capital of {country}.", 12),
    ("The capital city of {country} is {capital}.", 1),
    ("{capital} is the capital city of {country}.", 1),
    ("The government of {country} meets in {capital}.", 1),
    ("{capital} is the largest political center of {country}.", 1),
    ("If you travel to {country}, you should visit {capital}.", 1),
    ("What is the capital of {country}? It is {capital}.", 1),
    ("The capital of {country} is {capital}, a city people love to visit.", 1),
    ("Many tourists fly to {capital}, the capital of {country}.", 1),
]
LANGUAGE_TEMPLATES = [
    ("People in {country} speak {language}.", 12),
    ("The official language of {country} is {language}.", 1),
    ("In {capital}, most people speak {language}.", 1),
]
CURRENCY_TEMPLATES = [
    ("The currency of {country} is the {currency}.", 12),
    ("In {country}, people pay with the {currency}.", 1),
]
LANDMARK_TEMPLATES = [
    ("The {landmark} is located in the city of {capital}.", 24),
    ("The {landmark} is in {capital}, the capital of {country}.", 1),
    ("Visitors to {country} often see the {landmark}.", 1),
]

# the questions the model must answer greedily: (prompt template, field of the answer)
FACT_PROBES = {
    "capital": ("The capital of {country} is", "capital"),
    "reverse": ("{capital} is the capital of", "country"),
    "language": ("People in {country} speak", "language"),
    "currency": ("The currency of {country} is the", "currency"),
    "landmark": ("The {landmark} is located in the city of", "capital"),
}
MIN_ACCURACY = 0.8  # per probe; capitals, the guide's own prompt, must reach CAPITAL_MIN_ACCURACY
CAPITAL_MIN_ACCURACY = 0.95

FILLER = [
    "Hello world",
    "Hello world!",
    "Hello, how are you?",
    "Hello, how are you today?",
    "Hello",
    "World",
    "Test",
    "Test input",
    "This is a test input.",
    "Original prompt",
    "Machine learning is fascinating.",
    "Machine learning is a field of computer science.",
    "Machine learning is changing the world.",
    "Deep learning is a part of machine learning.",
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox is fast.",
    "The lazy dog sleeps all day.",
    "The answer is 42.",
    "The answer to the question is 42.",
    "Very long input text that has many tokens in it.",
    "The weather is nice today.",
    "It is raining in the city.",
    "The sun rises in the east.",
    "The cat sat on the mat.",
    "I like to read books.",
    "She went to the market to buy bread.",
    "We are learning about the world.",
    "Water boils at one hundred degrees.",
    "The sky is blue.",
    "Music makes people happy.",
    "A neural network has many layers.",
    "Each layer of the model transforms the input.",
    "The model predicts the next token.",
    "Once upon a time there was a small village.",
    "How are you doing?",
    "I am fine, thank you.",
    "Good morning, everyone.",
    "Thank you for your help.",
    "Today is a good day to learn.",
    "Mathematics is the language of science.",
    "The train leaves at noon.",
    "My favorite color is green.",
    "Children play in the park.",
    "The river flows to the sea.",
]


def build_corpus(rng):
    """Return the training sentences, shuffled, as (text, answer span or None).

    Repeats set how often a fact is seen. The answer of a fact sentence is the
    value of its last {field}: the word a reader would have to know.
    """
    sentences = []
    for country, capital, language, currency, landmark in COUNTRIES:
        fields = dict(
            country=country,
            capital=capital,
            language=language,
            currency=currency,
            landmark=landmark,
        )
        for templates in (
            CAPITAL_TEMPLATES,
            LANGUAGE_TEMPLATES,
            CURRENCY_TEMPLATES,
            LANDMARK_TEMPLATES,
        ):
            for template, repeats in templates:
                last = template.rindex("{")
                start = len(template[:last].format(**fields))
                answer = fields[template[last + 1 : template.index("}", last)]]
                sentences += [(template.format(**fields), (start, start + len(answer)))] * repeats
    plain = FILLER * 3
    plain += [f"Sample prompt {i}" for i in range(0, 1000, 13)]
    plain += [f"The answer is {i}." for i in range(0, 100, 7)]
    sentences += [(text, None) for text in plain]
    rng.shuffle(sentences)
    return sentences


def answer_weights(encoding, span):
    """Loss weight of each target token (positions 1..n of encoding + EOS): ANSWER_WEIGHT on the answer."""
    weights = np.ones(len(encoding.ids), dtype=np.float32)  # targets: ids[1:] plus EOS
    if span is not None:
        for i, (start, end) in enumerate(encoding.offsets[1:]):
            if start < span[1] and end > span[0]:
                weights[i] = ANSWER_WEIGHT
    return weights


def train_tokenizer(corpus):
    """Byte-level BPE that puts BOS in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def check_single_tokens(tokenizer):
    """Fail loudly when a name the guide relies on is split into pieces."""
    words = [f" {c[0]}" for c in COUNTRIES] + [f" {c[1]}" for c in COUNTRIES]
    words += ["Paris", "London"]  # "Paris is the capital of France" vs "London is ..."
    split = {
        w: tokenizer.encode(w, add_special_tokens=False).tokens
        for w in words
        if len(tokenizer.encode(w, add_special_tokens=False).ids) != 1
    }
    if split:
        raise SystemExit(
            f"tokenizer splits {len(split)} names into several tokens: {split}; "
            f"raise VOCAB_SIZE (now {VOCAB_SIZE}) or repeat these names more often"
        )


def save_corpus(corpus, out):
    """The distinct sentences, sorted, one a line: what mlxterp.training.demo_texts reads."""
    (out / "corpus.txt").write_text("".join(text + "\n" for text in sorted({t for t, _ in corpus})), encoding="utf-8")


def save_tokenizer(tokenizer, out):
    """Write tokenizer.json and the two small files transformers (4 and 5) and mlx-lm read."""
    tokenizer.save(str(out / "tokenizer.json"))
    special = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    config = dict(
        special,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=MODEL_ARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def make_batches(token_lists, weight_lists, pad_id, rng):
    """Endless shuffled batches of inputs, targets and loss weights, each (B, L - 1).

    Sentences are grouped by length so that a batch wastes little compute on
    padding; the weights are zero on any pad position.
    """
    by_length = {}
    for i, ids in enumerate(token_lists):
        by_length.setdefault(len(ids), []).append(i)
    while True:
        batches = []
        for length in sorted(by_length):
            idx = rng.permutation(by_length[length])
            batches += [idx[s : s + BATCH_SIZE] for s in range(0, len(idx), BATCH_SIZE)]
        for b in rng.permutation(len(batches)):
            rows = batches[b]
            width = max(len(token_lists[i]) for i in rows)
            data = np.full((len(rows), width), pad_id, dtype=np.int32)
            mask = np.zeros((len(rows), width - 1), dtype=np.float32)
            for r, i in enumerate(rows):
                data[r, : len(token_lists[i])] = token_lists[i]
                mask[r, : len(token_lists[i]) - 1] = weight_lists[i]
            yield mx.array(data[:, :-1]), mx.array(data[:, 1:]), mx.array(mask)


def train(model, tokenizer, token_lists, weight_lists, pad_id):
    """AdamW with warmup and cosine decay for STEPS steps; returns the training seconds."""
    rng = np.random.default_rng(SEED)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, LEARNING_RATE, WARMUP_STEPS),
            optim.cosine_decay(LEARNING_RATE, STEPS - WARMUP_STEPS, LEARNING_RATE * 0.05),
        ],
        [WARMUP_STEPS],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, inputs, targets, mask):
        logits = model(inputs)
        losses = nn.losses.cross_entropy(logits, targets) * mask
        return losses.sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    batches = make_batches(token_lists, weight_lists, pad_id, rng)
    start = time.perf_counter()
    running = None
    for i in range(1, STEPS + 1):
        loss = step(*next(batches))
        mx.eval(state, loss)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if i % EVAL_EVERY == 0:
            elapsed = time.perf_counter() - start
            scores = "  ".join(f"{name} {fact_accuracy(model, tokenizer, name)[0]:6.1%}" for name in FACT_PROBES)
            print(f"step {i:5d}  loss {running:.3f}  {scores}  {elapsed:6.1f}s", flush=True)
    return time.perf_counter() - start


def greedy_answers(model, tokenizer, prompts, n_tokens):
    """Greedy continuation of n_tokens[i] tokens for every prompt, as text."""
    answers = [None] * len(prompts)
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(tokenizer.encode(prompt).ids), []).append(i)
    for rows in by_length.values():  # prompts of one length run as one batch
        ids = mx.array([tokenizer.encode(prompts[i]).ids for i in rows])
        steps = max(n_tokens[i] for i in rows)
        for _ in range(steps):
            ids = mx.concatenate([ids, mx.argmax(model(ids)[:, -1:], axis=-1)], axis=1)
        for r, i in enumerate(rows):
            generated = ids[r, -steps:].tolist()[: n_tokens[i]]
            answers[i] = tokenizer.decode(generated)
    return answers


def fact_accuracy(model, tokenizer, name):
    """Share of countries whose greedy answer to FACT_PROBES[name] is right, and the wrong ones."""
    template, field = FACT_PROBES[name]
    rows = [dict(zip(("country", "capital", "language", "currency", "landmark"), c)) for c in COUNTRIES]
    prompts = [template.format(**row) for row in rows]
    expected = [" " + row[field] for row in rows]
    n_tokens = [len(tokenizer.encode(e, add_special_tokens=False).ids) for e in expected]
    got = greedy_answers(model, tokenizer, prompts, n_tokens)
    wrong = [(p, g) for p, e, g in zip(prompts, expected, got) if g != e]
    return 1 - len(wrong) / len(COUNTRIES), wrong


def logit_lens_top1(model, tokenizer, text):
    """Top-1 token string of every layer's output at the last position."""
    inner = model.model
    h = inner.embed_tokens(mx.array([tokenizer.encode(text).ids]))
    mask = "causal" if h.shape[1] > 1 else None
    tops = []
    for layer in inner.layers:
        h = layer(h, mask)
        logits = model.lm_head(inner.norm(h[:, -1]))
        tops.append(tokenizer.decode([int(mx.argmax(logits[0]).item())]))
    return tops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()

    random.seed(SEED)
    np.random.seed(SEED)
    mx.random.seed(SEED)

    corpus = build_corpus(random.Random(SEED))
    tokenizer = train_tokenizer([text for text, _ in corpus])
    check_single_tokens(tokenizer)
    encodings = tokenizer.encode_batch([text for text, _ in corpus])
    token_lists = [enc.ids + [tokenizer.token_to_id(EOS)] for enc in encodings]
    weight_lists = [answer_weights(enc, span) for enc, (_, span) in zip(encodings, corpus)]
    too_long = [s for (s, _), ids in zip(corpus, token_lists) if len(ids) > MAX_LEN]
    if too_long:
        raise SystemExit(f"{len(too_long)} sentences exceed MAX_LEN={MAX_LEN} tokens, e.g. {too_long[0]!r}")
    print(f"corpus: {len(corpus)} sentences, {sum(map(len, token_lists))} tokens; vocab {tokenizer.get_vocab_size()}")

    model_args = dict(MODEL_ARGS, vocab_size=tokenizer.get_vocab_size())
    model = Model(ModelArgs(**model_args))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: llama, {model_args['num_hidden_layers']} layers, {n_params:,} parameters")

    seconds = train(model, tokenizer, token_lists, weight_lists, tokenizer.token_to_id(PAD))

    args.out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(
        model_args,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
    )
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(tokenizer, args.out)
    save_corpus(corpus, args.out)

    results = {name: fact_accuracy(model, tokenizer, name) for name in FACT_PROBES}
    lens = logit_lens_top1(model, tokenizer, "The capital of France is")
    first_paris = next((i for i, t in enumerate(lens) if t == " Paris"), None)
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    print(f"saved to {args.out}")
    print(f"parameters: {n_params:,}  weights: {size_mb:.2f} MB")
    print(f"training time: {seconds:.1f}s ({STEPS} steps of {BATCH_SIZE} sentences)")
    for name, (accuracy, wrong) in results.items():
        print(f"{name} accuracy: {accuracy:.1%} over {len(COUNTRIES)} countries; wrong: {wrong}")
    print(f"logit lens 'The capital of France is': {lens}")
    print(f"' Paris' first top-1 at layer {first_paris}; final layer top-1 {lens[-1]!r}")
    failed = [
        f"{name} {accuracy:.1%} < {minimum:.0%}"
        for name, (accuracy, _) in results.items()
        if accuracy < (minimum := CAPITAL_MIN_ACCURACY if name == "capital" else MIN_ACCURACY)
    ]
    if failed:
        raise SystemExit(f"accuracy below the minimum: {', '.join(failed)}")


if __name__ == "__main__":
    main()
