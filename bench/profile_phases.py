"""Where the time of a training step goes, per phase, in the naive and the fast configuration.

    python bench/profile_phases.py [--model local-dir:TESTBED] [--steps 40]

Runs phase I steps (on a 160-image S*, as CoFT's top-16 of 10 classes) and phase II steps (on 2,000
pool images) of bench/e2e_speed.py's two configurations and times each part of a step: data (the
next augmented batch, including a new DataLoader's start-up each epoch when decoding per epoch),
text encoder, image encoder, loss, backward and optimiser. Writes
bench/results/profile_phases_<device>.md.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from coft_fast import ops
from coft_fast.config import Config, load_recipe
from coft_fast.data import from_folder
from coft_fast.data.resident import ResidentImages, preprocess_stats
from coft_fast.data.streaming import StreamedImages
from coft_fast.models import load_clip
from coft_fast.phases.phase1 import complement_labels, make_prompt_model
from coft_fast.phases.phase2 import build_classifier, optimizer_options
from coft_fast.pseudo import class_prompts
from coft_fast.scoring import class_text_embeddings, logit_scale_of
from coft_fast.runtime.device import autocast
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, data_root, machine

PARTS = ["data", "text encoder", "image encoder", "loss", "backward", "optimizer"]
CONFIGS = {
    "naive": ["data.resident=never", "model.precision=fp32", "phase1.text_encoding=separate", "run.op_backend=eager"],
    "fast": [],
}


class Timer:
    def __init__(self, device):
        self.device, self.totals = device, defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, part):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.totals[part] += time.perf_counter() - started


def images_for(cfg, source, rows, clip, device):
    size, mean, std = preprocess_stats(clip.model)
    if cfg.data.resident == "never":
        return StreamedImages(source, rows, size, mean, std, "pil", cfg.data.num_workers, device)
    return ResidentImages(source, rows, size, mean, std, cfg.data.batch_size, cfg.data.num_workers, False,
                          device if device.type == "cuda" else torch.device("cpu"))


def timed_batches(images, count, batch_size, scale_min, timer, steps, warmup=3):
    """``warmup + steps`` training batches, epoch after epoch; the timer restarts after the warm-up."""
    epoch, served = 0, 0
    while True:
        stream = images.epoch_batches(torch.arange(count), batch_size, torch.Generator().manual_seed(epoch), scale_min)
        while True:
            if served == warmup:
                timer.totals.clear()
            if served == warmup + steps:
                return
            with timer("data"):
                item = next(stream, None)
            if item is None:
                break
            served += 1
            yield item
        epoch += 1


def step_and_time(loss, optimizer, timer) -> None:
    with timer("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with timer("optimizer"):
        optimizer.step()


def profile_phase1(cfg, clip, source, labels, steps, device):
    names = source.class_names
    model = make_prompt_model(clip, names, cfg.phase1, 1, device)
    images = images_for(cfg, source, list(range(len(labels))), clip, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.phase1.lr, momentum=0.9)
    scale = float(clip.model.logit_scale.exp())
    timer = Timer(device)
    complements = complement_labels(labels, len(names), torch.Generator().manual_seed(0))
    for batch, picked in timed_batches(images, len(labels), cfg.phase1.batch_size, cfg.phase1.crop_scale_min,
                                       timer, steps):
        with autocast(cfg.model.precision, device):
            with timer("text encoder"):
                pos, neg = model.text_features()
            with timer("image encoder"):
                feats = model.image_features(batch.to(device))
        with timer("loss"):
            loss, _, _ = ops.dual_prompt_loss(feats, pos, neg, labels[picked].to(device),
                                              complements[picked].to(device), scale, backend=cfg.run.op_backend)
        step_and_time(loss, optimizer, timer)
    return {part: 1000 * timer.totals[part] / steps for part in PARTS}


def profile_phase2(cfg, clip, source, labels, steps, device):
    text = class_text_embeddings(clip, class_prompts("single", source.class_names), source.class_names, device)
    classifier = build_classifier(clip.model.visual, text, logit_scale_of(clip), "zeroshot", 0).to(device)
    images = images_for(cfg, source, list(range(len(labels))), clip, device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.phase2.lr, momentum=0.9, **optimizer_options(device))
    timer = Timer(device)
    for batch, picked in timed_batches(images, len(labels), cfg.phase2.batch_size, cfg.phase2.crop_scale_min,
                                       timer, steps):
        with timer("image encoder"), autocast(cfg.model.precision, device):
            features = classifier.visual(batch.to(device))
        with timer("loss"):
            loss = F.cross_entropy(classifier.head(F.normalize(features.float(), dim=-1)), labels[picked].to(device))
        step_and_time(loss, optimizer, timer)
    return {part: 1000 * timer.totals[part] / steps for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="open_clip name or local-dir:DIR (default: the e2e_speed test bed)")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per phase and configuration")
    args = parser.parse_args()
    root = data_root() / "cifar10"
    model = args.model or f"local-dir:{RESULTS / 'tmp' / 'e2e_speed' / 'testbed'}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = load_clip(model, args.pretrained, device)
    for parameter in clip.model.parameters():
        parameter.requires_grad_(False)
    pool = from_folder(root / "pool")
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pool), generator=generator).tolist()
    results = {}
    for phase, count, run in (("phase I", 160, profile_phase1), ("phase II", 2000, profile_phase2)):
        source = pool.subset(order[:count])
        labels = torch.tensor(source.labels)
        for name, overrides in CONFIGS.items():
            cfg = load_recipe("testbed").config().override(overrides).validate()
            results[(phase, name)] = run(cfg, clip, source, labels, args.steps, device)
            print(phase, name, {k: round(v, 1) for k, v in results[(phase, name)].items()}, flush=True)
    lines = [f"# Where a training step's time goes ({machine()})", "",
             f"`python bench/profile_phases.py` with {model}, {args.steps} timed steps each after 3 warm-up steps; "
             f"milliseconds per step (recipe testbed; batch: phase I {load_recipe('testbed').config().phase1.batch_size}, "
             f"phase II {Config().phase2.batch_size}). "
             "Data includes each epoch's DataLoader start-up when images are decoded per epoch. Phase II has no "
             "text encoder (its head starts from the zero-shot text embeddings, computed once).", "",
             "| phase | config | " + " | ".join(PARTS) + " | total | data share |", "|" + "---|" * (len(PARTS) + 4)]
    for (phase, name), parts in results.items():
        total = sum(parts.values())
        lines.append(f"| {phase} | {name} | " + " | ".join(f"{parts[p]:.1f}" for p in PARTS)
                     + f" | {total:.1f} | {100 * parts['data'] / total:.0f} % |")
    for phase in ("phase I", "phase II"):
        naive, fast = (sum(results[(phase, n)].values()) for n in ("naive", "fast"))
        lines.append(f"\n{phase}: naive / fast = {naive / fast:.2f}x per step.")
    stem = f"profile_phases_{device.type}"
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
