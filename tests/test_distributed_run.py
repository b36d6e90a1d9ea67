"""Distributed runs on CPU: gloo, two processes (torch.multiprocessing, and torchrun itself)."""
import csv
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import coft_fast
from test_train import _wait_for  # noqa: E402 (tests/ is on the path)
from coft_fast.runtime.distributed import BatchPart, batch_part, gather_rows, shard_range

TORCHRUN = shutil.which("torchrun")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# Odd global batch sizes: the two ranks get unequal parts of every batch, and short last batches.
SETTINGS = [
    "phase1.steps=60", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=31",
    "phase1.rounds=2", "phase2.epochs=3", "phase2.batch_size=17", "pseudo.top_k=16", "data.num_workers=0",
    "run.progress=false", "run.checkpoint_seconds=0", "method=coft+",
]


def test_shards_cover_every_item_once_in_order():
    for count in (0, 1, 5, 6, 7, 100):
        for shards in (1, 2, 3, 8):
            ranges = [shard_range(count, rank, shards) for rank in range(shards)]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))


def test_batch_parts_weight_the_ranks_to_the_mean_of_the_whole_batch():
    assert batch_part(7) == BatchPart(0, 7, 7, 1.0)  # one process: the whole batch
    for count in (1, 2, 3, 17, 31):
        parts = [batch_part(count, rank, 4) for rank in range(4)]
        assert sum(part.real for part in parts) == count
        # DDP averages the four gradients: sum(weight * mean_r) / 4 is the mean over all rows
        assert sum(part.weight * part.real for part in parts if part.real) / 4 == pytest.approx(
            sum(part.real ** 2 for part in parts) / count)
        assert sum(part.weight for part in parts) == pytest.approx(4.0)
        for part in parts:
            assert part.stop - part.start == max(part.real, 1)  # a rank without rows still runs one, weighted 0


