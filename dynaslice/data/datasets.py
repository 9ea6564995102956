"""Small image datasets held in memory as uint8 tensors: Fashion-MNIST, CIFAR-10, CIFAR-100.

The whole dataset lives in one tensor so that batching, shuffling and augmentation are plain
tensor indexing (see `loader.py`): no worker processes, no PIL, and every batch is a pure function
of the seed. Files are read from local disk in their official formats; the network is used only
when the caller asks for `download=True` *and* the files are missing.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover (numpy 1.x)
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric


class DatasetError(RuntimeError):
    """A dataset file exists but cannot be read (truncated, wrong format, inconsistent)."""


class DatasetNotFoundError(DatasetError):
    """The dataset's files are not where we looked; the message says how to get them.

    It does not say how to name another folder: that depends on the caller (the ``root``
    argument, ``data.root`` in a config, a command's ``--data-dir``), which adds it.
    """


@dataclass
class InMemoryDataset:
    """A labelled image dataset kept entirely in memory.

    `mean`/`std` are per-channel statistics of the *training* split in [0, 1] units. They are
    constants, the same for every split, so test-time normalisation never looks at test data.
    """

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape [{self.images.shape[0]}] to match the images, "
                f"got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor | Sequence[int]) -> InMemoryDataset:
        """The samples at `indices`, in that order (a copy; metadata is kept)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.images[idx], labels=self.labels[idx])


# --------------------------------------------------------------------------- registry

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CIFAR_ROOT = os.path.join("~", ".cache", "dynaslice", "data")

# Training-set statistics (Fashion-MNIST computed from the files; CIFAR per-pixel std, not the
# widely copied (0.2023, 0.1994, 0.2010), which is a std of per-image means).
_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = tuple(_STATS)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
) -> InMemoryDataset:
    """Load `split` ("train" or "test") of `name` from local files into memory.

    `download=True` fetches missing files with torchvision into `root`; it is never needed when
    the files are present, so offline runs do not depend on it. Model selection must use
    `split_train_val` on the training split; keep "test" for final reporting.
    """
    key = name.lower().replace("-", "_")
    if key not in _STATS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(
            f"unknown split {split!r}: choose 'train' or 'test' (carve a validation set out of "
            "'train' with split_train_val)"
        )
    if root is None:
        root = FASHION_MNIST_ROOT if key == "fashion_mnist" else CIFAR_ROOT
    root = Path(root).expanduser()

    if key == "fashion_mnist":
        load = _load_fashion_mnist
    else:
        load = _load_cifar10 if key == "cifar10" else _load_cifar100
    try:
        images, labels = load(root, split)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(key, root)
        images, labels = load(root, split)

    num_classes = 100 if key == "cifar100" else 10
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{name} in {root} has labels outside 0..{num_classes - 1}: the files are damaged; "
            "delete them and download them again"
        )
    mean, std = _STATS[key]
    return InMemoryDataset(images, labels, num_classes, mean, std, key)


