"""The typed training config: dataclasses, YAML presets and ``--set key=value`` overrides.

A run is described by one :class:`Config` (model, data, optim, train sections). Presets live in
``configs/*.yaml`` and only list what differs from the defaults here. Overrides use dotted keys
(``--set optim.lr=0.1 --set train.static_widths=[0.35,0.5]``); values are parsed as YAML, so
lists, ``null`` and booleans work. An unknown key is an error naming the closest valid one:
a typo must never be silently ignored, or the run trains something else than you think.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_bytes
from .samplers import sampler_names


class ConfigError(ValueError):
    """A config file or override the user has to fix (printed as one line by the CLI)."""


RESUMABLE_CHANGES = frozenset({"optim.lr", "optim.clip_grad_norm"})
"""Keys a resume may change on request (``--allow-change``): what rescues a diverged run."""


@dataclass
class GateConfig:
    """The DS-Net gate (``dynaslice.gate.GatedSupernet``), when ``enabled``.

    Stage I then trains the gated supernet: the gate's attention head is part of it, and the
    dims before the gate are pinned to the routes' one value. ``cut``: the stage the gate sits
    before (``null``: the family default). ``routes``: a number k of evenly spread uniform-width
    routes, or a list of arch dicts (narrowest first). ``pre_gate``: widths of the dims before
    the gate (only with ``routes: k``; the rest stay at their largest).
    """

    enabled: bool = False
    cut: int | None = None
    routes: int | list[dict[str, int]] = 4
    pre_gate: dict[str, int] = field(default_factory=dict)
    reduction: int = 4


@dataclass
class ModelConfig:
    """Which supernet: a registry name and keyword arguments for ``create_supernet``.

    ``in_chans``, ``num_classes`` and ``input_size`` are filled in from the dataset unless given.
    """

    name: str = "resnet_small"
    kwargs: dict[str, Any] = field(default_factory=dict)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class DataConfig:
    """The dataset and its batches.

    ``name``: fashion_mnist, cifar10, cifar100 (in memory, exact resume), ``synthetic`` (random
    class patterns, for tests and smoke runs) or ``folder`` (ImageNet layout under ``root``).
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


@dataclass
class OptimConfig:
    """Optimizer and per-iteration schedule: linear warm-up, then cosine to ``min_lr``.

    Weight decay applies to conv and linear weights only (never norms or biases).
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
    """

    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads, when set
    sampler: str = "sandwich"
    num_subnets: int = 4
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
    pss: PSSConfig = field(default_factory=PSSConfig)


