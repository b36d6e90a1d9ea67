"""Label issues (``pseudo.source=given``): the given labels the filter dropped, by 1 - min(p_clean)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from coft_fast.pseudo.filter import FilterResult
from coft_fast.runtime.io import atomic_write_csv

LABEL_ISSUES_FILE = "label_issues.csv"


class LabelIssue(NamedTuple):
    """One pool image's given label and what the two phase-I models made of it (a row of the file)."""
    path: str
    given_label: str
    p_clean_model1: float
    p_clean_model2: float
    pred_model1: str
    pred_model2: str
    issue_score: float
    is_issue: bool


LABEL_ISSUES_HEADER = list(LabelIssue._fields)


def issue_scores(result: FilterResult, shots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M,) 1 - min of the two models' p_clean of the given label; 0 for labelled shots."""
    scores = 1.0 - torch.minimum(result.p_clean1.float(), result.p_clean2.float())
    return scores if shots is None else torch.where(shots >= 0, torch.zeros_like(scores), scores)


def label_issue_counts(result: FilterResult, given: torch.Tensor, class_names: Sequence[str], threshold: float,
                       rule: str = "paper", detector: str = "prompts") -> Dict:
    """metrics.json's record: the rule, totals, and per class the given labels and their issues."""
    issue = ~result.keep1
    num_classes = len(class_names)
    given_counts = torch.bincount(given, minlength=num_classes).tolist()
    issue_counts = torch.bincount(given[issue], minlength=num_classes).tolist()
    return {
        "rule": (f"a given label is an issue iff model 1's or model 2's p_clean of it is <= {threshold}"
                 if rule == "paper" else "a given label is an issue iff model 1's or model 2's per-class two-component "
                 "mixture on p_clean puts it in the low component")
                + f" (models: {'out-of-fold linear probes' if detector == 'probe' else 'phase-I prompt models'}; "
                "labelled shots never are)",
        "threshold": threshold,
        "num_images": int(len(given)),
        "issues": int(issue.sum()),
        "issue_share": float(issue.double().mean()) if len(given) else 0.0,
        "per_class": {name: {"given": g, "issues": i} for name, g, i in zip(class_names, given_counts, issue_counts)},
    }


def label_issues(paths: Sequence[str], result: FilterResult, given: torch.Tensor, shots: Optional[torch.Tensor],
                 class_names: Sequence[str]) -> List[LabelIssue]:
    """One row per pool image, most likely wrong first (issue score descending; ties in pool order)."""
    scores = issue_scores(result, shots)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    p1, p2, s = result.p_clean1.tolist(), result.p_clean2.tolist(), scores.tolist()
    labels1, labels2, given_list = result.labels1.tolist(), result.labels2.tolist(), given.tolist()
    issue = (~result.keep1).tolist()
    return [LabelIssue(paths[i], class_names[given_list[i]], p1[i], p2[i], class_names[labels1[i]],
                       class_names[labels2[i]], s[i], issue[i]) for i in order]


def write_label_issues(path: Path, issues: Sequence[LabelIssue]) -> None:
    rows = ((row.path, row.given_label, f"{row.p_clean_model1:.6f}", f"{row.p_clean_model2:.6f}", row.pred_model1,
             row.pred_model2, f"{row.issue_score:.6f}", "true" if row.is_issue else "false") for row in issues)
    atomic_write_csv(path, LABEL_ISSUES_HEADER, rows)