def _download(key: str, root: Path) -> None:
    """Fetch the official files with torchvision, imported here so offline runs never need it."""
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[key]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, bottom of page).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzip-compressed if its name ends in .gz) into a numpy array.

    The format is a 4-byte magic (0, 0, type code, number of dims), one big-endian int32 per dim,
    then the raw data. We check all of it, because a half-downloaded file otherwise turns into
    silently wrong images.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read {path}: {e}; delete it and get the file again") from e

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
            "delete it and get the file again"
        )
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise DatasetError(f"{path} holds a {dims}-d array where a {ndim}-d one was expected")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (header cut short); delete it and get it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=dims, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} has {len(raw) - header} data bytes but its header promises {expected} "
            f"(shape {shape}): the file is truncated or damaged; delete it and get it again"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    """Our own layout (files in root) or torchvision's (root/FashionMNIST/raw), .gz or not."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_fashion_mnist(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    stems = _FMNIST_FILES[split]
    paths = [_find_idx(root, s) for s in stems]
    if None in paths:
        all_files = " ".join(f"{s}.gz" for pair in _FMNIST_FILES.values() for s in pair)
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'sudo apt-get install -y dataset-fashion-mnist', or use a folder holding "
            f"{all_files}"
        )
    images = read_idx(paths[0], ndim=3)
    labels = read_idx(paths[1], ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{paths[0]} holds {images.dtype} {images.shape}, not 28x28 uint8")
    if len(images) != len(labels):
        raise DatasetError(
            f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels: "
            "the files do not belong together"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- CIFAR (pickle, restricted)

_CIFAR = {
    # key: (title, folder, train files, test files, label key, archive)
    "cifar10": (
        "CIFAR-10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "CIFAR-100",
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        "cifar-100-python.tar.gz",
    ),
}


def _plain_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("it holds an array of Python objects, which a CIFAR batch never does")
    return dtype


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches without running code from the file.

    The official files are pickles (Python 2, numpy 1) of a dict of lists, strings and one
    uint8 array; ``pickle.load`` would call whatever function a file names, so a crafted
    batch file could run anything. This unpickler builds containers, numbers and strings as
    usual, but resolves only the few numpy functions that rebuild a plain array (as torch's
    ``weights_only`` loader does for tensors); any other name in the file stops the load.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,  # written by numpy 1
        ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,  # numpy 2
        ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never holds (refused, nothing was run)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("it refers to external objects, which a CIFAR batch never does")


def read_cifar_batch(path: str | os.PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """``(data [N, 3072] uint8, labels [N] int64)`` of one CIFAR python batch file, read safely.

    Only plain data is built (see :class:`_CifarUnpickler`); a file that names anything else,
    or holds something other than a CIFAR batch, is a :class:`DatasetError` naming it.
    """
    path = Path(path)
    fix = "delete it and extract the official archive again"
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path} is not a CIFAR batch: {e}; {fix}") from None
    except (OSError, EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"cannot read {path} as a CIFAR batch ({type(e).__name__}: {e}); {fix}") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or not isinstance(labels, list | np.ndarray):
        raise DatasetError(f"{path} is not a CIFAR batch (no uint8 'data' array and '{label_key}' list); {fix}")
    try:
        lab = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path} has labels that are not integers; {fix}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (len(data),):
        raise DatasetError(
            f"{path} holds data {data.shape} and labels {lab.shape}, not N x 3072 bytes with N labels; {fix}"
        )
    return data, lab


def _load_cifar(key: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    title, folder, train_files, test_files, label_key, archive = _CIFAR[key]
    files = train_files if split == "train" else test_files
    # Accept both root/<folder>/... (the extracted archive) and root pointing at <folder> itself.
    base = root / folder if (root / folder).is_dir() else root
    if not all((base / f).is_file() for f in files):
        raise DatasetNotFoundError(
            f"{title} not found in {root}: extract the python version ({archive}) there so that "
            f"{folder}/ holds {', '.join(train_files + test_files)} (load_dataset(..., download=True) fetches it)"
        )
    images, labels = [], []
    for f in files:
        data, lab = read_cifar_batch(base / f, label_key)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _load_cifar10(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_cifar("cifar10", root, split)


def _load_cifar100(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_cifar("cifar100", root, split)


# --------------------------------------------------------------------------- train / val split


def split_train_val(
    ds: InMemoryDataset, val_size: int | float, seed: int
) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Split a training set into (train, val), stratified by class and fixed by `seed`.

    Use the validation part for every decision made while developing (checkpoint choice, gate
    operating point, PSS pool winners, hyper-parameters); the test split is only for the final
    report, otherwise its numbers stop meaning anything. `val_size` is a sample count, or a
    fraction of the dataset when it is a float in (0, 1). Each class gets its share of the
    validation set to within one sample; both parts keep the original sample order.
    """
    n = len(ds)
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size {val_size} as a fraction must lie in (0, 1)")
        n_val = round(val_size * n)
    else:
        n_val = int(val_size)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_size {val_size} gives {n_val} validation samples out of {n}: both parts must be non-empty"
        )

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    labels = ds.labels[perm]
    # Rank of each sample among its class (random, thanks to perm). Sorting all samples by their
    # fractional position (rank + 0.5) / class_count and taking the first n_val gives each class
    # a share proportional to its size: systematic stratified sampling.
    counts = torch.bincount(labels, minlength=ds.num_classes)
    by_class = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - starts[labels[by_class]]
    position = (rank.double() + 0.5) / counts[labels].double()
    chosen = torch.argsort(position, stable=True)[:n_val]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[chosen]] = True
    val_idx = is_val.nonzero().squeeze(1)
    train_idx = (~is_val).nonzero().squeeze(1)
    return ds.subset(train_idx), ds.subset(val_idx)
