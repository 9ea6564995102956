"""The typed training config: dataclasses, YAML presets and ``--set key=value`` overrides.

A run is described by one :class:`Config` (model, data, optim, train sections). Presets live in
``configs/*.yaml`` and only list what differs from the defaults here. Overrides use dotted keys
(``--set optim.lr=0.1 --set train.static_widths=[0.35,0.5]``); values are parsed as YAML, so
lists, ``null`` and booleans work (by :func:`~dynaslice.config_base.load_yaml`, the one reader
of a user's YAML: no aliases, bounded depth and size). An unknown key is an error naming the
closest valid one: a typo must never be silently ignored, or the run trains something else than
you think. Sections owned by one part of the code are defined next to it and aggregated here:
:class:`~dynaslice.train.stage2_settings.Stage2Config`,
:class:`~dynaslice.train.ffsd_settings.FFSDConfig`, :class:`~dynaslice.prune_settings.PruneConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..atomic import atomic_write_bytes
from ..config_base import NON_NEGATIVE, POSITIVE, ConfigError, Rule, between, load_yaml, whole
from ..prune_settings import PruneConfig
from .ffsd_settings import FFSDConfig
from .stage2_settings import Stage2Config

MAX_CONFIG_BYTES = 1 << 20
"""A config file is kilobytes; a larger file is refused unread (it is something else)."""

C = TypeVar("C")
"""A config dataclass: :class:`Config` or a command's own section."""
S = TypeVar("S")


RESUMABLE_CHANGES = frozenset({"optim.lr", "optim.clip_grad_norm"})
"""Keys a resume may change on request (``--allow-change``): what rescues a diverged run."""


@dataclass
class GateConfig:
    """The DS-Net gate (``dynaslice.gate.GatedSupernet``), when ``enabled``.

    Stage I then trains the gated supernet: the gate's attention head is part of it, and the
    dims before the gate are pinned to the routes' one value. ``cut``: the stage the gate sits
    before (``null``: the family default); for a converted network (``model.name`` with a ``:``),
    the module path whose output the gate reads (``layer2``; ``null``: its default cut, see
    :meth:`~dynaslice.models.converted.ConvertedSupernet.default_gate_path`). ``routes``: a
    number k of evenly spread uniform-width routes, or a list of arch dicts (narrowest first).
    ``pre_gate``: widths of the dims before the gate (only with ``routes: k``; the rest stay at
    their largest).
    """

    enabled: bool = False
    cut: int | str | None = None
    routes: int | list[dict[str, int]] = 4
    pre_gate: dict[str, int] = field(default_factory=dict)
    reduction: int = 4


