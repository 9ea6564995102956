"""BatchNorm recalibration: exact running statistics for every subnet that will be used.

During supernet training the per-width running statistics are exponential averages over
batches of *different* subnets and of weights that kept changing, so narrow subnets evaluate
badly until their statistics are recomputed for the final weights. The fix over the original
DS-Net code: evaluation-style preprocessing (no augmentation), cumulative averaging
(``momentum=None``: every batch counts equally) instead of an exponential average, and a pass
over *every* subnet that will be used, so no width keeps stale statistics.

BatchNorm statistics are per width, not per subnet: two subnets that share a layer's width
share that row, and it ends up averaged over both. Recalibrate for exactly the subnets you
deploy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..data import EvalTransform, InMemoryDataset
from ..nn import SlicedBatchNorm2d
from ..progress import Progress
from ..seeding import derive_seed
from ..space import Arch


def recal_batches(
    data: InMemoryDataset, num_images: int = 2000, batch_size: int = 200, seed: int = 0
) -> list[torch.Tensor]:
    """Eval-preprocessed batches of a seeded random subset of ``data`` (full batches only).

    Only full batches are kept because cumulative averaging weights every batch equally.
    """
    n = min(num_images, len(data))
    if n < batch_size:
        batch_size = n
    g = torch.Generator().manual_seed(derive_seed("recal", seed))
    idx = torch.randperm(len(data), generator=g)[: n - n % batch_size]
    transform = EvalTransform(data.mean, data.std)
    return [transform(data.images[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]


@torch.no_grad()
def recalibrate_bn(
    net: nn.Module,
    archs: Sequence[Arch],
    data: InMemoryDataset | Iterable[torch.Tensor],
    num_images: int = 2000,
    batch_size: int = 200,
    seed: int = 0,
) -> nn.Module:
    """Reset all :class:`SlicedBatchNorm2d` statistics and recompute them for every arch in ``archs``.

    ``data``: an in-memory dataset (a seeded subset of ``num_images`` is taken and eval-
    preprocessed) or an iterable of ready, eval-preprocessed image batches, or of ``(images, labels)``
    (e.g. a few batches of an image folder; then ``num_images``/``batch_size`` are not used). Only the BatchNorm layers run in
    train mode (dropout stays off). Momentum and the train/eval mode of every module are
    restored afterwards. Returns ``net``.
    """
    if isinstance(data, InMemoryDataset):
        batches = recal_batches(data, num_images, batch_size, seed)
    else:
        batches = [b[0] if isinstance(b, tuple | list) else b for b in data]
    if not batches:
        raise ValueError("recalibration got no images")
    bns = [m for m in net.modules() if isinstance(m, SlicedBatchNorm2d)]
    modes = {m: m.training for m in net.modules()}
    momenta = [bn.momentum for bn in bns]
    device = next(net.parameters()).device
    try:
        net.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
            bn.train()
        with Progress(len(archs) * len(batches), "BN recalibration", unit="batch") as bar:
            for arch in archs:
                for x in batches:
                    net(x.to(device, non_blocking=True), arch)
                    bar.update()
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return net


def bn_statistics(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the running mean and variance of every :class:`SlicedBatchNorm2d` in ``net``, by
    state-dict name: what a recalibration produced, to keep for one subnet (see
    :class:`dynaslice.budget.BudgetNet`, which gives each budget entry statistics of its own)."""
    return {
        f"{name}.{k}": getattr(m, k).detach().clone()
        for name, m in net.named_modules()
        if isinstance(m, SlicedBatchNorm2d)
        for k in ("running_mean", "running_var")
    }
