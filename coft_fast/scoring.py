"""Zero-shot scoring (class text embeddings, image features, probabilities) for runs and ``zeroshot``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from coft_fast.runtime.progress import progress_bar

from coft_fast.data import ImageSource
from coft_fast.data.streaming import eval_batches
from coft_fast.models import ClipModel
from coft_fast.pseudo.templates import check_prompts_fit
from coft_fast.runtime.device import autocast, run_padded


@torch.no_grad()
def class_text_embeddings(clip: ClipModel, prompts: Sequence[Sequence[str]], class_names: Sequence[str],
                          device: torch.device, precision: str = "auto", batch_size: int = 512) -> torch.Tensor:
    """(C, d) float32: per class, the mean of its prompts' normalised embeddings, normalised again."""
    check_prompts_fit(clip.tokenizer, prompts, class_names, clip.context_length)
    flat = [prompt for class_prompts in prompts for prompt in class_prompts]
    owners = torch.tensor([c for c, class_prompts in enumerate(prompts) for _ in class_prompts])
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = clip.tokenizer(flat[start : start + batch_size]).to(device)
        with autocast(precision, device):
            chunks.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    embeddings = torch.cat(chunks)
    summed = torch.zeros(len(prompts), embeddings.shape[1], device=device).index_add_(0, owners.to(device), embeddings)
    return F.normalize(summed, dim=-1)


@torch.no_grad()
def model_outputs(classifier: torch.nn.Module, source: ImageSource, preprocess, device: torch.device,
                  precision: str = "auto", batch_size: int = 256, num_workers: int = 0,
                  indices: Optional[Sequence[int]] = None, progress: bool = True, description: str = "predicting",
                  decoder: str = "pil", stats: Optional[tuple] = None, compile_model: bool = False):
    """(outputs (M, ...) float32, positions (M,)) of a module over ``source`` (compiled: the last batch padded)."""
    classifier.eval()
    forward = torch.compile(classifier) if compile_model else classifier
    logits, positions = [], []
    total = len(source) if indices is None else len(indices)
    bar = progress_bar(total=total, desc=description, unit="img", disable=not progress, leave=False)
    for batch in eval_batches(source, indices, preprocess, batch_size, num_workers, decoder, stats, device):
        images = batch.images.to(device, non_blocking=True)
        with autocast(precision, device):
            output = run_padded(forward, images, batch_size) if compile_model else forward(images)
        logits.append(output.float().cpu())
        positions.append(batch.indices)
        bar.update(len(batch.indices) + len(batch.failed))
    bar.close()
    if not logits:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(positions)


class _ImageFeatures(torch.nn.Module):

    def __init__(self, clip: ClipModel):
        super().__init__()
        self.model = clip.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)


def encode_images(clip: ClipModel, source: ImageSource, device: torch.device, precision: str = "auto",
                  batch_size: int = 256, num_workers: int = 0, indices: Optional[Sequence[int]] = None,
                  progress: bool = True, description: str = "encoding images", compile_model: bool = False):
    """(normalised image features (M, d) float32, source positions (M,)); unreadable files are skipped."""
    features, positions = model_outputs(_ImageFeatures(clip), source, clip.preprocess_eval, device, precision,
                                        batch_size, num_workers, indices, progress, description,
                                        compile_model=compile_model)
    if not len(positions):
        dim = clip.model.text_projection.shape[-1] if hasattr(clip.model, "text_projection") else 0
        return torch.empty(0, dim), positions
    return features, positions


def logit_scale_of(clip: ClipModel) -> float:
    """The multiplier exp(model.logit_scale) (about 100 for trained CLIP)."""
    return float(clip.model.logit_scale.detach().exp())


@dataclass
class ZeroShotResult:
    """Zero-shot predictions for the decodable images of a source."""

    source: ImageSource
    positions: torch.Tensor  # (M,) int64 positions in the source of the scored images
    probabilities: torch.Tensor  # (M, C) float32 softmax over classes
    text_embeddings: torch.Tensor  # (C, d) normalised class embeddings
    image_features: torch.Tensor  # (M, d) normalised image features
    metrics: Optional[dict] = None
    refined_probabilities: Optional[torch.Tensor] = None

    @property
    def label_probabilities(self) -> torch.Tensor:
        """What predictions come from: pseudo.refine's probabilities where there are some, else zero-shot's."""
        return self.probabilities if self.refined_probabilities is None else self.refined_probabilities

    @property
    def predictions(self) -> torch.Tensor:
        return self.label_probabilities.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.label_probabilities.max(dim=1).values

    @property
    def paths(self) -> List[str]:
        return [self.source.paths[i] for i in self.positions.tolist()]

    @property
    def labels(self) -> torch.Tensor:
        """Ground-truth labels of the scored images (-1 where unknown); diagnostics only."""
        return torch.tensor([self.source.labels[i] for i in self.positions.tolist()], dtype=torch.long)


def zeroshot_probabilities(image_features: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """softmax_k(logit_scale * cos(image, class_k)) for normalised inputs, in float32."""
    return (logit_scale * image_features.float() @ text_embeddings.float().T).softmax(dim=1)


def score_images(clip: ClipModel, source: ImageSource, text: torch.Tensor, device: torch.device, precision: str,
                 batch_size: int, num_workers: int, indices: Optional[Sequence[int]] = None, progress: bool = True,
                 description: str = "zero-shot scoring", compile_model: bool = False, gather=None):
    """(image features, positions, zero-shot probabilities) of ``source``; ``gather`` shards the encoding."""
    def encode(chosen):
        return encode_images(clip, source, device, precision, batch_size, num_workers, indices=chosen,
                             progress=progress, description=description, compile_model=compile_model)

    everything = list(range(len(source))) if indices is None else list(indices)
    features, positions = gather(encode, everything) if gather is not None else encode(indices)
    return features, positions, zeroshot_probabilities(features, text.cpu(), logit_scale_of(clip))
