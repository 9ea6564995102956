"""Stage II of DS-Net: train the gate's slimming head on a frozen gated supernet, and evaluate it.

The backbone (every layer of the Stage-I supernet, the attention head included) is frozen:
``requires_grad=False``, BatchNorm in eval mode, and it runs under ``torch.no_grad()`` -- the
gate needs no gradient through it. The slimming head's logits reach the loss three ways:

- **SGS** (Sandwich Gate Sparsification): each training sample is labelled online by the
  frozen routes -- the narrowest route gets it right: target route 0; else the widest route
  (``stage2.drop_hopeless``: no target when the widest is wrong too); gate CE on the logits;
- **task CE** through straight-through Gumbel-softmax routes: the output of each sample's route
  (computed without grad) times its straight-through weight, so the gradient reaches the logits;
- a **complexity penalty** pulling the batch's MACs toward ``stage2.target_macs``: its value is
  the MACs of the routes taken, its gradient flows through the untempered softmax of the logits
  (straight-through), so it keeps pulling after the temperature has annealed.

After training, the slimming head's bias is shifted (calibrated on the validation split) so that
argmax routing spends at most the target (``stage2.calibrate``; :func:`dynaslice.gate.calibrate_route_bias`).

The Gumbel temperature anneals from ``tau_start`` to ``tau_end``; evaluation (in and after
Stage II) routes by the argmax of the logits, never with noise. Single process; a run takes
minutes, so it has no mid-run resume: a finished run's directory is never overwritten.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..atomic import atomic_write_json
from ..dynamic import DynamicNet
from ..gate import (
    GatedSupernet,
    anneal_tau,
    calibrate_route_bias,
    gate_loss,
    gumbel_routes,
    resolve_target_macs,
    sgs_targets,
)
from ..space import Arch
from .bn import recalibrate_bn
from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config
from .data import InMemoryDataset, eval_loader, load_split, train_loader
from .metrics import MetricsLogger
from .samplers import derive_seed


def route_archs(gated: GatedSupernet) -> dict[str, Arch]:
    """``{"route0": arch, ...}``, narrowest first: the names used in tables, JSON and metadata."""
    return {f"route{i}": a for i, a in enumerate(gated.routes)}


def needs_recalibration(gated: GatedSupernet, meta: dict[str, Any]) -> bool:
    """True unless the checkpoint's BN statistics were recalibrated for exactly the gate's routes.

    BN statistics are per width, so a file recalibrated for other subnets (e.g. Stage I's
    uniform eval widths) holds statistics averaged over the wrong mix for some routes.
    """
    done = {Arch(a) for a in (meta.get("recalibrated") or {}).values()}
    return done != set(gated.routes)


def recalibrate_routes(gated: GatedSupernet, cfg: Config) -> None:
    """Recompute BN statistics for the gate's routes from the run's training split (eval preprocessing)."""
    if cfg.data.name == "folder":
        raise ConfigError(
            "recalibrating a gated net from a folder dataset is not wired in yet; use recalibrate_bn"
        )
    t = cfg.train
    data = load_split(cfg.data, "train", t.seed)
    recalibrate_bn(gated, list(gated.routes), data, t.recal_images, t.recal_batch_size, seed=t.seed)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_gated(
    gated: GatedSupernet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Dynamic inference (argmax routing, :class:`DynamicNet`) on ``batches``, and what explains it.

    Returns accuracy (%), average MACs per image (:meth:`DynamicNet.avg_macs`), the route
    histogram overall and per class, each route's accuracy as a fixed (static) subnet, and the
    gate's agreement with the SGS targets (route 0 for samples the narrowest route gets right,
    the widest route for the others). Puts ``gated`` in eval mode; deterministic.
    """
    dyn = DynamicNet(gated)
    n = len(gated.routes)
    device = next(gated.parameters()).device
    routes_all, labels_all = [], []
    correct = agree = easy = hopeless = 0
    agree_easy = 0
    route_correct = [0] * n
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
            for i, (name, arch) in enumerate(route_archs(gated).items())
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


