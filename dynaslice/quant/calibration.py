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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..data import EvalTransform, InMemoryDataset
from .fdda import ConditionalGenerator, FDDAConfig, bn_centres, one_per_class, train_generator

__all__ = [
    "KINDS",
    "CalibrationSource",
    "GeneratorImages",
    "NoiseImages",
    "RealImages",
    "calibration_images",
    "calibration_source",
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
        return {"kind": "real", "images": len(self.images)}


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
        return {"kind": self.kind, "generator": "conditional (GDFQ layout)", "batch_size": self.batch_size}


def calibration_source(
    kind: str,
    dataset: InMemoryDataset | None = None,
    model: nn.Module | None = None,
    num_real: int = 256,
    seed: int = 0,
    fdda: FDDAConfig | None = None,
) -> CalibrationSource:
    """The calibration source ``kind`` (``real``, ``fdda``, ``gdfq`` or ``noise``).

    ``real`` takes ``num_real`` images of ``dataset``; ``fdda`` picks one image per class of
    ``dataset``, computes the BNS centres on ``model`` (the full-precision network with its
    BatchNorm layers) and trains a generator against it (``fdda`` settings); ``gdfq`` trains the
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
    cfg = fdda or FDDAConfig()
    cfg = FDDAConfig(**{**cfg.__dict__, "fdda": kind == "fdda"})
    real = RealImages.from_dataset(dataset, dataset.num_classes, seed, per_class=True)
    device = next(model.parameters()).device
    centres = bn_centres(model, real.images.to(device), real.labels.to(device), dataset.num_classes)
    size = dataset.images.shape[-1]
    gen = train_generator(model, dataset.num_classes, size, dataset.images.shape[1], cfg, centres, seed)
    return GeneratorImages(gen, kind, cfg.batch_size)


def calibration_images(source: CalibrationSource, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of ``source`` as a float32 numpy array, for onnxruntime calibration."""
    if n < 1:
        raise ValueError(f"calibration needs at least one image, got n={n}")
    images, _ = source.sample(n, torch.Generator().manual_seed(seed))
    return images.detach().cpu().numpy().astype(np.float32)