@dataclass
class ModelConfig:
    """Which supernet: a registry name and keyword arguments for ``create_supernet``.

    ``in_chans``, ``num_classes`` and ``input_size`` are filled in from the dataset unless given.
    ``name`` may also name a network to convert with ``make_supernet``
    (:mod:`dynaslice.models.named`): ``torchvision:resnet34``, ``timm:efficientnet_b0`` or your
    own ``package.module:factory``. Its ``kwargs`` then hold ``ratios`` and ``round_to`` (the
    width grid, make_supernet's) and the factory's own keywords; ``input_size`` sizes the example
    input it is traced on. Its gate (``gate.enabled``) sits at a module path (``gate.cut``).
    """

    name: str = "resnet_small"
    kwargs: dict[str, Any] = field(default_factory=dict)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class DataConfig:
    """The dataset and its batches.

    ``name``: fashion_mnist, cifar10, cifar100 (in memory, exact resume), ``synthetic`` (random
    class patterns, for tests and smoke runs), ``folder`` (ImageNet layout under ``root``) or
    ``text`` (a corpus of documents in fortune's format under ``root``, byte tokens in blocks of
    ``seq_len``, for ``hf:`` language models: :mod:`dynaslice.lm.data`).
    ``val_size`` images are held out of the training split (stratified, seeded) for every
    decision made during development; ``train_size`` > 0 trains on a stratified subset of the
    rest. ``batch_size`` is per process: the global batch is ``batch_size * world_size``.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    batch_size: int = 128
    val_size: int = 5000
    train_size: int = 0
    crop_padding: int | None = None
    hflip: bool = True
    image_size: int = 224  # folder datasets: crop size; synthetic: side length
    workers: int = 4  # folder datasets only
    synthetic_classes: int = 10
    synthetic_channels: int = 1
    synthetic_train: int = 512
    synthetic_test: int = 256
    seq_len: int = 128  # text: tokens per training block


@dataclass
class OptimConfig:
    """Optimizer and per-iteration schedule: linear warm-up, then cosine to ``min_lr``.

    Weight decay applies to conv and linear weights only (never norms or biases).
    ``clip_grad_value`` clips each gradient entry, then ``clip_grad_norm`` the total norm (the
    norm before clipping goes to ``metrics.jsonl`` as ``grad_norm``: how often the clip bites).
    """

    name: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None  # AttentiveNAS clips each gradient entry to +-1.0


@dataclass
class PSSConfig:
    """PSS-Net (``train.sampler: pss``, see :mod:`dynaslice.train.pss`).

    ``metric``: ``macs`` (analytic) or ``latency`` (``latency_table``: a JSON file made by
    ``dynaslice profile MODEL --latency-table PATH``); ``bucket_step`` in MMACs or ms. Each
    step runs ``train.num_subnets - 2`` pool subnets. ``p_e``/``t_e``: start and end of the
    exponential schedules. ``select_top_k``: the highest-scored subnets of each pool evaluated
    on the validation split at the end (the best becomes the bucket's entry of the budget table).
    """

    metric: str = "macs"
    bucket_step: float = 2.0
    pool_size: int = 50
    p_e: list[float] = field(default_factory=lambda: [1.0, 0.01])
    t_e: list[float] = field(default_factory=lambda: [1.0, 0.01])
    estimate_samples: int = 20000
    select_top_k: int = 3
    latency_table: str | None = None


@dataclass
class TrainConfig:
    """The Stage-I recipe: which subnets each step runs and what each of them learns from.

    - ``sampler``: ``sandwich`` (largest, smallest, ``num_subnets - 2`` random), ``fixed``
      (``fixed_width``: one uniform-width subnet, a static network) or ``pss`` (PSS-Net's
      prioritized pools, ``num_subnets - 2`` of them per step; see ``pss``).
    - ``target``: ``labels`` | ``inplace`` (in-place distillation from the largest) | ``ib``
      (in-place bootstrapping from an EMA teacher, the default) | ``ieb`` (IB, and the smallest
      learns from the EMA ensemble of the largest and this step's random subnets).
    - ``mvco``: two augmented views per image; each subnet's soft target mixes the teacher's
      predictions on both views with ``mvco_weight`` on the other view (0.5 = plain average).
    - ``ema_decay`` is per step; ``ema_half_life_epochs`` > 0 replaces it by the decay whose
      half-life is that fraction of an epoch (how to scale the ImageNet 0.997, a half-life of
      about 0.09 epoch, to runs with far fewer steps per epoch).
    - ``static_widths``: train one ordinary network per uniform width instead (the baseline);
      each gets its own sub-directory and the labels target.
    - ``init_from``: start from a trained network (:func:`dynaslice.train.init.init_from`: a
      static run, a checkpoint, a .safetensors file or ``torchvision:<Weights.NAME>``; a
      network without a gate goes into a gated supernet's backbone, its new gate's attention
      head starting near the identity); ``order_channels`` then sorts every sliced dimension
      by channel importance (:mod:`dynaslice.ordering`). ``target: teacher`` makes that network, frozen, the teacher of
      every subnet (``teacher_label_term``: the others also learn the labels;
      ``teacher_kd_largest``: the largest also distils; ``kd_ramp_epochs``: the others' loss
      weight ramps from 0 to 1 over that many epochs).
    - ``phase1_epochs``: without ``init_from``, first train the largest network alone for that
      many of the ``epochs`` (in ``RUN/phase1``, at ``phase1_lr``, default ``optim.lr``), then the
      supernet for the rest, started from it (``init_from`` set to it): OFA's progressive
      shrinking and DepS train the full network first.
    - ``zero_init_last_bn``: zero the last BatchNorm gamma of every residual branch at init.
    """

    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads, when set
    sampler: str = "sandwich"
    num_subnets: int = 4
    sandwich_uniform: bool = False  # random subnets among the uniform-width ones only
    fixed_width: float = 1.0
    target: str = "ib"
    label_smoothing: float = 0.1
    temperature: float = 1.0
    mvco: bool = False
    mvco_weight: float = 0.5
    ema_decay: float = 0.997
    ema_half_life_epochs: float = 0.0
    dropout_largest_only: bool = True
    amp: bool = True  # CUDA only; ignored on CPU
    ckpt_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    log_every_steps: int = 20
    eval_every_epochs: int = 1  # 0: only after the last epoch
    eval_widths: list[float] = field(default_factory=lambda: [0.35, 0.5, 0.75, 1.0])
    recal_images: int = 2000
    recal_batch_size: int = 200
    static_widths: list[float] = field(default_factory=list)
    init_from: str | None = None
    order_channels: bool = False
    teacher_label_term: bool = False
    teacher_kd_largest: bool = False
    kd_ramp_epochs: float = 0.0
    zero_init_last_bn: bool = False
    phase1_epochs: int = 0
    phase1_lr: float | None = None
    pss: PSSConfig = field(default_factory=PSSConfig)
    ffsd: FFSDConfig = field(default_factory=FFSDConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check every value's range, the choices and the rules between keys; returns self (calls chain).

        Everything that can be checked without the data or the model is checked here, before
        anything is written: a bad value must fail in the first second, not after training
        (checks against the data and the model follow as soon as those exist: the dataset
        sizes in :func:`dynaslice.train.data.load_split`, widths and input size when the
        trainer builds the net). Each error is one line naming the key, the value and the rule.
        """
        for key, value in _leaves(self):
            if not _finite(value):
                raise ConfigError(
                    f"{key}={value!r} holds a number that is not finite (nan, inf, or beyond float32's "
                    f"{FLOAT32_MAX:.3g}); give a finite value"
                )
        for key, (ok, rule) in self._ranges():
            value = _get(self, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key}={value!r} is out of range: {rule}")
        self._check_choices()
        self._check_combinations()
        for f in dataclasses.fields(self):  # a section's own rules live with it (a ``check(cfg)`` method)
            section_check = getattr(getattr(self, f.name), "check", None)
            if section_check is not None:
                section_check(self)
        for check in _CHECKS:
            check(self)
        return self

    def _ranges(self) -> list[tuple[str, Rule]]:
        """The ranges of this module's keys, then those each section defined elsewhere lists as
        its ``RANGES``, under the section's name."""
        ranges = list(_RULES.items())
        for f in dataclasses.fields(self):
            section_ranges = getattr(getattr(self, f.name), "RANGES", {})
            ranges += [(f"{f.name}.{key}", rule) for key, rule in section_ranges.items()]
        return ranges

    def _check_choices(self) -> None:
        t, o, d = self.train, self.optim, self.data
        choices = {
            "train.device": (t.device, ("auto", "cpu", "cuda")),
            "optim.name": (o.name, ("sgd", "adamw")),
            "data.name": (d.name, ("fashion_mnist", "cifar10", "cifar100", "synthetic", "folder", "text")),
            "train.pss.metric": (t.pss.metric, ("macs", "latency")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")

    def _check_combinations(self) -> None:
        """Rules that tie two or more keys together."""
        t, o, d, g = self.train, self.optim, self.data, self.model.gate
        if o.name == "sgd" and o.nesterov and o.momentum == 0:
            raise ConfigError("optim.momentum=0 does not go with optim.nesterov=true: set a momentum > 0 or nesterov: false")
        if o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the schedule decays to min_lr; lower it")
        if o.warmup_epochs > t.epochs:
            raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} is longer than train.epochs={t.epochs}; shorten it")
        if t.phase1_epochs and (t.init_from or t.static_widths or not 0 < t.phase1_epochs < t.epochs):
            raise ConfigError(
                f"train.phase1_epochs={t.phase1_epochs} must lie in 1..train.epochs-1 ({t.epochs - 1}) and goes "
                "without train.init_from and train.static_widths (it trains the network init_from would load)"
            )
        if g.enabled and isinstance(g.routes, int) and g.routes < 2:
            raise ConfigError(f"model.gate.routes={g.routes} is out of range: give >= 2 (or a list of archs)")
        if g.enabled and not isinstance(g.routes, int) and g.pre_gate:
            raise ConfigError("model.gate.pre_gate goes with routes=<k>; explicit routes already fix those dims")
        if t.mvco and d.name == "folder":
            raise ConfigError(
                "train.mvco needs an in-memory dataset (two views per batch); folder data is not supported yet"
            )
        if d.name == "synthetic":
            size = (d.synthetic_train + d.synthetic_test + d.synthetic_classes) * d.synthetic_channels * d.image_size**2
            if size > _SYNTHETIC_BYTES:
                raise ConfigError(
                    f"data.synthetic_* and data.image_size ask for {size / 2**30:.0f} GiB of synthetic images "
                    f"(at most {_SYNTHETIC_BYTES // 2**30} GiB); the synthetic dataset is for tests and smoke runs"
                )


# --------------------------------------------------------------------------- registered rules

ConfigCheck = Callable[[Config], None]
_CHECKS: list[ConfigCheck] = []


def register_check(check: ConfigCheck) -> ConfigCheck:
    """Add ``check(cfg)`` (raises :class:`ConfigError`) to every :meth:`Config.validate`.

    The one way a registry adds the rules of what it registers, so that this module names no
    method: the samplers' registry checks ``train.sampler`` and runs the chosen sampler's own
    ``check`` (:func:`~dynaslice.train.samplers.register_sampler`), the targets' registry likewise
    for ``train.target``, the pruning registry checks ``prune.method``. Every registry lives in a
    module ``dynaslice.train`` or the CLI imports, so its checks are in place before any config
    is validated.
    """
    _CHECKS.append(check)
    return check


# --------------------------------------------------------------------------- value ranges

_SYNTHETIC_BYTES = 2**31
MAX_SUBNETS = 32
"""More subnets per step than this is a typo, not a recipe (DS-Net and PSS-Net use 4)."""
MAX_THREADS = 1024
"""More CPU threads than any machine has (torch crashes on some huge counts instead of refusing)."""


_BN_BATCH = whole(2, " (BatchNorm statistics need two or more images per batch)")
_RATIOS = ((lambda ws: all(0 < w <= 1 for w in ws)), "use width ratios in (0, 1]")
_PAIR = ((lambda v: len(v) == 2 and min(v) > 0), "use [start, end], both > 0")

_RULES: dict[str, Rule] = {
    "model.gate.cut": (
        (lambda v: isinstance(v, str) or v >= 0),
        "use a stage number >= 0, or a module path for a converted network",
    ),
    "model.gate.reduction": whole(1),
    "model.gate.pre_gate": ((lambda v: all(w >= 1 for w in v.values())), "use widths >= 1"),
    "data.batch_size": _BN_BATCH,
    "data.val_size": whole(0, " (0: no validation split)"),
    "data.train_size": whole(0, " (0: all remaining training images)"),
    "data.crop_padding": whole(0),
    "data.image_size": whole(1),
    "data.workers": whole(0),
    "data.synthetic_classes": whole(1),
    "data.synthetic_channels": whole(1),
    "data.synthetic_train": whole(1),
    "data.synthetic_test": whole(1),
    "data.seq_len": whole(1),
    "optim.lr": POSITIVE,
    "optim.momentum": between(0, 1, hi_open=True),
    "optim.betas": ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)), "use [beta1, beta2], each in [0, 1)"),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.warmup_start_factor": between(0, 1, lo_open=True),
    "optim.min_lr": NON_NEGATIVE,
    "optim.clip_grad_norm": (POSITIVE[0], "use a value > 0, or null for no clipping"),
    "train.epochs": whole(1),
    "train.phase1_epochs": whole(0, " (0: no first phase)"),
    "train.phase1_lr": (POSITIVE[0], "use a value > 0, or null for optim.lr"),
    "train.kd_ramp_epochs": NON_NEGATIVE,
    "optim.clip_grad_value": (POSITIVE[0], "use a value > 0, or null for no clipping"),
    "train.threads": ((lambda v: 1 <= v <= MAX_THREADS), f"use a whole number in [1, {MAX_THREADS}], or null for torch's default"),
    "train.num_subnets": ((lambda v: 1 <= v <= MAX_SUBNETS), f"use a whole number in [1, {MAX_SUBNETS}]"),
    "train.fixed_width": between(0, 1, lo_open=True),
    "train.label_smoothing": between(0, 1, hi_open=True),
    "train.temperature": POSITIVE,
    "train.mvco_weight": between(0, 1),
    "train.ema_decay": between(0, 1),
    "train.ema_half_life_epochs": (NON_NEGATIVE[0], "use a value >= 0 (0: train.ema_decay per step)"),
    "train.ckpt_every_steps": whole(0, " (0: only at the end of each epoch)"),
    "train.keep_checkpoints": whole(1),
    "train.log_every_steps": whole(1),
    "train.eval_every_epochs": whole(0, " (0: only after the last epoch)"),
    "train.eval_widths": _RATIOS,
    "train.recal_images": _BN_BATCH,
    "train.recal_batch_size": _BN_BATCH,
    "train.static_widths": _RATIOS,
    "train.pss.bucket_step": POSITIVE,
    "train.pss.pool_size": whole(1),
    "train.pss.p_e": _PAIR,
    "train.pss.t_e": _PAIR,
    "train.pss.estimate_samples": whole(1),
    "train.pss.select_top_k": whole(1),
}
"""Ranges of single keys (``None``, where allowed, is never checked): ``key -> (ok, the rule)``.
A section defined outside this module lists its own as ``RANGES`` (keys within the section)."""


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-section field of a config dataclass."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaves(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, value))
    return out