# ---------------------------------------------------------------- one phase II step, two ranks
def _phase2_step(testbed, pool_folder, contrastive, result_path):
    """One phase II step (the batch is the whole training set) from a fixed start; saves the state."""
    from coft_fast.config import Phase2Config
    from coft_fast.data import from_folder
    from coft_fast.data.resident import ResidentImages, preprocess_stats
    from coft_fast.models import load_clip
    from coft_fast.models.momentum import MomentumContrast
    from coft_fast.phases.phase2 import ContrastiveTerm, build_classifier, train_phase2
    from coft_fast.runtime.distributed import all_gather_rows

    torch.manual_seed(0)
    clip = load_clip(f"local-dir:{testbed}", device="cpu")
    pool = from_folder(pool_folder)
    indices = list(range(0, len(pool), 11))[:24]
    images = ResidentImages(pool, indices, *preprocess_stats(clip.model), progress=False)
    labels = torch.tensor([pool.labels[i] for i in indices])
    text = torch.nn.functional.normalize(torch.randn(len(pool.class_names), clip.model.visual.output_dim), dim=-1)
    classifier = build_classifier(clip.model.visual, text, 10.0, "zeroshot", 0)
    start = {f"start.{k}": v.clone() for k, v in classifier.state_dict().items()}
    term = None
    if contrastive:
        module = MomentumContrast(classifier.visual, text.shape[1], queue_size=24, momentum=0.9, projection_dim=8,
                                  seed=1, gather=all_gather_rows)
        term = ContrastiveTerm(module, torch.arange(len(images)), gamma=1.0, temperature=0.1)
    rows = torch.arange(0, 21)  # 21 rows: one step of a global batch of 21, split 11 + 10
    cfg = Phase2Config(epochs=1, batch_size=21, lr=0.05, warmup_epochs=0.0)
    train_phase2(classifier, images, rows, labels[rows], cfg, seed=3, device=torch.device("cpu"), precision="fp32",
                 progress=False, contrastive=term)
    state = {**start, **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
    if term is not None:
        state.update({f"contrast.{k}": v for k, v in term.module.state_dict().items()})
    torch.save(state, result_path)


def _rank_main(rank, init_file, testbed, pool_folder, contrastive, out_folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        _phase2_step(testbed, pool_folder, contrastive, f"{out_folder}/rank{rank}.pt")
        # rows of unequal counts (3 and 0) come back in rank order
        rows = torch.arange(3.0).view(3, 1) if rank == 0 else torch.empty(0, 1)
        torch.save(gather_rows(rows), f"{out_folder}/gathered{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("contrastive", [False, True], ids=["ce", "ce+contrastive"])
def test_one_phase2_step_on_two_ranks_equals_one_process_on_the_whole_batch(tiny_testbed, digits, tmp_path,
                                                                            contrastive):
    _phase2_step(tiny_testbed, digits["pool"], contrastive, tmp_path / "single.pt")
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tiny_testbed), str(digits["pool"]), contrastive,
                               str(tmp_path)), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    changed = [key for key in single if key.startswith("classifier.")
               and not torch.allclose(single[key], single["start." + key[len("classifier."):]])]
    assert "classifier.head.weight" in changed and len(changed) > 10  # the step did train
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state.keys() == single.keys()
        for key in single:  # the parameters, momentum encoder and queue (both ranks' keys, in rank order)
            torch.testing.assert_close(state[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(torch.load(tmp_path / f"gathered{rank}.pt"), torch.arange(3.0).view(3, 1))


# ---------------------------------------------------------------- torchrun end to end
@pytest.fixture(scope="module")
def odd_pool(digits, tmp_path_factory):
    """The digits pool as a CSV with an odd number of images, and its class names file."""
    folder = tmp_path_factory.mktemp("odd_pool")
    names = sorted(path.name for path in digits["pool"].iterdir() if path.is_dir())
    paths = sorted(str(p) for p in digits["pool"].glob("*/*.png"))
    paths = paths if len(paths) % 2 else paths[:-1]
    with open(folder / "pool.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([path, path.split(os.sep)[-2]] for path in paths)
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    return {"csv": folder / "pool.csv", "classes": folder / "classes.txt", "paths": paths}


def _command(digits_testbed, odd_pool, out, launcher):
    command = launcher + ["-m", "coft_fast", "train", "--images", str(odd_pool["csv"]), "--classes",
                          str(odd_pool["classes"]), "--eval-images", str(digits_testbed["test"]),
                          "--model", f"local-dir:{digits_testbed['model']}", "--out", str(out), "--no-progress"]
    for item in SETTINGS:
        command += ["--set", item]
    return command


def _torchrun():
    if TORCHRUN is None:
        pytest.skip("torchrun is not on PATH")
    return [TORCHRUN, "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def two_process_run(digits_testbed, odd_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "run"
    done = subprocess.run(_command(digits_testbed, odd_pool, out, _torchrun()), env=ONE_THREAD, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _rows(run):
    with open(run / "pseudo_labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _comparable(metrics):
    """metrics.json without times and the world size."""
    metrics = json.loads(json.dumps(metrics))
    metrics.pop("timings", None)
    metrics.pop("world_size", None)
    for section in ("phase1", "phase2"):
        for entry in metrics.get(section, {}).values():
            entry.pop("seconds", None)
    for entry in metrics.get("rounds", []):
        entry.pop("seconds", None)
    return metrics


def _assert_close(got, want, rel, abs, where="metrics"):
    """Nested dicts and lists equal, floats within tolerance."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], rel, abs, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, rel, abs, f"{where}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=abs), where
    else:
        assert got == want, where


def test_torchrun_labels_every_pool_image_once_as_one_process_does(two_process_run, digits_testbed, odd_pool,
                                                                   tmp_path):
    rows = _rows(two_process_run)
    assert len(odd_pool["paths"]) % 2 == 1
    assert sorted(row["path"] for row in rows) == sorted(odd_pool["paths"])  # each image exactly once
    metrics = json.loads((two_process_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2

    one = coft_fast.train(odd_pool["csv"], odd_pool["classes"], model=f"local-dir:{digits_testbed['model']}",
                          eval_images=digits_testbed["test"], out=tmp_path / "one", overrides=SETTINGS)
    single_rows = _rows(tmp_path / "one")
    assert [row["path"] for row in rows] == [row["path"] for row in single_rows]
    for column in ("zero_shot_label", "model1_label", "model2_label", "kept1", "kept2"):
        assert [row[column] for row in rows] == [row[column] for row in single_rows], column
    for got, want in zip(rows, single_rows):
        assert float(got["zero_shot_confidence"]) == pytest.approx(float(want["zero_shot_confidence"]), abs=2e-6)
    # S*, each round's subsets and the filtered sets agree; losses to float tolerance
    assert metrics["selection"] == one.metrics["selection"]
    assert metrics["filter"] == one.metrics["filter"]
    _assert_close(_comparable(metrics), _comparable(one.metrics), rel=1e-3, abs=1e-4)


def _kill_tree(pid):
    """SIGKILL a process and all its descendants at once, as a crash would."""
    family, queue = [], [pid]
    while queue:
        parent = queue.pop()
        family.append(parent)
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    queue += [int(child) for child in handle.read().split()]
            except OSError:
                pass
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("stage", ["round2_phase1_model1_progress", "phase2_s1_progress"])
def test_a_killed_torchrun_run_resumes_to_the_same_metrics(two_process_run, digits_testbed, odd_pool, tmp_path,
                                                           stage):
    out = tmp_path / "run"
    command = _command(digits_testbed, odd_pool, out, _torchrun())
    process = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        _wait_for(out / "checkpoints" / f"{stage}.pt", process)
    finally:
        _kill_tree(process.pid)  # torchrun and both ranks (torchrun starts them in their own sessions), mid-stage
        process.wait()
    assert not (out / "metrics.json").exists()
    done = subprocess.run(command + ["--resume"], env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "finished by an earlier run, loaded" in log
    assert f"stage {stage[:-len('_progress')]}: started" in log.split("resuming")[-1] or "resumed at epoch" in log
    resumed = json.loads((out / "metrics.json").read_text())
    straight = json.loads((two_process_run / "metrics.json").read_text())
    _assert_close(_comparable(resumed), _comparable(straight), rel=1e-5, abs=1e-6)
    assert _rows(out) == _rows(two_process_run)


def test_a_global_batch_smaller_than_the_world_is_refused(monkeypatch, digits):
    from coft_fast import api
    from coft_fast.config import Config, ConfigError
    from coft_fast.data import from_folder

    monkeypatch.setattr(api.distributed, "world_size", lambda: 4)
    cfg = Config()
    cfg.phase1.batch_size = 3
    with pytest.raises(ConfigError, match="phase1.batch_size.*less than the 4 processes"):
        api._check_world(cfg, from_folder(digits["pool"]))


def _as_rank(monkeypatch, rank, world):
    """Make this process look like ``rank`` of ``world`` to the data stores (no process group)."""
    from coft_fast.data import streaming
    from coft_fast.runtime import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(streaming, "rank", lambda: rank)


def test_each_rank_gets_its_part_of_every_resident_batch_cut_as_one_process_cuts_it(digits, monkeypatch):
    from coft_fast.data import from_folder
    from coft_fast.data.resident import ResidentImages

    images = ResidentImages(from_folder(digits["pool"]), list(range(0, 70, 3)), 16, (0.5,) * 3, (0.25,) * 3,
                            progress=False)
    rows = torch.arange(len(images))

    def epoch():
        return list(images.epoch_batches(rows, 7, torch.Generator().manual_seed(4), 0.5))

    whole = epoch()
    parts = []
    for rank in range(3):
        with monkeypatch.context() as patch:
            _as_rank(patch, rank, 3)
            parts.append(epoch())
    for index, (batch, picked) in enumerate(whole):
        assert all(torch.equal(part[index][1], picked) for part in parts)  # every rank sees the global batch
        pieces = [part[index][0] for part, rank in zip(parts, range(3)) if batch_part(len(picked), rank, 3).real]
        torch.testing.assert_close(torch.cat(pieces), batch)  # the parts, in rank order, are the batch


def test_each_rank_decodes_only_its_part_of_every_streamed_batch(digits, monkeypatch):
    from coft_fast.data import from_folder
    from coft_fast.data.streaming import StreamedImages

    streamed = StreamedImages(from_folder(digits["pool"]), list(range(0, 69, 3)), 16, (0.5,) * 3, (0.25,) * 3, "pil")
    rows = torch.arange(len(streamed))  # 23 rows: batches of 7, 7, 7, 2 split over 3 ranks
    for rank in range(3):
        with monkeypatch.context() as patch:
            _as_rank(patch, rank, 3)
            batches = list(streamed.epoch_batches(rows, 7, torch.Generator().manual_seed(4), 0.5))
        assert [len(picked) for _, picked in batches] == [7, 7, 7, 2]
        for images, picked in batches:
            part = batch_part(len(picked), rank, 3)
            assert images.shape == (part.stop - part.start, 3, 16, 16)
