"""The `coft-fast` command line: parses arguments, builds a config, calls the API, prints a summary."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from coft_fast import __version__
from coft_fast.config import TESTBED_PRESET_HELP, TESTBED_PRESETS, ConfigError

IMAGES_HELP = "a folder (class sub-folders or flat), a CSV of path[,label], or a CoOp split JSON"
COMMANDS = {
    "zeroshot": "zero-shot CLIP classification of a folder of images",
    "testbed": "build the offline test-bed model from labelled images",
    "train": "adapt CLIP to your classes on unlabelled images (CoFT)",
    "clean-labels": "find the wrong labels of a labelled pool, then fine-tune on the rest",
    "demo": "run the offline demo on the embedded digits data",
    "templates": "write an LLM prompt and a JSON skeleton for per-class sentences "
                 "(or ask an OpenAI-compatible endpoint with --llm-url)",
    "predict": "classify images with a finished run's fine-tuned model",
    "export": "export a finished run's model as an open_clip folder or ONNX",
    "report": "rebuild a run folder's report.html",
    "config": "print the default config as YAML (with --recipe/--config/--set applied)",
    "recipes": "list the named recipes (--recipe NAME), one line each",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coft-fast", description="Label-free fine-tuning of CLIP (CoFT), fast.")
    parser.add_argument("--version", action="version", version=f"coft_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = {name: commands.add_parser(name, help=text) for name, text in COMMANDS.items()}
    _run_args(sub["zeroshot"], "output folder")
    tb = sub["testbed"]
    tb.add_argument("--images", required=True, nargs="+",
                    help="labelled images (class sub-folders, CSV or CoOp JSON); several sources are pooled")
    tb.add_argument("--preset", choices=list(TESTBED_PRESETS),
                    help="a named test bed: " + "; ".join(f"{name}: {text}" for name, text in TESTBED_PRESET_HELP.items())
                         + " (its testbed.* fields sit under --config and --set)")
    tb.add_argument("--classes", help="class names file (optional for class folders)")
    tb.add_argument("--per-class", type=int, help="use the first N images of each class, sorted by file name")
    tb.add_argument("--out", required=True, help="output folder (an open_clip local-dir model)")
    _common(tb)
    _run_args(sub["train"], "run folder", ["coft", "coft+", "self-train"])
    _run_args(sub["clean-labels"], "run folder (label_issues.csv, metrics.json, the fine-tuned model)", ["coft", "coft+"])
    sub["demo"].add_argument("--out", default="coft_demo", help="output folder (default: ./coft_demo)")
    _common(sub["demo"])
    tp = sub["templates"]
    tp.add_argument("--classes", required=True, help="class names: a text file with one per line")
    tp.add_argument("--out", required=True, help="JSON file for --templates; the prompt goes beside it (.prompt.txt)")
    tp.add_argument("--per-class", type=int, default=10, help="sentences to ask for per class (default 10)")
    tp.add_argument("--dataset-hint", help="what the classes are, e.g. 'types of aircraft' (added to the prompt)")
    tp.add_argument("--llm-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (off by default)")
    tp.add_argument("--llm-model", help="model name for --llm-url")
    tp.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the API key for --llm-url (default OPENAI_API_KEY)")
    tp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for --llm-url (default 120)")
    tp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _run_folder_args(sub["predict"], sub["export"], sub["report"])
    _common(sub["config"])
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    """The config layers, the seed, --no-progress and --verbose."""
    parser.add_argument("--recipe", metavar="NAME",
                        help="a named recipe (`coft-fast recipes` lists them) or a recipe .yaml file; "
                             "precedence: defaults < --recipe < --config < --set")
    parser.add_argument("--config", help="YAML config file (see `coft-fast config` for the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.batch_size=128 (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed (config key `seed`)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _run_args(parser: argparse.ArgumentParser, out_help: str, methods: Optional[List[str]] = None) -> None:
    """`zeroshot`, and with ``methods`` `train` and `clean-labels`: data, model, output folder, config."""
    parser.add_argument("--images", required=True, help=IMAGES_HELP)
    parser.add_argument("--classes", help="class names: a text file with one per line (optional for class folders)")
    parser.add_argument("--split", help="split of a CoOp JSON file: train, val or test")
    parser.add_argument("--image-root", help="folder that a CoOp JSON's paths are relative to")
    parser.add_argument("--batch-size", type=int, help="images per inference batch")
    parser.add_argument("--num-workers", type=int, help="decoding worker processes")
    parser.add_argument("--model", help="open_clip model name (ViT-B-16) or local-dir:/path")
    parser.add_argument("--pretrained", help="open_clip pre-trained tag (openai) or checkpoint path; 'none' for random")
    parser.add_argument("--templates", help="'single', 'ensemble' or a JSON file of templates")
    if methods:
        parser.add_argument("--method", choices=methods, help="config key `method` (default coft)")
        parser.add_argument("--eval-images", help="labelled images to measure zero-shot and final accuracy on")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", required=True, help=out_help)
    if methods:
        parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
        parser.add_argument("--labeled", metavar="PATH",
                            help="a few labelled images per class (class sub-folders, CSV of path,label, or CoOp "
                                 "JSON): first in S* with their labels, never filtered out")
        parser.add_argument("--labeled-split", metavar="SPLIT", help="split of a CoOp JSON given as --labeled")
    _common(parser)


def _run_folder_args(pr: argparse.ArgumentParser, ex: argparse.ArgumentParser, rp: argparse.ArgumentParser) -> None:
    """`predict`, `export` and `report`: they read a finished run folder."""
    for parser in (pr, ex, rp):
        parser.add_argument("--run", required=True, help="a finished training run folder (coft-fast train --out)")
    pr.add_argument("--images", required=True, help=IMAGES_HELP)
    pr.add_argument("--out", help="output folder for predictions.csv (and metrics.json when the images have labels)")
    pr.add_argument("--split", help="split of a CoOp JSON file (default: the run's data.eval_split)")
    pr.add_argument("--batch-size", type=int, help="images per batch (default: the run's data.batch_size)")
    pr.add_argument("--num-workers", type=int, help="decoding worker processes (default: the run's)")
    pr.add_argument("--device", default="auto", help="auto (the run's model.device), cpu, cuda, cuda:1 ...")
    pr.add_argument("--top5", action="store_true", help="add top5 and top5_confidence columns")
    pr.add_argument("--transductive", action="store_true",
                    help="label the images together: TransCLIP refines the run's predictions over the whole set "
                         "(the classifier as its prior); predictions.csv adds the classifier's own columns")
    pr.add_argument("--classifier", choices=["s1", "s2"],
                    help="one classifier of a phase2.train_on=both run (default: the run's ensemble)")
    pr.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ex.add_argument("--format", required=True, choices=["open_clip", "onnx"], help="open_clip (local-dir folder) or onnx")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--classifier", choices=["s1", "s2"], help="which clean set's classifier (default s1)")
    for parser in (pr, ex, rp):
        parser.add_argument("--verbose", action="store_true", help="debug logging")


def _overrides(args) -> List[str]:
    mapping = {
        "seed": "seed", "split": "data.split", "image_root": "data.image_root", "batch_size": "data.batch_size",
        "num_workers": "data.num_workers", "model": "model.name", "pretrained": "model.pretrained",
        "templates": "zeroshot.templates", "device": "model.device", "per_class": "testbed.per_class", "method": "method",
        "labeled": "data.labeled", "labeled_split": "data.labeled_split",
    }
    found = list(args.overrides)
    for attribute, key in mapping.items():
        value = getattr(args, attribute, None)
        if value is not None:
            random_weights = key == "model.pretrained" and value.lower() == "none"
            found.append(f"{key}={json.dumps(None if random_weights else value)}")  # YAML reads JSON's scalars
    if args.no_progress:
        found.append("run.progress=false")
    return found


def run(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "templates":
        return _templates_command(args)
    if args.command == "recipes":
        return _recipes_command()
    from coft_fast import api, testbed_commands
    from coft_fast.runtime.logs import log_to_console

    log_to_console(args.verbose)
    if args.command in ("predict", "export", "report"):  # a finished run folder: no config to build
        return _run_folder_command(api, args)
    from coft_fast.runtime import distributed

    if distributed.launch_rank() > 0 and not args.verbose:  # under torchrun, rank 0 speaks for all
        logging.getLogger("coft_fast").setLevel(logging.WARNING)
    overrides = _overrides(args)
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(api.resolve_config(args.config, overrides, recipe=args.recipe).to_dict(), sort_keys=False),
              end="")
        return 0
    if args.command == "zeroshot":
        result = api.zeroshot(args.images, args.classes, config=args.config, overrides=overrides, out=args.out,
                              recipe=args.recipe)
        _print_metrics("zero-shot", result.metrics)
        print(f"predictions: {args.out}/predictions.csv")
    elif args.command == "testbed":
        report = testbed_commands.testbed(args.images, args.out, classes=args.classes, config=args.config,
                                          overrides=overrides, recipe=args.recipe, preset=args.preset)
        print(f"test bed written to {args.out} in {report['build_seconds']:.0f} s "
              f"({report['num_images']} images); use --model local-dir:{args.out}")
    elif args.command in ("train", "clean-labels"):
        entry = api.train if args.command == "train" else api.clean_labels
        try:
            result = entry(args.images, args.classes, eval_images=args.eval_images, config=args.config,
                           recipe=args.recipe, overrides=overrides, out=args.out, resume=args.resume)
        finally:
            distributed.shutdown()
        if distributed.launch_rank() > 0:
            return 0
        _print_train_summary(result.metrics)
        issues = result.metrics.get("label_issues")
        if issues:
            print(f"  label issues: {issues['issues']} of {issues['num_images']} given labels "
                  f"({100 * issues['issue_share']:.1f} %)")
            print(f"label issues, most likely wrong first: {args.out}/label_issues.csv")
        print(f"run folder: {args.out}/ (metrics.json, pseudo_labels.csv, checkpoints, plots)")
    elif args.command == "demo":
        recipe = args.recipe or "testbed"
        metrics = testbed_commands.demo(args.out, seed=args.seed or 0, progress=not args.no_progress,
                                        overrides=args.overrides, recipe=recipe)
        print(f"demo: CoFT on scikit-learn's digits with the offline test-bed model, recipe {recipe}")
        _print_train_summary(metrics)
        print(f"zero-shot {100 * metrics['zero_shot']['acc1']:.2f} % -> CoFT {100 * metrics['final']['acc1']:.2f} % "
              f"(outputs in {args.out}/)")
    return 0


def _run_folder_command(api, args) -> int:
    """`predict`, `export` and `report`: what a finished run folder gives."""
    if args.command == "predict":
        metrics = api.predict(args.run, args.images, out=args.out, classifier=args.classifier, device=args.device,
                              batch_size=args.batch_size, num_workers=args.num_workers, split=args.split,
                              top5=args.top5, progress=not args.no_progress, transductive=args.transductive)
        _print_metrics("predictions", metrics)
        rate = metrics["num_images"] / metrics["seconds"] if metrics["seconds"] > 0 else float("nan")
        print(f"  {metrics['seconds']:.1f} s ({rate:.1f} images/s)")
        if args.out:
            print(f"predictions: {args.out}/predictions.csv")
    elif args.command == "export":
        path = api.export(args.run, args.format, args.out, classifier=args.classifier)
        print(f"exported {args.run} as {args.format}: {path}")
        print(f"how to load it: {args.out}/README.md")
    else:
        print(f"report: {api.report(args.run)}")
    return 0


def _recipes_command() -> int:
    from coft_fast.config import list_recipes

    recipes = list_recipes()
    width = max(len(recipe.name) for recipe in recipes)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  v{recipe.version}  {recipe.summary}")
    print("use: coft-fast train --recipe NAME ...; coft-fast config --recipe NAME prints one")
    return 0


def _templates_command(args) -> int:
    """`coft-fast templates`: a prompt and a skeleton to fill in, or --llm-url's answer."""
    from pathlib import Path

    from coft_fast.data.sources import read_class_names
    from coft_fast.pseudo import llm_templates
    from coft_fast.runtime.io import atomic_write_json, atomic_write_text

    if bool(args.llm_url) != bool(args.llm_model):
        raise ValueError("--llm-url and --llm-model go together: give the endpoint and the model name to ask")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    names = read_class_names(args.classes)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; use --force to overwrite it")
    stem = out.name[:-len(".json")] if out.name.lower().endswith(".json") else out.name
    prompt_path = out.with_name(f"{stem}.prompt.txt")
    atomic_write_text(prompt_path, llm_templates.llm_prompt(names, args.per_class, args.dataset_hint))
    if not args.llm_url:
        atomic_write_json(out, {name: [] for name in names})
        print(f"prompt:   {prompt_path}")
        print(f"skeleton: {out} ({len(names)} classes, empty lists)")
        print(f"next: paste the prompt into an LLM, save its JSON answer to {out}, "
              f"then run coft-fast train --templates {out} ...")
        return 0
    api_key = os.environ.get(args.api_key_env) or None
    print(f"asking {args.llm_model} at {llm_templates.chat_completions_url(args.llm_url)} for {args.per_class} "
          f"sentences for each of {len(names)} classes{'' if api_key else f' (no API key: ${args.api_key_env} unset)'}")
    sentences = llm_templates.ask_llm(args.llm_url, args.llm_model, names, args.per_class, args.dataset_hint,
                                      api_key=api_key, timeout=args.timeout)
    atomic_write_json(out, sentences)
    counts = [len(v) for v in sentences.values()]
    spread = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"
    print(f"templates: {out} ({len(names)} classes, {spread} sentences per class); prompt: {prompt_path}")
    print(f"next: coft-fast train --templates {out} ...")
    return 0


