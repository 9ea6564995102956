"""The EMA teacher of In-place Bootstrapping: an exponential moving average of the supernet.

Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``. Buffers
(the per-width BatchNorm statistics) are averaged too (``use_buffers=True``, as timm's model EMA
does), because the teacher runs in eval mode and needs running statistics that match its
averaged weights. Its integer counters (``num_batches_tracked``) are meaningless there and
unused in eval mode.
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay_for(decay: float, half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay: ``decay`` as given, or the one whose half-life is ``half_life_epochs``.

    The ImageNet recipe's 0.997 per step is a half-life of ~231 steps, ~0.09 epoch at 2502
    steps per epoch. A short run with few steps per epoch keeps the teacher's horizon in
    *epochs* by setting the half-life directly: ``decay = 0.5 ** (1 / (h * steps_per_epoch))``.
    """
    if half_life_epochs <= 0:
        return decay
    return 0.5 ** (1.0 / max(1.0, half_life_epochs * steps_per_epoch))


def half_life_steps(decay: float) -> float:
    """Steps after which an old weight's share in the average has halved."""
    if decay >= 1:
        return math.inf
    return math.log(0.5) / math.log(decay) if decay > 0 else 0.0


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (the unwrapped net, not its DDP wrapper), in eval mode.

    Call ``ema.update_parameters(model)`` after every optimizer step; run the teacher as
    ``ema.module(x, arch)``. The first update copies the weights; later ones average.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema.eval()
