"""The embedded demo data: scikit-learn's handwritten digits, written out as image folders."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = {"pretrain": 0.4, "pool": 0.3, "test": 0.3}


def write_digits(out_dir, image_size: int = 16, seed: int = 0) -> Dict[str, Path]:
    """The digits as PNG class folders ``pretrain/``, ``pool/``, ``test/`` (a stratified 40/30/30 split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    folders = {split: out_dir / split for split in SPLITS}
    for label, name in enumerate(DIGIT_NAMES):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        cuts = np.cumsum([int(round(len(members) * share)) for share in SPLITS.values()])[:-1]
        for split, chosen in zip(SPLITS, np.split(members, cuts)):
            folder = folders[split] / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (digits.images[index] / 16.0 * 255.0).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR)
                image.convert("RGB").save(folder / f"{index:04d}.png")
    return folders


def digit_class_names() -> List[str]:
    return list(DIGIT_NAMES)
