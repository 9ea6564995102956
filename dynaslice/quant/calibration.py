"""Where calibration images come from: real training images, FDDA's generator, or Gaussian noise.

Every source has one method, ``sample(n, rng) -> (images, labels or None)``, returning normalised
float images ``[n, C, H, W]`` (the network's input, as an evaluation transform makes it). Both
quantization paths use them: :func:`dynaslice.quant.ptq.quantize_artifact` calibrates
onnxruntime's int8 ranges on ``calibration_images(source, n)``, and the fake-quant fine-tuning
draws its batches from them.

- :class:`RealImages`: a fixed set of real images (``n`` training images, or one per class);
- :class:`GeneratorImages`: a trained FDDA (or GDFQ) conditional generator;
- :class:`NoiseImages`: standard Gaussian noise in the normalised input space (the baseline).

:func:`calibration_source` builds any of them by name from a dataset and a full-precision model.
:class:`SourceBatches` turns sources into training batches (seeded per batch, optionally
augmented) for the training engine: the fake-quant student's distillation fine-tuning.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import EvalTransform, InMemoryDataset
from ..seeding import derive_seed
from .fdda import ConditionalGenerator, FDDAConfig, bn_centres, fingerprint, one_per_class, train_generator

__all__ = [
    "KINDS",
    "CalibrationSource",
    "GeneratorImages",
    "NoiseImages",
    "UNLABELLED",
    "RealImages",
    "SourceBatches",
    "calibration_images",
    "calibration_source",
    "check_calibration_size",
    "random_resized_crop_flip",
]

KINDS = ("real", "fdda", "gdfq", "noise")


class CalibrationSource(Protocol):
    """Anything that samples normalised images (and labels when it has them)."""

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class RealImages:
    """A fixed set of real (normalised) images; ``sample`` cycles through random permutations of it,
    so ``n`` up to the set's size gives distinct images and more repeats them."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or not self.images.is_floating_point() or len(self.images) == 0:
            raise ValueError(
                "RealImages takes a non-empty normalised float batch [N, C, H, W]; got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape [{len(self.images)}], got {tuple(self.labels.shape)}")

    @classmethod
    def from_dataset(cls, ds: InMemoryDataset, n: int, seed: int = 0, per_class: bool = False) -> RealImages:
        """``n`` random images of ``ds`` (or, with ``per_class``, one random image per class),
        with evaluation preprocessing."""
        g = torch.Generator().manual_seed(seed)
        if per_class:
            idx = one_per_class(ds.labels, ds.num_classes, g)
        else:
            if not 0 < n <= len(ds):
                raise ValueError(f"asked for {n} real calibration images; the dataset has {len(ds)}")
            idx = torch.randperm(len(ds), generator=g)[:n]
        images = EvalTransform(ds.mean, ds.std)(ds.images[idx])
        return cls(images, ds.labels[idx].clone())

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rounds = -(-n // len(self.images))
        idx = torch.cat([torch.randperm(len(self.images), generator=rng) for _ in range(rounds)])[:n]
        return self.images[idx], self.labels[idx]

    def describe(self) -> dict[str, Any]:
        return {"kind": "real", "images": len(self.images), "sha256": fingerprint([self.images, self.labels])}


@dataclass
class NoiseImages:
    """Standard Gaussian noise of ``shape`` ``(C, H, W)`` in the normalised input space."""

    shape: Sequence[int]

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, None]:
        return torch.randn(n, *self.shape, generator=rng), None

    def describe(self) -> dict[str, Any]:
        return {"kind": "noise", "distribution": "standard normal"}


@dataclass
class GeneratorImages:
    """Images of a trained conditional generator (labels uniform over classes).

    Sampled in chunks of ``batch_size`` with batch statistics, as the generator was trained (the
    official code never switches it to eval mode).
    """

    generator: ConditionalGenerator
    kind: str = "fdda"
    batch_size: int = 16

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generator
        training = gen.training
        gen.train()
        try:
            chunks = [
                gen.sample(max(2, min(self.batch_size, n - i)), rng) for i in range(0, n, self.batch_size)
            ]
        finally:
            gen.train(training)
        images = torch.cat([c[0] for c in chunks])[:n].cpu()
        return images, torch.cat([c[1] for c in chunks])[:n].cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "generator": "conditional (GDFQ layout)", "batch_size": self.batch_size,
            "sha256": fingerprint(self.generator.state_dict().values()),
        }  # fmt: skip


