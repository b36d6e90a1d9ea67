"""Issue 19's defects, each with a test that failed before its fix: the filter and the evaluation
check that a re-decoded pass gives back the images of the first, distributed phase I runs without
visual prompts, and phase2.train_on=both ensembles logits."""
import json
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coft_fast.config import Config

TINY = [
    "phase1.steps=20", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=32",
    "phase2.epochs=1", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false", "zeroshot.templates=single",
]


def _corrupt(path):
    with open(path, "wb") as handle:
        handle.write(b"not an image any more")


from coft_fast.stages.evaluation import evaluate  # noqa: E402
from coft_fast.stages.filtering import clean_sets, filter_labels  # noqa: E402
from coft_fast.stages.finetune import phase2  # noqa: E402
from coft_fast.stages.labels import label_pool  # noqa: E402
from coft_fast.stages.prompt_tuning import phase1  # noqa: E402


def _run(tiny_testbed, pool_folder, eval_folder=None, settings=()):
    from coft_fast.api import load_images
    from coft_fast.data import from_folder
    from coft_fast.models import load_clip
    from coft_fast.stages.context import RunContext

    cfg = Config().override(TINY + list(settings)).validate()
    pool = from_folder(pool_folder)
    evaluation = load_images(eval_folder, pool.class_names, cfg, evaluation=True) if eval_folder else None
    clip = load_clip(f"local-dir:{tiny_testbed}", device="cpu")
    return RunContext(cfg, pool, evaluation, clip, torch.device("cpu"), None)


def test_the_filter_stops_when_a_pool_image_decodes_once_and_then_fails(tiny_testbed, digits, tmp_path):
    pool_folder = tmp_path / "pool"
    shutil.copytree(digits["pool"], pool_folder)
    run = _run(tiny_testbed, pool_folder)
    selection = label_pool(run)
    phase1(run, selection)
    in_s_star = set(run.state.positions[selection.rows].tolist())
    victim = next(i for i in run.state.positions.tolist()[5:] if i not in in_s_star)
    _corrupt(run.pool.paths[victim])  # decoded by zero-shot scoring, fails when the filter re-decodes the pool
    with pytest.raises(RuntimeError, match="failed to decode again"):
        filter_labels(run)


@pytest.mark.parametrize("method", ["coft", "self-train"])
def test_evaluation_stops_when_an_eval_image_decodes_once_and_then_fails(tiny_testbed, digits, tmp_path, monkeypatch,
                                                                         method):
    """coft: the phase I models' pass re-decodes; self-train: the fine-tuned classifier's pass."""
    import coft_fast.scoring as scoring

    eval_folder = tmp_path / "test"
    shutil.copytree(digits["test"], eval_folder)
    run = _run(tiny_testbed, digits["pool"], eval_folder, [f"method={method}"])
    selection = label_pool(run)
    if method == "coft":
        phase1(run, selection)
        filter_labels(run)
        sets = clean_sets(run)
    else:
        sets = {"s_star": {"rows": selection.rows, "labels": selection.labels}}
    clip2 = phase2(run, sets)
    original = scoring.encode_images
    victim = run.eval_source.paths[3]

    def encode_then_break(clip, source, *args, **kwargs):
        result = original(clip, source, *args, **kwargs)
        if source is run.eval_source:  # the zero-shot pass of evaluate() has read it; later passes fail on it
            _corrupt(victim)
        return result

    monkeypatch.setattr(scoring, "encode_images", encode_then_break)
    with pytest.raises(RuntimeError, match="failed to decode again"):
        evaluate(run, clip2)


def test_train_on_both_reports_the_logit_ensemble():
    from coft_fast.inference import ensemble_logits

    a = torch.tensor([[-5.0, 4.0, 4.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[4.0, 1.0, -5.0], [0.0, 0.0, 3.0]])
    assert torch.equal(ensemble_logits([a, b]), (a + b) / 2)
    # row 0: the mean of the logits picks class 1, the mean of the probabilities would pick class 0
    assert ensemble_logits([a, b]).argmax(1)[0] == 1
    assert (a.softmax(1) + b.softmax(1)).argmax(1)[0] == 0


def test_a_train_on_both_run_scores_and_predicts_with_the_mean_of_the_two_heads_logits(tiny_testbed, digits, tmp_path,
                                                                                       monkeypatch):
    import coft_fast
    import coft_fast.stages.evaluation as evaluation
    from coft_fast.runtime.metrics import classification_metrics

    seen = {}
    original = evaluation.model_outputs

    def recording(classifier, source, *args, **kwargs):
        logits, positions = original(classifier, source, *args, **kwargs)
        description = args[7] if len(args) > 7 else kwargs.get("description", "")
        if str(description).startswith("evaluating s"):
            seen[description] = (logits, positions, source)
        return logits, positions

    monkeypatch.setattr(evaluation, "model_outputs", recording)
    result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"],
                             out=tmp_path / "run", overrides=TINY + ["phase2.train_on=both"])
    assert sorted(seen) == ["evaluating s1", "evaluating s2"]
    (l1, positions, source), (l2, _, _) = seen["evaluating s1"], seen["evaluating s2"]
    truth = torch.tensor(source.labels)[positions]
    mean = (l1 + l2) / 2
    assert result.metrics["final"]["classifier"] == "ensemble"
    assert result.metrics["zero_shot"]["templates"] == "single"  # what zero-shot scoring used, in metrics.json
    assert json.loads((tmp_path / "run" / "class_names.json").read_text()) == {n: n for n in source.class_names}
    assert result.metrics["final"]["ensemble"] == pytest.approx(classification_metrics(mean, truth))
    predicted = result.predict(digits["test"])
    torch.testing.assert_close(predicted.probabilities, mean.softmax(1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- distributed phase I without visual prompts
def _phase1_steps(testbed, pool_folder, vpt_tokens, result_path):
    from coft_fast.config import Phase1Config
    from coft_fast.data import from_folder
    from coft_fast.data.resident import ResidentImages, preprocess_stats
    from coft_fast.models import load_clip
    from coft_fast.phases.phase1 import make_prompt_model, train_phase1

    torch.manual_seed(0)
    clip = load_clip(f"local-dir:{testbed}", device="cpu")
    pool = from_folder(pool_folder)
    indices = list(range(0, len(pool), 11))[:20]
    images = ResidentImages(pool, indices, *preprocess_stats(clip.model), progress=False)
    labels = torch.tensor([pool.labels[i] for i in indices])
    cfg = Phase1Config(n_ctx=4, vpt_tokens=vpt_tokens, steps=2, min_epochs=1, batch_size=10, warmup_steps=0)
    model = make_prompt_model(clip, pool.class_names, cfg, 1, torch.device("cpu"))
    train_phase1(model, images, torch.arange(len(images)), labels, cfg, 1, torch.device("cpu"), "fp32", progress=False)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, result_path)


def _phase1_rank(rank, init_file, testbed, pool_folder, vpt_tokens, out_folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        _phase1_steps(testbed, pool_folder, vpt_tokens, f"{out_folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_phase1_without_visual_prompts_trains_as_one_process(tiny_testbed, digits, tmp_path):
    """vpt_tokens=0 leaves the (empty) visual prompt parameter without a gradient: DDP stopped the run."""
    _phase1_steps(tiny_testbed, digits["pool"], 0, tmp_path / "single.pt")
    mp.spawn(_phase1_rank, args=(str(tmp_path / "init"), str(tiny_testbed), str(digits["pool"]), 0, str(tmp_path)),
             nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key in single:
            torch.testing.assert_close(state[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
