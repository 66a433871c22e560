"""``shapes``: seeded scenes of coloured shapes in quadrants, with captions, QA and per-patch word labels.

Every fact in a scene is known, so questions on count, colour, shape and position have exact answers and
known answer spaces (the chance level). ``patch_labels.json`` gives, for each image and each cell of a
``label_grid`` x ``label_grid`` grid, the words of what covers the cell with coverage scores measured on the
rendered mask: an annotation source of token-level word labels (``alignlm sea-labels annotations``).

With ``som`` on, every training scene is also written with a numbered tag on each object (Set-of-Mark prompting) and a
``som.json`` record asks for the objects one by one in tag order ("list items one by one", Yan et al. 2024): tags in
a random order per scene, so the answer is read off the marks. The tags draw from their own random stream, so the
other files are the same bytes with ``som`` on or off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from alignlm.data.synthetic import DatasetWriter, Question, check_int

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant q is row q // 2, column q % 2
QTYPES = ("count", "color", "shape", "position")
KINDS = tuple((shape, color) for shape in SHAPES for color in COLOURS)  # a scene never repeats a (shape, colour)
BACKGROUND = "background"
VOCAB = (*COLOURS, *SHAPES, BACKGROUND)
COUNT_Q = "How many shapes are there? Answer with a single number."
SOM_Q = "Every object in the image has a numbered tag. Name the objects one by one, in the order of their tags."


class Shape(NamedTuple):
    """One object of a scene: what it is, where it is, and its pixel box ``(x0, y0, x1, y1)``."""

    shape: str
    color: str
    position: str
    box: tuple[int, int, int, int]


def sample_scene(rng: np.random.Generator, size: int, max_shapes: int) -> list[Shape]:
    """1..max_shapes distinct coloured shapes in distinct quadrants, 35-45 % of the quadrant side, so none overlap."""
    n = int(rng.integers(1, max_shapes + 1))
    quadrants = sorted(rng.choice(4, size=n, replace=False).tolist())
    kinds = rng.choice(len(KINDS), size=n, replace=False).tolist()
    half = size / 2
    scene = []
    for q, kind in zip(quadrants, kinds):
        side = half * rng.uniform(0.35, 0.45)
        cx, cy = half * (q % 2 + 0.5), half * (q // 2 + 0.5)
        dx, dy = rng.uniform(-0.25, 0.25, size=2) * (half - side)  # jitter keeps a margin inside the quadrant
        x0, y0 = round(cx + dx - side / 2), round(cy + dy - side / 2)
        box = (x0, y0, x0 + round(side), y0 + round(side))
        scene.append(Shape(*KINDS[kind], POSITIONS[q], box))
    return scene


def draw_scene(size: int, scene: list[Shape]) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image on white and a label map of the same pixels (0 = background, k = k-th shape)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    labels = Image.new("L", (size, size), 0)
    for k, obj in enumerate(scene, 1):
        x0, y0, x1, y1 = obj.box
        for canvas, fill in ((ImageDraw.Draw(image), COLOURS[obj.color]), (ImageDraw.Draw(labels), k)):
            if obj.shape == "circle":
                canvas.ellipse(obj.box, fill=fill)
            elif obj.shape == "square":
                canvas.rectangle(obj.box, fill=fill)
            else:
                canvas.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(image), np.asarray(labels)


def draw_marks(pixels: np.ndarray, scene: list[Shape], tags: list[int]) -> np.ndarray:
    """The image with each object's tag number, white on a black box, at the object's centre (a triangle's centroid)."""
    image = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(image)
    size = max(8, pixels.shape[0] // 12)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    for obj, tag in zip(scene, tags):
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        if obj.shape == "triangle":  # its centroid, where the triangle is widest around the tag
            cy = (obj.box[1] + 2 * obj.box[3]) / 3
        x0, y0, x1, y1 = canvas.textbbox((cx, cy), str(tag), font=font, anchor="mm")
        canvas.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
        canvas.text((cx, cy), str(tag), font=font, anchor="mm", fill=(255, 255, 255))
    return np.asarray(image)


def listing(scene: list[Shape], tags: list[int]) -> str:
    """The objects in tag order, one per line: "1. blue square" then "2. red circle"."""
    return "\n".join(f"{tag}. {obj.color} {obj.shape}" for tag, obj in sorted(zip(tags, scene)))


def caption(scene: list[Shape]) -> str:
    """Every shape with its colour and position: "A red circle in the top left and a blue square in the bottom right."""
    parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape} in the {o.position}" for o in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def candidates(qtype: str, scene: list[Shape], max_shapes: int) -> list[Question]:
    """All unambiguous questions of a type: a shape is named by a kind or colour only it has in the scene."""

    def unique(key: Any) -> list[Shape]:
        return [o for o in scene if sum(key(x) == key(o) for x in scene) == 1]

    if qtype == "count":
        return [Question(COUNT_Q, str(len(scene)), qtype, tuple(str(n) for n in range(1, max_shapes + 1)))]
    if qtype == "color":
        return [
            Question(f"What color is the {o.shape}? Answer with one word.", o.color, qtype, tuple(COLOURS))
            for o in unique(lambda x: x.shape)
        ]
    if qtype == "shape":
        return [
            Question(f"What shape is the {o.color} object? Answer with one word.", o.shape, qtype, SHAPES)
            for o in unique(lambda x: x.color)
        ]
    return [
        Question(f"Where is the {o.color} {o.shape}? Answer with the position.", o.position, qtype, POSITIONS)
        for o in scene
    ]


def instruct_questions(scene: list[Shape], rng: np.random.Generator, max_shapes: int) -> list[Question]:
    """2-4 turns of distinct question types in random order (count and position always exist, so at least 2)."""
    pools = [c for c in (candidates(t, scene, max_shapes) for t in QTYPES) if c]
    n_turns = min(int(rng.integers(2, 5)), len(pools))
    return [pools[t][int(rng.integers(len(pools[t])))] for t in rng.permutation(len(pools))[:n_turns].tolist()]


def held_out_question(scene: list[Shape], rng: np.random.Generator, max_shapes: int, index: int) -> Question:
    """One question whose type cycles with ``index`` to keep types balanced (the next type if the scene has none)."""
    rotated = QTYPES[index % len(QTYPES) :] + QTYPES[: index % len(QTYPES)]
    pool = next(p for p in (candidates(t, scene, max_shapes) for t in rotated) if p)  # count always has one
    return pool[int(rng.integers(len(pool)))]


def patch_labels(labels: np.ndarray, scene: list[Shape], grid: int, top_k: int) -> list[list[list[Any]]]:
    """Per grid cell (row-major): up to ``top_k`` ``[word, coverage]`` of the dominant shape and the background."""
    edges = np.linspace(0, labels.shape[0], grid + 1).round().astype(int)
    cells = []
    for r in range(grid):
        for c in range(grid):
            cell = labels[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
            coverage = np.bincount(cell.ravel(), minlength=len(scene) + 1) / cell.size
            cells.append(cell_words(coverage, scene)[:top_k])
    return cells


def cell_words(coverage: np.ndarray, scene: list[Shape]) -> list[list[Any]]:
    """Colour and shape words of the shape covering most of the cell, then "background", by coverage descending."""
    words: list[list[Any]] = []
    k = int(np.argmax(coverage[1:]))  # a scene has at least one shape
    if coverage[k + 1] > 0:
        score = round(float(coverage[k + 1]), 4)
        words += [[scene[k].color, score], [scene[k].shape, score]]
    if coverage[0] > 0:
        words.append([BACKGROUND, round(float(coverage[0]), 4)])
    return sorted(words, key=lambda w: -w[1])


# knobs that add files and change none of the others (tests/test_som.py): a set written again with another value
# holds the same split, so a run's checkpoint is still scored on its own held-out questions
SPLIT_NEUTRAL = ("som",)


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 2000,
    n_test: int = 200,
    max_shapes: int = 3,
    label_grid: int = 4,
    label_top_k: int = 3,
    som: bool = False,
) -> dict[str, Any]:
    """Write the shapes set: captions, multi-turn QA, held-out questions and per-patch word labels, with ``som`` also
    the tagged training images and their listing records (``som.json``); return info.json."""
    check_int("image_size", image_size, 32, why="pixels per side; smaller shapes are not legible")
    check_int("n_train", n_train, 1)
    check_int("n_test", n_test, 1)
    check_int("max_shapes", max_shapes, 1, 4, "one shape per quadrant")
    check_int("label_grid", label_grid, 1, image_size, "cells per side, at most one per pixel")
    check_int("label_top_k", label_top_k, 1)
    if not isinstance(som, bool):
        raise ValueError(f"shapes: som must be true or false, got {som!r}")
    rng = np.random.default_rng(seed)
    tag_rng = np.random.default_rng([seed, 1])  # its own stream: som on or off leaves the other files unchanged
    writer = DatasetWriter(out_dir, "shapes")
    images: dict[str, list[list[list[Any]]]] = {}
    for i in range(n_train + n_test):
        rid = f"shapes_train_{i:05d}" if i < n_train else f"shapes_test_{i - n_train:05d}"
        scene = sample_scene(rng, image_size, max_shapes)
        pixels, labels = draw_scene(image_size, scene)
        images[rid] = patch_labels(labels, scene, label_grid, label_top_k)
        if i < n_train:
            writer.add_train(rid, pixels, caption(scene), instruct_questions(scene, rng, max_shapes))
            if som:
                tags = (tag_rng.permutation(len(scene)) + 1).tolist()
                marked = draw_marks(pixels, scene, tags)
                writer.add_qa("som", f"shapes_som_{i:05d}", marked, [(SOM_Q, listing(scene, tags))])
        else:
            writer.add_test(rid, pixels, caption(scene), held_out_question(scene, rng, max_shapes, i - n_train))
    knobs = {
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "max_shapes": max_shapes,
        "label_grid": label_grid,
        "label_top_k": label_top_k,
        "som": som,
    }
    labels_file = {"grid": label_grid, "words": list(VOCAB), "images": images}
    return writer.finish(seed, knobs, {"patch_labels": labels_file}, optional=("som",))
