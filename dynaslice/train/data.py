"""Build the datasets and batch loaders a config names."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config_base import ConfigError
from ..data import (
    BatchLoader,
    EvalTransform,
    InMemoryDataset,
    MultiView,
    TrainTransform,
    image_folder_loader,
    load_dataset,
    split_train_val,
)
from ..seeding import derive_seed
from .config import DataConfig


def synthetic_dataset(
    n: int, size: int = 16, channels: int = 1, classes: int = 10, seed: int = 0
) -> InMemoryDataset:
    """Noisy copies of one fixed random prototype per class: learnable, tiny, needs no files.

    The prototypes do not depend on ``seed`` (every split shares them); the samples do.
    """
    g = torch.Generator().manual_seed(derive_seed("synthetic-prototypes", size, channels, classes))
    protos = torch.rand(classes, channels, size, size, generator=g) * 255
    g = torch.Generator().manual_seed(derive_seed("synthetic-samples", seed))
    labels = torch.randint(classes, (n,), generator=g)
    noise = torch.randn(n, channels, size, size, generator=g) * 64
    images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
    return InMemoryDataset(images, labels, classes, (0.5,) * channels, (0.3,) * channels, "synthetic")


def load_split(cfg: DataConfig, split: str, seed: int = 0) -> InMemoryDataset:
    """``train`` (what the run trains on), ``val`` (held out of the training split) or ``test``."""
    if cfg.name == "folder":
        raise ValueError("folder datasets are not held in memory; use folder_loader")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: choose train, val or test")
    if cfg.name == "synthetic":
        if split == "test":
            return synthetic_dataset(
                cfg.synthetic_test, cfg.image_size, cfg.synthetic_channels, cfg.synthetic_classes, seed=1
            )
        full = synthetic_dataset(
            cfg.synthetic_train, cfg.image_size, cfg.synthetic_channels, cfg.synthetic_classes, seed=0
        )
    else:
        full = load_dataset(cfg.name, cfg.root, split="test" if split == "test" else "train")
        if split == "test":
            return full
    check_sizes(cfg, len(full))
    if cfg.val_size > 0:
        train, val = split_train_val(full, cfg.val_size, seed=derive_seed("val-split", seed))
    else:
        if split == "val":
            raise ValueError("data.val_size is 0: there is no validation split")
        train, val = full, None
    if split == "val":
        return val
    if 0 < cfg.train_size < len(train):
        _, train = split_train_val(train, cfg.train_size, seed=derive_seed("train-subset", seed))
    return train


def check_sizes(cfg: DataConfig, available: int) -> None:
    """Refuse ``val_size``/``train_size`` that the training split (``available`` images) cannot
    hold, instead of silently training on everything or on nothing."""
    if cfg.val_size >= available:
        raise ConfigError(
            f"data.val_size={cfg.val_size} leaves no training images: the {cfg.name} training split has "
            f"{available}; use at most {available - 1}"
        )
    left = available - cfg.val_size
    if cfg.train_size > left:
        raise ConfigError(
            f"data.train_size={cfg.train_size} is more than the {left} training images of {cfg.name} "
            f"(after data.val_size={cfg.val_size} held out); use at most {left}, or 0 for all of them"
        )


def train_loader(
    cfg: DataConfig, ds: InMemoryDataset, seed: int, rank: int, world_size: int, views: int = 1
) -> BatchLoader:
    """Shuffled, augmented, rank-sharded batches; ``views=2`` yields ``[2, B, C, H, W]`` (MvCo)."""
    side = min(ds.images.shape[-2:])
    if cfg.crop_padding is not None and cfg.crop_padding > side:
        raise ConfigError(
            f"data.crop_padding={cfg.crop_padding} is larger than the {side}-pixel images; use at most {side}"
        )
    transform = TrainTransform(ds.mean, ds.std, crop_padding=cfg.crop_padding, hflip=cfg.hflip)
    if views > 1:
        transform = MultiView(transform, views)
    return BatchLoader(
        ds,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        drop_last=True,
        rank=rank,
        world_size=world_size,
        transform=transform,
    )


def eval_loader(ds: InMemoryDataset, batch_size: int = 500) -> BatchLoader:
    return BatchLoader(
        ds, batch_size, shuffle=False, drop_last=False, transform=EvalTransform(ds.mean, ds.std)
    )


class FolderBatches:
    """An ImageNet-style DataLoader behind the ``epoch_batches(epoch, start)`` interface of BatchLoader.

    The order of each epoch is reseeded from (seed, epoch). Augmentation runs in worker
    processes, so a run resumed mid-epoch sees the same images but not bit-identical crops,
    and skipping to ``start`` decodes the skipped batches.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, seed: int):
        self.loader, self.seed = loader, seed

    def __len__(self) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(derive_seed("folder-order", self.seed, epoch))
        return itertools.islice(iter(self.loader), start, None)


def folder_loader(cfg: DataConfig, split: str, train: bool, seed: int, rank: int = 0, world_size: int = 1):
    if cfg.root is None:
        raise ValueError("data.name=folder needs data.root (a folder with train/ and val/ sub-folders)")
    return image_folder_loader(
        Path(cfg.root),
        split,
        cfg.batch_size,
        train=train,
        workers=cfg.workers,
        rank=rank,
        world_size=world_size,
        seed=seed,
        size=cfg.image_size,
    )


def folder_recal_batches(cfg: DataConfig, num_images: int, batch_size: int, seed: int):
    """A seeded random subset of the training folder with *evaluation* preprocessing, for BN recalibration."""
    from torchvision.datasets import ImageFolder

    from ..data import imagefolder_transforms

    if cfg.root is None:
        raise ValueError("data.name=folder needs data.root (a folder with train/ and val/ sub-folders)")
    ds = ImageFolder(str(Path(cfg.root) / "train"), transform=imagefolder_transforms(False, cfg.image_size))
    g = torch.Generator().manual_seed(derive_seed("recal", seed))
    n = min(num_images, len(ds))
    idx = torch.randperm(len(ds), generator=g)[: n - n % batch_size or n].tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx), batch_size=batch_size, num_workers=cfg.workers
    )
