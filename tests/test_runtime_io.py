"""Atomic writes: a failing write (a full disk) leaves the previous file whole and loadable."""
import errno
import json

import pytest
import torch

from coft_fast.runtime import io as runtime_io
from coft_fast.runtime.checkpoint import load_state, save_state


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "phase2_s1_progress.pt"
    save_state(path, {"step": 10, "weights": torch.ones(4)})
    real_save = torch.save

    def disk_fills_up(obj, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        save_state(path, {"step": 20, "weights": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_state(path)
    assert state["step"] == 10 and torch.equal(state["weights"], torch.ones(4))
    assert [p.name for p in path.parent.iterdir()] == [path.name], "the temporary file was not removed"


def test_failing_fsync_keeps_the_previous_metrics(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    runtime_io.atomic_write_json(path, {"acc1": 0.5})

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(runtime_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        runtime_io.atomic_write_json(path, {"acc1": 0.9})
    assert json.loads(path.read_text()) == {"acc1": 0.5}


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".zero_shot.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".metrics.json.x.tmp").write_text("{")
    (tmp_path / "metrics.json").write_text("{}")
    assert runtime_io.remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["metrics.json"]


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path):
    """mkstemp's temporaries are owner-only (0600); a written output has 0666 minus the umask, as
    open() would give it (0644 under the usual umask 022), so reports and exports can be shared."""
    import stat

    from coft_fast.runtime import io as runtime_io

    runtime_io.atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o666 & ~runtime_io._UMASK
