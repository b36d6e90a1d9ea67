"""Progress output: tqdm on a terminal, whole lines at most every few seconds elsewhere."""
import io

import pytest

from coft_fast.runtime.progress import LineProgress, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_writes_whole_lines_without_redraws(monkeypatch):
    monkeypatch.setenv("COFT_PROGRESS_SECONDS", "3600")
    stream = io.StringIO()
    bar = progress_bar(total=1000, desc="phase I model1", unit="step", file=stream, leave=False)
    assert isinstance(bar, LineProgress)
    for step in range(1000):
        bar.update(1)
        bar.set_postfix(loss=1.0 / (step + 1))  # forces a refresh each step, as the test bed's loop does
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first line at the start, none during the hour-long interval, the last count at the close
    assert len(lines) == 2, lines
    assert lines[0].startswith("phase I model1: 0/1000 step")
    assert lines[1].startswith("phase I model1: 1000/1000 step (100 %)")


def test_every_update_becomes_a_line_when_the_interval_is_zero(monkeypatch):
    monkeypatch.setenv("COFT_PROGRESS_SECONDS", "0")
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="reading images", file=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["0/5", "1/5", "2/5", "3/5", "4/5", "5/5"]


def test_a_terminal_gets_tqdm_and_disabled_bars_write_nothing(monkeypatch):
    terminal = FakeTerminal()
    bar = progress_bar(total=3, desc="x", file=terminal)
    assert not isinstance(bar, LineProgress)
    bar.close()
    quiet = io.StringIO()
    bar = progress_bar(total=3, desc="x", file=quiet, disable=True)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_bad_interval_names_the_variable(monkeypatch):
    monkeypatch.setenv("COFT_PROGRESS_SECONDS", "often")
    with pytest.raises(ValueError, match="COFT_PROGRESS_SECONDS"):
        progress_bar(total=3, file=io.StringIO())
