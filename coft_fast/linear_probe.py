"""Linear probes: a linear classification head trained full-batch on frozen, normalised features."""
from __future__ import annotations

import torch


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 500,
                     lr: float = 1e-2, generator: torch.Generator = None):
    """``predict(features) -> logits`` of a linear head trained full-batch with Adam on normalised features."""
    weight, bias = train_linear_head(features, labels, num_classes, steps, lr, generator)
    return lambda rows: torch.nn.functional.normalize(rows.float(), dim=-1) @ weight.T + bias


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 500,
                      lr: float = 1e-2, generator: torch.Generator = None, init: torch.Tensor = None):
    """(weight (C, d), bias (C,)) of :func:`fit_linear_probe`'s classifier; ``init``: the starting weight."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    if init is not None:
        weight = init.float().clone().requires_grad_()
    elif generator is None:
        weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    else:
        weight = (torch.randn(num_classes, x.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()
