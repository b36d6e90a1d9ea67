"""bench/same_metrics.py's comparison: identical metrics pass, a changed figure beyond the tolerance
is named and fails, timings and seconds are skipped."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import same_metrics  # noqa: E402


def _write(root: Path, acc1: float, seconds: float) -> None:
    for name in same_metrics.CELLS:
        (root / name).mkdir(parents=True)
        metrics = {"final": {"acc1": acc1, "classifier": "s1"}, "timings": {"phase1": seconds},
                   "rounds": [{"seconds": seconds, "agreement": 0.5}]}
        (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_compare_passes_same_metrics_and_names_a_changed_one(tmp_path, capsys):
    _write(tmp_path / "a", 0.5, 1.0)
    _write(tmp_path / "b", 0.5 + 1e-9, 7.0)  # inside the tolerance; timings differ and are skipped
    _write(tmp_path / "c", 0.51, 1.0)
    assert same_metrics.compare(tmp_path / "a", tmp_path / "b", 1e-6) == 0
    assert "same metrics" in capsys.readouterr().out
    assert same_metrics.compare(tmp_path / "a", tmp_path / "c", 1e-6) == 1
    out = capsys.readouterr().out
    assert "coft: final.acc1: 0.5 -> 0.51" in out and f"{len(same_metrics.CELLS)} differences" in out
