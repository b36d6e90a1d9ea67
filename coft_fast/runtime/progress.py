"""Progress bars: tqdm on a terminal, else a line at most every ``COFT_PROGRESS_SECONDS`` (10) seconds."""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm as terminal_tqdm
from tqdm.std import tqdm as plain_tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %) [{elapsed}<{remaining}, {rate_fmt}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"


class LineProgress(plain_tqdm):
    """tqdm's counting and rate, displayed as whole lines (no redraws), at most one per interval."""

    def __init__(self, *args, **kwargs):
        self._shown_n, self._shown_at = None, 0.0
        total = kwargs.get("total")
        if total is None and args and hasattr(args[0], "__len__"):
            total = len(args[0])
        kwargs.setdefault("bar_format", LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL)
        raw = os.environ.get("COFT_PROGRESS_SECONDS", "10")
        try:
            seconds = max(float(raw), 0.0)
        except ValueError:
            raise ValueError(f"COFT_PROGRESS_SECONDS must be a number of seconds, got {raw!r}") from None
        # leave=False: the lines stay written anyway; no blank line or redraw at the end
        kwargs.update(mininterval=seconds, miniters=1, dynamic_ncols=False, leave=False)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        # msg == "" is tqdm's request to erase the bar on close: write the last count instead. Other
        # calls (updates, and refreshes that set_postfix forces) write at most once per interval.
        closing = msg == ""
        now = time.monotonic()
        due = self._shown_n is None or now - self._shown_at >= self.mininterval
        if self.n != self._shown_n and (closing or due):
            self._shown_n, self._shown_at = self.n, now
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return not closing  # False: tqdm writes no carriage return after the erase


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar for a terminal; elsewhere a :class:`LineProgress`. Takes tqdm's arguments."""
    stream = kwargs.get("file") or sys.stderr
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or stream-like objects without isatty
        terminal = False
    if kwargs.get("disable") or terminal:
        return terminal_tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
