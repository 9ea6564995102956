"""Targets: what each subnet of a training step learns from.

One step runs several subnets (see :mod:`.samplers`). A target decides each one's loss:

- :class:`LabelsTarget`: every subnet learns the labels (cross-entropy, label smoothing).
- :class:`InplaceDistillTarget` (US-Nets): the largest learns the labels; the others match the
  largest subnet's *detached* softmax of this very step (soft cross-entropy). The largest must
  run first.
- :class:`IBTarget` (In-place Bootstrapping, DS-Net++; the default): the largest learns the
  labels; the others match the softmax of an EMA copy of the supernet run as its largest
  subnet (the *teacher*, see :mod:`.ema`). A slowly moving teacher is steadier than the
  student's own largest subnet early in training.
- :class:`IEBTarget` (In-place Ensemble Bootstrapping, DS-Net): as IB, but the smallest subnet
  matches the mean of the teacher's probabilities for the largest *and for the same random
  subnets the student trains in this step* (the original drew fresh random ones: fixed here).
- :class:`FrozenTeacherTarget` (once-for-all, DϵpS): a trained network, frozen, teaches every
  subnet; the others' loss ramps up over the first steps. For supernets started from a trained
  network (:func:`dynaslice.train.init.init_from`).

Multi-view consistency (MvCo, DS-Net++) is an option of every target. The batch then holds
``views`` augmented copies of each image, view-major (``[view0 batch, view1 batch]``), and every
soft target is mixed across views: the target of view ``v`` is
``(1 - w) * p_v + w * mean_{u != v} p_u`` with ``w = view_weight``. The default ``w = 0.5``
gives, with two views, the teacher's prediction averaged over both views for either view (the
method as stated); ``w = 0`` keeps per-view targets (plain IB on twice the data: the ablation).
Label losses stay per view. Soft targets use temperature ``T`` and the loss is scaled by
``T^2`` (Hinton et al.) so gradient sizes do not depend on ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..config_base import ConfigError
from ..registry import Registry
from ..space import Arch, SearchSpace
from .config import Config, ConfigCheck, register_check

Teacher = Callable[[torch.Tensor, Arch], torch.Tensor]
"""``teacher(x, arch) -> logits``; called under ``torch.no_grad()``."""


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-sum_k p_k log softmax(logits / T)_k``, averaged over the batch, times ``T^2``."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(probs * log_q).sum(-1).mean() * temperature**2


def mix_views(probs: torch.Tensor, views: int, weight: float) -> torch.Tensor:
    """Mix view-major probabilities ``[views * B, K]`` across views (see the module docstring)."""
    if views == 1 or weight == 0:
        return probs
    p = probs.view(views, -1, probs.shape[-1])
    others = (p.sum(0, keepdim=True) - p) / (views - 1)
    return ((1 - weight) * p + weight * others).reshape(probs.shape)


class StepTargets:
    """The targets of one step: ``loss(arch, logits)`` for each subnet as it runs.

    ``soft`` maps an arch to its soft target; ``default`` is the soft target of every other
    arch except the largest (which learns the labels); ``None`` means labels.
    """

    def __init__(
        self,
        target: Target,
        labels: torch.Tensor,
        largest: Arch,
        soft: dict[Arch, torch.Tensor] | None = None,
        default: torch.Tensor | None = None,
        from_largest: bool = False,
    ):
        self.target, self.labels, self.largest = target, labels, largest
        self.soft = soft or {}
        self.default = default
        self.from_largest = from_largest

    def loss(self, arch: Arch, logits: torch.Tensor) -> torch.Tensor:
        t = self.target
        if arch in self.soft:
            return soft_cross_entropy(logits, self.soft[arch], t.temperature)
        if arch == self.largest or (self.default is None and not self.from_largest):
            loss = F.cross_entropy(logits.float(), self.labels, label_smoothing=t.label_smoothing)
            if self.from_largest and arch == self.largest:
                probs = F.softmax(logits.detach().float() / t.temperature, dim=-1)
                self.default = mix_views(probs, t.views, t.view_weight)
            return loss
        if self.default is None:
            raise RuntimeError("in-place distillation needs the largest subnet to run first in every step")
        return soft_cross_entropy(logits, self.default, t.temperature)


# --------------------------------------------------------------------------- the registry

T = TypeVar("T", bound="type[Target]")


@dataclass(frozen=True)
class _Target:
    cls: type[Target]
    check: ConfigCheck | None


_TARGETS: Registry[_Target] = Registry("target")


def register_target(name: str, *, check: ConfigCheck | None = None) -> Callable[[T], T]:
    """Register a :class:`Target` subclass under ``name`` (the value of ``train.target``; it
    becomes the class's ``name``), built as ``cls(space, label_smoothing=, temperature=, views=,
    view_weight=, ...)``. ``check(cfg)``: the target's own rules between config keys, run by
    every :meth:`Config.validate` whose ``train.target`` is ``name`` (as samplers register theirs).
    """

    def register(cls: T) -> T:
        _TARGETS.add(name, _Target(cls, check))
        cls.name = name
        return cls

    return register


def target_names() -> tuple[str, ...]:
    return _TARGETS.names()


def target_run(name: str) -> Callable[..., Any] | None:
    """The whole-run function of target ``name`` (:attr:`Target.run`); None: the supernet trains."""
    entry = _TARGETS.get(name) if name in _TARGETS else None
    return entry.cls.run if entry is not None else None


@register_check
def _check_target(cfg: Config) -> None:
    """``train.target`` names a registered target, and the config meets that target's rules."""
    _TARGETS.check_config(cfg, cfg.train.target, "train.target", ConfigError)