def calibration_source(
    kind: str,
    dataset: InMemoryDataset | None = None,
    model: nn.Module | None = None,
    num_real: int = 256,
    seed: int = 0,
    fdda: FDDAConfig | None = None,
    run_dir: str | Path | None = None,
) -> CalibrationSource:
    """The calibration source ``kind`` (``real``, ``fdda``, ``gdfq`` or ``noise``).

    ``real`` takes ``num_real`` images of ``dataset``; ``fdda`` picks one image per class of
    ``dataset``, computes the BNS centres on ``model`` (the full-precision network with its
    BatchNorm layers) and trains a generator against it (``fdda`` settings) in ``run_dir``
    (resumed if it holds an unfinished run; None: a temporary directory); ``gdfq`` trains the
    generator without FDDA's class-wise losses; ``noise`` needs only the input shape (from
    ``dataset``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown calibration source {kind!r}: choose one of {', '.join(KINDS)}")
    if dataset is None:
        raise ValueError(f"the {kind!r} calibration source needs the dataset (for its images or input shape)")
    if kind == "noise":
        return NoiseImages(tuple(dataset.images.shape[1:]))
    if kind == "real":
        return RealImages.from_dataset(dataset, num_real, seed)
    if model is None:
        raise ValueError(f"the {kind!r} calibration source trains a generator: pass the full-precision model")
    cfg = FDDAConfig(**{**(fdda or FDDAConfig()).__dict__, "fdda": kind == "fdda"})
    real = RealImages.from_dataset(dataset, dataset.num_classes, seed, per_class=True)
    device = next(model.parameters()).device
    centres = bn_centres(model, real.images.to(device), real.labels.to(device), dataset.num_classes)
    shape = (dataset.num_classes, dataset.images.shape[-1], dataset.images.shape[1])
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="dynaslice-generator-") as tmp:
            gen = train_generator(model, *shape, tmp, cfg, centres, seed)
    else:
        gen = train_generator(model, *shape, run_dir, cfg, centres, seed)
    return GeneratorImages(gen, kind, cfg.batch_size)


MAX_CALIBRATION_BYTES = 4 << 30
"""The most calibration images (float32) :func:`check_calibration_size` lets anyone allocate."""


def check_calibration_size(n: int, shape: Sequence[int]) -> None:
    """Refuse ``n`` float32 images of ``shape`` ``(C, H, W)`` larger than :data:`MAX_CALIBRATION_BYTES`
    in all, before they are made: a graph declaring a 60000x60000 input must not make calibration
    try to allocate terabytes."""
    size = 4 * n * math.prod(int(d) for d in shape)
    if size > MAX_CALIBRATION_BYTES:
        raise ValueError(
            f"{n} calibration images of shape {list(shape)} take {size / 2**30:.3g} GiB, more than "
            f"{MAX_CALIBRATION_BYTES / 2**30:g} GiB; ask for fewer images"
        )


def calibration_images(source: CalibrationSource, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of ``source`` as a float32 numpy array, for onnxruntime calibration."""
    if n < 1:
        raise ValueError(f"calibration needs at least one image, got n={n}")
    images, _ = source.sample(n, torch.Generator().manual_seed(seed))
    return images.detach().cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------- training batches


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


UNLABELLED = -1
"""The label of an image whose source has none (noise); a trainer labels it itself (the teacher's class)."""


class SourceBatches:
    """Training batches drawn from calibration sources: ``batch_size`` images of every source per
    batch (concatenated in source order), ``steps`` batches per epoch, each augmented with
    :func:`random_resized_crop_flip` when ``augment``. A source without labels (noise) gets
    :data:`UNLABELLED`. Batch ``(epoch, i)`` is seeded from ``(seed, epoch, i)`` alone, so a
    resumed run sees what an uninterrupted one would (the engine's ``epoch_batches`` contract).
    """

    def __init__(
        self, sources: Sequence[CalibrationSource], batch_size: int, steps: int, seed: int = 0, augment: bool = False
    ):
        if not sources:
            raise ValueError("SourceBatches needs at least one calibration source")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"SourceBatches needs batch_size and steps >= 1, got {batch_size} and {steps}")
        self.sources, self.batch_size, self.steps = list(sources), batch_size, steps
        self.seed, self.augment = seed, augment

    def __len__(self) -> int:
        return self.steps

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = torch.Generator().manual_seed(derive_seed("source-batches", self.seed, epoch, index))
        images, labels = [], []
        for source in self.sources:
            x, y = source.sample(self.batch_size, rng)
            x = x.detach().cpu()
            if self.augment:
                x = random_resized_crop_flip(x, rng)
            images.append(x)
            labels.append(torch.full((len(x),), UNLABELLED) if y is None else y.cpu().long())
        return torch.cat(images), torch.cat(labels)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(start, self.steps):
            yield self.batch(epoch, i)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sources]
