"""dynaslice.data: file formats, splits, reproducible sharded batches, batched augmentation."""

import gzip
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaslice.data import (
    BatchLoader,
    DatasetError,
    DatasetNotFoundError,
    EvalTransform,
    InMemoryDataset,
    MultiView,
    TrainTransform,
    image_folder_loader,
    imagefolder_transforms,
    load_dataset,
    split_train_val,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(folder: Path, n: int = 6, gz: bool = True, seed: int = 0) -> dict:
    """Tiny synthetic Fashion-MNIST in `folder`; returns the arrays written per split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (images, labels)
    return out


def write_cifar10(folder: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Tiny synthetic cifar-10-batches-py; returns the train data rows and labels."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": lab, "batch_label": name}, f)
        if name != "test_batch":
            rows.append(data)
            labels += lab
    return np.concatenate(rows), np.array(labels)


def toy_dataset(n: int = 50, size: int = 8, channels: int = 1) -> InMemoryDataset:
    """Labels are the sample indices, so a batch's labels say exactly which samples it holds."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return InMemoryDataset(images, torch.arange(n), n, (0.5,) * channels, (0.25,) * channels, "toy")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or download fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", refuse)
    monkeypatch.setattr(tvu, "download_and_extract_archive", refuse)


# --------------------------------------------------------------------------- Fashion-MNIST / IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load_with_shapes_and_values(tmp_path, gz):
    written = write_fmnist(tmp_path, n=6, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("fashion_mnist", root=tmp_path, split=split)
        images, labels = written[split]
        assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert ds.num_classes == 10 and len(ds) == 6 and ds.name == "fashion_mnist"


def test_torchvision_raw_layout_is_accepted(tmp_path):
    written = write_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(written["train"][0]))


def test_truncated_idx_file_names_the_file(tmp_path):
    write_fmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])  # cut the gzip stream
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_short_idx_data_names_the_file(tmp_path):
    write_fmnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-2]))  # a valid gzip whose payload is too short
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz.*truncated"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_wrong_magic_names_the_file(tmp_path):
    write_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x1f\x8b\x08\x03" + bytes(100)))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*magic"):
        load_dataset("fashion_mnist", root=tmp_path, split="test")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, no_network):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert "apt-get install" in msg and "train-images-idx3-ubyte.gz" in msg and "\n" not in msg
    assert "--data-dir" not in msg  # the caller says how to name a folder (not every command has the flag)
    assert str(tmp_path / "nowhere") in msg


def test_missing_cifar_without_download_never_touches_network(tmp_path, no_network):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path, split="test")


def test_download_fetches_with_torchvision_then_loads_local_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeFashionMNIST:  # stands in for the real download: writes the raw files
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_fmnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    ds = load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert len(ds) == 6 and calls and all(c[2] for c in calls)
    calls.clear()
    load_dataset("fashion_mnist", root=tmp_path, download=True)  # files present: no fetch
    assert calls == []


def test_unknown_name_and_split_are_rejected():
    with pytest.raises(ValueError, match="fashion_mnist, cifar10, cifar100"):
        load_dataset("imagenet22k")
    with pytest.raises(ValueError, match="split_train_val"):
        load_dataset("fashion_mnist", split="val")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs 'apt-get install dataset-fashion-mnist'")
def test_real_fashion_mnist(no_network):
    train = load_dataset("fashion_mnist")
    test = load_dataset("fashion_mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.num_classes == 10
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert abs(train.images[:2000].float().mean().item() / 255 - train.mean[0]) < 0.02


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_pickle_folder(tmp_path):
    rows, labels = write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.images.shape == (15, 3, 32, 32) and ds.num_classes == 10
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    # Row layout is 1024 red, 1024 green, 1024 blue bytes, each plane row-major.
    assert ds.images[4, 0, 0, 1] == rows[4, 1] and ds.images[4, 1, 0, 0] == rows[4, 1024]
    assert ds.images[4, 2, 31, 31] == rows[4, 3071]
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test")
    assert len(test) == 3 and len(ds.mean) == 3


def test_cifar100_and_damaged_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.astype(np.uint8), "fine_labels": [3, 99]}, f)
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.labels.tolist() == [3, 99]
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cifar-100-python/test"):
        load_dataset("cifar100", root=tmp_path, split="test")


# --------------------------------------------------------------------------- splits


def test_split_train_val_is_disjoint_complete_deterministic_and_stratified():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 13)
    images = torch.zeros(103, 1, 2, 2, dtype=torch.uint8)
    ds = InMemoryDataset(images, labels, 3, (0.0,), (1.0,), "t")
    ds.images[:, 0, 0, 0] = torch.arange(103, dtype=torch.uint8)  # identify samples by pixel
    train, val = split_train_val(ds, 20, seed=0)
    tr, va = set(train.images[:, 0, 0, 0].tolist()), set(val.images[:, 0, 0, 0].tolist())
    assert len(val) == 20 and len(train) == 83
    assert not tr & va and tr | va == set(range(103))
    # Each class gets its proportional share to within one sample.
    for c, share in enumerate([60 * 20 / 103, 30 * 20 / 103, 13 * 20 / 103]):
        assert abs((val.labels == c).sum().item() - share) <= 1
    again = split_train_val(ds, 20, seed=0)[1]
    other = split_train_val(ds, 20, seed=1)[1]
    assert torch.equal(again.images, val.images)
    assert not torch.equal(other.images, val.images)
    assert len(split_train_val(ds, 0.1, seed=0)[1]) == 10
    with pytest.raises(ValueError, match="non-empty"):
        split_train_val(ds, 103, seed=0)


