"""TEMPORARY training loop of ``dynaslice.prune``, until ``dynaslice/train/engine.py`` lands.

Plain SGD (Nesterov momentum) with a short linear warm-up and a per-step cosine schedule, labels
cross-entropy. Each method plugs in the same pieces it will give the project's engine:

- ``loss_fn(model, x, y) -> loss``: the per-step loss (White-Box adds its mask regulariser and
  passes the labels to the masked network);
- ``epoch_hooks``: ``hook(model, epoch, num_epochs)`` before each epoch (DCFF's temperature and
  filter fusion).

Weight decay applies to every tensor with more than one dimension (conv/linear weights, DCFF's
full filter banks, White-Box's class masks, which the official code decays too), never to
norms or biases. Nothing here is specific to pruning; it goes away when the engine arrives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[nn.Module, int, int], None]


@dataclass(frozen=True)
class FitConfig:
    """One training phase. ``epochs`` may be fractional (the last epoch is cut short)."""

    epochs: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def cross_entropy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)


def _optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def fit(
    model: nn.Module,
    loader,
    cfg: FitConfig,
    loss_fn: LossFn | None = None,
    epoch_hooks: Sequence[EpochHook] = (),
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``loader`` (a ``BatchLoader``); returns the mean loss per epoch.

    Batches move to the model's device. The caller seeds the model; the loader seeds the data.
    """
    steps_per_epoch = len(loader)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    num_epochs = math.ceil(total / steps_per_epoch)
    opt = _optimizer(model, cfg)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup))
    sched = cosine if warmup <= 0 else SequentialLR(
        opt, [LinearLR(opt, start_factor=0.1, total_iters=warmup), cosine], milestones=[warmup]
    )  # fmt: skip
    if loss_fn is None:
        loss_fn = lambda m, x, y: cross_entropy(m, x, y, cfg.label_smoothing)  # noqa: E731
    device = next(model.parameters()).device
    history, step = [], 0
    model.train()
    for epoch in range(num_epochs):
        for hook in epoch_hooks:
            hook(model, epoch, num_epochs)
        losses = []
        for x, y in loader.epoch_batches(epoch):
            if step == total:
                break
            loss = loss_fn(model, x.to(device), y.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {loss.item()}); lower the lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        history.append({"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), "steps": len(losses)})
    return history


def fit_if(model: nn.Module, loader, cfg: FitConfig | None, **kwargs) -> list[dict[str, float]]:
    """:func:`fit` when both a loader and a config are given, nothing when neither is."""
    if (loader is None) != (cfg is None):
        raise ValueError("pass both a training loader and a FitConfig to train, or neither")
    return fit(model, loader, cfg, **kwargs) if cfg is not None else []
