"""Synthetic class-folder images for bench/gpu_check.sh's end-to-end speed run (no data on the device).

    python bench/gpu_check_images.py OUT [--classes 10] [--pool 120] [--test 40] [--size 64]

Writes OUT/pool/<class>/*.png and OUT/test/<class>/*.png: per class a base colour plus noise, so the
images differ by class (accuracy is meaningless with random weights; only the speed is measured).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(out: Path, classes: int, pool: int, test: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("pool", pool), ("test", test)):
        for label in range(classes):
            folder = out / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for index in range(count):
                noise = rng.normal(0, 40, (size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--pool", type=int, default=120, help="pool images per class")
    parser.add_argument("--test", type=int, default=40, help="evaluation images per class")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    write_images(Path(args.out), args.classes, args.pool, args.test, args.size)
    print(f"wrote {args.classes * (args.pool + args.test)} images under {args.out}")


if __name__ == "__main__":
    main()