# --------------------------------------------------------------------------- BatchLoader


def epoch_labels(loader: BatchLoader, epoch: int, start: int = 0) -> list[list[int]]:
    return [y.tolist() for _, y in loader.epoch_batches(epoch, start)]


def test_loader_is_reproducible_and_resumes_exactly():
    ds = toy_dataset()
    make = lambda: BatchLoader(ds, 8, True, 7, True, transform=TrainTransform((0.5,), (0.25,)))
    a, b = make(), make()
    full = list(a.epoch_batches(3))
    assert len(full) == len(a) == 6
    for (xa, ya), (xb, yb) in zip(full, b.epoch_batches(3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed = list(b.epoch_batches(3, start=4))
    assert len(resumed) == 2
    for (xa, ya), (xr, yr) in zip(full[4:], resumed, strict=True):
        assert torch.equal(xa, xr) and torch.equal(ya, yr)  # images include the augmentation
    assert epoch_labels(a, 3) != epoch_labels(a, 4)  # a new order every epoch
    assert epoch_labels(a, 3) != epoch_labels(BatchLoader(ds, 8, True, 8, True), 3)  # seed


def test_loader_without_shuffle_keeps_order_and_defaults_to_normalisation():
    ds = toy_dataset(n=10)
    loader = BatchLoader(ds, 4, shuffle=False, seed=0, drop_last=False)
    assert epoch_labels(loader, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x, _ = next(iter(loader))
    assert torch.allclose(x, (ds.images[:4].float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_see_disjoint_shards_with_equal_batch_counts(drop_last):
    ds = toy_dataset(n=51)
    ranks = [BatchLoader(ds, 8, True, 3, drop_last, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [sum(epoch_labels(loader, 2), []) for loader in ranks]
    assert len(seen[0]) == len(seen[1])
    if drop_last:  # 25 per rank, 3 full batches of 8 each; the rest is dropped
        assert len(seen[0]) == 24 and not set(seen[0]) & set(seen[1])
    else:  # 26 per rank: one sample is repeated to even the shards, nothing is lost
        assert len(seen[0]) == 26 and set(seen[0]) | set(seen[1]) == set(range(51))
        assert len(set(seen[0]) & set(seen[1])) <= 1
    # Every rank shares one permutation: interleaving the shards recovers it.
    whole = BatchLoader(ds, 51, True, 3, False).indices(2)
    assert ranks[0].indices(2).tolist() == whole[0::2][: len(ranks[0].indices(2))].tolist()


def test_loader_rejects_bad_arguments():
    ds = toy_dataset(n=10)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 4, True, 0, True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_last"):
        BatchLoader(ds, 16, True, 0, True)


# --------------------------------------------------------------------------- transforms


def test_train_transform_makes_per_sample_crops_and_flips():
    image = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    batch = image.expand(16, 1, 8, 8).contiguous()
    t = TrainTransform((0.0,), (1.0,), crop_padding=2)
    out = t(batch, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, t(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, t(batch, torch.Generator().manual_seed(1)))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4  # not one crop for the batch
    # Every output is one of the 5 x 5 shifts (times 2 flips) of the zero-padded image.
    padded = torch.nn.functional.pad(image[0, 0].float() / 255, (2, 2, 2, 2))
    candidates = [padded[i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
    candidates += [c.flip(-1) for c in candidates]
    for o in out:
        assert any(torch.equal(o[0], c) for c in candidates)


def test_train_transform_default_padding_and_no_op_setting():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t = TrainTransform(mean, std, crop_padding=0, hflip=False)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(t(x, torch.Generator()), EvalTransform(mean, std)(x))
    # Default padding for 28 px is 2: no output pixel can come from a 3-pixel shift.
    ones = torch.full((64, 1, 28, 28), 255, dtype=torch.uint8)
    out = TrainTransform((0.0,), (1.0,))(ones, torch.Generator().manual_seed(0))
    zero_cols = (out == 0).all(dim=2).sum(dim=-1)  # fully black columns per sample
    assert zero_cols.max() == 2 and zero_cols.min() == 0


def test_eval_transform_normalises_exactly():
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    expected = (x.float() / 255 - m) / s
    assert torch.allclose(EvalTransform(mean, std)(x), expected, atol=1e-6)


def test_multiview_gives_two_different_views():
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    views = MultiView(TrainTransform((0.0,), (1.0,)))(x, torch.Generator().manual_seed(0))
    assert views.shape == (2, 8, 1, 28, 28) and not torch.equal(views[0], views[1])


# --------------------------------------------------------------------------- image folders


def test_image_folder_loader(tmp_path):
    from PIL import Image

    with pytest.raises(DatasetNotFoundError, match="one sub-folder of images per class"):
        image_folder_loader(tmp_path, "train", 4, train=True, workers=0)
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / cls / f"{i}.png")
    loader = image_folder_loader(tmp_path, "val", 4, train=False, workers=0, size=32)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1]
    train = imagefolder_transforms(train=True, size=32)(Image.fromarray(pixels))
    assert train.shape == (3, 32, 32)