@dataclass
class Stage2Config:
    """Stage II (``dynaslice train-gate``): only the gate's slimming head learns.

    ``target_macs``: the average MACs per image the complexity penalty pulls toward -- a
    fraction (<= 1) of the widest route's MACs or absolute MACs; ``null`` switches the penalty
    off (plain SGS). The Gumbel temperature anneals exponentially from ``tau_start`` to
    ``tau_end`` over the run. ``drop_hopeless``: samples even the widest route gets wrong get
    no gate target. ``train_gate_trunk``: the gate's shared 1x1 conv learns too (from the
    route logits only; the attention scale the backbone was trained with changes with it).
    ``calibrate``: after training, shift the slimming head's bias on the validation split so that
    argmax routing spends at most ``target_macs`` on average
    (:func:`dynaslice.gate.calibrate_route_bias`); without it the raw argmax can miss the
    target widely (every image on one route).
    SGD with momentum and a cosine schedule; the batch size is ``data.batch_size``.
    """

    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    target_macs: float | None = 0.6
    drop_hopeless: bool = False
    train_gate_trunk: bool = False
    calibrate: bool = True
    tau_start: float = 1.0
    tau_end: float = 0.1
    gate_weight: float = 1.0
    task_weight: float = 1.0
    macs_weight: float = 10.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check value ranges and choices; returns self so calls can chain."""
        t, o, d = self.train, self.optim, self.data
        choices = {
            "train.sampler": (t.sampler, sampler_names()),
            "train.target": (t.target, ("labels", "inplace", "ib", "ieb")),
            "train.device": (t.device, ("auto", "cpu", "cuda")),
            "optim.name": (o.name, ("sgd", "adamw")),
            "data.name": (d.name, ("fashion_mnist", "cifar10", "cifar100", "synthetic", "folder")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        positive = {
            "train.epochs": t.epochs,
            "data.batch_size": d.batch_size,
            "train.keep_checkpoints": t.keep_checkpoints,
            "train.recal_batch_size": t.recal_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.sampler == "sandwich" and t.num_subnets < 2:
            raise ConfigError(f"train.num_subnets must be >= 2 for the sandwich rule, got {t.num_subnets}")
        if not 0.0 <= t.ema_decay <= 1.0:
            raise ConfigError(f"train.ema_decay must lie in [0, 1], got {t.ema_decay}")
        if not 0.0 <= t.mvco_weight <= 1.0:
            raise ConfigError(f"train.mvco_weight must lie in [0, 1], got {t.mvco_weight}")
        for key, widths in (("train.eval_widths", t.eval_widths), ("train.static_widths", t.static_widths)):
            bad = [w for w in widths if not 0 < w <= 1]
            if bad:
                raise ConfigError(f"{key} must hold ratios in (0, 1], got {bad}")
        if not 0 < t.fixed_width <= 1:
            raise ConfigError(f"train.fixed_width must lie in (0, 1], got {t.fixed_width}")
        if o.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        g, s2 = self.model.gate, self.stage2
        if g.enabled and isinstance(g.routes, int) and g.routes < 2:
            raise ConfigError(f"model.gate.routes must be >= 2 (or a list of archs), got {g.routes}")
        if g.enabled and not isinstance(g.routes, int) and g.pre_gate:
            raise ConfigError(
                "model.gate.pre_gate goes with routes=<k>; explicit routes already fix those dims"
            )
        if g.reduction < 1:
            raise ConfigError(f"model.gate.reduction must be >= 1, got {g.reduction}")
        if s2.epochs < 1 or s2.lr <= 0:
            raise ConfigError(f"stage2.epochs must be >= 1 and stage2.lr > 0, got {s2.epochs} and {s2.lr}")
        if s2.target_macs is not None and not s2.target_macs > 0:
            raise ConfigError(
                f"stage2.target_macs must be > 0 (a fraction <= 1 of the widest route, or MACs), got {s2.target_macs}"
            )
        if not 0 < s2.tau_end <= s2.tau_start:
            raise ConfigError(f"stage2 needs 0 < tau_end <= tau_start, got {s2.tau_end} and {s2.tau_start}")
        if t.sampler == "pss":
            ps = t.pss
            if ps.metric not in ("macs", "latency"):
                raise ConfigError(f"train.pss.metric={ps.metric!r} is not one of macs, latency")
            if ps.metric == "latency" and not ps.latency_table:
                raise ConfigError(
                    "train.pss.metric=latency needs train.pss.latency_table (dynaslice profile MODEL --latency-table PATH)"
                )
            if ps.bucket_step <= 0 or min(ps.pool_size, ps.select_top_k, ps.estimate_samples) < 1:
                raise ConfigError(
                    "train.pss needs bucket_step > 0 and pool_size, select_top_k, estimate_samples >= 1"
                )
            for key, sched in (("p_e", ps.p_e), ("t_e", ps.t_e)):
                if len(sched) != 2 or min(sched) <= 0:
                    raise ConfigError(f"train.pss.{key} must be [start, end], both > 0, got {sched}")
            if t.num_subnets < 3:
                raise ConfigError(
                    f"train.sampler=pss needs train.num_subnets >= 3 (largest, pool, smallest), got {t.num_subnets}"
                )
        if t.mvco and d.name == "folder":
            raise ConfigError(
                "train.mvco needs an in-memory dataset (two views per batch); folder data is not supported yet"
            )
        return self


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


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _keys(Config), n=1, cutoff=0.5)
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
        return dict(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
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
            raise _unknown(key)
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = from_dict(v, hints[k], key + ".")
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def apply_override(config: Config, assignment: str) -> Config:
    """Apply one ``dotted.key=value`` (value parsed as YAML) and return the new config."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {assignment!r}: {e}") from None
    data = config.to_dict()
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise _unknown(".".join(parts[: i + 1]))
        node = node[part]
    # free-form mappings (model.kwargs) take any key; dataclass sections only their fields
    free_form = ".".join(parts[:-1]) == "model.kwargs"
    if not isinstance(node, dict) or (parts[-1] not in node and not free_form):
        raise _unknown(key)
    node[parts[-1]] = value
    return from_dict(data)


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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults, updated by the YAML file at ``path`` (if any), then by each override."""
    data = read_config_file(path) if path is not None else {}
    config = from_dict(data)
    for assignment in overrides:
        config = apply_override(config, assignment)
    return config.validate()


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`), atomically."""
    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