FLOAT32_MAX = 3.4028234663852886e38
"""Training computes in float32: a setting beyond its range (``optim.lr: 1e300``) overflows there."""


def _finite(value: Any) -> bool:
    """False for a NaN, an infinity or a float beyond float32's range anywhere in ``value``
    (lists and mappings included)."""
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


# --------------------------------------------------------------------------- dict <-> dataclass


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as ``{"optim.lr": 0.1, ...}``: dotted keys, the ones ``--set`` takes.

    ``model.kwargs`` stays one value (its contents are the model's, not config sections).
    Used to name exactly which settings differ between a run directory and a new config.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (for 'did you mean')."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], key + ".")
    return out


def _unknown(key: str, cls: type | None = None, prefix: str = "") -> ConfigError:
    """``key`` is not a key of ``cls`` (default :class:`Config`) whose keys start with ``prefix``."""
    known = [prefix + k for k in _keys(cls or Config)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (int -> float allowed), or a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, key): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "5e-5" (no dot) as a string
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):
            note = " (YAML reads 1e400 as inf)" if math.isinf(number) else ""
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}{note}")
        if number is not None:
            return number
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key {key!r} expects {name}, got {value!r}")


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a config dataclass from nested dicts, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, cls, prefix)
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = from_dict(v, hints[k], key + ".")
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def apply_override(config: C, assignment: str, prefix: str = "") -> C:
    """Apply one ``dotted.key=value`` (value parsed as YAML) and return the new config.

    ``config``: a :class:`Config`, or a command's own section (``prefix``: its name and a dot,
    as in ``run.latency_repeats=5``; see :func:`load_config_with_section`), so that every
    ``--set`` is read, typed and refused the same way.
    """
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    cls = type(config)
    if not key.startswith(prefix):
        raise _unknown(key, cls, prefix)
    value = load_yaml(text, f"the value of override {key}") if text.strip() else ""
    data = dataclasses.asdict(config)
    parts = key.removeprefix(prefix).split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise _unknown(prefix + ".".join(parts[: i + 1]), cls, prefix)
        node = node[part]
    # free-form mappings (model.kwargs) take any key; dataclass sections only their fields
    free_form = prefix + ".".join(parts[:-1]) == "model.kwargs"
    if not isinstance(node, dict) or (parts[-1] not in node and not free_form):
        raise _unknown(key, cls, prefix)
    node[parts[-1]] = value
    return from_dict(data, cls, prefix)


