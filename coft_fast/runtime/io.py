"""Atomic writes: a file is either the old version or the complete new one, never half-written."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ".<name>.<random>.tmp" beside the target
# mkstemp creates files readable by their owner only; outputs get the usual permissions instead
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A temporary file beside ``path``, fsynced and renamed over it when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def remove_stale_temporaries(folder: PathLike) -> int:
    """Delete the temporary files that killed atomic writes left under ``folder``; returns how many."""
    removed = 0
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink()
            removed += 1
    return removed


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def atomic_write_json(path: PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_csv_writer(path, header) as writer:
        writer.writerows(rows)


@contextlib.contextmanager
def atomic_csv_writer(path: Optional[PathLike], header: Sequence[str]) -> Iterator[Any]:
    """A csv writer streaming to a temporary file renamed over ``path`` at the end (None: rows dropped)."""
    if path is None:
        with open(os.devnull, "w", encoding="utf-8", newline="") as handle:
            yield csv.writer(handle)
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        yield writer
