"""Evaluation: top-1 accuracy and MACs of each subnet on a split, and of a gated model's dynamic inference."""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from typing import Any

import torch

from ..counting import count_macs
from ..dynamic import DynamicNet
from ..gate import GatedSupernet, sgs_targets
from ..models.base import Supernet
from ..progress import Progress
from ..space import Arch


@torch.no_grad()
def evaluate(
    net: Supernet,
    archs: dict[str, Arch],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    input_size: Sequence[int] | None = None,
    desc: str = "eval",
) -> list[dict[str, Any]]:
    """Accuracy (top-1, in %) and MACs per image of each named arch, in eval mode.

    ``batches`` is iterated once per arch, so pass a re-iterable (a list, or a loader).
    BatchNorm uses the running statistics: recalibrate first (:func:`.recalibrate_bn`).
    Progress (:mod:`dynaslice.progress`, named ``desc``) counts batches when ``batches`` has a
    length, else subnets.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    rows = []
    per_arch = len(batches) if isinstance(batches, Sized) else 0
    bar = Progress(len(archs) * (per_arch or 1), desc, unit="batch" if per_arch else "subnet")
    try:
        for name, arch in archs.items():
            correct = total = 0
            for x, y in batches:
                logits = net(x.to(device, non_blocking=True), arch)
                correct += int((logits.argmax(-1).cpu() == y).sum())
                total += len(y)
                if per_arch:
                    bar.update()
            if not per_arch:
                bar.update()
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
        bar.close()
        net.train(was_training)
    return rows


def subnet_accuracy(net: Supernet, arch: Arch, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 (%) of one subnet on ``batches`` (BN statistics as they are)."""
    return evaluate(net, {"subnet": arch}, batches)[0]["accuracy"]


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`evaluate`'s rows."""
    lines = ["| subnet | MMACs | top-1 (%) |", "| --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['macs'] / 1e6:.2f} | {r['accuracy']:.2f} |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_gated(
    gated: GatedSupernet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    desc: str = "eval gated",
) -> dict[str, Any]:
    """Dynamic inference (argmax routing, :class:`DynamicNet`) on ``batches``, and what explains it.

    Returns accuracy (%), average MACs per image (:meth:`DynamicNet.avg_macs`), the route
    histogram overall and per class, each route's accuracy as a fixed (static) subnet, and the
    gate's agreement with the SGS targets (route 0 for samples the narrowest route gets right,
    the widest route for the others). Puts ``gated`` in eval mode; deterministic. Progress
    (:mod:`dynaslice.progress`, named ``desc``) counts batches when ``batches`` has a length.
    """
    dyn = DynamicNet(gated)
    n = len(gated.routes)
    device = next(gated.parameters()).device
    routes_all, labels_all = [], []
    correct = agree = easy = hopeless = 0
    agree_easy = 0
    route_correct = [0] * n
    bar = Progress(len(batches) if isinstance(batches, Sized) else 0, desc, unit="batch")
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out, routes = dyn.forward_with_routes(x)
        correct += int((out.argmax(1) == y).sum())
        h, _ = gated.trunk(x)  # the trunk again, for the static routes and the SGS labels
        route_out = [gated.forward_route(h, r) for r in range(n)]
        for r in range(n):
            route_correct[r] += int((route_out[r].argmax(1) == y).sum())
        target = sgs_targets(route_out[0], route_out[-1], y, n)
        is_easy = target == 0
        easy += int(is_easy.sum())
        hopeless += int((route_out[-1].argmax(1) != y).sum())
        hit = routes == target
        agree += int(hit.sum())
        agree_easy += int((hit & is_easy).sum())
        routes_all.append(routes.cpu())
        labels_all.append(y.cpu())
        bar.update()
    bar.close()
    if not routes_all:
        raise ValueError("evaluation got no images")
    routes_t, labels_t = torch.cat(routes_all), torch.cat(labels_all)
    total = len(labels_t)
    route_macs = gated.route_macs(input_size).tolist()
    hist = dyn.route_counts(routes_t)
    per_class = {
        str(c): torch.bincount(routes_t[labels_t == c], minlength=n).tolist() for c in range(num_classes)
    }
    hard = total - easy
    return {
        "accuracy": 100.0 * correct / total,
        "avg_macs": dyn.avg_macs(routes_t, input_size),
        "images": total,
        "histogram": hist,
        "per_class": per_class,
        "routes": [
            {
                "name": name,
                "arch": arch.to_dict(),
                "macs": int(route_macs[i]),
                "accuracy": 100.0 * route_correct[i] / total,
                "share": hist[i] / total,
            }
            for i, (name, arch) in enumerate(gated.named_routes().items())
        ],
        "sgs": {
            "agreement": 100.0 * agree / total,
            "agreement_easy": 100.0 * agree_easy / easy if easy else None,
            "agreement_hard": 100.0 * (agree - agree_easy) / hard if hard else None,
            "easy": easy,
            "hard": hard,
            "hopeless": hopeless,
        },
    }


def format_gated(result: dict[str, Any]) -> str:
    """Markdown tables of :func:`evaluate_gated`: the gate next to each route, then routes per class."""
    names = [r["name"] for r in result["routes"]]
    lines = [
        "| model | MMACs | top-1 (%) | share of images |",
        "| --- | ---: | ---: | ---: |",
        f"| gate (argmax) | {result['avg_macs'] / 1e6:.2f} (avg) | {result['accuracy']:.2f} | 100% |",
    ]
    for r in result["routes"]:
        lines.append(
            f"| {r['name']} (static) | {r['macs'] / 1e6:.2f} | {r['accuracy']:.2f} | {100 * r['share']:.1f}% |"
        )
    lines += [
        "",
        "| class | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for c, counts in result["per_class"].items():
        lines.append(f"| {c} | " + " | ".join(str(v) for v in counts) + " |")
    s = result["sgs"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}%"

    lines += [
        "",
        f"SGS agreement (gate route == SGS target): {pct(s['agreement'])} of {result['images']} images "
        f"(easy {s['easy']}: {pct(s['agreement_easy'])}, hard {s['hard']}: {pct(s['agreement_hard'])}; "
        f"hopeless {s['hopeless']})",
    ]
    return "\n".join(lines)
