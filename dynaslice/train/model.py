"""Training of one plain ``nn.Module`` on the engine: pruned, quantized and baseline networks.

:class:`ModelTrainer` trains any module (not a supernet: no Arch) on the config's in-memory data
with the config's optimizer and schedule, by cross-entropy with label smoothing. Methods that
need more subclass it and override :meth:`ModelTrainer.loss` (an extra term: White-Box's mask
regulariser, a distillation target), :meth:`~dynaslice.train.engine.Trainer.after_step` (re-apply
a fixed sparsity mask) or :meth:`~dynaslice.train.engine.Trainer.on_epoch_start` (DCFF's fusion
temperature). Checkpoints, resume, metrics and the run lock are the engine's.

The batches are the config's training split unless ``batches`` is given: any object with
``len()`` (steps per epoch) and ``epoch_batches(epoch, start)`` yielding ``(x, y)`` -- e.g.
synthetic calibration images for post-training fine-tuning (:mod:`dynaslice.quant`). It must
yield the same batches for the same ``(epoch, start)`` so a resume continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config_base import ConfigError
from .config import Config
from .data import eval_loader, load_split, train_loader
from .engine import Trainer, total_steps
from .optim import build_optimizer, build_scheduler


class Batches(Protocol):
    """What the engine iterates: ``len()`` steps per epoch, the same batches for the same arguments."""

    def __len__(self) -> int: ...

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ModelTrainer(Trainer):
    """Train ``model`` with ``cfg`` (data, optim, ``train.epochs`` unless ``epochs`` is given, which
    may be fractional) into ``run_dir``.

    ``batches``: what to train on instead of the config's training split (see the module doc).
    ``train_mode = False`` in a subclass trains the model in eval mode (BatchNorm on its running
    statistics, no dropout): fine-tuning after training, as post-training quantization does.
    """

    train_mode = True

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        run_dir: str | Path,
        epochs: float | None = None,
        batches: Batches | None = None,
    ):
        super().__init__(cfg, run_dir)
        t = cfg.train
        if batches is None:
            if cfg.data.name == "folder":
                raise ConfigError("ModelTrainer trains on in-memory datasets (fashion_mnist, cifar10/100, synthetic)")
            train_ds = load_split(cfg.data, "train", t.seed)
            batches = train_loader(cfg.data, train_ds, t.seed, self.env.rank, self.env.world_size)
        self.val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
        self.model = model.to(self.device)
        epochs = t.epochs if epochs is None else epochs
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps(epochs, len(batches)), len(batches))
        self.setup_loop(batches, epochs, optimizer, scheduler, cfg.optim.clip_grad_norm, cfg.optim.clip_grad_value)
        self.setup_amp(t.amp)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (the model in ``train_mode``): CE with label smoothing."""
        return F.cross_entropy(self.model(x).float(), y, label_smoothing=self.cfg.train.label_smoothing)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        self.model.train(self.train_mode)
        with self.autocast():
            loss = self.loss(x, y)
        self.scaler.scale(loss).backward()
        return [loss.detach()], {"names": ["the loss"]}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    @torch.no_grad()
    def evaluate_validation(self) -> dict[str, Any] | None:
        """Top-1 (%) on the validation split, in eval mode."""
        if self.val_ds is None:
            return None
        self.model.eval()
        correct = total = 0
        for x, y in eval_loader(self.val_ds):
            correct += int((self.model(x.to(self.device)).argmax(-1).cpu() == y).sum())
            total += len(y)
        return {"accuracy": 100.0 * correct / total, "images": total}

    def format_validation(self, result: Any) -> str:
        return f": top-1 {result['accuracy']:.2f}% on {result['images']} images"

    def finish(self) -> dict[str, Any]:
        result = self.evaluate_validation() or {}
        self.report(result, self.total_steps / self.steps_per_epoch, final=True)
        return result
