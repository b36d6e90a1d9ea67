"""Phase I alone, several configurations in one process: how well does each model label cifar10/test?

    python bench/phase1_variants.py --testbed DIR [--variant NAME=key=value,key=value ...]

S* is the default top-K selection of zero-shot pseudo-labels on cifar10/pool; each variant trains
one phase-I model (seed 1) on it with the `testbed` recipe plus its overrides, then scores its
positive prompts on cifar10/test. Zero-shot is the baseline in the same run. Writes
bench/results/phase1_variants.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from coft_fast.config import Config, load_recipe
from coft_fast.data import from_folder
from coft_fast.data.resident import ResidentImages, preprocess_stats
from coft_fast.models import load_clip
from coft_fast.phases.phase1 import encode_with_models, make_prompt_model, train_phase1
from coft_fast.pseudo import class_prompts
from coft_fast.scoring import class_text_embeddings, encode_images, logit_scale_of, zeroshot_probabilities
from coft_fast.pseudo.selection import select_top_k
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, data_root, machine

DEFAULT_VARIANTS = [
    "default=",
    "vpt_shared_lr=phase1.vpt_lr_scale=1.0",
    "no_visual_prompts=phase1.vpt_tokens=0",
]


def accuracy(features, text, labels) -> float:
    return ((features @ text.T).argmax(1) == labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", required=True)
    parser.add_argument("--variant", action="append", help="NAME=key=value,key=value (default: three variants)")
    args = parser.parse_args()
    root, device = data_root() / "cifar10", torch.device("cpu")
    clip = load_clip(f"local-dir:{args.testbed}")
    pool, test = from_folder(root / "pool"), from_folder(root / "test")
    names = pool.class_names
    text = class_text_embeddings(clip, class_prompts("ensemble", names), names, device)
    pool_features, pool_positions = encode_images(clip, pool, device, batch_size=512, progress=False)
    test_features, test_positions = encode_images(clip, test, device, batch_size=512, progress=False)
    test_labels = torch.tensor(test.labels)[test_positions]
    confidence, labels = zeroshot_probabilities(pool_features, text, logit_scale_of(clip)).max(1)
    selection = select_top_k(labels, confidence, Config().pseudo.top_k, names)
    size, mean, std = preprocess_stats(clip.model)
    images = ResidentImages(pool, pool_positions[selection.rows].tolist(), size, mean, std, progress=False)

    results = [("zero-shot (baseline)", "-", accuracy(test_features, text, test_labels), None)]
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, overrides = spec.partition("=")
        cfg = load_recipe("testbed").config().override([o for o in overrides.split(",") if o]).validate()
        model = make_prompt_model(clip, names, cfg.phase1, cfg.phase1.seeds[0], device)
        started = time.perf_counter()
        train_phase1(model, images, torch.arange(len(selection.rows)), selection.labels, cfg.phase1,
                     cfg.phase1.seeds[0], device, progress=False)
        seconds = time.perf_counter() - started
        (features,), positions = encode_with_models([model], test, None, device, progress=False)
        pos_text, _ = model.text_features()
        acc = accuracy(features, pos_text.detach(), torch.tensor(test.labels)[positions])
        results.append((name, overrides or "(defaults)", acc, seconds))
        print(f"{name}: phase I model top-1 {100 * acc:.2f} % in {seconds:.0f} s", flush=True)

    lines = [f"# Phase I variants on the test bed ({Path(args.testbed).name})", "",
             f"`python bench/phase1_variants.py --testbed DIR`. S*: top-{Config().pseudo.top_k} zero-shot "
             f"pseudo-labels of cifar10/pool ({len(selection.rows)} images); one model (seed "
             f"{Config().phase1.seeds[0]}) per variant, recipe testbed plus its overrides; top-1 of its positive prompts "
             "on cifar10/test.", "",
             "| variant | overrides | test top-1 | training seconds |", "|---|---|---|---|"]
    lines += [f"| {n} | {o} | {100 * a:.2f} % | {'-' if s is None else f'{s:.0f}'} |" for n, o, a, s in results]
    lines += ["", f"Machine: {machine()}.", ""]
    report = "\n".join(lines)
    print(report)
    atomic_write_text(RESULTS / "phase1_variants.md", report)


if __name__ == "__main__":
    main()
