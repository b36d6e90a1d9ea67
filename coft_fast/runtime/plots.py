"""PNG plots of a run: per-class pseudo-label accuracy, p_clean, CoFT+ rounds, issue scores."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Sequence

import torch

from coft_fast.runtime.io import atomic_write

_BINS = torch.linspace(0, 1, 41).tolist()  # histograms of probabilities and scores on [0, 1]


@contextlib.contextmanager
def _figure(path: Path, *args, **kwargs):
    """(fig, axes) of ``plt.subplots(*args, **kwargs)``, written as a PNG to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def per_class_accuracy(labels: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label accuracy per (true) class, NaN where a class has no sample."""
    known = truth >= 0
    labels, truth = labels[known], truth[known]
    hits = torch.bincount(truth[labels == truth], minlength=num_classes).double()
    totals = torch.bincount(truth, minlength=num_classes).double()
    return torch.where(totals > 0, hits / totals.clamp(min=1), torch.full_like(totals, float("nan")))


def plot_per_class_accuracy(path: Path, class_names: Sequence[str], series: Dict[str, torch.Tensor]) -> None:
    width = 0.8 / max(len(series), 1)
    with _figure(path, figsize=(max(6, 0.5 * len(class_names)), 4)) as (fig, ax):
        for i, (name, values) in enumerate(series.items()):
            xs = [c + i * width for c in range(len(class_names))]
            ax.bar(xs, (100 * values).tolist(), width=width, label=name)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(class_names))], class_names, rotation=60, ha="right",
                      fontsize=8)
        ax.set(ylabel="pseudo-label accuracy (%)", ylim=(0, 100),
               title="Pseudo-label accuracy per class, before and after filtering")
        ax.legend(fontsize=8)


def plot_clean_probability(path: Path, p_clean: torch.Tensor, keep: torch.Tensor, threshold: float) -> None:
    with _figure(path, figsize=(6, 4)) as (fig, ax):
        ax.hist(p_clean[keep].tolist(), bins=_BINS, alpha=0.7, label=f"kept ({int(keep.sum())})")
        ax.hist(p_clean[~keep].tolist(), bins=_BINS, alpha=0.7, label=f"dropped ({int((~keep).sum())})")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set(xlabel="p_clean of model 1's label under model 2", ylabel="samples")
        ax.legend()


def plot_issue_scores(path: Path, p_clean1: torch.Tensor, p_clean2: torch.Tensor, score: torch.Tensor,
                      issue: torch.Tensor, threshold: float) -> None:
    """clean-labels: each model's p_clean of the given labels, and the issue scores."""
    with _figure(path, 1, 3, figsize=(12, 3.6)) as (fig, axes):
        for ax, values, model in ((axes[0], p_clean1, 1), (axes[1], p_clean2, 2)):
            ax.hist(values.float().tolist(), bins=_BINS, color="tab:blue")
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"model {model}: p_clean of the given label", fontsize=9)
            ax.set(xlabel="p_clean", ylabel="images")
        axes[2].hist(score[~issue].tolist(), bins=_BINS, alpha=0.7, label=f"kept ({int((~issue).sum())})")
        axes[2].hist(score[issue].tolist(), bins=_BINS, alpha=0.7, label=f"issues ({int(issue.sum())})")
        axes[2].set_title("issue score: 1 - min(p_clean1, p_clean2)", fontsize=9)
        axes[2].set_xlabel("issue score")
        axes[2].legend(fontsize=8)
        fig.suptitle("Given labels checked by the two phase-I models")


def plot_rounds(path: Path, rounds: Sequence[dict]) -> None:
    """CoFT+: per round, each model's subset size and label accuracies, and the models' agreement."""
    numbers = [entry["round"] for entry in rounds]
    with _figure(path, 1, 2, figsize=(9, 3.6)) as (fig, (acc_ax, size_ax)):

        def plot_percent(values, style, label):  # a line where any value is known (None: a gap)
            if any(v is not None for v in values):
                acc_ax.plot(numbers, [100 * v if v is not None else float("nan") for v in values], style,
                            label=label)

        for model in sorted(key for key in rounds[0] if key.startswith("model")):
            for key, style in (("subset_label_accuracy", "--o"), ("pool_label_accuracy", "-s")):
                plot_percent([entry[model].get(key) for entry in rounds], style,
                             f"{model}, {key.replace('_label_accuracy', '')}")
            size_ax.plot(numbers, [entry[model]["subset_size"] for entry in rounds], "-o", label=model)
        plot_percent([entry.get("agreement") for entry in rounds], ":^k", "models agree on the pool")
        acc_ax.set(xlabel="round", ylabel="label accuracy, agreement (%)", xticks=numbers)
        if acc_ax.lines:
            acc_ax.legend(fontsize=7)
        size_ax.set(xlabel="round", ylabel="training subset size", xticks=numbers)
        size_ax.legend(fontsize=7)
        fig.suptitle("CoFT+ phase I rounds")
