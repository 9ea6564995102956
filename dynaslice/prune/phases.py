"""How pruning methods train: each phase is a run of the project's engine in its own directory.

A method's phases (``RUN/train``: its own training; ``RUN/finetune``: the pruned network) are
:class:`~dynaslice.train.ModelTrainer` runs, or subclasses that add the method's piece (a loss
term, a fusion update, a fixed mask), so they get the engine's checkpoints, exact resume, metrics
and run lock. The lengths come from one budget, ``train.epochs`` (see
:class:`~dynaslice.prune_settings.PruneConfig`): what prunes a trained network spends
``train.epochs - prune.finetune_epochs`` on it and ``prune.finetune_epochs`` fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from .. import runs
from ..train.checkpoint import refuse_existing_run
from ..train.config import Config
from ..train.model import ModelTrainer

__all__ = ["finetune", "finetune_config", "fit", "pretrain_epochs", "run_phase", "train_base"]


def pretrain_epochs(cfg: Config) -> float:
    """Epochs before pruning: the budget less the fine-tuning (the base network, White-Box's masks)."""
    return cfg.train.epochs - cfg.prune.finetune_epochs


def finetune_config(cfg: Config) -> Config:
    """The fine-tuning recipe: ``cfg`` at ``prune.finetune_lr``, no warm-up (the weights are trained)."""
    optim = dataclasses.replace(cfg.optim, lr=cfg.prune.finetune_lr, warmup_epochs=0.0)
    return dataclasses.replace(cfg, optim=optim)


def fit(trainer: ModelTrainer, resume: bool = False) -> dict[str, Any]:
    """Train ``trainer``'s phase to its end and return its final validation (``{}`` without one).

    ``resume=True`` continues the phase's newest checkpoint (a finished phase just reloads its
    weights); without it an existing checkpoint is an error, never silently overwritten.
    """
    run_dir = trainer.run_dir
    refuse_existing_run(run_dir, resume)
    if resume:
        trainer.resume()
    return trainer.fit() or {}


def train_base(model: nn.Module, cfg: Config, run_dir: str | Path, resume: bool = False) -> nn.Module:
    """A trained copy of the full network ``model``: ``pretrain_epochs(cfg)`` epochs in ``run_dir``.

    What l1, random, 1xN and magnitude pruning start from (``RUN/base`` of a pruning run).
    """
    trainer = ModelTrainer(copy.deepcopy(model), cfg, run_dir, epochs=pretrain_epochs(cfg))
    fit(trainer, resume)
    return trainer.model.eval()


def run_phase(
    model: nn.Module, cfg: Config | None, run_dir: str | Path | None, phase: str, epochs: float | None = None,
    resume: bool = False, trainer_cls: type[ModelTrainer] = ModelTrainer, **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` in place in ``RUN/phase`` with ``cfg`` (``epochs``: default ``train.epochs``)
    when ``cfg`` is given; returns the final validation (``{}`` without training).

    ``kwargs`` go to ``trainer_cls`` (a method's :class:`ModelTrainer` subclass).
    """
    if cfg is None:
        return {}
    if run_dir is None:
        raise ValueError("training needs a run directory: pass run_dir with cfg")
    return fit(trainer_cls(model, cfg, Path(run_dir) / phase, epochs, **kwargs), resume)


def finetune(
    model: nn.Module, cfg: Config | None, run_dir: str | Path | None, resume: bool = False,
    trainer_cls: type[ModelTrainer] = ModelTrainer, **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune a pruned ``model`` in place: ``prune.finetune_epochs`` of :func:`finetune_config`
    in ``RUN/finetune`` (nothing without ``cfg``)."""
    if cfg is None:
        return {}
    return run_phase(model, finetune_config(cfg), run_dir, runs.PRUNE_FINETUNE, cfg.prune.finetune_epochs,
                     resume, trainer_cls, **kwargs)  # fmt: skip
