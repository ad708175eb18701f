"""Sentences the demo model was trained on (scripts/train_demo_model.py's corpus), for training lenses and SAEs."""

import importlib.util
import random
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo_model.py"


def demo_texts(seed: int = 0) -> list:
    """The corpus's distinct sentences, shuffled with ``seed``."""
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts = sorted({text for text, _ in script.build_corpus(random.Random(0))})
    random.Random(seed).shuffle(texts)
    return texts