def _print_train_summary(metrics: dict) -> None:
    pool = metrics["pool"]
    print(f"{metrics['method']}: {pool['num_images']} pool images, {pool['num_skipped']} skipped")
    phase1 = [(f"phase I {name}", entry) for name, entry in metrics.get("phase1", {}).items()]
    for name, entry in [("zero-shot", metrics.get("zero_shot", {})), *phase1, ("final", metrics.get("final", {}))]:
        if entry.get("acc1") is not None:
            print(f"  {name:<22} acc1 {100 * entry['acc1']:6.2f} %")
    for name in ("s1", "s2"):
        entry = metrics.get("filter", {}).get(name)
        if entry and "precision" in entry:
            print(f"  clean set {name}: {entry['size']} samples, label precision {100 * entry['precision']:.1f} %")
    print("  time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in metrics.get("timings", {}).items()))


def _print_metrics(title: str, metrics: dict) -> None:
    print(f"{title}: {metrics.get('num_images')} images, {metrics.get('num_skipped')} skipped")
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        if key in metrics:
            print(f"  {key:<22} {100 * metrics[key]:6.2f} %")
    if "refine" in metrics:  # zeroshot --set pseudo.refine=...: the predictions are the refined labels
        print(f"  labels refined by pseudo.refine={metrics['refine']} (predictions.csv holds them)")
        if "refined_acc1" in metrics:
            print(f"  {'refined acc1':<22} {100 * metrics['refined_acc1']:6.2f} %")
    if metrics.get("predictions") == "transductive":
        print("  transductive predictions (TransCLIP over the whole set, the run's classifier as the prior)")
        if "inductive" in metrics:
            print(f"  {'classifier alone acc1':<22} {100 * metrics['inductive']['acc1']:6.2f} %")


def main(argv: Optional[List[str]] = None) -> None:
    try:
        sys.exit(run(argv))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if "--verbose" in (argv if argv is not None else sys.argv):
            raise
        print(f"coft-fast: error: {exc}", file=sys.stderr)
        sys.exit(2)
