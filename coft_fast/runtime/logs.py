"""Logging set-up: a console handler for the CLI and a log file in each run folder."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to_file(path: Optional[Path]) -> Iterator[None]:
    """Append the library's log records to ``path`` (nothing when None) until the block ends."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("coft_fast")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def log_to_console(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    # open_clip logs every checkpoint look-up at INFO; keep the console readable.
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("coft_fast").setLevel(logging.INFO)
