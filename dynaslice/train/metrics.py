"""Metrics: JSON lines in the run directory, and TensorBoard when it is installed.

``metrics.jsonl`` gets one object per logged step (``step``, ``lr``, ``loss``, per-subnet
``losses``) and per evaluation (``val``: rows of accuracy and MACs). A resumed run appends; steps
logged after the checkpoint it resumed from appear twice, and the later line is the one that
counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import runs


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / runs.METRICS
        self.enabled = enabled
        self._file = None
        self._tb = None

    def open(self) -> None:
        if not self.enabled or self._file is not None:
            return
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: JSON lines are the record of the run
            return
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key in ("lr", "loss"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for i, value in enumerate(record.get("losses", [])):
                self._tb.add_scalar(f"train/loss_subnet{i}", value, step)
            val = record.get("val")
            if isinstance(val, dict) and "accuracy" in val:  # a gated model: one accuracy
                self._tb.add_scalar("val/top1_gated", val["accuracy"], step)
            for row in val if isinstance(val, list) else []:  # a supernet: one row per subnet
                self._tb.add_scalar(f"val/top1_{row['name']}", row["accuracy"], step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
