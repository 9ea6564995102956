"""Evaluation: top-1 accuracy and MACs of each subnet on a split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..models.base import Supernet
from ..profile import count_macs
from ..space import Arch


def uniform_archs(net: Supernet, widths: Sequence[float]) -> dict[str, Arch]:
    """``{"x0.5": arch, ...}``: the uniform-width subnets (every width dimension at ratio ``w``)."""
    return {f"x{w:g}": net.space.uniform(w) for w in widths}


@torch.no_grad()
def evaluate(
    net: Supernet,
    archs: dict[str, Arch],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    input_size: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy (top-1, in %) and MACs per image of each named arch, in eval mode.

    ``batches`` is iterated once per arch, so pass a re-iterable (a list, or a loader).
    BatchNorm uses the running statistics: recalibrate first (:func:`.recalibrate_bn`).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    rows = []
    try:
        for name, arch in archs.items():
            correct = total = 0
            for x, y in batches:
                logits = net(x.to(device, non_blocking=True), arch)
                correct += int((logits.argmax(-1).cpu() == y).sum())
                total += len(y)
            if total == 0:
                raise ValueError("evaluation got no images")
            rows.append(
                {
                    "name": name,
                    "arch": arch.to_dict(),
                    "accuracy": 100.0 * correct / total,
                    "macs": int(count_macs(net, arch, input_size)),
                    "images": total,
                }
            )
    finally:
        net.train(was_training)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`evaluate`'s rows."""
    lines = ["| subnet | MMACs | top-1 (%) |", "| --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['macs'] / 1e6:.2f} | {r['accuracy']:.2f} |")
    return "\n".join(lines)
