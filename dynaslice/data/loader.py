"""Mini-batches: `BatchLoader` for in-memory datasets, `image_folder_loader` for ImageNet folders.

`BatchLoader` runs in the training process (no workers: on a 2-core machine workers starve the
model) and slices batches out of one uint8 tensor. Everything random is derived from
(seed, epoch, batch index, rank) through a stable hash, so `epoch_batches(epoch, start=k)` after a
restart yields exactly the batches an uninterrupted run would have produced from batch k on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from ..seeding import derive_seed
from .datasets import DatasetNotFoundError, InMemoryDataset
from .transforms import BatchTransform, EvalTransform, imagefolder_transforms


class BatchLoader:
    """Iterate an `InMemoryDataset` in mini-batches of `(float images, int64 labels)`.

    Every rank draws the same permutation for an epoch, then takes every `world_size`-th index
    starting at `rank`, so ranks see disjoint samples. Each rank gets the same number of samples
    and batches, which DDP needs to stay in lock-step: with `drop_last` the tail that does not
    divide evenly (and a final partial batch) is dropped; without it the permutation is padded
    by repeating its first indices, so up to `world_size - 1` samples appear twice per epoch.

    `transform(images_uint8, generator)` turns each batch into floats; the default only
    normalises with the dataset's mean/std. Its generator is seeded per (seed, epoch, rank,
    batch), so augmentation is reproducible too. Iterating the loader directly gives epoch 0;
    training loops call `epoch_batches(epoch)`. Batches come out on the device the dataset's
    tensors are on: move `ds.images`/`ds.labels` to the GPU once and augmentation runs there.
    """

    def __init__(
        self,
        ds: InMemoryDataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform: BatchTransform | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in 0..{world_size - 1} (world_size)")
        if len(ds) == 0:
            raise ValueError(f"dataset {ds.name!r} is empty: nothing to load")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.transform = transform if transform is not None else EvalTransform(ds.mean, ds.std)

        n = len(ds)
        if drop_last:
            self.samples_per_rank = n // world_size
            self.num_batches = self.samples_per_rank // batch_size
        else:
            self.samples_per_rank = math.ceil(n / world_size)
            self.num_batches = math.ceil(self.samples_per_rank / batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{n} samples over {world_size} rank(s) do not fill one batch of {batch_size} "
                "with drop_last=True: lower batch_size or set drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.num_batches

    def indices(self, epoch: int) -> torch.Tensor:
        """The dataset indices this rank visits in `epoch`, in order."""
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:  # pad by wrapping around to the start of the permutation
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of `epoch` from batch index `start` on (for exact mid-epoch resume)."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start batch {start} is outside 0..{self.num_batches}")
        idx = self.indices(epoch)
        for b in range(start, self.num_batches):
            batch = idx[b * self.batch_size : (b + 1) * self.batch_size]
            g = torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch, self.rank, b))
            yield self.transform(self.ds.images[batch], g), self.ds.labels[batch]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch_batches(0)


def image_folder_loader(
    root: str | os.PathLike,
    split: str,
    batch_size: int,
    train: bool,
    workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    size: int = 224,
) -> torch.utils.data.DataLoader:
    """A torch DataLoader over `root/split` in ImageFolder layout (one sub-folder per class).

    Decoding JPEGs needs worker processes, so this is the standard DataLoader rather than
    `BatchLoader`. With `world_size > 1` a DistributedSampler shards the data; call
    `loader.sampler.set_epoch(epoch)` each epoch, as with any DDP loader. Shuffling is seeded,
    but augmentation runs in the workers, so a resumed run is not bit-identical mid-epoch.
    """
    from torchvision.datasets import ImageFolder

    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(
            f"image folder {folder} not found: pass --data-dir DIR where DIR/{split}/ holds one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    dataset = ImageFolder(folder, transform=imagefolder_transforms(train, size))
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )
        generator = None
    else:
        sampler = None
        generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=workers > 0,
    )
