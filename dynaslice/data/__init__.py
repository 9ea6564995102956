"""Datasets and batching: Fashion-MNIST / CIFAR in memory, ImageNet-style folders via torchvision.

Typical use (select models on `val`, report on the test split only):

ds = load_dataset("fashion_mnist")  # uint8 [60000, 1, 28, 28]
train, val = split_train_val(ds, 5000, seed=0)
loader = BatchLoader(train, 256, shuffle=True, seed=0, drop_last=True,
                     transform=TrainTransform(ds.mean, ds.std))
for x, y in loader.epoch_batches(epoch): ...
"""

from .datasets import (
    DATASETS,
    DatasetError,
    DatasetNotFoundError,
    InMemoryDataset,
    load_dataset,
    read_idx,
    split_train_val,
)
from .loader import BatchLoader, image_folder_loader
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiView,
    TrainTransform,
    imagefolder_transforms,
)

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchLoader",
    "DatasetError",
    "DatasetNotFoundError",
    "EvalTransform",
    "InMemoryDataset",
    "MultiView",
    "TrainTransform",
    "image_folder_loader",
    "imagefolder_transforms",
    "load_dataset",
    "read_idx",
    "split_train_val",
]
