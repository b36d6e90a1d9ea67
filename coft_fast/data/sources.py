"""Image sources (class folders, flat folders, CSV files, CoOp split JSON); problems raise :class:`DataError`."""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
UNLABELLED = -1
PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """An input file, folder or class list is unusable; the message names it and what was expected."""


@dataclass
class ImageSource:
    """Image paths with optional labels (-1 = unknown) over a fixed list of class names."""

    paths: List[str]
    labels: List[int]
    class_names: List[str]
    origin: str = ""
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DataError(f"{self.origin}: {len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return any(label != UNLABELLED for label in self.labels)

    def subset(self, indices: Sequence[int]) -> "ImageSource":
        return ImageSource([self.paths[i] for i in indices], [self.labels[i] for i in indices], list(self.class_names),
                           self.origin)


def read_class_names(classes: Union[PathLike, Sequence[str]]) -> List[str]:
    """Class names from a list, or from a text file with one name per line (blank lines ignored)."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise DataError(f"class file not found: {path} (expected a text file with one class name per line)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        origin = str(path)
    else:
        names = [str(name).strip() for name in classes]
        origin = "class list"
    if not names:
        raise DataError(f"{origin}: no class names (expected at least one)")
    if any(not name for name in names):
        raise DataError(f"{origin}: empty class name")
    first: Dict[str, int] = {}
    for index, name in enumerate(names):
        if first.setdefault(name, index) != index:
            raise DataError(f"{origin}: class name {name!r} appears twice (entries {first[name] + 1} and {index + 1})")
    return names


def _canonical(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _class_index(class_names: Sequence[str]) -> Dict[str, int]:
    """Lookup that matches names exactly, then case- and separator-insensitively."""
    index = {}
    for i, name in enumerate(class_names):
        index.setdefault(_canonical(name), i)
    return {**index, **{name: i for i, name in enumerate(class_names)}}


def _lookup(index: Dict[str, int], name: str) -> Optional[int]:
    return index.get(name, index.get(_canonical(name)))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def from_folder(root: PathLike, class_names: Optional[Sequence[str]] = None) -> ImageSource:
    """A folder of class sub-folders (matched to ``class_names`` ignoring case, '_' and '-') or of images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    found = {d: images for d in subdirs if (images := sorted(p for p in d.rglob("*") if p.is_file() and _is_image(p)))}
    if found and loose:
        raise DataError(f"{root} mixes class sub-folders ({', '.join(d.name for d in list(found)[:3])}...) with "
                        f"{len(loose)} loose images: use one layout (class sub-folders, or a flat folder)")
    if not found:
        if not loose:
            raise DataError(f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        if class_names is None:
            raise DataError(f"{root} is a flat folder of unlabelled images: class names are required")
        names = read_class_names(class_names)
        return ImageSource([str(p) for p in loose], [UNLABELLED] * len(loose), names, str(root))

    names = read_class_names(class_names) if class_names is not None else [d.name for d in found]
    lookup = _class_index(names)
    paths: List[str] = []
    labels: List[int] = []
    for folder, images in found.items():
        label = _lookup(lookup, folder.name)
        if label is None:
            raise DataError(f"{root}: sub-folder {folder.name!r} matches no class name "
                            f"(classes: {', '.join(names[:10])}{'...' if len(names) > 10 else ''})")
        paths += map(str, images)
        labels += [label] * len(images)
    return ImageSource(paths, labels, names, str(root))


def from_csv(csv_path: PathLike, class_names: Sequence[str]) -> ImageSource:
    """A CSV of ``path[,label]`` rows (paths relative to it; a label: a class name or index, or empty)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV file not found: {csv_path}")
    names = read_class_names(class_names)
    lookup = _class_index(names)
    listed: Dict[str, list] = {}  # normalised path -> [first row, path, label]
    duplicates = 0
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    first_row = 2 if rows and rows[0] and rows[0][0].strip().lower() == "path" else 1
    for line_no, row in enumerate(rows[first_row - 1:], start=first_row):
        if not row or not row[0].strip():
            continue
        if len(row) > 2:
            raise DataError(f"{csv_path}, row {line_no}: expected 'path[,label]', got {len(row)} columns")
        image = str(csv_path.parent / row[0].strip())  # an absolute path stays as it is
        raw = row[1].strip() if len(row) == 2 else ""
        label = _lookup(lookup, raw) if raw else UNLABELLED
        if label is None and raw.lstrip("-").isdigit():
            label = int(raw)
            if not 0 <= label < len(names):
                raise DataError(f"{csv_path}, row {line_no}: label index {label} is outside 0..{len(names) - 1}")
        if label is None:
            raise DataError(f"{csv_path}, row {line_no}: label {raw!r} is not one of the {len(names)} class names")
        earlier = listed.setdefault(os.path.normpath(image), [line_no, image, label])
        if earlier[0] != line_no:
            if UNLABELLED not in (earlier[2], label) and earlier[2] != label:
                raise DataError(f"{csv_path}, rows {earlier[0]} and {line_no}: {row[0].strip()!r} is listed twice "
                                f"with different labels; keep one row per image")
            earlier[2] = max(earlier[2], label)  # a label wins over "unlabelled"
            duplicates += 1
    if not listed:
        raise DataError(f"{csv_path}: no image rows")
    if duplicates:
        log.warning("%s: %d repeated rows of images already listed were ignored", csv_path, duplicates)
    return ImageSource([entry[1] for entry in listed.values()], [entry[2] for entry in listed.values()], names,
                       str(csv_path))


def _find_image_root(json_path: Path, first_relative: str) -> Path:
    for candidate in [json_path.parent, *sorted(p for p in json_path.parent.iterdir() if p.is_dir())]:
        if (candidate / first_relative).exists():
            return candidate
    raise DataError(f"{json_path}: cannot find the image folder: {first_relative!r} exists neither beside the JSON "
                    f"nor in one of its sub-folders; pass the folder the paths are relative to (data.image_root)")


def _is_coop_entry(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)


def from_coop_split(json_path: PathLike, split: Optional[str], class_names: Optional[Sequence[str]] = None,
                    image_root: Optional[PathLike] = None) -> ImageSource:
    """CoOp's ``split_zhou_<Dataset>.json``: {"train"|"val"|"test": [[path, label, classname], ...]}."""
    json_path = Path(json_path)
    if split is None:
        raise DataError(f"{json_path} is a CoOp split file: choose a split (train, val or test) with data.split / --split")
    try:
        with open(json_path, encoding="utf-8") as handle:
            splits = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"split file not found: {json_path}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path} is not valid JSON: {exc}") from None
    if not isinstance(splits, dict) or split not in splits:
        found = ", ".join(sorted(splits)) if isinstance(splits, dict) else type(splits).__name__
        raise DataError(f"{json_path}: no split {split!r} (found: {found})")
    entries = splits[split]
    if not entries:
        raise DataError(f"{json_path}: split {split!r} is empty")
    for position, entry in enumerate(entries):
        if not _is_coop_entry(entry):
            raise DataError(f"{json_path}: {split}[{position}] should be [path, label, classname], got {entry!r}")
    json_names: Dict[int, str] = {}
    for part in [entries, *splits.values()]:  # the chosen split's names first
        for entry in filter(_is_coop_entry, part if isinstance(part, list) else []):
            json_names.setdefault(entry[1], entry[2])
    if class_names is None:
        count = max(json_names) + 1
        missing = [i for i in range(count) if i not in json_names]
        if missing:
            raise DataError(f"{json_path}: no class name for label(s) {missing[:5]}: pass the class names")
        names = [json_names[i] for i in range(count)]  # as CoOp's loaders keep them; prompts read "_" as " "
    else:
        names = read_class_names(class_names)
    root = Path(image_root) if image_root is not None else _find_image_root(json_path, entries[0][0])
    for position, (_, label, _) in enumerate(entries):
        if not 0 <= label < len(names):
            raise DataError(f"{json_path}: {split}[{position}] has label {label}, "
                            f"but there are {len(names)} class names")
    return ImageSource([str(root / entry[0]) for entry in entries], [entry[1] for entry in entries], names,
                       f"{json_path}:{split}")


def load_source(images: PathLike, class_names: Optional[Union[PathLike, Sequence[str]]] = None,
                split: Optional[str] = None, image_root: Optional[PathLike] = None) -> ImageSource:
    """Pick the reader from what ``images`` is: a folder, a ``.csv`` file or a ``.json`` split file."""
    path = Path(images)
    if path.is_dir():
        return from_folder(path, class_names)
    if path.suffix.lower() == ".csv":
        if class_names is None:
            raise DataError(f"{path}: a CSV source needs class names (a list or a file with one per line)")
        return from_csv(path, class_names)
    if path.suffix.lower() == ".json":
        return from_coop_split(path, split, class_names, image_root)
    if not path.exists():
        raise DataError(f"images not found: {path} (expected a folder, a .csv file or a CoOp split .json)")
    raise DataError(f"{path}: unsupported image source (expected a folder, a .csv file or a CoOp split .json)")


def require_labels(source: ImageSource, purpose: str) -> None:
    """Raise a DataError naming ``source`` and its first unlabelled image when any image lacks a label."""
    missing = [path for path, label in zip(source.paths, source.labels) if label == UNLABELLED]
    if missing:
        raise DataError(f"{source.origin}: {purpose} needs a label for every image (class sub-folders, a CSV of "
                        f"path,label, or a CoOp split JSON), but {len(missing)} of {len(source)} have none "
                        f"(first: {missing[0]})")


def add_shots(pool: ImageSource, shots: ImageSource) -> tuple:
    """(the pool with the ``shots`` it lacks appended, each position's shot label or -1)."""
    if list(shots.class_names) != list(pool.class_names):
        raise DataError(f"{shots.origin}: the labelled shots have classes {shots.class_names[:5]}..., "
                        f"not the pool's {pool.class_names[:5]}...")
    require_labels(shots, "the labelled shots (--labeled)")
    where = {os.path.realpath(path): position for position, path in enumerate(pool.paths)}
    paths, labels = list(pool.paths), list(pool.labels)
    shot_labels = [UNLABELLED] * len(paths)
    for path, label in zip(shots.paths, shots.labels):
        position = where.setdefault(os.path.realpath(path), len(paths))
        if position == len(paths):  # neither in the pool nor an earlier shot
            paths.append(path)
            labels.append(label)
            shot_labels.append(label)
        elif shot_labels[position] not in (UNLABELLED, label):
            raise DataError(f"{shots.origin}: {path} is listed twice with different labels; keep one")
        shot_labels[position] = label
    return ImageSource(paths, labels, list(pool.class_names), pool.origin, pool.skipped), shot_labels


def combine_sources(sources: Sequence[ImageSource], classes_given: bool = False) -> ImageSource:
    """One source from several with the same classes (``classes_given``: each class needs images somewhere)."""
    if not sources:
        raise DataError("no image sources given")
    first = sources[0]
    for other in sources[1:]:
        if list(other.class_names) != list(first.class_names):
            missing = sorted(set(first.class_names) - set(other.class_names))
            extra = sorted(set(other.class_names) - set(first.class_names))
            raise DataError(f"{other.origin}: its class folders disagree with {first.origin}'s "
                            f"(missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'}); "
                            "give the same class folders, or --classes")
    if len(sources) == 1:
        return first
    seen: Dict[str, str] = {}
    for source in sources:
        for path in source.paths:
            key = os.path.realpath(path)
            if key in seen:
                raise DataError(f"{path} is in both {seen[key]} and {source.origin}: give each image once")
            seen[key] = source.origin
    combined = ImageSource([path for s in sources for path in s.paths], [label for s in sources for label in s.labels],
                           list(first.class_names), " + ".join(s.origin for s in sources))
    if classes_given:
        present = set(combined.labels)
        empty = [name for index, name in enumerate(first.class_names) if index not in present]
        if empty:
            raise DataError(f"{combined.origin}: no images of class {', '.join(empty[:5])}"
                            f"{'...' if len(empty) > 5 else ''} in any source")
    return combined