def _check_teacher(cfg: Config) -> None:
    t = cfg.train
    if not (t.init_from or t.phase1_epochs):
        raise ConfigError(
            "train.target=teacher needs a trained network to teach: train.init_from, or train.phase1_epochs > 0"
        )


class Target:
    """Base class: per-step soft targets. Subclasses override :meth:`begin`."""

    name = ""  # the registered name: set by register_target
    uses_teacher = False
    run: Callable[..., Any] | None = None
    """Set by a target that trains networks of its own instead of the supernet (FFSD, DML:
    :mod:`.ffsd`): ``run(cfg, run_dir, resume, env, allow_changes)``, to which
    :func:`~dynaslice.train.supernet.train` hands the whole run."""

    def __init__(
        self,
        space: SearchSpace,
        label_smoothing: float = 0.1,
        temperature: float = 1.0,
        views: int = 1,
        view_weight: float = 0.5,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.space, self.label_smoothing, self.temperature = space, label_smoothing, temperature
        self.views, self.view_weight = views, view_weight

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return mix_views(F.softmax(logits.float() / self.temperature, dim=-1), self.views, self.view_weight)

    def begin(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        archs: Sequence[Arch],
        teacher: Teacher | None = None,
        step: int = 0,
    ) -> StepTargets:
        """Targets for global step ``step``, which runs ``archs`` on ``(x, y)``; teacher forwards
        happen here."""
        return StepTargets(self, y, self.space.largest())

    def _need(self, teacher: Teacher | None) -> Teacher:
        if teacher is None:
            raise ValueError(f"the {self.name!r} target needs a teacher (the EMA model)")
        return teacher

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(T={self.temperature}, views={self.views}, view_weight={self.view_weight})"
        )


@register_target("labels")
class LabelsTarget(Target):
    """Every subnet: cross-entropy with the labels (label smoothing)."""


@register_target("inplace")
class InplaceDistillTarget(Target):
    """Largest: labels. Others: the largest subnet's detached softmax from the same step."""

    def begin(self, x, y, archs, teacher=None, step=0) -> StepTargets:
        largest = self.space.largest()
        if largest in archs and archs[0] != largest:
            raise ValueError("in-place distillation needs the largest subnet first in the step's archs")
        return StepTargets(self, y, largest, from_largest=True)


@register_target("ib")
class IBTarget(Target):
    """Largest: labels. Others: the EMA teacher's softmax, run as its largest subnet."""
    uses_teacher = True

    def begin(self, x, y, archs, teacher=None, step=0) -> StepTargets:
        teacher = self._need(teacher)
        largest = self.space.largest()
        with torch.no_grad():
            default = self._probs(teacher(x, largest))
        return StepTargets(self, y, largest, default=default)


