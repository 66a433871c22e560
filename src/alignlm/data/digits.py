"""``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled, with captions and questions.

Real data that ships with scikit-learn, so the offline demo can show a model learning to read images it
never saw: the held-out question "What digit is shown in the image?" has a 10 % chance level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from alignlm.data.synthetic import DatasetWriter, Question, check_int, split

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))
DIGIT_Q = "What digit is shown in the image? Answer with a single number."
PARITY_Q = "Is the digit even or odd? Answer with one word."
LARGE_Q = "Is the digit greater than five? Answer yes or no."
CAPTIONS = (
    "A handwritten digit {n} ({w}).",
    "The number {w} ({n}), handwritten.",
    "A handwritten {w}: the digit {n}.",
    "The digit {n}, written by hand in dark ink: {w}.",
)


def render(pixels: np.ndarray, size: int) -> np.ndarray:
    """8x8 intensities 0..16 -> ``size`` px RGB, dark ink on a light background, bicubic so strokes stay smooth."""
    gray = (255 - pixels * (255 / 16)).clip(0, 255).round().astype(np.uint8)
    big = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(big.convert("RGB"))


def caption(d: int, rng: np.random.Generator) -> str:
    """A templated caption naming the digit both as a numeral and as a word."""
    return CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(n=d, w=WORDS[d])


def digit_question(d: int) -> Question:
    """The held-out question, also asked first in every instruct conversation so the phrasing matches."""
    return Question(DIGIT_Q, str(d), "digit", NUMERALS)


def questions(d: int, rng: np.random.Generator) -> list[Question]:
    """1-2 turns: which digit, then sometimes parity or "greater than five"."""
    extra = int(rng.integers(3))
    qa = [digit_question(d)]
    if extra == 1:
        qa.append(Question(PARITY_Q, "even" if d % 2 == 0 else "odd", "parity", ("even", "odd")))
    elif extra == 2:
        qa.append(Question(LARGE_Q, "yes" if d > 5 else "no", "greater_than_five", ("yes", "no")))
    return qa


def generate(
    out_dir: str | Path, *, seed: int = 0, image_size: int = 64, n_test: int = 300, limit: int | None = None
) -> dict[str, Any]:
    """Write the digits set (train: captions + QA; test: one digit question per held-out image); return info.json."""
    check_int("image_size", image_size, 16, why="pixels per side")
    data = load_digits()
    rng = np.random.default_rng(seed)
    train, test = split(len(data.target), n_test, rng, limit)
    writer = DatasetWriter(out_dir, "digits")
    for i in train:
        d = int(data.target[i])
        writer.add_train(f"digits_{i:04d}", render(data.images[i], image_size), caption(d, rng), questions(d, rng))
    for i in test:
        d = int(data.target[i])
        writer.add_test(f"digits_{i:04d}", render(data.images[i], image_size), caption(d, rng), digit_question(d))
    return writer.finish(seed, {"image_size": image_size, "n_test": n_test, "limit": limit})
