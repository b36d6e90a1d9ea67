"""One CoFT (or self-training) run: the stages in order, each a checkpoint boundary.

zero-shot scoring -> class-balanced top-K (S*) -> phase I, model 1 and model 2 -> generate-and-
validate filter -> phase II on the clean set -> evaluation -> run folder. A stage that finished is
loaded from ``checkpoints/`` instead of being run again, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from coft_fast.config import Config, resolve_filter
from coft_fast.data import ImageSource
from coft_fast.data.resident import ResidentImages, decoded_bytes, preprocess_stats
from coft_fast.data.streaming import StreamedImages, resolve_decoder
from coft_fast.inference import CLASSIFIER_FILE, classifier_metadata, ensemble_logits
from coft_fast.models import ClipModel, load_clip
from coft_fast.phases.phase1 import PromptModel, encode_with_models, make_prompt_model, train_phase1
from coft_fast.models.attention import use_batch_major_attention
from coft_fast.models.momentum import MomentumContrast
from coft_fast.neighbors import knn_accuracy
from coft_fast.pseudo.transductive import refine_labels
from coft_fast.phases.phase2 import (ContrastiveTerm, FineTunedClassifier, NormalizedEncoder, build_classifier,
                                     classifier_logits, train_phase2)
from coft_fast.pseudo import (class_name_mapping, class_prompts, class_text_embeddings, encode_images, logit_scale_of,
                              prompt_names, templates_record, zeroshot_probabilities)
from coft_fast.pseudo.filter import FilterResult, ModelView, decide, filter_quality, generate_and_validate, validate_given
from coft_fast.pseudo.label_issues import LabelIssue, label_issue_counts, label_issues
from coft_fast.pseudo.probe_detector import probe_detector, stratified_folds
from coft_fast.pseudo.selection import select_top_k
from coft_fast.runtime.checkpoint import StageStore, save_tensors
from coft_fast.runtime.device import autocast_dtype
from coft_fast.runtime.distributed import all_gather_rows, gather_objects, gather_rows, is_main, shard
from coft_fast.runtime.io import atomic_write_json
from coft_fast.runtime.metrics import classification_metrics, train_linear_head

log = logging.getLogger("coft_fast")


# seed offset of a phase-I model's continuation on the whole pool (phase1.train_on=s_star_then_pool)
POOL_STAGE_SEED = 500_009


def stratified_halves(labels: torch.Tensor, seed: int):
    """Two disjoint row sets covering ``labels``, each class split in half by a seeded permutation
    (the odd one of a class goes to the first half): phase1.train_on=pool_halves's out-of-fold split."""
    fold = stratified_folds(labels, 2, seed)
    return (fold == 0).nonzero().flatten(), (fold == 1).nonzero().flatten()


def sharded(encode, indices: List[int]):
    """``encode(this rank's contiguous share of indices)``, its tensors (or lists of tensors) gathered
    from every rank in rank order: every index's result once, in order. One process: ``encode(indices)``."""

    def gather(value):
        if isinstance(value, torch.Tensor):
            return gather_rows(value)
        return [gather(item) for item in value]

    return gather(encode(shard(indices)))


def check_same_positions(found: torch.Tensor, expected: torch.Tensor, origin: str) -> torch.Tensor:
    """``found`` (the images a later pass decoded) when it equals ``expected`` (an earlier pass's);
    otherwise a RuntimeError: an image that decoded before and failed now would shift every later
    row, pairing features or labels with the wrong images."""
    if not torch.equal(found.cpu(), expected.cpu()):
        missing = sorted(set(expected.tolist()) - set(found.tolist()))
        raise RuntimeError(f"{origin}: {len(missing) or 'some'} image(s) that decoded in an earlier pass failed to "
                           f"decode again (source positions {missing[:5]}{' ...' if len(missing) > 5 else ''}): "
                           "the rows would no longer match their images, so the run stops; fix or remove the file(s) "
                           "and resume")
    return found


def label_accuracy(labels: torch.Tensor, truth: torch.Tensor) -> Optional[float]:
    known = truth >= 0
    if not bool(known.any()):
        return None
    return (labels[known] == truth[known]).double().mean().item()


def agreement(labels1: torch.Tensor, labels2: torch.Tensor) -> float:
    """The share of the pool on which two models give the same label."""
    return (labels1 == labels2).double().mean().item()


def record_pool_labels(entry: Dict, labels1: torch.Tensor, labels2: torch.Tensor, names: Sequence[str]) -> None:
    """Label-free signs of a CoFT+ round in its metrics entry: how often its two models agree on the
    pool, and how many pool images each model gives each class (a class that swallows its look-alike
    round after round shows here even where the pool has no labels)."""
    entry["agreement"] = agreement(labels1, labels2)
    for index, labels in ((1, labels1), (2, labels2)):
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        entry[f"model{index}"]["pool_class_counts"] = dict(zip(names, counts))


