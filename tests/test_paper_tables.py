"""bench/paper_tables.py end to end on a synthetic CoOp-layout tree (two datasets) with the tiny test bed."""
import csv
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import paper_tables  # noqa: E402

FAST = ["phase1.steps=4", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=16",
        "phase2.epochs=1", "phase2.batch_size=16", "pseudo.top_k=4", "data.num_workers=0"]


def _digit_images(digits, classes, per_class, split_offset):
    """(class index, PIL image) pairs from the digits test folders."""
    for label, name in enumerate(classes):
        files = sorted((digits["test"] / name).iterdir())[split_offset : split_offset + per_class]
        for path in files:
            with Image.open(path) as image:
                yield label, image.convert("RGB")


def make_coop_tree(root: Path, digits) -> None:
    """DTD with CoOp's split JSON (paths relative to dtd/images) and FGVCAircraft with its variant lists."""
    classes = ["zero", "one", "two"]
    dtd = root / "dtd"
    split = {}
    for part, offset in (("train", 0), ("val", 12), ("test", 14)):
        entries = []
        for i, (label, image) in enumerate(_digit_images(digits, classes, 12 if part == "train" else 2 if part == "val" else 8, offset)):
            relative = f"{classes[label]}/{part}_{i}.jpg"
            (dtd / "images" / classes[label]).mkdir(parents=True, exist_ok=True)
            image.save(dtd / "images" / relative)
            entries.append([relative, label, f"{classes[label]}_texture"])  # CoOp's names may hold underscores
        split[part] = entries
    (dtd / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    fgvc = root / "fgvc_aircraft"
    (fgvc / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (fgvc / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, offset, count in (("train", 0, 12), ("test", 14, 8)):
        lines = []
        for i, (label, image) in enumerate(_digit_images(digits, classes, count, offset)):
            image_id = f"{part}{i:05d}"
            image.save(fgvc / "images" / f"{image_id}.jpg")
            lines.append(f"{image_id} {variants[label]}")
        (fgvc / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")


def test_paper_tables_runs_on_a_coop_tree_and_resumes(digits, tiny_testbed, tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    make_coop_tree(root, digits)
    argv = ["--data-root", str(root), "--model", f"local-dir:{tiny_testbed}", "--datasets", "DTD", "FGVCAircraft",
            "--methods", "zero-shot", "coft", "self-train", "--seeds", "0", "--out", str(out)]
    for setting in FAST:
        argv += ["--set", setting]
    paper_tables.main(argv)
    lines = (out / "paper_tables.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| dataset"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "dataset", "zero-shot (paper)", "zero-shot (ours)", "coft (paper)", "coft (ours)", "self-train (ours)",
        "seeds", "minutes"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| ") and not line.startswith("| dataset")}
    assert list(rows) == ["DTD", "FGVCAircraft", "average"]
    assert rows["DTD"][1] == "44.73" and rows["FGVCAircraft"][3] == "29.49"  # the paper's figures beside ours
    for name in ("DTD", "FGVCAircraft"):
        assert all(0 <= float(v) <= 100 for v in rows[name][2:3] + rows[name][4:6])
    with open(out / "paper_tables.csv", newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert {(c["dataset"], c["method"]) for c in cells} == {
        (d, m) for d in ("DTD", "FGVCAircraft") for m in ("zero-shot", "coft", "self-train")}
    names = json.loads((out / "runs" / "DTD" / "coft_seed0" / "class_names.json").read_text())
    assert names == {"zero_texture": "zero texture", "one_texture": "one texture", "two_texture": "two texture"}
    # a finished dataset is read back, not run again
    before = {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.json")}
    paper_tables.main(argv)
    assert {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.json")} == before


def test_paper_tables_names_a_missing_split_file(tmp_path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(SystemExit, match="split_zhou_DescribableTextures.json"):
        paper_tables.main(["--data-root", str(tmp_path), "--datasets", "DTD", "--out", str(tmp_path / "o")])
