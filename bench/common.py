"""What every benchmark script shares: smoke-test sizing, the test split, machine facts, results.

Benchmarks run as ``python bench/bench_X.py`` (this folder is then first on ``sys.path``), write
one JSON file each (atomically) and are quoted with their command in docs/RESULTS.md.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from dynaslice.atomic import atomic_write_json
from dynaslice.data import InMemoryDataset
from dynaslice.train.config import Config
from dynaslice.train.data import load_split

# --quick: a smoke run of a benchmark in a minute or two (checks it runs, says nothing)
QUICK = [
    "data.train_size=512",
    "data.val_size=256",
    "data.batch_size=64",
    "train.epochs=1",
    "train.recal_images=256",
    "train.recal_batch_size=128",
]


def test_split(cfg: Config, images: int = 0) -> InMemoryDataset:
    """The test split a config names (its first ``images`` images; 0: all of it). Report only."""
    test = load_split(cfg.data, "test", cfg.train.seed)
    if images and images < len(test):
        test = test.subset(range(images))
    return test


def machine() -> dict[str, Any]:
    """Where a figure was measured: recorded in every results file."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_results(path: str | Path, data: dict[str, Any]) -> None:
    """The benchmark's JSON (with the machine facts), written atomically."""
    atomic_write_json(path, {**data, "environment": machine()}, indent=1)
    print(f"wrote {path}")