@register_target("ieb")
class IEBTarget(Target):
    """IB, plus: the smallest matches the teacher's mean probabilities over this step's other archs.

    The ensemble is the teacher run as every arch of the step except the smallest (the largest
    and the very random subnets the student trains now, duplicates counted as drawn).
    """
    uses_teacher = True

    def begin(self, x, y, archs, teacher=None, step=0) -> StepTargets:
        teacher = self._need(teacher)
        largest, smallest = self.space.largest(), self.space.smallest()
        soft: dict[Arch, torch.Tensor] = {}
        with torch.no_grad():
            default = self._probs(teacher(x, largest))
            members = [a for a in archs if a != smallest]
            if smallest in archs and members:
                probs = [default if a == largest else self._probs(teacher(x, a)) for a in members]
                soft[smallest] = torch.stack(probs).mean(0)
        return StepTargets(self, y, largest, soft=soft, default=default)


class TeacherStepTargets(StepTargets):
    """One step of :class:`FrozenTeacherTarget`: the teacher's soft target and the ramp weight."""

    def __init__(
        self,
        target: FrozenTeacherTarget,
        labels: torch.Tensor,
        largest: Arch,
        probs: torch.Tensor,
        weight: float,
    ):
        super().__init__(target, labels, largest, default=probs)
        self.weight = weight

    def loss(self, arch: Arch, logits: torch.Tensor) -> torch.Tensor:
        t: FrozenTeacherTarget = self.target  # type: ignore[assignment]
        labels = F.cross_entropy(logits.float(), self.labels, label_smoothing=t.label_smoothing)
        kd = soft_cross_entropy(logits, self.default, t.temperature)  # type: ignore[arg-type]
        if arch == self.largest:
            return labels + kd if t.kd_largest else labels
        return self.weight * (kd + labels if t.label_term else kd)


@register_target("teacher", check=_check_teacher)
class FrozenTeacherTarget(Target):
    """A trained network, frozen in eval mode, teaches every subnet (once-for-all, DϵpS).

    Largest subnet: cross-entropy with the labels (label smoothing), plus the distillation term
    when ``kd_largest``. Every other subnet: soft cross-entropy to the teacher's softmax, plus
    the label term when ``label_term`` (OFA trains with both; US-Nets and AttentiveNAS with
    distillation only), times a weight that ramps linearly from 0 to 1 over the first
    ``ramp_steps`` steps, so the freshly sliced narrow subnets do not drag the shared weights
    away from the trained network at the start (DϵpS).

    ``teacher(x, arch)``: a module (normally :func:`dynaslice.train.init.frozen_copy` of the
    supernet right after :func:`~dynaslice.train.init.init_from`), run as its largest subnet
    under ``torch.no_grad()``. It is put in eval mode and excluded from autograd here, so it can
    neither receive gradients nor update BatchNorm statistics. Unlike IB's EMA teacher it never
    changes.
    """

    def __init__(
        self,
        space: SearchSpace,
        teacher: torch.nn.Module | None = None,
        label_term: bool = False,
        kd_largest: bool = False,
        ramp_steps: int = 0,
        **kwargs,
    ):
        super().__init__(space, **kwargs)
        if teacher is None:
            raise ValueError("the 'teacher' target needs a trained teacher network (set train.init_from)")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.label_term, self.kd_largest, self.ramp_steps = label_term, kd_largest, ramp_steps

    def weight(self, step: int) -> float:
        """The weight of the non-largest subnets' loss at ``step``: 0 -> 1 over ``ramp_steps``."""
        return 1.0 if step >= self.ramp_steps else (step + 1) / (self.ramp_steps + 1)

    def begin(self, x, y, archs, teacher=None, step=0) -> StepTargets:
        largest = self.space.largest()
        self.teacher.eval()
        with torch.no_grad():
            probs = self._probs(self.teacher(x, largest))
        return TeacherStepTargets(self, y, largest, probs, self.weight(step))

    def __repr__(self) -> str:
        return (
            f"FrozenTeacherTarget(T={self.temperature}, label_term={self.label_term}, "
            f"kd_largest={self.kd_largest}, ramp_steps={self.ramp_steps})"
        )


def make_target(name: str, space: SearchSpace, **kwargs) -> Target:
    return _TARGETS.get(name).cls(space, **kwargs)
