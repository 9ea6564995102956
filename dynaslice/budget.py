"""Budget tables: the deployable subnet for each resource budget of a PSS-Net supernet.

A PSS run (``train.sampler=pss``, see :mod:`dynaslice.train.pss`) ends by picking, for every
budget bucket, the subnet of its pool with the best accuracy on the *validation* split, and
writes ``RUN/budget_table.json`` (bucket -> arch, MACs, validation accuracy, predicted latency
when a latency table was given) and ``RUN/budget.safetensors`` (the weights, and for every
entry the BatchNorm statistics recalibrated for that subnet alone).

Switching budget at run time is one call that reloads nothing -- the supernet holds every
subnet; a :class:`BudgetNet` picks the table's entry and gives the BN layers that entry's
statistics (a copy of a few kilobytes) before running it::

    from dynaslice.budget import BudgetNet

    net = BudgetNet.load("runs/pss").eval()
    y = net(x, max_macs=10e6)          # resources shrink: a smaller subnet, same weights
    y = net(x, max_latency_ms=2.0)     # with a latency table (train.pss.latency_table)
    static = net.extract(max_macs=10e6)  # a plain torch.nn model of that entry

From the shell: ``dynaslice select runs/pss --max-macs 10M [--export subnet.pt|subnet.onnx]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs, safejson
from .atomic import atomic_write_json
from .modelfile import CheckpointError, load_model_file, net_from_tensors, prefixed, save_model_file
from .models.base import Supernet
from .nn import SlicedBatchNorm2d
from .onnx_package import pick_entry
from .space import Arch
from .torch_export import extract_subnet

TABLE_FILE, WEIGHTS_FILE = runs.BUDGET_TABLE, runs.BUDGET_WEIGHTS


@dataclass(frozen=True)
class BudgetEntry:
    """One bucket's deployable subnet: the best of ``candidates`` pool subnets by ``val_accuracy``,
    top-1 (%) on the validation split with BN statistics recalibrated for it alone (the
    statistics :class:`BudgetNet` runs it with)."""

    bucket: float
    arch: Arch
    macs: int
    val_accuracy: float
    candidates: int = 1
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "arch": self.arch.to_dict(),
            "macs": self.macs,
            "val_accuracy": self.val_accuracy,
            "candidates": self.candidates,
            "latency_ms": self.latency_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetEntry:
        return cls(
            bucket=float(d["bucket"]),
            arch=Arch(d["arch"]),
            macs=int(d["macs"]),
            val_accuracy=float(d["val_accuracy"]),
            candidates=int(d.get("candidates", 1)),
            latency_ms=d.get("latency_ms"),
        )


@dataclass
class BudgetTable:
    """Budget bucket -> subnet. :meth:`best` answers "which subnet for this budget?"."""

    entries: list[BudgetEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries

    def best(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> Arch:
        """The most accurate subnet within the budget (all given limits must hold).

        Raises a ValueError naming the cheapest entry when none fits.
        """
        return self.best_entry(max_macs, max_latency_ms).arch

    def best_entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> BudgetEntry:
        """The most accurate entry within the budget, cheaper on a tie (:func:`dynaslice.onnx_package.pick_entry`)."""
        return self.entries[pick_entry([e.to_dict() for e in self.entries], max_macs, max_latency_ms)]

    def bucket_label(self, entry: BudgetEntry) -> str:
        """The metric range of ``entry``'s bucket, e.g. ``"11.25-13.75 MMACs"``.

        A subnet belongs to bucket ``b`` when its metric *rounds* to ``b`` (a multiple of
        ``bucket_step``), so ``b`` is the middle of the range, not an upper bound: an entry of bucket
        12.5 (step 2.5) may cost 13.1 MMACs. Tables without ``bucket_step`` (version 1) show ``b`` alone.
        """
        unit = "ms" if self.meta.get("metric") == "latency" else "MMACs"
        step = self.meta.get("bucket_step")
        if not step:
            return f"{entry.bucket:g} {unit}"
        return f"{round(entry.bucket - step / 2, 9):g}-{round(entry.bucket + step / 2, 9):g} {unit}"

    def format(self) -> str:
        """A Markdown table (the bucket column: each bucket's range, :meth:`bucket_label`)."""
        lat = any(e.latency_ms is not None for e in self.entries)
        lines = ["| bucket | MMACs | " + ("ms | " if lat else "") + "val top-1 (%) | arch |"]
        lines.append("| ---: | ---: | " + ("---: | " if lat else "") + "---: | --- |")
        for e in self.entries:
            ms = f"{e.latency_ms:.3f} | " if lat and e.latency_ms is not None else ("- | " if lat else "")
            arch = " ".join(f"{k}={v}" for k, v in e.arch.items())
            label = self.bucket_label(e)
            lines.append(f"| {label} | {e.macs / 1e6:.2f} | {ms}{e.val_accuracy:.2f} | {arch} |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "dynaslice-budget-table",
            "version": 2,
            **self.meta,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetTable:
        if not isinstance(d, dict) or "entries" not in d:
            raise ValueError("not a budget table (no 'entries')")
        meta = {k: v for k, v in d.items() if k not in ("format", "version", "entries")}
        return cls([BudgetEntry.from_dict(e) for e in d["entries"]], meta)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (a temporary file in the same folder, then a rename)."""
        atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> BudgetTable:
        """From a table JSON, a run directory, or a ``budget.safetensors`` model file."""
        path = Path(path)
        if path.is_dir():
            path = path / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no budget table at {path}: it is written at the end of a run with train.sampler=pss"
            )
        if path.suffix == ".safetensors":
            _, meta = load_model_file(path)
            if "budget_table" not in meta:
                raise ValueError(f"{path} holds no budget table (use the run's {WEIGHTS_FILE})")
            return cls.from_dict(meta["budget_table"])
        try:
            return cls.from_dict(safejson.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path} is not a readable budget table ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------- runtime

STATS_PREFIX = "bn"  # budget.safetensors: "model.*" weights, "bn.<entry>.<BN buffer>" statistics


class BudgetNet(nn.Module):
    """A PSS supernet with its budget table: ``net(x, max_macs=..., max_latency_ms=...)`` runs the
    table's most accurate subnet within the budget, with BatchNorm statistics of its own.

    Why statistics per entry: a :class:`~dynaslice.nn.SlicedBatchNorm2d` keeps one row of
    statistics per *layer width*, so two table subnets with the same width in one layer but
    different widths upstream would have to share that row; averaged over both, non-uniform
    subnets lose tens of points. Each forward therefore first copies its entry's statistics
    (``running_mean``/``running_var`` of every BN layer, kilobytes) into ``self.net``: that, and
    the choice of slices, is all a budget switch costs. Calls are independent of each other; do
    not run two budgets concurrently on one instance (they share ``self.net``'s BN buffers).
    """

    def __init__(self, net: Supernet, table: BudgetTable, bn_stats: Sequence[Mapping[str, torch.Tensor]]):
        super().__init__()
        if len(bn_stats) != len(table.entries):
            raise ValueError(f"{len(bn_stats)} sets of BN statistics for {len(table.entries)} table entries")
        self.net, self.table = net, table
        self._bns = [(n, m) for n, m in net.named_modules() if isinstance(m, SlicedBatchNorm2d)]
        self.stats = nn.ModuleList()  # entry i -> a module whose buffers are its statistics
        for i, given in enumerate(bn_stats):
            holder = nn.Module()
            for name, bn in self._bns:
                for k in ("running_mean", "running_var"):
                    t = given.get(f"{name}.{k}")
                    if t is None or t.shape != getattr(bn, k).shape:
                        raise ValueError(
                            f"budget entry {i} (bucket {table.entries[i].bucket:g}) has no BN statistics "
                            f"{name}.{k} of shape {tuple(getattr(bn, k).shape)}"
                        )
                    holder.register_buffer(f"{name}.{k}".replace(".", "__"), t.detach().clone())
            self.stats.append(holder)

    def entry(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> BudgetEntry:
        """The table's most accurate entry within the budget (see :meth:`BudgetTable.best_entry`)."""
        return self.table.best_entry(max_macs, max_latency_ms)

    @torch.no_grad()
    def use(self, entry: BudgetEntry) -> Arch:
        """Give ``self.net`` the BN statistics of ``entry`` (one of ``self.table.entries``); returns
        its arch, for ``self.net(x, arch)``, :func:`~dynaslice.torch_export.extract_subnet` or ONNX export."""
        i = self.table.entries.index(entry)
        targets = [getattr(bn, k) for _, bn in self._bns for k in ("running_mean", "running_var")]
        torch._foreach_copy_(targets, list(self.stats[i].buffers(recurse=False)))
        return entry.arch

    def forward(
        self, x: torch.Tensor, max_macs: float | None = None, max_latency_ms: float | None = None
    ) -> torch.Tensor:
        return self.net(x, self.use(self.entry(max_macs, max_latency_ms)))

    def extract(self, max_macs: float | None = None, max_latency_ms: float | None = None) -> nn.Module:
        """The entry for the budget as a plain ``torch.nn`` model (its own BN statistics included)."""
        return extract_subnet(self.net, self.use(self.entry(max_macs, max_latency_ms)))

    @classmethod
    def load(cls, path: str | Path) -> BudgetNet:
        """From a PSS run directory or its ``budget.safetensors`` (in train mode, like any new module)."""
        path = Path(path)
        if path.name == TABLE_FILE:
            path = path.parent
        file = path / WEIGHTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no {WEIGHTS_FILE} at {path}: it is written at the end of a run with train.sampler=pss"
            )
        tensors, meta = load_model_file(file)
        if "budget_table" not in meta:
            raise CheckpointError(f"{file} holds no budget table (use a PSS run's {WEIGHTS_FILE})")
        table = BudgetTable.from_dict(meta["budget_table"])
        stats: list[dict[str, torch.Tensor]] = [{} for _ in table.entries]
        for key, t in tensors.items():
            head, _, rest = key.partition(".")
            if head == STATS_PREFIX:
                i, _, name = rest.partition(".")
                stats[int(i)][name] = t
        if not all(stats):
            raise CheckpointError(
                f"{file} has no BN statistics per budget entry (written by dynaslice before budget "
                "table version 2); train the PSS run again to get them"
            )
        try:
            return cls(net_from_tensors(tensors, meta, file), table, stats)
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from None


def save_budget_file(
    path: str | Path,
    net: Supernet,
    table: BudgetTable,
    bn_stats: Sequence[Mapping[str, torch.Tensor]],
    meta: dict[str, Any],
) -> None:
    """Write what :meth:`BudgetNet.load` reads: ``net``'s weights, the table (in the metadata) and
    each entry's BN statistics, atomically."""
    tensors = prefixed("model", net)
    for i, stats in enumerate(bn_stats):
        tensors.update({f"{STATS_PREFIX}.{i}.{k}": v for k, v in stats.items()})
    save_model_file(path, tensors, {**meta, "budget_table": table.to_dict()})
