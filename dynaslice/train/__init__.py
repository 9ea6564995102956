"""Stage I: supernet training with pluggable samplers and targets, checkpoints, DDP, evaluation.

from dynaslice.train import load_config, train
cfg = load_config("configs/fmnist_quick.yaml", ["optim.lr=0.2"])
rows = train(cfg, "runs/quick")           # final validation accuracy/MACs per width

The pieces, each usable alone: samplers (:class:`SandwichSampler`, :class:`FixedSampler`),
targets (:class:`LabelsTarget`, :class:`InplaceDistillTarget`, :class:`IBTarget`,
:class:`IEBTarget`, MvCo via ``views``), :func:`make_ema`, :func:`param_groups`,
:func:`recalibrate_bn`, :func:`evaluate`, checkpoints, and :class:`Trainer`, the one loop.
"""

from .bn import recalibrate_bn
from .checkpoint import CheckpointError, latest_checkpoint, load_model_file, load_supernet, save_model_file
from .config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .distributed import DistEnv, init_distributed
from .ema import ema_decay_for, make_ema
from .evaluate import evaluate, format_table, uniform_archs
from .loop import Trainer, TrainingDiverged, run_finished, static_config, train, train_static
from .optim import build_optimizer, build_scheduler, param_groups
from .samplers import ArchSampler, FixedSampler, SandwichSampler, derive_seed
from .targets import (
    IBTarget,
    IEBTarget,
    InplaceDistillTarget,
    LabelsTarget,
    Target,
    make_target,
    mix_views,
    soft_cross_entropy,
)

__all__ = [
    "ArchSampler",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistEnv",
    "FixedSampler",
    "IBTarget",
    "IEBTarget",
    "InplaceDistillTarget",
    "LabelsTarget",
    "ModelConfig",
    "OptimConfig",
    "SandwichSampler",
    "Target",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "build_scheduler",
    "derive_seed",
    "ema_decay_for",
    "evaluate",
    "format_table",
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
    "run_finished",
    "save_model_file",
    "soft_cross_entropy",
    "static_config",
    "train",
    "train_static",
    "uniform_archs",
]
