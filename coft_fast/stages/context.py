"""The run context every stage reads and writes: config, data, frozen CLIP, stage store, labels."""
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
from coft_fast.models import ClipModel
from coft_fast.models.attention import use_batch_major_attention
from coft_fast.ops.numerics import set_numerics
from coft_fast.phases.phase1 import PromptModel, encode_with_models
from coft_fast.phases.phase2 import FineTunedClassifier
from coft_fast.pseudo import class_prompts, prompt_names
from coft_fast.scoring import class_text_embeddings, logit_scale_of
from coft_fast.pseudo.filter import FilterResult
from coft_fast.pseudo.label_issues import LabelIssue, label_issues
from coft_fast.runtime.checkpoint import StageStore
from coft_fast.runtime.device import autocast_dtype
from coft_fast.runtime.distributed import gather_rows, is_main, shard

log = logging.getLogger("coft_fast")


def sharded(encode, indices: List[int]):
    """``encode(this rank's share of indices)``, its tensors (or lists of them) gathered from every rank in order."""

    def gather(value):
        if isinstance(value, torch.Tensor):
            return gather_rows(value)
        return [gather(item) for item in value]

    return gather(encode(shard(indices)))


def check_same_positions(found: torch.Tensor, expected: torch.Tensor, origin: str) -> torch.Tensor:
    """``found`` (a later pass's decoded positions) if it equals ``expected``, else a RuntimeError."""
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


@dataclass
class RunState:
    """What the stages hand each other."""

    positions: Optional[torch.Tensor] = None  # scored pool images (positions in the source)
    zs_probabilities: Optional[torch.Tensor] = None
    zs_features: Optional[torch.Tensor] = None  # kept only where needed (RunContext.keep_features)
    pool_probabilities: Optional[torch.Tensor] = None  # the pool's labels for later stages (zero-shot or refined)
    pool_ranking: Optional[torch.Tensor] = None  # pseudo.refine: what ranks S* (None: the probability)
    text_embeddings: Optional[torch.Tensor] = None
    filter: Optional[FilterResult] = None
    prompt_models: List[PromptModel] = field(default_factory=list)
    classifiers: Dict[str, FineTunedClassifier] = field(default_factory=dict)
    metrics: Dict = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


class RunContext:
    def __init__(self, cfg: Config, pool: ImageSource, eval_source: Optional[ImageSource], clip: ClipModel,
                 device: torch.device, out_dir: Optional[Path], writer=None, shots: Optional[Sequence[int]] = None):
        """``shots``: per pool position, the class of a labelled shot (-1: none)."""
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
        # given labels are checked (no truth then); otherwise the pool's labels serve diagnostics only
        self.given_all = labels if self.given else None
        self.truth_all = torch.full_like(labels, -1) if self.given else labels
        self.shots_all = torch.tensor(shots if shots is not None else [-1] * len(pool), dtype=torch.long)
        self.logit_scale = logit_scale_of(clip)
        self.progress = cfg.run.progress and is_main()  # one set of progress bars
        self.decoder = resolve_decoder(cfg.data.decoder, device)
        self.compile = cfg.run.compile if cfg.run.compile is not None else device.type == "cuda"
        set_numerics(cfg.run.tf32, cfg.run.deterministic)  # before any matmul or kernel of the run
        for parameter in clip.model.parameters():
            parameter.requires_grad_(False)
        self.prepare(clip)

    @property
    def keep_features(self) -> bool:
        """The zero-shot stage keeps the pool's image features for pseudo.refine, the probe detector, LP-FT."""
        cfg = self.cfg
        return cfg.pseudo.refine != "none" or cfg.filter.detector == "probe" or cfg.phase2.head_init == "probe"

    def prepare(self, clip: ClipModel) -> None:
        """bf16 on a CPU: matrix products in bf16 (AMX), attention kept in float32 (models/attention.py)."""
        if self.device.type == "cpu" and autocast_dtype(self.cfg.model.precision, self.device) is not None:
            use_batch_major_attention(clip.model, float32=True)

    def timed(self, name: str, seconds: float) -> None:
        self.state.timings[name] = self.state.timings.get(name, 0.0) + seconds

    def stage(self, name: str, phase: str, compute):
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
        self.timed(phase, state["seconds"])
        return state

    def training_images(self, positions: torch.Tensor, model: torch.nn.Module):
        """Training images of ``positions``: decoded once into memory when ``data.resident`` allows, else streamed."""
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
        check_same_positions(images.positions, positions, self.pool.origin)
        return images

    def pool_images(self) -> ResidentImages:
        """Every scored pool image, decoded once (CoFT+'s rounds and contrastive batches)."""
        if self._pool_resident is None:
            self._pool_resident = self.training_images(self.state.positions, self.clip.model)
        return self._pool_resident

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
        """(confidence, label) per pool row: the arg-max of ``probabilities``, or the given label's."""
        if not self.given:
            return probabilities.max(1)
        labels = self.given_labels
        return probabilities.gather(1, labels[:, None]).squeeze(1), labels

    def pool_training_labels(self) -> torch.Tensor:
        """Every pool row's given label or pseudo-label, a labelled shot's own label in its row."""
        labels = self.given_labels.clone() if self.given else self.state.pool_probabilities.argmax(1)
        if self.shots is not None:
            labels = torch.where(self.shots >= 0, self.shots, labels)
        return labels

    def label_issues(self) -> Optional[List[LabelIssue]]:
        """pseudo.source=given, after the filter: a LabelIssue per scored pool image, most likely wrong first."""
        if not self.given or self.state.filter is None:
            return None
        paths = [self.pool.paths[i] for i in self.state.positions.tolist()]
        return label_issues(paths, self.state.filter, self.given_labels, self.shots, self.names)

    def model_features(self, models: Sequence[PromptModel], source: ImageSource, positions: torch.Tensor,
                       description: str) -> List[torch.Tensor]:
        """Each phase-I model's image features of ``source`` at ``positions`` (decoded once, across ranks)."""
        cfg = self.cfg
        features, found = sharded(lambda shard: encode_with_models(
            models, source, shard, self.device, cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers,
            self.progress, description=description, decoder=self.decoder, reuse=cfg.run.reuse), positions.tolist())
        check_same_positions(found, positions, source.origin)
        return features

    def class_text(self, clip: ClipModel) -> torch.Tensor:
        """The class text embeddings of ``clip`` (zero-shot scoring's, unless run.reuse is off)."""
        if self.cfg.run.reuse and clip is self.clip and self.state.text_embeddings is not None:
            return self.state.text_embeddings
        prompts = class_prompts(self.cfg.zeroshot.templates, self.names)
        return class_text_embeddings(clip, prompts, self.names, self.device, self.cfg.model.precision).cpu()

    def metrics_record(self) -> Dict:
        """metrics.json's content so far: the method, every stage's figures, and the timings."""
        return {"method": self.cfg.method, **self.state.metrics, "timings": self.state.timings}
