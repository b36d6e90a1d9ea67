"""coft_fast.neighbors in a run: kNN refinement of pseudo-labels (pseudo.refine=knn, pseudo.knn_k)."""
import torch

import coft_fast
from coft_fast.neighbors import knn_vote
from coft_fast.pseudo.selection import select_top_k

SETTINGS = ["phase2.epochs=2", "pseudo.top_k=16", "data.num_workers=0", "run.progress=false"]


def test_knn_refinement_selects_s_star_from_the_neighbours_vote(digits_testbed, digits, tmp_path):
    model = f"local-dir:{digits_testbed['model']}"
    plain = coft_fast.train(digits["pool"], model=model, method="self-train", out=tmp_path / "plain",
                            overrides=SETTINGS)
    refined = coft_fast.train(digits["pool"], model=model, method="self-train", out=tmp_path / "knn",
                              overrides=SETTINGS + ["pseudo.refine=knn", "pseudo.knn_k=10"])
    pool = refined.metrics["pool"]
    assert pool["refine"] == "knn" and pool["refine_details"]["k"] == 10 and 0 < pool["refine_details"]["changed"] < 1
    assert plain.metrics["pool"]["refine"] == "none" and "refine_details" not in plain.metrics["pool"]
    # S* is the class-balanced top-K of the vote, recomputed here from the kept zero-shot features
    state = torch.load(tmp_path / "knn" / "checkpoints" / "zero_shot.pt", weights_only=False)
    share, labels = knn_vote(state["probabilities"], state["features"], 10).max(1)
    confidence = share * state["probabilities"].gather(1, labels[:, None]).squeeze(1)  # ranked by share x zero-shot
    expected = select_top_k(labels, confidence, 16, refined.class_names)
    names = refined.class_names
    want = sorted((refined.pool.paths[int(state["positions"][r])], names[int(l)])
                  for r, l in zip(expected.rows, expected.labels))
    assert sorted(refined.clean_sets["s_star"]) == want
    assert sorted(plain.clean_sets["s_star"]) != want
    assert torch.load(tmp_path / "plain" / "checkpoints" / "zero_shot.pt", weights_only=False)["features"] is None

