"""Training: Stage I (supernets and static networks), Stage II (the gate), on one engine.

from dynaslice.train import load_config, train
cfg = load_config("fmnist_quick", ["optim.lr=0.2"])   # a preset name or a YAML path
rows = train(cfg, "runs/quick")           # final validation accuracy/MACs per width

The engine (:class:`Trainer`, :mod:`.engine`) owns the loop, checkpoints, resume, metrics and
progress; :class:`SupernetTrainer` (Stage I) and :class:`GateTrainer` (Stage II) say what a
step does. The Stage-I pieces, each usable alone: samplers (a registry: :func:`register_sampler`;
:class:`SandwichSampler`, :class:`FixedSampler`, PSS-Net's :class:`PSSSampler`), targets
(:class:`LabelsTarget`, :class:`InplaceDistillTarget`, :class:`IBTarget`, :class:`IEBTarget`,
MvCo via ``views``), :func:`make_ema`, :func:`param_groups`, :func:`recalibrate_bn`,
:func:`evaluate`.
"""

from ..config_base import ConfigError
from ..modelfile import CheckpointError, load_model_file, load_supernet, save_model_file
from ..seeding import derive_seed
from .bn import recalibrate_bn
from .checkpoint import latest_checkpoint
from .config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .distributed import DistEnv, init_distributed
from .ema import ema_decay_for, make_ema
from .engine import Callback, Trainer, TrainingDiverged
from .evaluate import evaluate, evaluate_gated, format_gated, format_rows
from .ffsd import OnlineDistillTrainer, train_online
from .model import ModelTrainer
from .optim import build_optimizer, build_scheduler, param_groups
from .pss import PSSSampler
from .samplers import ArchSampler, FixedSampler, SandwichSampler, build_sampler, register_sampler
from .stage2 import GateTrainer, train_gate
from .supernet import SupernetTrainer, static_config, train, train_static
from .targets import (
    IBTarget,
    IEBTarget,
    InplaceDistillTarget,
    LabelsTarget,
    Target,
    make_target,
    mix_views,
    register_target,
    soft_cross_entropy,
)

__all__ = [
    "ArchSampler",
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistEnv",
    "FixedSampler",
    "GateTrainer",
    "IBTarget",
    "IEBTarget",
    "InplaceDistillTarget",
    "LabelsTarget",
    "ModelConfig",
    "ModelTrainer",
    "OnlineDistillTrainer",
    "OptimConfig",
    "PSSSampler",
    "SandwichSampler",
    "SupernetTrainer",
    "Target",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "build_sampler",
    "build_scheduler",
    "derive_seed",
    "ema_decay_for",
    "evaluate",
    "evaluate_gated",
    "format_gated",
    "format_rows",
    "init_distributed",
    "latest_checkpoint",
    "load_config",
    "load_model_file",
    "load_supernet",
    "make_ema",
    "make_target",
    "mix_views",
    "param_groups",
    "recalibrate_bn",
    "register_sampler",
    "register_target",
    "save_model_file",
    "soft_cross_entropy",
    "static_config",
    "train",
    "train_gate",
    "train_online",
    "train_static",
]
