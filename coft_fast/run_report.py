"""report.html: one self-contained page of what a run did, built from the run folder's files alone."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from coft_fast.runtime.io import PathLike, atomic_write_text

log = logging.getLogger(__name__)
REPORT = "report.html"
THUMBNAIL_PIXELS = 64
THUMBNAILS_PER_STRIP = 6
MAX_STRIP_CLASSES = 100
PLOTS = ("pseudo_label_accuracy.png", "clean_probability.png", "label_issue_scores.png", "rounds.png")

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.name{text-align:left}
.headline{font-size:1.3em}.strip{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 12px}
figure{margin:0;text-align:center;font-size:11px;width:96px}figure img{width:64px;height:64px;object-fit:contain;
image-rendering:pixelated;border:2px solid #4a4}figure.dropped img{border-color:#c44}
.plots img{max-width:100%;margin:8px 0}.note{color:#666}
"""


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _thumbnail(path: str) -> Optional[str]:
    """A data: URI of a small JPEG of ``path`` (None when the file cannot be read)."""
    from coft_fast.data.loading import decode_rgb

    try:
        image = decode_rgb(path)  # the decoder training used: 16-bit, palette and alpha as there
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except Exception as exc:  # a moved or broken pool file leaves a gap, not a failed report
        log.debug("report: no thumbnail for %s (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class PoolSummary:
    """Per-class counts of pseudo_labels.csv and a seeded reservoir of each class's kept and dropped rows."""

    def __init__(self, seed: int = 0, per_strip: int = THUMBNAILS_PER_STRIP):
        self.zero_shot, self.truth, self.kept, self.correct = Counter(), Counter(), Counter(), Counter()
        self.given = Counter()  # pool images per given label (clean-labels runs)
        self.seen = Counter()  # rows per (class, kept or dropped), for the reservoirs
        self.samples: Dict[tuple, List[Dict[str, str]]] = defaultdict(list)
        self.filtered = self.labelled = False
        self.rng = random.Random(seed)
        self.per_strip = per_strip

    def add(self, row: Dict[str, str]) -> None:
        self.zero_shot[row["zero_shot_label"]] += 1
        if row.get("pool_label"):
            self.labelled = True
            self.truth[row["pool_label"]] += 1
        if row.get("kept1", "") == "":
            return
        self.filtered = True
        if row.get("given_label"):  # clean-labels: the filter kept or dropped the given label
            self.given[row["given_label"]] += 1
        label, kept = row.get("given_label") or row["model1_label"], row["kept1"] == "1"
        if kept:
            self.kept[label] += 1
            self.correct[label] += row.get("pool_label") == label
        key = (label, "kept" if kept else "dropped")
        self.seen[key] += 1
        reservoir = self.samples[key]
        if len(reservoir) < self.per_strip:
            reservoir.append(row)
        elif (slot := self.rng.randrange(self.seen[key])) < self.per_strip:  # reservoir sampling
            reservoir[slot] = row


def class_table(summary: PoolSummary, metrics: Dict, names: List[str]) -> List[Dict]:
    """One entry per class: pool images (by zero-shot, true and given label), S* size, kept, precision."""
    selection = metrics.get("selection", {}).get("per_class", {})
    table = []
    for name in names:
        entry = {"class": name, "pool_images": summary.zero_shot.get(name, 0)}
        if summary.labelled:
            entry["pool_true"] = summary.truth.get(name, 0)
        if summary.given:
            entry["pool_given"] = summary.given.get(name, 0)
        entry["s_star"] = selection.get(name)
        if summary.filtered:
            entry["kept"] = summary.kept.get(name, 0)
            if summary.labelled:
                entry["precision"] = summary.correct[name] / summary.kept[name] if summary.kept.get(name) else None
        table.append(entry)
    return table


def _strips(summary: PoolSummary, names: List[str]) -> str:
    if not summary.filtered:
        return "<p class='note'>This method has no filter (self-training): no kept or dropped images to show.</p>"
    classes = [name for name in names if summary.seen[(name, "kept")] or summary.seen[(name, "dropped")]]
    parts, unread = [], 0
    for name in classes[:MAX_STRIP_CLASSES]:
        parts.append(f"<h3>{html.escape(name)}</h3><div class='strip'>")
        for kind in ("kept", "dropped"):
            for row in summary.samples[(name, kind)]:
                uri = _thumbnail(row["path"])
                if uri is None:
                    unread += 1
                    continue
                caption = f"{kind}<br>"
                if row.get("given_label"):
                    caption += f"given: {html.escape(row['given_label'])}<br>"
                caption += f"m1: {html.escape(row['model1_label'])}<br>m2: {html.escape(row['model2_label'])}"
                if row.get("pool_label"):  # the pool's own label, where it has one
                    caption += f"<br>true: {html.escape(row['pool_label'])}"
                parts.append(f"<figure class='{kind}' title='{html.escape(row['path'], quote=True)}'>"
                             f"<img src='{uri}' alt='{kind} {html.escape(name, quote=True)}'>"
                             f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    if unread:
        parts.insert(0, f"<p class='note' id='unread-thumbnails'>{unread} pool images could not be read for "
                        "thumbnails: they were moved, or pseudo_labels.csv holds paths relative to the folder the run "
                        "was started from; run `coft-fast report` from that folder.</p>")
    if len(classes) > MAX_STRIP_CLASSES:
        parts.append(f"<p class='note'>{len(classes) - MAX_STRIP_CLASSES} more classes not shown "
                     f"(at most {MAX_STRIP_CLASSES}).</p>")
    return "".join(parts)


def _headline(metrics: Dict) -> str:
    zero_shot = metrics.get("zero_shot", {}).get("acc1")
    final = metrics.get("final", {}).get("acc1")
    timings = metrics.get("timings", {})
    lines = [f"<p class='headline'>Method <b>{html.escape(str(metrics.get('method', '?')))}</b>: "
             f"zero-shot top-1 <b id='zero-shot-acc1'>{_percent(zero_shot)}</b> &rarr; "
             f"final top-1 <b id='final-acc1'>{_percent(final)}</b></p>"]
    if zero_shot is None or final is None:
        lines.append("<p class='note'>Accuracy needs labelled evaluation images (--eval-images).</p>")
    pool = metrics.get("pool", {})
    lines.append(f"<p>{pool.get('num_images', '?')} pool images, {pool.get('num_skipped', 0)} skipped.</p>")
    if timings:
        cells = "".join(f"<tr><td class='name'>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
        total = sum(timings.values())
        lines.append(f"<table id='timings'><tr><th>phase</th><th>time</th></tr>{cells}"
                     f"<tr><td class='name'><b>total</b></td><td><b>{total:.1f} s</b></td></tr></table>")
    return "".join(lines)


def _class_rows_html(table: List[Dict]) -> str:
    columns = [("class", "class"), ("pool_images", "pool images (zero-shot label)"), ("pool_true", "pool images (true)"),
               ("pool_given", "pool images (given label)"), ("s_star", "S* size"), ("kept", "kept by the filter"),
               ("precision", "pseudo-label precision")]
    present = [(key, title) for key, title in columns if table and key in table[0]]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in present)
    body = []
    for entry in table:
        cells = [f"<td class='name'>{html.escape(entry['class'])}</td>"]  # "class" is always the first column
        for key, _ in present[1:]:
            value = entry.get(key)
            cells.append(f"<td>{_percent(value) if key == 'precision' else '-' if value is None else value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table id='classes'><tr>{head}</tr>{''.join(body)}</table>"


def build_report(run_dir: PathLike) -> Path:
    """Write ``run_dir``/report.html from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: the report needs a finished run folder")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    summary = PoolSummary()
    if (run_dir / "pseudo_labels.csv").is_file():
        with open(run_dir / "pseudo_labels.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                summary.add(row)
    names_path = run_dir / "class_names.json"  # older runs lack it: the classes in the order they occur
    names = list(json.loads(names_path.read_text(encoding="utf-8")) if names_path.is_file() else summary.zero_shot)
    plots = "".join(f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,"
                    f"{base64.b64encode((run_dir / name).read_bytes()).decode('ascii')}' alt='{html.escape(name)}'>"
                    for name in PLOTS if (run_dir / name).is_file())
    legend = ("By the given label; green: kept (both phase I models accept it), red: dropped (a label issue). "
              if summary.given else "By model 1's label; green: kept (model 2 validated the label), red: dropped. ")
    atomic_write_text(run_dir / REPORT, (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>coft_fast run: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Run {html.escape(run_dir.name)}</h1>{_headline(metrics)}"
        f"<h2>Per class</h2>{_class_rows_html(class_table(summary, metrics, names))}"
        f"<h2>Plots</h2><div class='plots'>{plots or '<p class=note>No plots in this run.</p>'}</div>"
        f"<h2>What the filter kept and dropped</h2><p class='note'>{legend}m1, m2: the two phase I models' labels; "
        "true: the pool's own label, where it has one (never used for training).</p>"
        f"{_strips(summary, names)}</body></html>\n"))
    return run_dir / REPORT
