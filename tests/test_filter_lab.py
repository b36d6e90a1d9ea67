"""bench/filter_lab.py on the tiny test bed: cells, reuse of the paper cell's stages, the tables."""
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402
import filter_lab  # noqa: E402

SMOKE = ["phase1.steps=10", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=32",
         "phase2.epochs=1", "pseudo.top_k=8", "data.num_workers=0", "phase1.rounds=2"]


def test_filter_lab_cells_reuse_the_paper_models(tiny_testbed, digits, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(filter_lab, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    spec = f"digits={tiny_testbed},{digits['pool']},{digits['test']}"
    argv = ["--testbed", spec, "--variants", "mixture", "gce", "self-train", "coftplus-peer", "--work", str(tmp_path / "work")]
    for item in SMOKE:
        argv += ["--set", item]
    filter_lab.main(argv)
    with open(tmp_path / "results" / "filter_lab.csv", newline="") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["paper", "mixture", "gce", "self-train", "coftplus-peer"]
    assert rows["paper"]["rounds: model1 pool acc"] == ""  # CoFT: no rounds
    assert len(rows["coftplus-peer"]["rounds: model1 pool acc"].split(" → ")) == 2  # one accuracy per round
    config = (tmp_path / "work" / "digits" / "coftplus-peer_seed0" / "config.yaml").read_text()
    assert "method: coft+" in config and "round_ranking: peer" in config
    assert rows["self-train"]["kept"] == "" and rows["self-train"]["final"] != ""  # no filter to score
    for key in ("filter AUC", "own AUC", "agreement", "model1 pool acc"):  # the paper cell's models, another rule
        assert rows["mixture"][key] == rows["paper"][key]
    assert 0 < int(rows["mixture"]["kept"]) and rows["mixture"]["final"] != ""
    assert rows["gce"]["kept"] == rows["paper"]["kept"]  # the same models and decision; only phase II differs
    assert 0.0 <= float(rows["paper"]["filter AUC"]) <= 1.0 and rows["paper"]["final"] != ""
    assert 0.0 <= float(rows["paper"]["own AUC"]) <= 1.0
    log = (tmp_path / "work" / "digits" / "mixture_seed0" / "run.log").read_text()
    assert "stage phase1_model1: finished by an earlier run, loaded" in log
    table = (tmp_path / "results" / "filter_lab_digits.md").read_text()
    assert "| mixture | 1 |" in table and (tmp_path / "results" / "filter_lab_digits.png").is_file()
    filter_lab.main(argv)  # every cell is done: nothing runs again
    assert (tmp_path / "work" / "digits" / "paper_seed0" / "run.log").read_text().count("stage zero_shot: started") == 1


def test_committed_rows_of_retired_variants_still_render(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(filter_lab, "RESULTS", tmp_path)
    from coft_fast.config import Config

    assert not set(filter_lab.RETIRED) & set(filter_lab.VARIANTS)  # removed in issue 37: not runnable
    for overrides, _ in filter_lab.VARIANTS.values():
        Config().override(overrides).validate()  # a removed key would raise ConfigError
    assert set(filter_lab.ROW_ORDER) == set(filter_lab.VARIANTS) | set(filter_lab.RETIRED)
    table = common.CellTable("filter_lab", filter_lab.HEADER, ("testbed", "variant", "seed"))
    for variant, kept, final in (("agreement", "61.07", "43.62"), ("paper", "69.24", "43.48")):
        table.rows[("t", variant, "0")] = {h: "" for h in filter_lab.HEADER} | {
            "testbed": "t", "variant": variant, "seed": "0", "kept share": kept, "precision": "55.00", "final": final}
    filter_lab.write(table, [])
    means = (tmp_path / "filter_lab_t.md").read_text().split("Means over seeds:")[1]
    assert means.index("| paper | 1 | 69.24") < means.index("| agreement | 1 | 61.07")  # in ROW_ORDER's order

def test_two_processes_filling_one_cell_table_keep_each_others_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    header, keys = ["testbed", "seed", "final"], ("testbed", "seed")
    first, second = common.CellTable("lab", header, keys), common.CellTable("lab", header, keys)  # both start empty
    first.add({"testbed": "a", "seed": 0, "final": "1"}, [])
    second.add({"testbed": "b", "seed": 0, "final": "2"}, [])  # must not drop a's row
    first.add({"testbed": "a", "seed": 1, "final": "3"}, [])  # nor this b's
    with open(tmp_path / "lab.csv", newline="") as handle:
        rows = {(r["testbed"], r["seed"]): r["final"] for r in csv.DictReader(handle)}
    assert rows == {("a", "0"): "1", ("b", "0"): "2", ("a", "1"): "3"}
    assert {"testbed": "b", "seed": 0} in first  # what another process finished counts as done
