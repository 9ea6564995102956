"""Fake quantization at low bit widths (W4A4 and the like), as FDDA/GDFQ/ZeroQ simulate it.

This is the *simulation* path, where FDDA's accuracy gains show (4 bits); int8 deployment on
onnxruntime is :mod:`dynaslice.quant.ptq`. The scheme is the official code's
(``quantization_utils/quant_modules.py``, inherited from ZeroQ):

- **weights**: per output channel, asymmetric, range = that channel's current min/max, recomputed
  every forward (so fine-tuning moves the grid with the weights);
- **activations**: per tensor, asymmetric, after every activation function (ReLU, ...), with a
  range that is an exponential moving average (``beta = 0.9``, started at zero) of batch min/max,
  updated only inside :func:`observe_ranges` and frozen otherwise;
- rounding passes gradients straight through (STE); BatchNorm stays unfolded and in float.

``quantize_model(model, 4, 4)`` is W4A4; ``first_last_bits=8`` keeps the first and last weight
layers and the activations after the first and before the last at 8 bits (the paper's "F8L8").
The model must be traceable by ``torch.fx`` (an extracted dynaslice subnet already is a
GraphModule); every *call* of an activation gets its own quantizer, so a ReLU module called twice
(ResNet blocks do) has two ranges.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "ActQuant",
    "FinetuneConfig",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_ranges",
    "fake_quant",
    "finetune",
    "kd_loss",
    "observe_ranges",
    "quantize_model",
    "random_resized_crop_flip",
]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu)


def fake_quant(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Asymmetric uniform quantize-dequantize of ``x`` to ``2**bits`` levels spanning ``[lo, hi]``.

    ``lo``/``hi`` broadcast against ``x`` (per channel: shape ``[C, 1, 1, 1]``). The grid's zero
    point is rounded (ZeroQ's ``asymmetric_linear_quantization_params``), values outside the range
    are clamped, and the gradient passes straight through to ``x`` unchanged.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bit width must be in 1..16, got {bits}")
    levels = 2**bits - 1
    scale = levels / torch.clamp(hi - lo, min=1e-8)
    zero = torch.round(scale * lo)
    q = torch.clamp(torch.round(scale * x - zero), 0, levels)
    xq = (q + zero) / scale
    return x + (xq - x).detach()


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized per output channel to ``weight_bits``."""

    def __init__(self, *args, weight_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_bits = weight_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = w.detach().flatten(1)
        shape = (-1,) + (1,) * (w.dim() - 1)
        wq = fake_quant(w, self.weight_bits, flat.min(1).values.view(shape), flat.max(1).values.view(shape))
        return self._conv_forward(x, wq, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized per output row to ``weight_bits``."""

    def __init__(self, *args, weight_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_bits = weight_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.detach()
        wq = fake_quant(
            self.weight, self.weight_bits, flat.min(1).values[:, None], flat.max(1).values[:, None]
        )
        return F.linear(x, wq, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}"


class ActQuant(nn.Module):
    """Per-tensor activation fake-quantizer with an EMA range (``beta``, started at zero).

    The range is updated from each batch's min/max only while ``observing`` is on -- set it for a
    block with :func:`observe_ranges`, which is how the official code's ``unfix()``/``fix()``
    periods read here.
    """

    def __init__(self, bits: int, beta: float = 0.9):
        super().__init__()
        self.bits, self.beta, self.observing = bits, beta, False
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                self.lo.mul_(self.beta).add_((1 - self.beta) * x.min())
                self.hi.mul_(self.beta).add_((1 - self.beta) * x.max())
        return fake_quant(x, self.bits, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{self.lo.item():.4g}, {self.hi.item():.4g}]"


@contextlib.contextmanager
def observe_ranges(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every :class:`ActQuant` of ``model`` updates its EMA range on each forward."""
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in quants:
        q.observing = True
    try:
        yield model
    finally:
        for q in quants:
            q.observing = False


def _quant_layer(module: nn.Module, bits: int) -> nn.Module:
    """A fake-quant copy of a Conv2d or Linear (same weights, same device and dtype)."""
    if isinstance(module, nn.Conv2d):
        q = QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, weight_bits=bits,
        )  # fmt: skip
    else:
        q = QuantLinear(module.in_features, module.out_features, module.bias is not None, weight_bits=bits)
    q = q.to(module.weight.device, module.weight.dtype)
    q.load_state_dict(module.state_dict())
    q.train(module.training)
    return q


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATIONS)
    return node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS


