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
from typing import Dict, List, Optional

import torch

from coft_fast.config import Config
from coft_fast.data import ImageSource
from coft_fast.data.resident import ResidentImages, preprocess_stats
from coft_fast.models import ClipModel, load_clip
from coft_fast.phases.phase1 import PromptModel, encode_with_models, make_prompt_model, train_phase1
from coft_fast.phases.phase2 import FineTunedClassifier, build_classifier, classifier_logits, train_phase2
from coft_fast.pseudo import class_prompts, class_text_embeddings, encode_images, logit_scale_of, zeroshot_probabilities
from coft_fast.pseudo.filter import FilterResult, ModelView, filter_quality, generate_and_validate
from coft_fast.pseudo.selection import select_top_k
from coft_fast.runtime.checkpoint import StageStore, save_tensors
from coft_fast.runtime.metrics import classification_metrics

log = logging.getLogger("coft_fast")


def label_accuracy(labels: torch.Tensor, truth: torch.Tensor) -> Optional[float]:
    known = truth >= 0
    if not bool(known.any()):
        return None
    return (labels[known] == truth[known]).double().mean().item()


@dataclass
class RunState:
    """What the stages hand each other."""

    positions: Optional[torch.Tensor] = None  # scored pool images (positions in the source)
    zs_probabilities: Optional[torch.Tensor] = None
    text_embeddings: Optional[torch.Tensor] = None
    filter: Optional[FilterResult] = None
    prompt_models: List[PromptModel] = field(default_factory=list)
    classifiers: Dict[str, FineTunedClassifier] = field(default_factory=dict)
    metrics: Dict = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


