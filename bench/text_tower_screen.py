"""Screen text-tower designs for the `clip-like` test bed (issue 36): does prompt learning keep up with a
linear probe, as on CLIP?

    python bench/text_tower_screen.py --base TESTBED_DIR --images DIR [DIR ...] --work DIR
                                      [--variants NAME ...] [--threads N]

Each variant is a text-only rebuild of the base test bed (its build_state/ copied, so the image tower is
reused and only stage 2 trains: `coft-fast testbed --preset P --set testbed.KEY=VALUE ...`), then scored on
cifar10/test with the frozen image features of bench/testbed_fidelity.py's `Bed`:

- `zero-shot` (the single template);
- `probe@k`: bench/testbed_fidelity.py's linear head from scratch on k true shots (seed 0);
- `feature coop@k`: the library's positive prompts (16 shared context tokens) trained on the SAME frozen,
  un-augmented features of the k shots (SGD, lr 0.03, momentum 0.9, cosine, 300 full-batch steps): a
  cheap stand-in for the fidelity bench's `coop` (phase I, 1000 augmented steps), for ranking designs only.

Rows go to bench/results/text_tower_screen.csv as each variant finishes (a variant already there is
skipped) and the table to text_tower_screen.md.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, CellTable, data_root, machine, markdown_table
from testbed_fidelity import Bed, train_head

STEM = "text_tower_screen"
HEADER = ["variant", "settings", "zero-shot", "probe@1", "feature coop@1", "probe@16", "feature coop@16",
          "build_s"]
# name -> (preset, testbed.* overrides); "base" is the base test bed itself (no rebuild).
VARIANTS = {
    "base": ("strong", {}),
    "layers4": ("strong", {"text_layers": 4, "text_steps": 2000}),
    "attr3": ("strong", {"caption_attributes": 3, "text_steps": 1000}),
    "attr3-share0.5": ("strong", {"caption_attributes": 3, "text_steps": 1000, "lookalike_share": 0.5}),
    "attr3-share0.6": ("strong", {"caption_attributes": 3, "text_steps": 1000, "lookalike_share": 0.6}),
}
COOP_STEPS, COOP_LR = 300, 0.03


def rebuild(base: Path, out: Path, images, preset: str, overrides: dict, threads: int) -> float:
    """A text-only rebuild of ``base`` into ``out``; returns its wall seconds (0 if ``out`` is built)."""
    if (out / "open_clip_config.json").exists():
        return 0.0
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "build_state", out / "build_state", dirs_exist_ok=True)
    command = [sys.executable, "-m", "coft_fast", "testbed", "--preset", preset, "--images", *map(str, images),
               "--seed", "0", "--out", str(out), "--no-progress"]
    for key, value in overrides.items():
        command += ["--set", f"testbed.{key}={value}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - started


def feature_coop(bed: Bed, rows: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Eval top-1 of positive prompts trained on the frozen features of ``rows``."""
    from coft_fast.models.prompts import DualPromptLearner
    from coft_fast.pseudo import prompt_names

    clip = bed.clip
    learner = DualPromptLearner(clip.model, clip.tokenizer, prompt_names(bed.names), n_ctx=16,
                                generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD([learner.ctx_pos], lr=COOP_LR, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / COOP_STEPS)))
    x = bed.pool[0][rows]
    for _ in range(COOP_STEPS):
        positive, _ = learner()
        loss = F.cross_entropy(bed.logit_scale * x @ F.normalize(positive, dim=-1).T, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        positive = F.normalize(learner()[0], dim=-1)
    features, truth, _ = bed.eval
    return ((features @ positive.T).argmax(1) == truth).double().mean().item()


def score(model_dir: Path) -> dict:
    root = data_root()
    bed = Bed(model_dir, root / "cifar10" / "pool", root / "cifar10" / "test")
    for p in bed.clip.model.parameters():
        p.requires_grad_(False)
    x, y, _ = bed.eval
    found = {"zero-shot": ((x @ bed.text.T).argmax(1) == y).double().mean().item()}
    for shots in (1, 16):
        rows, labels = bed.shot_rows(shots, 0)
        weight, bias = train_head(bed.pool[0][rows], labels, len(bed.names), 0, 500)
        found[f"probe@{shots}"] = bed.head_accuracies(weight, bias)[0]
        found[f"feature coop@{shots}"] = feature_coop(bed, rows, labels, 0)
    return {k: f"{100 * v:.2f}" for k, v in found.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the built test bed whose image tower is reused")
    parser.add_argument("--images", nargs="+", required=True, help="the base test bed's labelled image folders")
    parser.add_argument("--work", type=Path, required=True, help="where the variants' test beds are built")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = CellTable(STEM, HEADER, ("variant",))
    order = [{"variant": name} for name in VARIANTS]
    for name in args.variants:
        if {"variant": name} in table:
            continue
        preset, overrides = VARIANTS[name]
        model_dir = args.base if name == "base" else args.work / name
        seconds = 0.0 if name == "base" else rebuild(args.base, model_dir, args.images, preset, overrides, args.threads)
        settings = f"--preset {preset} " + " ".join(f"{k}={v}" for k, v in overrides.items())
        row = {"variant": name, "settings": settings.strip(), **score(model_dir), "build_s": f"{seconds:.0f}"}
        print(row, flush=True)
        table.add(row, order)
        rows = table.ordered(order)
        atomic_write_text(RESULTS / f"{STEM}.md",
            f"# Text-tower screen for the clip-like test bed ({machine()})\n\n`python bench/text_tower_screen.py`; "
            "top-1 % on cifar10/test, seed 0; feature coop: prompts trained on frozen un-augmented features "
            "(a ranking stand-in for the fidelity bench's coop); build_s: the rebuild's wall seconds beside other "
            "benchmarks (layers4 and attr3 were built before the text stage was cut at the last end-of-text token).\n\n" + "\n".join(markdown_table(HEADER, rows)) + "\n")


if __name__ == "__main__":
    main()