def quantize_model(
    model: nn.Module, weight_bits: int = 4, act_bits: int = 4, first_last_bits: int | None = None
) -> fx.GraphModule:
    """A fake-quantized copy of ``model`` (``model`` itself is not changed).

    Every ``nn.Conv2d``/``nn.Linear`` call becomes a :class:`QuantConv2d`/:class:`QuantLinear` at
    ``weight_bits``; every activation call (``ReLU``, ``ReLU6``, ``SiLU``, ``Hardswish``, ``GELU``,
    module or function) is followed by an :class:`ActQuant` at ``act_bits``. The network input is
    not quantized (as in the official code). With ``first_last_bits``, the first and last weight
    layers and the first and last activation quantizers use that width instead. The ranges start
    empty: run calibration batches inside :func:`observe_ranges` before use.
    """
    gm = copy.deepcopy(model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model))
    layers = [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))
    ]  # fmt: skip
    acts = [n for n in gm.graph.nodes if _is_activation(gm, n)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    ends = {id(layers[0]), id(layers[-1]), id(acts[0]) if acts else None, id(acts[-1]) if acts else None}

    def bits(node: fx.Node, default: int) -> int:
        return first_last_bits if first_last_bits is not None and id(node) in ends else default

    for node in layers:
        parent, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        if len(node.graph.find_nodes(op="call_module", target=node.target)) > 1:
            raise ValueError(f"{node.target!r} is called more than once; its weight cannot take one grid")
        setattr(owner, name, _quant_layer(gm.get_submodule(node.target), bits(node, weight_bits)))
    for i, node in enumerate(acts):
        qname = f"act_quant_{i}"
        gm.add_submodule(qname, ActQuant(bits(node, act_bits)).to(_device(gm)))
        with gm.graph.inserting_after(node):
            qnode = gm.graph.call_module(qname, (node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
    gm.graph.lint()
    gm.recompile()
    return gm


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 20.0,
    alpha: float = 20.0,
) -> torch.Tensor:
    """The official student loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + CE(s, labels)``.

    KL is ``batchmean``-reduced (``nn.KLDivLoss(reduction='batchmean')``); the official defaults
    are ``T = alpha = 20``.
    """
    kl = F.kl_div(
        F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="batchmean"
    )
    return alpha * temperature**2 * kl + F.cross_entropy(student, labels)


# --------------------------------------------------------------------------- fine-tuning pieces


def random_resized_crop_flip(
    x: torch.Tensor,
    rng: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) and
    horizontal flip, resampled bilinearly to the input size: the official augmentation of
    synthetic images (``RandomResizedCrop(scale=(0.5, 1.0))`` + ``RandomHorizontalFlip``),
    seeded by ``rng`` and vectorised with ``affine_grid``."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=rng)
    aspect = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=rng).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(n, generator=rng) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=rng) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=rng) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _draw(
    sources: Sequence, n: int, rng: torch.Generator, teacher: nn.Module, augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: ``n`` images from every source, concatenated; a source without labels (noise)
    takes the teacher's predictions."""
    device = _device(teacher)
    images, labels = [], []
    for source in sources:
        x, y = source.sample(n, rng)
        x = x.to(device)
        if augment:
            x = random_resized_crop_flip(x, rng)
        if y is None:
            with torch.no_grad():
                y = teacher(x).argmax(1)
        images.append(x)
        labels.append(y.to(device))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def calibrate_ranges(
    student: nn.Module,
    teacher: nn.Module,
    sources: Sequence,
    steps: int,
    batch_size: int,
    rng: torch.Generator,
) -> None:
    """Set the activation ranges: ``steps`` forward passes over fresh batches inside
    :func:`observe_ranges` (un-augmented, as the official range period sees generator output)."""
    if steps < 1:
        raise ValueError(f"range calibration needs at least one step, got {steps}")
    with observe_ranges(student):
        for _ in range(steps):
            student(_draw(sources, batch_size, rng, teacher, augment=False)[0])


@dataclass(frozen=True)
class FinetuneConfig:
    """Distillation fine-tuning of the fake-quantized student (official values unless noted).

    ``calib_steps`` range-observation steps (official: the first 4 of 400 epochs), then ``steps``
    of SGD (Nesterov, momentum 0.9, weight decay 1e-4) on :func:`kd_loss` with a cosine schedule
    to zero over ``steps`` (official: a 20 000-step cosine period). The official ``lr = 1e-6``
    looks tiny but meets a loss scaled by ``alpha * T^2 = 8000``; it transfers (docs/QUANT.md).
    """

    steps: int = 500
    calib_steps: int = 100
    batch_size: int = 16
    lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 20.0
    alpha: float = 20.0
    augment: bool = True


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    sources: Sequence,
    cfg: FinetuneConfig = FinetuneConfig(),
    seed: int = 0,
) -> nn.Module:
    """Calibrate ``student``'s activation ranges, then fine-tune it by distillation from ``teacher``.

    ``calib_steps=0`` keeps the ranges as they are (set earlier with :func:`calibrate_ranges`).
    Each step draws ``batch_size`` images from every source (e.g. FDDA's generator and the real
    images). The student stays in eval mode throughout (BatchNorm on its running statistics, as
    the official code keeps it); the teacher is frozen. Returns ``student`` (trained in place).
    TEMPORARY loop, to move onto dynaslice's training engine; the method is :func:`kd_loss`,
    :func:`calibrate_ranges` and :func:`random_resized_crop_flip`.
    """
    rng = torch.Generator().manual_seed(seed)
    teacher.eval()
    student.eval()
    if cfg.calib_steps:
        calibrate_ranges(student, teacher, sources, cfg.calib_steps, cfg.batch_size, rng)
    if cfg.steps == 0:
        return student
    opt = torch.optim.SGD(
        student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    for _ in range(cfg.steps):
        x, y = _draw(sources, cfg.batch_size, rng, teacher, cfg.augment)
        with torch.no_grad():
            target = teacher(x)
        loss = kd_loss(student(x), target, y, cfg.temperature, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student
