"""report.html: one self-contained page (images and plots inline, no network) of what a run did.

Built from the run folder's files alone (metrics.json, pseudo_labels.csv, the plots and the pool's
images), so ``coft-fast report --run DIR`` rebuilds it at any time. Thumbnails are bounded:
THUMBNAILS_PER_STRIP kept and as many dropped images per class, for at most MAX_STRIP_CLASSES classes.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Union

from coft_fast.runtime.io import atomic_write_text

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
REPORT = "report.html"
THUMBNAIL_PIXELS = 64
THUMBNAILS_PER_STRIP = 6
MAX_STRIP_CLASSES = 100
PLOTS = ("pseudo_label_accuracy.png", "clean_probability.png", "rounds.png")

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
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except Exception as exc:  # a moved or broken pool file leaves a gap, not a failed report
        log.debug("report: no thumbnail for %s (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _read_rows(run_dir: Path) -> List[Dict[str, str]]:
    table = run_dir / "pseudo_labels.csv"
    if not table.is_file():
        return []
    with open(table, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def class_table(rows: List[Dict[str, str]], metrics: Dict, names: List[str]) -> List[Dict]:
    """One entry per class: pool images (by zero-shot label), S* size, kept by the filter (model 1's
    labels validated by model 2) and those labels' precision where the pool has labels."""
    zero_shot = Counter(row["zero_shot_label"] for row in rows)
    kept = Counter(row["model1_label"] for row in rows if row.get("kept1") == "1")
    correct = Counter(row["model1_label"] for row in rows
                      if row.get("kept1") == "1" and row.get("pool_label") and row["pool_label"] == row["model1_label"])
    labelled = any(row.get("pool_label") for row in rows)
    truth = Counter(row["pool_label"] for row in rows if row.get("pool_label"))
    selection = metrics.get("selection", {}).get("per_class", {})
    filtered = bool(rows) and rows[0].get("kept1", "") != ""
    table = []
    for name in names:
        entry = {"class": name, "pool_images": zero_shot.get(name, 0), "s_star": selection.get(name)}
        if labelled:
            entry["pool_true"] = truth.get(name, 0)
        if filtered:
            entry["kept"] = kept.get(name, 0)
            if labelled:
                entry["precision"] = correct.get(name, 0) / kept[name] if kept.get(name) else None
        table.append(entry)
    return table


def _strips(rows: List[Dict[str, str]], names: List[str], seed: int = 0) -> str:
    if not rows or rows[0].get("kept1", "") == "":
        return "<p class='note'>This method has no filter (self-training): no kept or dropped images to show.</p>"
    by_class = defaultdict(lambda: {"kept": [], "dropped": []})
    for row in rows:
        by_class[row["model1_label"]]["kept" if row["kept1"] == "1" else "dropped"].append(row)
    rng = random.Random(seed)
    parts = []
    shown = [name for name in names if name in by_class][:MAX_STRIP_CLASSES]
    for name in shown:
        parts.append(f"<h3>{html.escape(name)}</h3><div class='strip'>")
        for kind in ("kept", "dropped"):
            members = by_class[name][kind]
            for row in rng.sample(members, min(THUMBNAILS_PER_STRIP, len(members))):
                uri = _thumbnail(row["path"])
                if uri is None:
                    continue
                caption = (f"{kind}<br>m1: {html.escape(row['model1_label'])}<br>"
                           f"m2: {html.escape(row['model2_label'])}")
                parts.append(f"<figure class='{kind}' title='{html.escape(row['path'], quote=True)}'>"
                             f"<img src='{uri}' alt='{kind} {html.escape(name, quote=True)}'>"
                             f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
    more = len([n for n in names if n in by_class]) - len(shown)
    if more > 0:
        parts.append(f"<p class='note'>{more} more classes not shown (at most {MAX_STRIP_CLASSES}).</p>")
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
               ("s_star", "S* size"), ("kept", "kept by the filter"), ("precision", "pseudo-label precision")]
    present = [(key, title) for key, title in columns if table and key in table[0]]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in present)
    body = []
    for entry in table:
        cells = []
        for key, _ in present:
            value = entry.get(key)
            if key == "class":
                cells.append(f"<td class='name'>{html.escape(value)}</td>")
            elif key == "precision":
                cells.append(f"<td>{_percent(value)}</td>")
            else:
                cells.append(f"<td>{'-' if value is None else value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table id='classes'><tr>{head}</tr>{''.join(body)}</table>"


def build_report(run_dir: PathLike) -> Path:
    """Write ``run_dir``/report.html from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: the report needs a finished run folder")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    rows = _read_rows(run_dir)
    names_path = run_dir / "class_names.json"
    if names_path.is_file():
        names = list(json.loads(names_path.read_text(encoding="utf-8")))
    else:
        names = list(dict.fromkeys(row["zero_shot_label"] for row in rows))
    plots = "".join(f"<h3>{html.escape(name)}</h3><img src='{_png(run_dir / name)}' alt='{html.escape(name)}'>"
                    for name in PLOTS if (run_dir / name).is_file())
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>coft_fast run: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Run {html.escape(run_dir.name)}</h1>{_headline(metrics)}"
        f"<h2>Per class</h2>{_class_rows_html(class_table(rows, metrics, names))}"
        f"<h2>Plots</h2><div class='plots'>{plots or '<p class=note>No plots in this run.</p>'}</div>"
        "<h2>What the filter kept and dropped</h2><p class='note'>By model 1's label; green: kept (model 2 "
        "validated the label), red: dropped. m1, m2: the two phase I models' labels.</p>"
        f"{_strips(rows, names)}</body></html>\n"
    )
    out = run_dir / REPORT
    atomic_write_text(out, page)
    return out