def presets() -> dict[str, Path]:
    """The YAML presets shipped inside the package, by name (``demo``, ``fmnist_quick``, ...)."""
    root = importlib.resources.files("dynaslice") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: an existing path, or the name of a preset (``fmnist_quick`` or ``fmnist_quick.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    known = presets()
    preset = known.get(path.stem) if path.parent == Path(".") or str(path.parent) == "configs" else None
    if preset is not None:
        return preset
    raise ConfigError(
        f"config {name_or_path} not found: give a YAML file or one of the presets {', '.join(sorted(known))}"
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (a path or a preset name), or a one-line ConfigError."""
    path = resolve_config(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file") from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> Config:
    """The defaults, updated by the YAML file at ``path`` (if any), then by each override.

    ``ignore``: top-level sections of the file that belong to another command (``dynaslice
    train`` leaves out the ``run:`` section of a ``dynaslice run`` config).
    """
    data = read_config_file(path) if path is not None else {}
    try:
        config = from_dict({k: v for k, v in data.items() if k not in ignore})
    except ConfigError as e:  # name the file: the mistake is in it, not in an override
        raise ConfigError(f"{path}: {e}") from None
    for assignment in overrides:
        config = apply_override(config, assignment)
    return config.validate()


def load_config_with_section(
    path: str | Path | None, overrides: list[str] | tuple[str, ...], name: str, cls: type[S]
) -> tuple[Config, S]:
    """The training config of the file at ``path`` and the file's own top-level section ``name``
    for one command (``run:`` of ``dynaslice run``), a ``cls`` dataclass outside :class:`Config`.

    Each override ``name.KEY=VALUE`` goes to the section, every other to the config, through
    the one :func:`apply_override`: the same typing, YAML reading and "did you mean" for both.
    The section comes back unchecked: its rules are its command's.
    """
    data = read_config_file(path) if path is not None else {}
    prefix = f"{name}."
    try:
        section = from_dict(data.get(name) or {}, cls, prefix)
    except ConfigError as e:  # name the file: the mistake is in it, not in an override
        raise ConfigError(f"{path}: {e}") from None
    rest = []
    for assignment in overrides:
        if assignment.strip().startswith(prefix):
            section = apply_override(section, assignment, prefix)
        else:
            rest.append(assignment)
    return load_config(path, rest, ignore=(name,)), section


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`), atomically."""
    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
