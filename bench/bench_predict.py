"""Throughput of `coft-fast predict` beside zero-shot scoring: same images, same image tower size.

    python bench/bench_predict.py [--model ViT-B-16] [--limit 512] [--repeats 3] [--batch-size 64]
                                  [--num-workers 2] [--threads N] [--tag TAG]

Both sides run in this process, interleaved (zero-shot, predict, predict, zero-shot, ...), on the same
images (the first --limit of cifar10/test, or --images), from decoding to a written
predictions.csv:
- zero-shot scoring: what `coft-fast zeroshot` does per image (coft_fast.scoring.encode_images with
  the model's evaluation transform, the text classifier, predictions.csv);
- predict: what `coft-fast predict` does (coft_fast.load_run on a run folder, streamed
  predictions.csv). The run folder holds a fine-tuned classifier of the same architecture, written
  as phase II writes it; its weights are the random initial ones (throughput does not depend on them).
Model loading is timed once apart. Writes bench/results/predict_throughput_<device>[_TAG].md/.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, data_root, machine

from coft_fast.run_outputs import write_zeroshot_outputs
from coft_fast.config import Config
from coft_fast.data import ImageSource, from_folder
from coft_fast.inference import CLASSIFIER_FILE, classifier_metadata, load_run, predict_to_folder
from coft_fast.models import load_clip
from coft_fast.phases.phase2 import build_classifier
from coft_fast.pseudo import class_prompts
from coft_fast.scoring import ZeroShotResult, class_text_embeddings, encode_images, logit_scale_of, zeroshot_probabilities
from coft_fast.runtime.checkpoint import save_tensors
from coft_fast.runtime.device import resolve_device
from coft_fast.runtime.io import atomic_write_csv, atomic_write_text


def first_images(folder: Path, limit: int) -> ImageSource:
    source = from_folder(folder)
    order = sorted(range(len(source)), key=lambda i: Path(source.paths[i]).name)[:limit]  # all classes mixed
    return source.subset(sorted(order))


def write_run_folder(folder: Path, clip, names, cfg: Config, device) -> None:
    """A run folder as training leaves it after phase II, for the classifier of ``clip``'s image tower."""
    text = class_text_embeddings(clip, class_prompts("single", names), names, device, cfg.model.precision)
    classifier = build_classifier(clip.model.visual, text, logit_scale_of(clip), "zeroshot", 0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.yaml")
    save_tensors(folder / CLASSIFIER_FILE.format("s1"), classifier.state_dict(), classifier_metadata(clip, names, "s1"))


def zero_shot_pass(clip, source, text, cfg, device, out: Path) -> float:
    started = time.perf_counter()
    features, positions = encode_images(clip, source, device, cfg.model.precision, cfg.data.batch_size,
                                        cfg.data.num_workers, progress=False)
    probabilities = zeroshot_probabilities(features, text, logit_scale_of(clip))
    write_zeroshot_outputs(ZeroShotResult(source, positions, probabilities, text, features), out)
    return time.perf_counter() - started


def predict_pass(model, images, cfg, out: Path) -> float:
    started = time.perf_counter()
    predict_to_folder(model, images, out, cfg.data.batch_size, cfg.data.num_workers, progress=False)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", help="a class-folder tree (default: cifar10/test of the shared data)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or local-dir:PATH (random weights "
                                                            "for a name: throughput only)")
    parser.add_argument("--limit", type=int, default=512, help="images (the first N by file name)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tag", help="suffix of the results files")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.images) if args.images else data_root() / "cifar10" / "test"
    source = first_images(folder, args.limit)
    device = resolve_device(args.device)
    cfg = Config()
    cfg.model.name, cfg.model.pretrained, cfg.model.device = args.model, None, str(device)
    cfg.data.batch_size, cfg.data.num_workers = args.batch_size, args.num_workers
    started = time.perf_counter()
    clip = load_clip(args.model, None, device)
    clip_seconds = time.perf_counter() - started
    names = source.class_names
    text = class_text_embeddings(clip, class_prompts("single", names), names, device, cfg.model.precision).cpu()
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as work:
        work = Path(work)
        write_run_folder(work / "run", clip, names, cfg, device)
        started = time.perf_counter()
        model = load_run(work / "run", device=str(device))
        load_seconds = time.perf_counter() - started
        images = [source.paths[i] for i in range(len(source))]
        zero_shot_pass(clip, source, text, cfg, device, work / "zs_warmup")  # first-touch costs, both sides
        predict_pass(model, images, cfg, work / "pred_warmup")
        times = {"zero-shot scoring": [], "coft-fast predict": []}
        passes = {"zero-shot scoring": lambda r: zero_shot_pass(clip, source, text, cfg, device, work / f"zs{r}"),
                  "coft-fast predict": lambda r: predict_pass(model, images, cfg, work / f"pred{r}")}
        for repeat in range(args.repeats):
            order = list(passes) if repeat % 2 == 0 else list(passes)[::-1]  # ABBA: a drifting load favours neither
            for name in order:
                times[name].append(passes[name](repeat))
            print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    rates = {name: len(source) / statistics.median(values) for name, values in times.items()}
    ratio = rates["coft-fast predict"] / rates["zero-shot scoring"]
    stem = f"predict_throughput_{device.type}" + (f"_{args.tag}" if args.tag else "")
    rows = [(name, len(source), f"{statistics.median(times[name]):.3f}", f"{rates[name]:.1f}") for name in times]
    atomic_write_csv(RESULTS / f"{stem}.csv", ["path", "images", "median_seconds", "images_per_second"], rows)
    lines = [
        f"# `coft-fast predict` beside zero-shot scoring ({device.type})", "",
        f"`python bench/bench_predict.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"Machine: {machine()}, {torch.get_num_threads()} torch threads. Model {args.model} (image size "
        f"{model.image_size}), {len(source)} images of {folder}, batch {args.batch_size}, {args.num_workers} "
        f"decoding workers; median of {args.repeats} interleaved repeats (order alternating), each from decoding to a written "
        f"predictions.csv.", "",
        "| path | images/s | median time |", "|---|---|---|",
        *[f"| {name} | {rates[name]:.1f} | {statistics.median(times[name]):.2f} s |" for name in times], "",
        f"**predict / zero-shot throughput: {ratio:.3f}** ({100 * (ratio - 1):+.1f} %).", "",
        f"Loading, apart: open_clip model {clip_seconds:.1f} s (zero-shot), `load_run` {load_seconds:.1f} s (predict).",
    ]
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[8:]))


if __name__ == "__main__":
    main()
