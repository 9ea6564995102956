"""Optimizer, weight-decay groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ..nn import SlicedConv2d, SlicedLinear
from .config import OptimConfig

_DECAYED = (SlicedConv2d, SlicedLinear, nn.Conv2d, nn.Linear)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights with ``weight_decay``, everything else (norms, biases) without.

    Decaying BatchNorm's gamma/beta or biases only fights the normalisation and hurts accuracy
    (the standard ImageNet recipe, as in the DS-Net papers). A module with a
    ``weight_decay_parameters()`` method says itself which of its own parameters are decayed: a
    binary convolution's method decides (:mod:`dynaslice.binary`; SiMaN decays none of them).
    """
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, _DECAYED)}
    for m in model.modules():  # a layer that names its decayed parameters overrides the rule for its own
        if hasattr(m, "weight_decay_parameters"):
            decay_ids -= {id(p) for p in m.parameters(recurse=False)}
            decay_ids |= {id(p) for p in m.weight_decay_parameters()}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW; weight decay per :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.name!r}: choose sgd or adamw")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> LRScheduler:
    """Linear warm-up for ``warmup_epochs`` then cosine decay to ``min_lr``; step it every iteration."""
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.min_lr)
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