# --------------------------------------------------------------------------- training


@torch.no_grad()
def route_logits_of(gated: GatedSupernet, data: InMemoryDataset) -> torch.Tensor:
    """The slimming head's logits for every image of ``data`` (eval mode)."""
    gated.eval()
    device = next(gated.parameters()).device
    out = []
    for x, _ in eval_loader(data):
        feat = gated.net.forward_to(x.to(device), gated.routes[0], gated.cut)
        out.append(gated.gate.route_logits(gated.gate.squeeze(feat)).cpu())
    return torch.cat(out)


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def train_gate(
    gated: GatedSupernet,
    cfg: Config,
    out_dir: str | Path,
    source: dict[str, Any],
    recalibrate: bool,
) -> dict[str, Any]:
    """Stage II on ``gated`` (modified in place) with ``cfg.stage2``; writes a gated checkpoint.

    ``source``: the Stage-I checkpoint's metadata (its ``model`` spec is kept). ``recalibrate``:
    recompute BN statistics for the routes first (do it unless the file was recalibrated for
    them). Writes ``OUT/checkpoints/step-N`` (backbone and gate, the usual format, metadata
    ``stage: 2`` and ``recalibrated`` = the routes), ``OUT/config.yaml``, ``OUT/metrics.jsonl``
    and ``OUT/final_eval.json`` (validation split); returns the final validation result (empty
    when ``data.val_size`` is 0).
    """
    cfg.validate()
    s2, t = cfg.stage2, cfg.train
    out = Path(out_dir)
    if out.is_dir() and latest_checkpoint(out) is not None:
        raise CheckpointError(f"{out} already holds a Stage-II checkpoint; choose another --out directory")
    if t.threads:
        torch.set_num_threads(t.threads)
    if cfg.data.name == "folder":
        raise ConfigError("Stage II on a folder dataset is not wired in yet (in-memory datasets only)")
    device = _resolve_device(t.device)
    gated.to(device)
    route_macs = gated.route_macs()
    try:
        target = None if s2.target_macs is None else resolve_target_macs(s2.target_macs, route_macs)
    except ValueError as e:
        raise ConfigError(f"stage2.target_macs: {e}") from None
    if recalibrate:
        recalibrate_routes(gated, cfg)

    train_ds = load_split(cfg.data, "train", t.seed)
    val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
    loader = train_loader(cfg.data, train_ds, t.seed, 0, 1)
    steps_per_epoch = len(loader)
    total = s2.epochs * steps_per_epoch
    if total < 1:
        raise ConfigError(
            f"no Stage-II steps: {len(train_ds)} training images < data.batch_size {cfg.data.batch_size}"
        )

    params = gated.freeze_for_stage2(s2.train_gate_trunk)
    opt = torch.optim.SGD(params, lr=s2.lr, momentum=s2.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gate, n = gated.gate, len(gated.routes)

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out)
    logger.open()
    history: list[dict[str, Any]] = []
    step = 0
    show_bar = sys.stderr.isatty()
    for epoch in range(s2.epochs):
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"gate epoch {epoch + 1}/{s2.epochs}",
            disable=not show_bar,
            leave=False,
        )
        t0, sums = time.perf_counter(), {"total": 0.0, "expected_macs": 0.0}
        for x, y in loader.epoch_batches(epoch):
            torch.manual_seed(derive_seed("gate-step", t.seed, step))  # the Gumbel noise
            x, y = x.to(device), y.to(device)
            tau = anneal_tau(step, total, s2.tau_start, s2.tau_end)
            with torch.no_grad():  # the frozen backbone: no graph, no gradient
                feat = gated.net.forward_to(x, gated.routes[0], gated.cut)
            with torch.set_grad_enabled(s2.train_gate_trunk):
                z = gate.squeeze(feat)
            logits = gate.route_logits(z)
            weights = gumbel_routes(logits, tau)
            idx = weights.argmax(1)
            with torch.no_grad():
                h = gate.scale(feat, z.detach())
                small, large = gated.forward_route(h, 0), gated.forward_route(h, -1)
                targets = sgs_targets(small, large, y, n, s2.drop_hopeless)
                chosen = torch.where((idx == 0)[:, None], small, large)
                middle = ((idx > 0) & (idx < n - 1)).nonzero().squeeze(1)
                if len(middle):
                    chosen[middle] = gated.forward_routes(h[middle], idx[middle])
            # straight-through: the weight is 1 in value, and carries the gradient to the gate
            outputs = chosen * weights.gather(1, idx[:, None])
            # The MACs term: the value is the MACs of the routes taken, the gradient comes from the
            # untempered softmax. Through the Gumbel soft sample it would vanish as tau anneals and
            # the gate grows confident, and the target would stop pulling.
            probs = logits.softmax(1)
            macs_weights = weights.detach() - probs.detach() + probs
            loss = gate_loss(
                logits,
                targets,
                outputs,
                y,
                macs_weights,
                route_macs,
                target,
                s2.gate_weight,
                s2.task_weight,
                s2.macs_weight,
            )
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            sched.step()
            step += 1
            parts = loss.log()
            sums["total"] += parts["total"]
            sums["expected_macs"] += parts["expected_macs"]
            bar.update()
            bar.set_postfix(
                loss=f"{parts['total']:.3f}", mmacs=f"{parts['expected_macs'] / 1e6:.2f}", tau=f"{tau:.2f}"
            )
            if step % t.log_every_steps == 0 or step == total:
                logger.log(
                    {
                        "stage": 2,
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "lr": sched.get_last_lr()[0],
                        "tau": tau,
                        "loss": parts["total"],
                        **{k: v for k, v in parts.items() if k != "total"},
                        "routes": torch.bincount(idx.cpu(), minlength=n).tolist(),
                    }
                )
        bar.close()
        seen = max(1, steps_per_epoch)
        line = (
            f"gate epoch {epoch + 1}/{s2.epochs}: mean loss {sums['total'] / seen:.4f}, "
            f"train MMACs {sums['expected_macs'] / seen / 1e6:.2f}, {time.perf_counter() - t0:.1f} s"
        )
        if val_ds is not None:
            result = evaluate_gated(gated, eval_loader(val_ds), val_ds.num_classes)
            history.append(result)
            logger.log({"stage": 2, "step": step, "epoch": epoch + 1, "val_gate": result})
            line += f"; val top-1 {result['accuracy']:.2f}% at {result['avg_macs'] / 1e6:.2f} MMACs, routes {result['histogram']}"
        print(line, flush=True)
    if s2.calibrate and target is not None and val_ds is not None:
        shift = calibrate_route_bias(route_logits_of(gated, val_ds), route_macs, target)
        with torch.no_grad():
            gate.slimming.bias.add_(shift.to(gate.slimming.bias))
        result = evaluate_gated(gated, eval_loader(val_ds), val_ds.num_classes)
        history.append(result)
        logger.log({"stage": 2, "step": step, "calibrated": True, "val_gate": result})
        print(
            f"route bias calibrated on validation for <= {target / 1e6:.2f} MMACs "
            f"(logit shift {[round(b, 3) for b in shift.tolist()]}): val top-1 {result['accuracy']:.2f}% "
            f"at {result['avg_macs'] / 1e6:.2f} MMACs, routes {result['histogram']}",
            flush=True,
        )
    logger.close()

    spec = dict(source["model"])
    meta = {
        "model": spec,
        "config": cfg.to_dict(),
        "epoch": float(s2.epochs),
        "stage": 2,
        "recalibrated": {k: a.to_dict() for k, a in route_archs(gated).items()},
        "stage2": {"target_macs": target, "route_macs": route_macs.tolist()},
    }
    tensors = {f"model.{k}": v for k, v in gated.state_dict().items()}
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": {"seed": t.seed}}
    save_checkpoint(out, step, tensors, meta, state, t.keep_checkpoints)
    final = history[-1] if history else {}
    atomic_write_json(out / "final_eval.json", final, indent=1)
    return final
