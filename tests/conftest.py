"""Shared fixtures: the shared image folder, the digits data and a tiny test-bed model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


def shared_data_root() -> Path:
    return Path(os.environ.get("COFT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = shared_data_root() / "cifar10"
    if not root.is_dir():
        pytest.skip(f"shared CIFAR-10 images not found at {root} (set COFT_DATA to the folder holding cifar10/)")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as pretrain/ and test/ class folders of 16-px PNGs."""
    from coft_fast.data.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), image_size=16)


@pytest.fixture(scope="session")
def tiny_testbed(digits, tmp_path_factory) -> Path:
    """A tiny test-bed model (seconds to build) as an open_clip local-dir folder."""
    from coft_fast.data import from_folder
    from coft_fast.testbed_builder import build_testbed, preset_config

    out = tmp_path_factory.mktemp("tiny_testbed")
    build_testbed(from_folder(digits["pretrain"]), out, preset_config("tiny"), seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def digits_testbed(digits, tmp_path_factory) -> dict:
    """A tiny test bed trained longer (about 20 s): about 50 % zero-shot accuracy on the digits pool,
    so pseudo-labels, S* and the filtered sets are not trivial. {"model": folder, "test": images}."""
    from coft_fast.data import from_folder
    from coft_fast.testbed_builder import build_testbed, preset_config

    out = tmp_path_factory.mktemp("digits_testbed")
    build_testbed(from_folder(digits["pretrain"]), out, preset_config("tiny", image_epochs=40, text_steps=300), seed=0,
                  progress=False)
    return {"model": out, "test": digits["test"]}


@pytest.fixture(scope="module")
def phase2_parts(tiny_testbed, digits):
    """(tiny test-bed CLIP, 48 resident digits pool images, their labels, class count) for phase II tests."""
    from coft_fast.data import from_folder
    from coft_fast.data.resident import ResidentImages, preprocess_stats
    from coft_fast.models import load_clip

    clip = load_clip(f"local-dir:{tiny_testbed}", device="cpu")
    pool = from_folder(digits["pool"])
    indices = list(range(0, len(pool), 7))[:48]
    images = ResidentImages(pool, indices, *preprocess_stats(clip.model), progress=False)
    labels = torch.tensor([pool.labels[i] for i in indices])
    return clip, images, labels, len(pool.class_names)
