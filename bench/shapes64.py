"""A 64×64 RGB image-folder dataset of coloured shapes, 5 classes, with train/ and test/ splits: the input of the
rgb64 run in docs/EXPERIMENTS.md ("Bigger images: rgb64").

Each class is one shape in one hue family (the hue, brightness, place and size vary per image) on a dark, noisy
background, so a sample grid shows at a glance whether a model draws the class it was asked for.

    python bench/shapes64.py OUT --train 3000 --test 500      # OUT/train/<class>/*.png, OUT/test/<class>/*.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cross", "disc", "ring", "square", "triangle")           # sorted: the labels ingest gives them
HUES = {"cross": (1.0, 0.2, 0.9), "disc": (1.0, 0.25, 0.1), "ring": (1.0, 0.9, 0.1),
        "square": (0.15, 0.9, 0.2), "triangle": (0.2, 0.45, 1.0)}
SIDE = 64


def shape_mask(cls: str, cy: int, cx: int, r: int) -> np.ndarray:
    """(64, 64) bool: the class's shape centred at (cy, cx) with half-size r."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    dy, dx = yy - cy, xx - cx
    if cls == "disc":
        return dy ** 2 + dx ** 2 < r * r
    if cls == "ring":
        d2 = dy ** 2 + dx ** 2
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if cls == "square":
        return (abs(dy) < r) & (abs(dx) < r)
    if cls == "cross":
        return ((abs(dy) < r) & (abs(dx) < r / 3)) | ((abs(dx) < r) & (abs(dy) < r / 3))
    return (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2)             # triangle, apex up


def shape_image(cls: str, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) uint8: one shape of `cls`, its hue jittered, on a dark noisy background."""
    cy, cx, r = rng.integers(22, 42), rng.integers(22, 42), rng.integers(10, 19)
    colour = np.clip(np.asarray(HUES[cls]) + rng.normal(0, 0.08, 3), 0, 1) * rng.integers(170, 256)
    image = rng.integers(0, 40, (SIDE, SIDE, 3)).astype(np.float64)
    image[shape_mask(cls, cy, cx, r)] = colour
    return image.clip(0, 255).astype(np.uint8)


def write_split(out: Path, split: str, count: int, rng: np.random.Generator) -> None:
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        folder = out / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shape_image(cls, rng)).save(folder / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (train/ and test/ inside)")
    parser.add_argument("--train", type=int, default=3000, help="training images (classes in turn)")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    write_split(args.out, "train", args.train, rng)
    write_split(args.out, "test", args.test, rng)


if __name__ == "__main__":
    main()
