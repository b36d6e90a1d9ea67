"""What a CLIP-like visual-prompt share would cost the test bed's build (issue 36): the image tower's
training step at patch 4 (64 patches of a 32-px image, today's presets) against patch 2 (256 patches,
where phase I's 20 prompt tokens per layer are 8 % of the patches, near ViT-B/16's 10 % of 196), timed in
one process, and the strong preset's stage 1 (18 epochs of 40,000 images) projected from the ratio.

    python bench/testbed_patch_cost.py --strong DIR [--threads N] [--steps N]

DIR is a built strong test bed, whose testbed_report.json gives stage 1's measured seconds.

Writes bench/results/testbed_patch_cost.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from common import RESULTS, machine
from coft_fast.runtime.io import atomic_write_text
from coft_fast.testbed_builder import model_config, preset_config


def step_seconds(patch_size: int, steps: int, batch: int) -> float:
    """Median wall seconds of one AdamW step of the strong preset's image tower at ``patch_size``."""
    cfg = preset_config("strong", patch_size=patch_size)
    torch.manual_seed(0)
    visual = CLIP(**model_config(cfg)).visual.train()
    optimizer = torch.optim.AdamW(visual.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    target = torch.randn(batch, cfg.embed_dim)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        loss = F.mse_loss(visual(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strong", required=True, help="a built strong test bed (its testbed_report.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = preset_config("strong").image_batch_size
    patch4, patch2 = step_seconds(4, args.steps, batch), step_seconds(2, args.steps, batch)
    report = json.loads((Path(args.strong) / "testbed_report.json").read_text())
    stage1 = (report.get("training_seconds_all_builds") or {}).get("image_tower") or report["stage1_seconds"]
    ratio = patch2 / patch4
    lines = [f"# The image tower's step at patch 2 against patch 4 ({machine()}, {args.threads} threads)", "",
             f"`python bench/testbed_patch_cost.py --threads {args.threads} --steps {args.steps}`: the strong preset's "
             f"image tower (32 px, width 128, 4 layers), one AdamW step on a batch of {batch}, median of "
             f"{args.steps} after 2 warm-up steps, both in this process.", "",
             "| patch | patches | 20 prompt tokens per patch | seconds per step |", "|---|---|---|---|",
             f"| 4 | 64 | {20 / 64:.0%} | {patch4:.3f} |", f"| 2 | 256 | {20 / 256:.0%} | {patch2:.3f} |", "",
             f"Patch 2 costs **{ratio:.1f}x** patch 4 per step. The strong preset's stage 1 took {stage1:,.0f} s "
             f"(its build's testbed_report.json, on the same 2 cores), so a patch-2 tower would take about "
             f"{stage1 * ratio / 60:.0f} minutes, against the issue's budget of about 60 (ViT-B/16 has 20 / 196 = 10 %; the teacher's inference inside stage 1 "
             "does not grow with the patches, so the projection is a slight overestimate)."]
    atomic_write_text(RESULTS / "testbed_patch_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