@dataclass
class RunState:
    """What the stages hand each other."""

    positions: Optional[torch.Tensor] = None  # scored pool images (positions in the source)
    zs_probabilities: Optional[torch.Tensor] = None
    zs_features: Optional[torch.Tensor] = None  # kept only where needed (CoftRun.keep_features)
    # the pool's labels for every later stage: the zero-shot probabilities, or pseudo.refine's
    pool_probabilities: Optional[torch.Tensor] = None
    pool_ranking: Optional[torch.Tensor] = None  # pseudo.refine: what ranks S* (None: the probability)
    text_embeddings: Optional[torch.Tensor] = None
    filter: Optional[FilterResult] = None
    prompt_models: List[PromptModel] = field(default_factory=list)
    classifiers: Dict[str, FineTunedClassifier] = field(default_factory=dict)
    metrics: Dict = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


class CoftRun:
    def __init__(self, cfg: Config, pool: ImageSource, eval_source: Optional[ImageSource], clip: ClipModel,
                 device: torch.device, out_dir: Optional[Path], writer=None, shots: Optional[Sequence[int]] = None):
        """``shots``: per pool position, the class of a labelled shot (-1: none); see data.add_shots."""
        resolve_filter(cfg)  # a config built without api.resolve_config still runs the filter it names
        self.cfg, self.pool, self.eval_source, self.clip, self.device = cfg, pool, eval_source, clip, device
        self.out_dir = out_dir
        self.store = StageStore(out_dir / "checkpoints" if out_dir else None)
        self.writer = writer
        self.state = RunState()
        self._pool_resident: Optional[ResidentImages] = None
        self.names = pool.class_names
        self.prompt_names = prompt_names(self.names)  # what goes into the prompts (underscores as spaces)
        self.given = cfg.pseudo.source == "given"
        labels = torch.tensor(pool.labels, dtype=torch.long)
        # the pool's labels: with pseudo.source=given the labels to check (so no truth for diagnostics);
        # otherwise diagnostics only, never used for training
        self.given_all = labels if self.given else None
        self.truth_all = torch.full_like(labels, -1) if self.given else labels
        self.shots_all = torch.tensor(shots if shots is not None else [-1] * len(pool), dtype=torch.long)
        self.logit_scale = logit_scale_of(clip)
        self.progress = cfg.run.progress and is_main()  # one set of progress bars
        self.decoder = resolve_decoder(cfg.data.decoder, device)
        self.compile = cfg.run.compile if cfg.run.compile is not None else device.type == "cuda"
        from coft_fast.ops.numerics import set_numerics

        set_numerics(cfg.run.tf32, cfg.run.deterministic)  # before any matmul or kernel of the run
        for parameter in clip.model.parameters():
            parameter.requires_grad_(False)
        self._prepare(clip)

    @property
    def keep_features(self) -> bool:
        """The zero-shot stage keeps the pool's image features: pseudo.refine, the probe detector and
        the LP-FT head read them."""
        cfg = self.cfg
        return cfg.pseudo.refine != "none" or cfg.filter.detector == "probe" or cfg.phase2.head_init == "probe"

    def _prepare(self, clip: ClipModel) -> None:
        """bf16 on a CPU: matrix products in bf16 (AMX), attention kept in float32 (models/attention.py)."""
        if self.device.type == "cpu" and autocast_dtype(self.cfg.model.precision, self.device) is not None:
            use_batch_major_attention(clip.model, float32=True)

    def execute(self):
        """Every stage in order; returns (the phase II training sets, the phase II CLIP)."""
        self.zero_shot()
        self.refine()
        selection = self.select()
        if self.cfg.method in ("coft", "coft+"):
            if self.cfg.filter.detector == "prompts":
                self.phase1(selection)
            self.filter()
        sets = self.training_sets(selection)
        clip2 = self.phase2(sets)
        self.evaluate(clip2)
        return sets, clip2

    # ------------------------------------------------------------------ helpers
    def _timed(self, name: str, seconds: float) -> None:
        self.state.timings[name] = self.state.timings.get(name, 0.0) + seconds

    def _stage(self, name: str, phase: str, compute):
        """Load stage ``name`` if a previous run finished it, else compute and save it; time it under ``phase``."""
        state = self.store.load(name)
        if state is None:
            log.info("stage %s: started", name)
            started = time.perf_counter()
            state = compute()
            state["seconds"] = time.perf_counter() - started
            self.store.save(name, state)
            log.info("stage %s: done in %.1f s", name, state["seconds"])
        else:
            log.info("stage %s: finished by an earlier run, loaded", name)
        self._timed(phase, state["seconds"])
        return state

    def _training_images(self, positions: torch.Tensor, model: torch.nn.Module):
        """Training images of ``positions``: kept decoded in memory (on the GPU when there is one) when
        ``data.resident`` allows, else decoded every epoch by the configured decoder."""
        cfg = self.cfg.data
        size, mean, std = preprocess_stats(model)
        needed = decoded_bytes(len(positions), size)
        if cfg.resident == "never" or (cfg.resident == "auto" and needed > cfg.resident_max_gb * 2**30):
            if cfg.resident == "auto":
                log.info("%d training images need %.1f GB decoded, more than data.resident_max_gb=%g: decoding them "
                         "every epoch (%s)", len(positions), needed / 2**30, cfg.resident_max_gb, self.decoder)
            return StreamedImages(self.pool, positions.tolist(), size, mean, std, self.decoder, cfg.num_workers,
                                  self.device)
        images = ResidentImages(self.pool, positions.tolist(), size, mean, std, cfg.batch_size, cfg.num_workers,
                                self.progress, self.device if self.device.type == "cuda" else torch.device("cpu"))
        if not torch.equal(images.positions, positions):
            raise RuntimeError("an image that decoded during zero-shot scoring failed to decode again")
        return images

    @property
    def truth(self) -> torch.Tensor:
        return self.truth_all[self.state.positions]

    @property
    def shots(self) -> Optional[torch.Tensor]:
        """Per scored pool row, the class of its labelled shot (-1: none); None when the run has no shots."""
        shots = self.shots_all[self.state.positions]
        return shots if bool((shots >= 0).any()) else None

    @property
    def given_labels(self) -> torch.Tensor:
        """Per scored pool row, the label it came with (pseudo.source=given), the shot's where it is one."""
        given = self.given_all[self.state.positions]
        return given if self.shots is None else torch.where(self.shots >= 0, self.shots, given)

    def ranked_labels(self, probabilities: torch.Tensor):
        """(confidence, label) per pool row for a top-K: the arg-max of ``probabilities``, or with
        pseudo.source=given the given label and its probability."""
        if not self.given:
            return probabilities.max(1)
        labels = self.given_labels
        return probabilities.gather(1, labels[:, None]).squeeze(1), labels

    def label_issues(self) -> Optional[List[LabelIssue]]:
        """pseudo.source=given, after the filter: a LabelIssue per scored pool image, most likely wrong first."""
        if not self.given or self.state.filter is None:
            return None
        paths = [self.pool.paths[i] for i in self.state.positions.tolist()]
        return label_issues(paths, self.state.filter, self.given_labels, self.shots, self.names)

    def record_shots(self) -> None:
        shots = self.shots
        if shots is None:
            return
        counts = torch.bincount(shots[shots >= 0], minlength=len(self.names)).tolist()
        self.state.metrics["shots"] = {"per_class": dict(zip(self.names, counts)), "total": int(sum(counts))}

    # ------------------------------------------------------------------ stages
    def zero_shot(self) -> None:
        cfg = self.cfg

        def compute():
            prompts = class_prompts(cfg.zeroshot.templates, self.names)
            text = class_text_embeddings(self.clip, prompts, self.names, self.device, cfg.model.precision).cpu()
            features, positions = sharded(lambda shard: encode_images(
                self.clip, self.pool, self.device, cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers,
                indices=shard, progress=self.progress, description="zero-shot scoring", compile_model=self.compile),
                list(range(len(self.pool))))
            if not len(positions):
                raise RuntimeError(f"{self.pool.origin}: none of the {len(self.pool)} images could be decoded")
            probabilities = zeroshot_probabilities(features, text, self.logit_scale)
            skipped = gather_objects(self.pool.skipped)  # each rank met the broken files of its shard
            return {"positions": positions, "probabilities": probabilities, "text": text, "skipped": skipped,
                    "features": features if self.keep_features else None}

        state = self._stage("zero_shot", "zero_shot", compute)
        self.state.metrics.setdefault("zero_shot", {})["templates"] = templates_record(cfg.zeroshot.templates)
        if self.out_dir and is_main():
            atomic_write_json(self.out_dir / "class_names.json", class_name_mapping(self.names))
        self.pool.skipped[:] = state["skipped"]
        self.state.positions = state["positions"]
        self.state.zs_probabilities = state["probabilities"]
        self.state.zs_features = state.get("features")
        self.state.text_embeddings = state["text"]
        labels = state["probabilities"].argmax(1)
        self.state.metrics["pool"] = {
            "num_images": int(len(state["positions"])),
            "num_skipped": len(state["skipped"]),
            "refine": cfg.pseudo.refine,
            "pseudo_label_accuracy": label_accuracy(labels, self.truth),
        }
        self.state.metrics["zero_shot"]["pool_acc1"] = self.state.metrics["pool"]["pseudo_label_accuracy"]
        self.state.pool_probabilities = state["probabilities"]
        self.record_shots()

    def refine(self) -> None:
        """pseudo.refine: the pool's labels refined on its zero-shot features (a stage, so a resumed
        run reuses them); pool_probabilities and pool_ranking then hold them for every later stage."""
        mode = self.cfg.pseudo.refine
        if mode == "none":
            return
        features, zero_shot = self.state.zs_features, self.state.zs_probabilities
        if features is None:
            raise RuntimeError(f"pseudo.refine={mode} needs the zero-shot stage's image features, which its checkpoint "
                               "lacks (it was written with pseudo.refine=none): start the run in a new folder")

        def compute():
            refined = refine_labels(mode, zero_shot, features.to(self.device), self.cfg.pseudo.knn_k)
            details = dict(refined.details)
            if "empty_classes" in details:
                details["empty_classes"] = [self.names[i] for i in details["empty_classes"]]
            return {"probabilities": refined.probabilities.cpu(), "ranking": refined.ranking.cpu(), "details": details}

        state = self._stage(f"refine_{mode}", "refine", compute)
        self.state.pool_probabilities, self.state.pool_ranking = state["probabilities"], state["ranking"]
        labels = state["probabilities"].argmax(1)
        pool = self.state.metrics["pool"]
        pool["zero_shot_label_accuracy"] = pool["pseudo_label_accuracy"]
        pool["pseudo_label_accuracy"] = label_accuracy(labels, self.truth)
        pool["refine_details"] = {**state["details"], "seconds": state["seconds"],
                                  "changed": (labels != zero_shot.argmax(1)).double().mean().item()}
        log.info("pseudo.refine=%s changed %.1f %% of the zero-shot labels", mode, 100 * pool["refine_details"]["changed"])

    def select(self):
        """S*: the class-balanced top-K of the zero-shot labels (pseudo.source=given: of the given labels,
        ranked by their zero-shot probability); labelled shots first, with their labels."""
        confidence, labels = self.ranked_labels(self.state.pool_probabilities)
        if self.state.pool_ranking is not None:
            confidence = self.state.pool_ranking
        selection = select_top_k(labels, confidence, self.cfg.pseudo.top_k, self.names, self.shots)
        self.state.metrics["selection"] = {
            "source": self.cfg.pseudo.source,
            "top_k": self.cfg.pseudo.top_k,
            "size": int(len(selection.rows)),
            "per_class": dict(zip(self.names, selection.counts.tolist())),
            "classes_short": selection.short_classes,
            "classes_empty": selection.empty_classes,
            "pseudo_label_accuracy": label_accuracy(selection.labels, self.truth[selection.rows]),
        }
        if self.state.pool_ranking is not None:  # the top-K the zero-shot labels alone give, for comparison
            zs_confidence, zs_labels = self.ranked_labels(self.state.zs_probabilities)
            before = select_top_k(zs_labels, zs_confidence, self.cfg.pseudo.top_k, self.names, self.shots)
            self.state.metrics["selection"]["zero_shot_pseudo_label_accuracy"] = label_accuracy(
                before.labels, self.truth[before.rows])
        return selection

    def knn_monitor(self, classifier: FineTunedClassifier, clip2: ClipModel):
        """What phase II calls after each epoch (``phase2.knn_monitor``): leave-one-out kNN accuracy
        of the encoder's features on the labelled evaluation images; None without them."""
        cfg, source = self.cfg, self.eval_source
        if source is None or not source.has_labels:
            log.warning("phase2.knn_monitor needs labelled evaluation images (eval_images): not measured")
            return None
        truth = torch.tensor(source.labels, dtype=torch.long)
        encoder = NormalizedEncoder(classifier.visual)

        def measure() -> Dict[str, float]:
            features, positions = sharded(lambda shard: classifier_logits(
                encoder, source, clip2.preprocess_eval, self.device, cfg.model.precision, cfg.data.batch_size,
                cfg.data.num_workers, shard, self.progress, "kNN monitor"), list(range(len(source))))
            accuracy = knn_accuracy(features, truth[positions], k=cfg.phase2.knn_k)
            log.info("phase II kNN monitor: leave-one-out %d-NN accuracy %.2f %%", cfg.phase2.knn_k, 100 * accuracy)
            return {"knn_acc1": accuracy}

        return measure

    def _pool_images(self) -> ResidentImages:
        """Every scored pool image, decoded once: CoFT+ draws each round's subset and phase II's
        contrastive batches from it."""
        if self._pool_resident is None:
            self._pool_resident = self._training_images(self.state.positions, self.clip.model)
        return self._pool_resident

    def pool_training_labels(self) -> torch.Tensor:
        """Every pool row's label for training on the whole pool: the given labels (pseudo.source=given)
        or the zero-shot pseudo-labels, with each labelled shot's own label in its row."""
        labels = self.given_labels.clone() if self.given else self.state.pool_probabilities.argmax(1)
        if self.shots is not None:
            labels = torch.where(self.shots >= 0, self.shots, labels)
        return labels

    def phase1(self, selection) -> None:
        """Phase I: one round for CoFT; ``phase1.rounds`` for CoFT+, each on the previous round's labels.
        ``phase1.train_on`` other than s_star trains CoFT's two models on the pool's labels, DeFT-style."""
        cfg = self.cfg
        if cfg.phase1.train_on == "s_star_halves":  # diversity: each model on one half of S*, per class
            images = self._training_images(self.state.positions[selection.rows], self.clip.model)
            halves = stratified_halves(selection.labels, cfg.seed)
            models = [self._train_prompt_model(1, index, seed, images, rows, selection.labels[rows])[0]
                      for index, (seed, rows) in enumerate(zip(cfg.phase1.seeds, halves), start=1)]
            for index, rows in enumerate(halves, start=1):
                self.state.metrics["phase1"][f"model{index}"].update(
                    {"train_on": "s_star_halves", "train_size": int(len(rows)),
                     "train_label_accuracy": label_accuracy(selection.labels[rows], self.truth[selection.rows[rows]])})
            self.state.prompt_models = models
            return
        if cfg.phase1.train_on == "pool_halves":
            images, labels = self._pool_images(), self.pool_training_labels()
            halves = stratified_halves(labels, cfg.seed)
            models = [self._train_prompt_model(1, index, seed, images, rows, labels[rows], self_selection=True)[0]
                      for index, (seed, rows) in enumerate(zip(cfg.phase1.seeds, halves), start=1)]
            for index, rows in enumerate(halves, start=1):
                self.state.metrics["phase1"][f"model{index}"].update(
                    {"train_on": "pool_halves", "train_size": int(len(rows)),
                     "train_label_accuracy": label_accuracy(labels[rows], self.truth[rows])})
            self.state.prompt_models = models
            return
        plus = cfg.method == "coft+"
        rounds = cfg.phase1.rounds if plus else 1
        history = self.state.metrics.setdefault("rounds", []) if plus else []
        if plus:  # every round draws its subsets from the whole pool, decoded once; rows are pool rows
            images, offset = self._pool_images(), None
        else:  # S* alone is decoded; its rows are 0..S-1
            images = self._training_images(self.state.positions[selection.rows], self.clip.model)
            offset = selection.rows  # pool row of each S* row
        s_star_rows = selection.rows if plus else torch.arange(len(selection.rows))
        subsets = [(s_star_rows, selection.labels)] * len(cfg.phase1.seeds)  # round 1: both models on S*
        for round_ in range(1, rounds + 1):
            entry = {"round": round_, "seconds": 0.0}
            models = []
            for index, (seed, (rows, labels)) in enumerate(zip(cfg.phase1.seeds, subsets), start=1):
                model, seconds = self._train_prompt_model(round_, index, seed, images, rows, labels)
                models.append(model)
                pool_rows = rows if offset is None else offset[rows]
                entry[f"model{index}"] = {"subset_size": int(len(rows)),
                                          "subset_label_accuracy": label_accuracy(labels, self.truth[pool_rows])}
                entry["seconds"] += seconds
            if round_ < rounds:
                subsets = self._relabel(round_, models, entry)
            history.append(entry)
        if cfg.phase1.train_on == "s_star_then_pool":  # each S* model continues on every pool label
            pool_images, labels = self._pool_images(), self.pool_training_labels()
            rows = torch.arange(len(labels))
            for index, model in enumerate(models, start=1):
                self._train_prompt_model(1, index, cfg.phase1.seeds[index - 1], pool_images, rows, labels,
                                         self_selection=True, start=model)
                self.state.metrics["phase1"][f"model{index}"].update(
                    {"train_on": "s_star_then_pool", "train_size": int(len(rows)),
                     "train_label_accuracy": label_accuracy(labels, self.truth)})
        self.state.prompt_models = models

    @staticmethod
    def round_seed(model_seed: int, round_: int) -> int:
        """Round 1 uses the model's seed (so CoFT+'s first round is CoFT's phase I); later rounds new ones."""
        return model_seed + 1_000_003 * (round_ - 1)

    def _train_prompt_model(self, round_: int, index: int, seed: int, images: ResidentImages, rows: torch.Tensor,
                            labels: torch.Tensor, self_selection: bool = False, start: Optional[PromptModel] = None):
        """A freshly initialised phase-I model (frozen CLIP, new prompts) trained on ``rows``; (model, seconds).
        With ``start``, that model is trained further instead (its own stage, ``..._pool``), in place.
        ``self_selection``: DeFT's training on a whole labelled set (see train_phase1)."""
        cfg = self.cfg
        model_seed = self.round_seed(self.cfg.seed * 1000 + seed, round_)
        name = f"phase1_model{index}" if round_ == 1 else f"round{round_}_phase1_model{index}"
        if start is not None:
            name, model_seed = f"{name}_pool", model_seed + POOL_STAGE_SEED
        model = start if start is not None else make_prompt_model(self.clip, self.prompt_names, cfg.phase1,
                                                                   model_seed, self.device)

        def compute():
            report = train_phase1(
                model, images, rows, labels, cfg.phase1, model_seed, self.device, cfg.model.precision,
                checkpoint=self.store.path(f"{name}_progress"), checkpoint_seconds=cfg.run.checkpoint_seconds,
                progress=self.progress, writer=self.writer, backend=cfg.run.op_backend,
                tag=(f"model{index}" if round_ == 1 else f"round{round_}/model{index}") + ("/pool" if start else ""),
                self_selection=self_selection,
            )
            return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "report": report}

        state = self._stage(name, "phase1", compute)
        model.load_state_dict(state["model"])
        if self.out_dir:
            save_tensors(self.out_dir / f"prompts_model{index}.safetensors", state["model"],
                         {"class_names": "\n".join(self.names), "seed": str(model_seed), "round": str(round_)})
        record = {
            "seed": model_seed, "round": round_, "steps": state["report"]["steps"], "seconds": state["seconds"],
            "final_loss": state["report"]["history"][-1]["loss"] if state["report"]["history"] else None,
        }
        models = self.state.metrics.setdefault("phase1", {})
        if start is not None:
            models[f"model{index}"]["pool_stage"] = record
        else:
            models[f"model{index}"] = record
        return model, state["seconds"]

    def _relabel(self, round_: int, models: List[PromptModel], entry: Dict):
        """Each model labels the pool; its class-balanced top-K (by positive-prompt softmax confidence)
        is its subset for the next round. Returns [(rows, labels)] per model."""
        cfg = self.cfg

        def compute():
            features, positions = sharded(lambda shard: encode_with_models(
                models, self.pool, shard, self.device, cfg.model.precision, cfg.data.batch_size,
                cfg.data.num_workers, self.progress, description=f"round {round_}: labelling the pool",
                decoder=self.decoder, reuse=cfg.run.reuse), self.state.positions.tolist())
            if not torch.equal(positions, self.state.positions):
                raise RuntimeError("an image that decoded during zero-shot scoring failed to decode again")
            views, model_views = [], []
            for model, feats in zip(models, features):
                with torch.no_grad():
                    pos, neg = model.text_features()
                model_views.append(ModelView(feats, pos.cpu(), neg.cpu()))
                probabilities = model_views[-1].positive_logits(self.logit_scale).softmax(1)
                confidence, labels = self.ranked_labels(probabilities)
                views.append({"labels": labels, "confidence": confidence})
            for index, view in enumerate(views):  # the peer model's p_clean of each label (round_ranking=peer)
                view["peer_p_clean"] = model_views[1 - index].clean_probability(view["labels"], self.logit_scale)
            return {"views": views}

        state = self._stage(f"round{round_}_labels", "relabel", compute)
        entry["seconds"] += state["seconds"]
        subsets = []
        for index, view in enumerate(state["views"], start=1):
            ranking = view["confidence"]
            if cfg.phase1.round_ranking == "peer":  # validated by the other model: own confidence x its p_clean
                ranking = ranking * view["peer_p_clean"].to(ranking.dtype)
            chosen = select_top_k(view["labels"], ranking, cfg.pseudo.top_k, self.names, self.shots)
            entry[f"model{index}"]["pool_label_accuracy"] = label_accuracy(view["labels"], self.truth)
            if self.shots is not None:  # the next round's subset starts with every shot
                entry[f"model{index}"]["next_subset_shots"] = int((self.shots[chosen.rows] >= 0).sum())
            subsets.append((chosen.rows, chosen.labels))
        record_pool_labels(entry, state["views"][0]["labels"], state["views"][1]["labels"], self.names)
        return subsets

    def probe_filter(self) -> Dict:
        """filter.detector=probe: the given labels judged out of fold by linear probes on the zero-shot
        stage's frozen features (no phase I)."""
        cfg = self.cfg
        features = self.state.zs_features
        if features is None:
            raise RuntimeError("filter.detector=probe needs the zero-shot stage's image features, which its checkpoint "
                               "lacks (it was written with another detector): start the run in a new folder")
        trusted = None if self.shots is None else self.shots >= 0
        result = probe_detector(features.to(self.device), self.pool_training_labels(), len(self.names),
                                cfg.phase1.seeds, cfg.filter.probe_folds, cfg.filter.probe_rounds,
                                cfg.filter.threshold, trusted)
        return {"result": result.__dict__, "positions": self.state.positions}

    def filter(self) -> None:
        cfg = self.cfg
        models = self.state.prompt_models

        def compute():
            if cfg.filter.detector == "probe":
                return self.probe_filter()
            features, positions = sharded(lambda shard: encode_with_models(
                models, self.pool, shard, self.device, cfg.model.precision, cfg.data.batch_size,
                cfg.data.num_workers, self.progress, description="labelling the pool", decoder=self.decoder,
                reuse=cfg.run.reuse), self.state.positions.tolist())
            check_same_positions(positions, self.state.positions, self.pool.origin)
            with torch.no_grad():
                texts = [model.text_features() for model in models]
            views = [ModelView(f, pos.cpu(), neg.cpu()) for f, (pos, neg) in zip(features, texts)]
            if self.given:
                result = validate_given(views[0], views[1], self.given_labels, self.logit_scale, cfg.filter.threshold)
            else:
                result = generate_and_validate(views[0], views[1], self.logit_scale, cfg.filter.threshold)
            return {"result": result.__dict__, "positions": positions}

        state = self._stage("filter", "filter", compute)
        checked = decide(FilterResult(**state["result"]), cfg.filter.rule, cfg.filter.threshold)
        result = checked if self.shots is None else checked.with_shots(self.shots)  # shots are never filtered out
        self.state.filter = result
        truth = self.truth
        if cfg.filter.detector == "probe":
            self.state.metrics["detector"] = {"name": "probe", "folds": cfg.filter.probe_folds,
                                              "rounds": cfg.filter.probe_rounds, "seeds": list(cfg.phase1.seeds)}
        else:
            phase1 = self.state.metrics.setdefault("phase1", {})
            for index, labels in ((1, result.labels1), (2, result.labels2)):
                phase1[f"model{index}"]["pool_label_accuracy"] = label_accuracy(labels, truth)
        rounds = self.state.metrics.get("rounds")
        if rounds:  # the last round's models are the filter's
            for index in (1, 2):
                rounds[-1][f"model{index}"]["pool_label_accuracy"] = phase1[f"model{index}"]["pool_label_accuracy"]
            record_pool_labels(rounds[-1], result.labels1, result.labels2, self.names)
        self.state.metrics["filter"] = {
            "threshold": cfg.filter.threshold,
            "rule": cfg.filter.rule,
            "agreement": agreement(result.labels1, result.labels2),
            "s1": {"size": int(result.keep1.sum()),
                   **(filter_quality(result.training_labels(1), result.keep1, truth) if (truth >= 0).any() else {})},
            "s2": {"size": int(result.keep2.sum()),
                   **(filter_quality(result.training_labels(2), result.keep2, truth) if (truth >= 0).any() else {})},
        }
        if self.given:
            self.state.metrics["label_issues"] = label_issue_counts(result, self.given_labels, self.names,
                                                                    cfg.filter.threshold, cfg.filter.rule,
                                                                    cfg.filter.detector)

    def training_sets(self, selection) -> Dict[str, Dict[str, torch.Tensor]]:
        if self.cfg.method == "self-train":
            return {"s_star": {"rows": selection.rows, "labels": selection.labels}}
        result = self.state.filter
        if self.cfg.phase2.relabel_issues:  # given labels: confidently relabelled issues join, with the models' label
            result = result.with_relabelled_issues()
            self.state.metrics["filter"]["relabelled_issues"] = int(
                (result.keep1 & ~self.state.filter.keep1).sum())
        sets = {
            "s1": {"rows": result.keep1.nonzero().flatten(), "labels": result.training_labels(1)[result.keep1]},
            "s2": {"rows": result.keep2.nonzero().flatten(), "labels": result.training_labels(2)[result.keep2]},
        }
        if self.cfg.phase2.sample_weight == "clean_probability":  # the validating model's p_clean; shots weigh 1
            for name, p_clean, keep in (("s1", result.p_clean1, result.keep1), ("s2", result.p_clean2, result.keep2)):
                weights = p_clean.float() if self.shots is None else torch.where(self.shots >= 0, 1.0, p_clean.float())
                sets[name]["weights"] = weights[keep]
        chosen = {"s1": ["s1"], "s2": ["s2"], "both": ["s1", "s2"]}[self.cfg.phase2.train_on]
        return {name: sets[name] for name in chosen}

    def zero_shot_text(self, clip: ClipModel) -> torch.Tensor:
        """The class text embeddings of ``clip`` (the ones zero-shot scoring computed, unless run.reuse is off)."""
        if self.cfg.run.reuse and clip is self.clip:
            return self.state.text_embeddings
        prompts = class_prompts(self.cfg.zeroshot.templates, self.names)
        return class_text_embeddings(clip, prompts, self.names, self.device, self.cfg.model.precision).cpu()

    def phase2_backbone(self):
        """The phase II CLIP (the phase I one, or another for distillation) and its class embeddings."""
        cfg = self.cfg
        if not cfg.phase2.model:
            return self.clip, self.zero_shot_text(self.clip)
        if cfg.phase2.pretrained is None and cfg.model.pretrained is not None and not cfg.phase2.model.startswith("local-dir:"):
            raise ValueError("config key 'phase2.pretrained' is not set: phase II would fine-tune a randomly initialised "
                             f"{cfg.phase2.model} (resolve the config with coft_fast.config.resolve_auto, or set it)")
        clip2 = load_clip(cfg.phase2.model, cfg.phase2.pretrained, self.device, None, cfg.model.cache_dir)
        self._prepare(clip2)
        return clip2, self.zero_shot_text(clip2)

    def phase2(self, sets) -> ClipModel:
        cfg = self.cfg
        clip2, text = self.phase2_backbone()
        scale = logit_scale_of(clip2)
        if self.contrastive_on:
            contrastive = cfg.contrastive
            self.state.metrics["contrastive"] = {
                "queue_size": self.queue_size(), "pool_size": int(len(self.state.positions)), "gamma": contrastive.gamma,
                "temperature": contrastive.temperature, "momentum": contrastive.momentum}
        for tag, data in sets.items():
            classifier = build_classifier(clip2.model.visual, text.to(self.device), scale, cfg.phase2.head_init,
                                          cfg.seed).to(self.device)

            def compute(classifier=classifier, tag=tag, data=data):
                if cfg.phase2.head_init == "probe":
                    self.fit_probe_head(classifier, data, scale)
                contrastive = None
                if self.contrastive_on:  # labelled rows and contrastive batches come from the whole pool
                    images = self._pool_images() if clip2 is self.clip else self._training_images(self.state.positions, clip2.model)
                    rows = data["rows"]
                    contrastive = self.contrastive_term(classifier, text.shape[1])
                else:
                    images = self._training_images(self.state.positions[data["rows"]], clip2.model)
                    rows = torch.arange(len(data["rows"]))
                report = train_phase2(
                    classifier, images, rows, data["labels"], cfg.phase2, cfg.seed,
                    self.device, cfg.model.precision, checkpoint=self.store.path(f"phase2_{tag}_progress"),
                    checkpoint_seconds=cfg.run.checkpoint_seconds, progress=self.progress, writer=self.writer, tag=tag,
                    contrastive=contrastive, compile_model=self.compile,
                    monitor=self.knn_monitor(classifier, clip2) if cfg.phase2.knn_monitor else None,
                    weights=data.get("weights"),
                )
                return {"model": {k: v.detach().cpu() for k, v in classifier.state_dict().items()}, "report": report}

            state = self._stage(f"phase2_{tag}", "phase2", compute)
            classifier.load_state_dict(state["model"])
            classifier.eval()
            if self.out_dir:
                save_tensors(self.out_dir / CLASSIFIER_FILE.format(tag), state["model"],
                             classifier_metadata(clip2, self.names, tag))
            self.state.classifiers[tag] = classifier
            history = state["report"]["history"]
            self.state.metrics.setdefault("phase2", {})[tag] = {
                "train_size": int(len(data["rows"])), "steps": state["report"]["steps"], "seconds": state["seconds"],
                "train_label_accuracy": label_accuracy(data["labels"], self.truth[data["rows"]]),
                "final_loss": history[-1]["loss"] if history else None,
                **({"contrastive_loss": [entry["contrastive"] for entry in history]}
                   if history and "contrastive" in history[-1] else {}),
                **({"knn_acc1": [entry["knn_acc1"] for entry in history]}
                   if history and "knn_acc1" in history[-1] else {}),
            }
        return clip2

    def fit_probe_head(self, classifier: FineTunedClassifier, data: Dict[str, torch.Tensor], scale: float) -> None:
        """phase2.head_init=probe (LP-FT): the head becomes a linear probe fit on the frozen tower's
        features of the training rows (the zero-shot stage's), at the head's fixed scale."""
        features = self.state.zs_features
        if features is None:
            raise RuntimeError("phase2.head_init=probe needs the zero-shot stage's image features, which its checkpoint "
                               "lacks (it was written with another head_init): start the run in a new folder")
        generator = torch.Generator().manual_seed(self.cfg.seed)
        weight, bias = train_linear_head(features[data["rows"]], data["labels"], len(self.names), generator=generator)
        with torch.no_grad():
            classifier.head.weight.copy_(weight.to(classifier.head.weight.device) / scale)
            classifier.head.bias.copy_(bias.to(classifier.head.bias.device))

    def queue_size(self) -> int:
        """CoFT+'s key queue length: the configured size, capped by a share of the pool, at least one global batch."""
        cfg = self.cfg.contrastive
        pool_size = len(self.state.positions)
        return max(min(cfg.queue_size, int(pool_size * cfg.queue_pool_fraction)), self.cfg.phase2.batch_size)

    @property
    def contrastive_on(self) -> bool:
        """Phase II adds CoFT+'s momentum-contrastive term."""
        return self.cfg.method == "coft+" and self.cfg.contrastive.gamma > 0

    def contrastive_term(self, classifier: FineTunedClassifier, dim: int) -> ContrastiveTerm:
        """CoFT+'s momentum encoder and key queue for ``classifier``, over every scored pool image."""
        cfg = self.cfg.contrastive
        module = MomentumContrast(classifier.visual, dim, self.queue_size(), cfg.momentum, cfg.projection_dim,
                                  seed=self.cfg.seed, gather=all_gather_rows).to(self.device)
        return ContrastiveTerm(module, torch.arange(len(self.state.positions)), cfg.gamma, cfg.temperature,
                               self.cfg.run.op_backend)

    def evaluate(self, clip2: ClipModel) -> None:
        """Zero-shot, phase I and final accuracies on the evaluation images (when they have labels)."""
        metrics = self.state.metrics
        source = self.eval_source
        zero_shot = metrics.setdefault("zero_shot", {})
        final = metrics.setdefault("final", {})
        if source is None or not source.has_labels:
            return
        cfg, device = self.cfg, self.device
        started = time.perf_counter()
        features, positions = sharded(lambda shard: encode_images(
            self.clip, source, device, cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers, indices=shard,
            progress=self.progress, description="evaluating zero-shot", compile_model=self.compile),
            list(range(len(source))))
        truth = torch.tensor(source.labels, dtype=torch.long)[positions]
        zs = zeroshot_probabilities(features, self.zero_shot_text(self.clip), self.logit_scale)
        zero_shot.update(classification_metrics(zs, truth))
        zero_shot["num_images"] = int(len(positions))
        if self.state.prompt_models:
            model_features, model_positions = sharded(lambda shard: encode_with_models(
                self.state.prompt_models, source, shard, device, cfg.model.precision, cfg.data.batch_size,
                cfg.data.num_workers, self.progress, description="evaluating phase I", decoder=self.decoder,
                reuse=cfg.run.reuse), positions.tolist())
            check_same_positions(model_positions, positions, source.origin)
            for index, (model, feats) in enumerate(zip(self.state.prompt_models, model_features), start=1):
                with torch.no_grad():
                    pos, _ = model.text_features()
                logits = self.logit_scale * feats @ pos.cpu().T
                metrics["phase1"][f"model{index}"]["eval"] = classification_metrics(logits, truth)
                metrics["phase1"][f"model{index}"]["acc1"] = metrics["phase1"][f"model{index}"]["eval"]["acc1"]
        all_logits = {}
        for tag, classifier in self.state.classifiers.items():
            logits, found = sharded(lambda shard: classifier_logits(
                classifier, source, clip2.preprocess_eval, device, cfg.model.precision, cfg.data.batch_size,
                cfg.data.num_workers, shard, self.progress, f"evaluating {tag}", self.decoder,
                preprocess_stats(clip2.model), self.compile), positions.tolist())
            check_same_positions(found, positions, source.origin)
            all_logits[tag] = logits
            final[tag] = classification_metrics(logits, truth)
        if len(all_logits) > 1:  # train_on=both: the logit ensemble
            final["ensemble"] = classification_metrics(ensemble_logits(all_logits.values()), truth)
        main = "ensemble" if "ensemble" in final else next(iter(all_logits))
        final.update({key: final[main][key] for key in ("acc1", "acc5", "mean_per_class_recall")})
        final["classifier"] = main
        final["num_images"] = int(len(positions))
        self._timed("evaluation", time.perf_counter() - started)