class CoftRun:
    def __init__(self, cfg: Config, pool: ImageSource, eval_source: Optional[ImageSource], clip: ClipModel,
                 device: torch.device, out_dir: Optional[Path], writer=None):
        self.cfg, self.pool, self.eval_source, self.clip, self.device = cfg, pool, eval_source, clip, device
        self.out_dir = out_dir
        self.store = StageStore(out_dir / "checkpoints" if out_dir else None)
        self.writer = writer
        self.state = RunState()
        self.names = pool.class_names
        self.truth_all = torch.tensor(pool.labels, dtype=torch.long)
        self.logit_scale = logit_scale_of(clip)
        self.progress = cfg.run.progress
        for parameter in clip.model.parameters():
            parameter.requires_grad_(False)

    def execute(self):
        """Every stage in order; returns (the phase II training sets, the phase II CLIP)."""
        self.zero_shot()
        selection = self.select()
        if self.cfg.method == "coft":
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

    def _resident(self, positions: torch.Tensor, model: torch.nn.Module) -> ResidentImages:
        size, mean, std = preprocess_stats(model)
        images = ResidentImages(self.pool, positions.tolist(), size, mean, std, self.cfg.data.batch_size,
                                self.cfg.data.num_workers, self.progress)
        if not torch.equal(images.positions, positions):
            raise RuntimeError("an image that decoded during zero-shot scoring failed to decode again")
        return images

    @property
    def truth(self) -> torch.Tensor:
        return self.truth_all[self.state.positions]

    # ------------------------------------------------------------------ stages
    def zero_shot(self) -> None:
        cfg = self.cfg

        def compute():
            prompts = class_prompts(cfg.zeroshot.templates, self.names)
            text = class_text_embeddings(self.clip, prompts, self.names, self.device, cfg.model.precision).cpu()
            features, positions = encode_images(self.clip, self.pool, self.device, cfg.model.precision,
                                                cfg.data.batch_size, cfg.data.num_workers, progress=self.progress,
                                                description="zero-shot scoring")
            if not len(positions):
                raise RuntimeError(f"{self.pool.origin}: none of the {len(self.pool)} images could be decoded")
            probabilities = zeroshot_probabilities(features, text, self.logit_scale)
            return {"positions": positions, "probabilities": probabilities, "text": text, "skipped": list(self.pool.skipped)}

        state = self._stage("zero_shot", "zero_shot", compute)
        self.pool.skipped[:] = state["skipped"]
        self.state.positions = state["positions"]
        self.state.zs_probabilities = state["probabilities"]
        self.state.text_embeddings = state["text"]
        labels = state["probabilities"].argmax(1)
        self.state.metrics["pool"] = {
            "num_images": int(len(state["positions"])),
            "num_skipped": len(state["skipped"]),
            "pseudo_label_accuracy": label_accuracy(labels, self.truth),
        }

    def select(self):
        probabilities = self.state.zs_probabilities
        confidence, labels = probabilities.max(1)
        selection = select_top_k(labels, confidence, self.cfg.pseudo.top_k, self.names)
        self.state.metrics["selection"] = {
            "top_k": self.cfg.pseudo.top_k,
            "size": int(len(selection.rows)),
            "per_class": dict(zip(self.names, selection.counts.tolist())),
            "classes_short": selection.short_classes,
            "classes_empty": selection.empty_classes,
            "pseudo_label_accuracy": label_accuracy(selection.labels, self.truth[selection.rows]),
        }
        return selection

    def phase1(self, selection) -> None:
        cfg = self.cfg
        positions = self.state.positions[selection.rows]
        images = self._resident(positions, self.clip.model)
        rows = torch.arange(len(positions))
        for index, seed in enumerate(cfg.phase1.seeds, start=1):
            model_seed = cfg.seed * 1000 + seed
            model = make_prompt_model(self.clip, self.names, cfg.phase1, model_seed, self.device)

            def compute(model=model, index=index, model_seed=model_seed):
                report = train_phase1(
                    model, images, rows, selection.labels, cfg.phase1, model_seed, self.device, cfg.model.precision,
                    checkpoint=self.store.path(f"phase1_model{index}_progress"),
                    checkpoint_seconds=cfg.run.checkpoint_seconds, progress=self.progress, writer=self.writer,
                    tag=f"model{index}",
                )
                return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "report": report}

            state = self._stage(f"phase1_model{index}", "phase1", compute)
            model.load_state_dict(state["model"])
            if self.out_dir:
                save_tensors(self.out_dir / f"prompts_model{index}.safetensors", state["model"],
                             {"class_names": "\n".join(self.names), "seed": str(model_seed)})
            self.state.prompt_models.append(model)
            self.state.metrics.setdefault("phase1", {})[f"model{index}"] = {
                "seed": model_seed, "steps": state["report"]["steps"], "seconds": state["seconds"],
                "final_loss": state["report"]["history"][-1]["loss"] if state["report"]["history"] else None,
            }

    def filter(self) -> None:
        cfg = self.cfg
        models = self.state.prompt_models

        def compute():
            features, positions = encode_with_models(
                models, self.pool, self.state.positions.tolist(), self.device, cfg.model.precision,
                cfg.data.batch_size, cfg.data.num_workers, self.progress, description="labelling the pool",
            )
            with torch.no_grad():
                texts = [model.text_features() for model in models]
            views = [ModelView(f, pos.cpu(), neg.cpu()) for f, (pos, neg) in zip(features, texts)]
            result = generate_and_validate(views[0], views[1], self.logit_scale, cfg.filter.threshold)
            return {"result": result.__dict__, "positions": positions}

        state = self._stage("filter", "filter", compute)
        result = FilterResult(**state["result"])
        self.state.filter = result
        truth = self.truth
        phase1 = self.state.metrics.setdefault("phase1", {})
        for index, labels in ((1, result.labels1), (2, result.labels2)):
            phase1[f"model{index}"]["pool_label_accuracy"] = label_accuracy(labels, truth)
        self.state.metrics["filter"] = {
            "threshold": cfg.filter.threshold,
            "agreement": (result.labels1 == result.labels2).double().mean().item(),
            "s1": {"size": int(result.keep1.sum()), **(filter_quality(result.labels1, result.keep1, truth) if (truth >= 0).any() else {})},
            "s2": {"size": int(result.keep2.sum()), **(filter_quality(result.labels2, result.keep2, truth) if (truth >= 0).any() else {})},
        }

    def training_sets(self, selection) -> Dict[str, Dict[str, torch.Tensor]]:
        if self.cfg.method == "self-train":
            return {"s_star": {"rows": selection.rows, "labels": selection.labels}}
        result = self.state.filter
        sets = {
            "s1": {"rows": result.keep1.nonzero().flatten(), "labels": result.labels1[result.keep1]},
            "s2": {"rows": result.keep2.nonzero().flatten(), "labels": result.labels2[result.keep2]},
        }
        chosen = {"s1": ["s1"], "s2": ["s2"], "both": ["s1", "s2"]}[self.cfg.phase2.train_on]
        return {name: sets[name] for name in chosen}

    def phase2_backbone(self):
        """The phase II CLIP (the phase I one, or another for distillation) and its class embeddings."""
        cfg = self.cfg
        if not cfg.phase2.model:
            return self.clip, self.state.text_embeddings
        clip2 = load_clip(cfg.phase2.model, cfg.phase2.pretrained, self.device, None, cfg.model.cache_dir)
        prompts = class_prompts(cfg.zeroshot.templates, self.names)
        text = class_text_embeddings(clip2, prompts, self.names, self.device, cfg.model.precision).cpu()
        return clip2, text

    def phase2(self, sets) -> ClipModel:
        cfg = self.cfg
        clip2, text = self.phase2_backbone()
        scale = logit_scale_of(clip2)
        for tag, data in sets.items():
            classifier = build_classifier(clip2.model.visual, text.to(self.device), scale, cfg.phase2.head_init,
                                          cfg.seed).to(self.device)

            def compute(classifier=classifier, tag=tag, data=data):
                images = self._resident(self.state.positions[data["rows"]], clip2.model)
                report = train_phase2(
                    classifier, images, torch.arange(len(data["rows"])), data["labels"], cfg.phase2, cfg.seed,
                    self.device, cfg.model.precision, checkpoint=self.store.path(f"phase2_{tag}_progress"),
                    checkpoint_seconds=cfg.run.checkpoint_seconds, progress=self.progress, writer=self.writer, tag=tag,
                )
                return {"model": {k: v.detach().cpu() for k, v in classifier.state_dict().items()}, "report": report}

            state = self._stage(f"phase2_{tag}", "phase2", compute)
            classifier.load_state_dict(state["model"])
            classifier.eval()
            if self.out_dir:
                save_tensors(self.out_dir / f"finetuned_{tag}.safetensors", state["model"],
                             {"class_names": "\n".join(self.names), "model": cfg.phase2.model or cfg.model.name})
            self.state.classifiers[tag] = classifier
            self.state.metrics.setdefault("phase2", {})[tag] = {
                "train_size": int(len(data["rows"])), "steps": state["report"]["steps"], "seconds": state["seconds"],
                "train_label_accuracy": label_accuracy(data["labels"], self.truth[data["rows"]]),
            }
        return clip2

    def evaluate(self, clip2: ClipModel) -> None:
        """Zero-shot, phase I and final accuracies on the evaluation images (when they have labels)."""
        metrics = self.state.metrics
        source = self.eval_source
        zero_shot = metrics.setdefault("zero_shot", {})
        zero_shot["pool_acc1"] = metrics["pool"]["pseudo_label_accuracy"]
        final = metrics.setdefault("final", {})
        if source is None or not source.has_labels:
            return
        cfg, device = self.cfg, self.device
        started = time.perf_counter()
        features, positions = encode_images(self.clip, source, device, cfg.model.precision, cfg.data.batch_size,
                                            cfg.data.num_workers, progress=self.progress, description="evaluating zero-shot")
        truth = torch.tensor(source.labels, dtype=torch.long)[positions]
        zs = zeroshot_probabilities(features, self.state.text_embeddings, self.logit_scale)
        zero_shot.update(classification_metrics(zs, truth))
        zero_shot["num_images"] = int(len(positions))
        if self.state.prompt_models:
            model_features, model_positions = encode_with_models(
                self.state.prompt_models, source, positions.tolist(), device, cfg.model.precision,
                cfg.data.batch_size, cfg.data.num_workers, self.progress, description="evaluating phase I")
            for index, (model, feats) in enumerate(zip(self.state.prompt_models, model_features), start=1):
                with torch.no_grad():
                    pos, _ = model.text_features()
                logits = self.logit_scale * feats @ pos.cpu().T
                metrics["phase1"][f"model{index}"]["eval"] = classification_metrics(logits, truth)
                metrics["phase1"][f"model{index}"]["acc1"] = metrics["phase1"][f"model{index}"]["eval"]["acc1"]
        all_logits = {}
        for tag, classifier in self.state.classifiers.items():
            logits, final_positions = classifier_logits(classifier, source, clip2.preprocess_eval, device,
                                                        cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers,
                                                        positions.tolist(), self.progress, f"evaluating {tag}")
            all_logits[tag] = logits
            final[tag] = classification_metrics(logits, truth)
        if len(all_logits) > 1:
            ensemble = sum(logits.softmax(1) for logits in all_logits.values())
            final["ensemble"] = classification_metrics(ensemble, truth)
        main = "ensemble" if "ensemble" in final else next(iter(all_logits))
        final.update({key: final[main][key] for key in ("acc1", "acc5", "mean_per_class_recall")})
        final["classifier"] = main
        final["num_images"] = int(len(positions))
        self._timed("evaluation", time.perf_counter() - started)
