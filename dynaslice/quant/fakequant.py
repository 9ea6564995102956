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

:class:`DistillTrainer` fine-tunes the fake-quantized student by distillation from the
full-precision network (:func:`kd_loss`) on calibration images (:class:`~.calibration.SourceBatches`),
on dynaslice's training engine: checkpoints, exact resume and metrics come with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..seeding import derive_seed
from ..train.config import Config, OptimConfig
from ..train.model import Batches, ModelTrainer
from .calibration import UNLABELLED, CalibrationSource, SourceBatches
from .fdda import check_same_run, fingerprint

__all__ = [
    "ActQuant",
    "DistillConfig",
    "DistillTrainer",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_ranges",
    "distill_config",
    "fake_quant",
    "kd_loss",
    "observe_ranges",
    "quantize_model",
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


# --------------------------------------------------------------------------- fine-tuning


@torch.no_grad()
def calibrate_ranges(student: nn.Module, batches: Batches) -> None:
    """Set the activation ranges: one forward pass per batch of ``batches`` (epoch 0) inside
    :func:`observe_ranges`, the student in eval mode (the official range period runs un-augmented
    generator output through it)."""
    if len(batches) < 1:
        raise ValueError("range calibration needs at least one batch")
    training = student.training
    student.eval()
    device = _device(student)
    try:
        with observe_ranges(student):
            for x, _ in batches.epoch_batches(0, 0):
                student(x.to(device))
    finally:
        student.train(training)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation fine-tuning of a fake-quantized student (official values unless noted).

    ``range_steps`` un-augmented batches set the activation ranges first (official: the first 4
    of 400 epochs); then every step takes ``batch_size`` images of each calibration source
    (augmented when ``augment``), ``steps_per_epoch`` steps per epoch, and minimises
    :func:`kd_loss` with ``temperature`` and ``alpha``. The optimizer and its schedule are the
    run config's ``optim`` section: :func:`distill_config` sets the official ones.
    """

    range_steps: int = 100
    batch_size: int = 16
    steps_per_epoch: int = 100
    temperature: float = 20.0
    alpha: float = 20.0
    augment: bool = True


def distill_config(base: Config | None = None, epochs: int = 2, lr: float = 1e-6) -> Config:
    """``base`` (default: the defaults) set up for :class:`DistillTrainer`: the official student
    optimizer -- SGD, Nesterov momentum 0.9, weight decay 1e-4, ``lr`` -- with a cosine schedule to
    zero and no warm-up, ``epochs`` epochs, and no validation split (the fine-tuning is data-free;
    evaluate the result yourself). The official ``lr = 1e-6`` looks tiny but meets a loss scaled by
    ``alpha * T^2 = 8000`` (docs/QUANT.md)."""
    base = base or Config()
    optim = OptimConfig(name="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return dataclasses.replace(
        base,
        optim=optim,
        data=dataclasses.replace(base.data, val_size=0),
        train=dataclasses.replace(base.train, epochs=epochs, eval_every_epochs=0),
    ).validate()


def _bit_widths(model: nn.Module) -> list[int]:
    return [m.weight_bits if isinstance(m, (QuantConv2d, QuantLinear)) else m.bits
            for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear, ActQuant))]  # fmt: skip


class DistillTrainer(ModelTrainer):
    """KD fine-tuning of a fake-quantized ``student`` from a frozen full-precision ``teacher`` on
    batches of calibration ``sources`` (e.g. FDDA's generator and the few real images), on the
    training engine.

    :meth:`fit` first sets the student's activation ranges (:meth:`calibrate`, unless already
    done or the run resumed past step 0), then trains with :func:`kd_loss`; images without a
    label (noise) take the teacher's class. The student trains in eval mode (BatchNorm on its
    running statistics, as the official code keeps it); the teacher is a frozen copy (the
    caller's module is not touched). ``cfg``: see :func:`distill_config`. A resume must continue
    with the same settings, bit widths, teacher and sources (checked).
    """

    name = "distill"
    rng_name = "distill-step"
    train_mode = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        sources: Sequence[CalibrationSource],
        cfg: Config,
        run_dir: str | Path,
        distill: DistillConfig = DistillConfig(),
        epochs: int | None = None,
    ):
        seed = cfg.train.seed
        batches = SourceBatches(sources, distill.batch_size, distill.steps_per_epoch, seed, distill.augment)
        super().__init__(student, cfg, run_dir, epochs, batches)
        self.distill, self.ranges_set = distill, False
        self.ranges = SourceBatches(sources, distill.batch_size, max(distill.range_steps, 1),
                                    derive_seed("ranges", seed), augment=False)  # fmt: skip
        self.teacher = copy.deepcopy(teacher).to(self.device).eval().requires_grad_(False)

    def calibrate(self) -> None:
        """Set the activation ranges on ``range_steps`` un-augmented batches (0: keep them as they are)."""
        if self.distill.range_steps > 0:
            calibrate_ranges(self.model, self.ranges)
        self.ranges_set = True

    def fit(self) -> Any:
        if self.step == 0 and not self.ranges_set:
            self.calibrate()
        return super().fit()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        y = torch.where(y == UNLABELLED, target.argmax(1), y)
        return kd_loss(self.model(x), target, y, self.distill.temperature, self.distill.alpha)

    def _identity(self) -> dict[str, Any]:
        return {
            "distill": dataclasses.asdict(self.distill),
            "bits": _bit_widths(self.model),
            "teacher": fingerprint(self.teacher.state_dict().values()),
            "sources": self.train_loader.describe(),
        }

    def extra_state(self) -> dict[str, Any]:
        return self._identity()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        check_same_run(self.run_dir, state, self._identity(), "distillation settings, bit widths, teacher or sources")
