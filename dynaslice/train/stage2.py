"""Stage II of DS-Net on the training engine: the gate's slimming head learns on a frozen gated supernet.

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
Stage II) routes by the argmax of the logits, never with noise. Checkpoints, resume, metrics and
progress are the engine's (:class:`~dynaslice.train.engine.Trainer`), as in Stage I.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config_base import ConfigError
from ..gate import (
    GatedSupernet,
    anneal_tau,
    calibrate_route_bias,
    gate_loss,
    gumbel_routes,
    resolve_target_macs,
    sgs_targets,
)
from ..modelfile import CheckpointError
from ..space import Arch
from .bn import recalibrate_bn
from .checkpoint import latest_checkpoint
from .config import Config
from .data import InMemoryDataset, eval_loader, load_split, train_loader
from .engine import Trainer
from .evaluate import evaluate_gated


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
        raise ConfigError("recalibrating a gated net from a folder dataset is not wired in yet; use recalibrate_bn")
    t = cfg.train
    data = load_split(cfg.data, "train", t.seed)
    recalibrate_bn(gated, list(gated.routes), data, t.recal_images, t.recal_batch_size, seed=t.seed)


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


class GateTrainer(Trainer):
    """Stage II of ``gated`` (changed in place) with ``cfg.stage2``, on the engine.

    ``source``: the Stage-I model file's metadata (its ``model`` spec is kept in the Stage-II
    checkpoints). Checkpoints carry metadata ``stage: 2`` and ``recalibrated`` = the routes (call
    :func:`recalibrate_routes` first unless the file was recalibrated for them).
    """

    name = "gate"
    rng_name = "gate-step"

    def __init__(self, gated: GatedSupernet, cfg: Config, run_dir: str | Path, source: dict[str, Any]):
        super().__init__(cfg, run_dir)
        s2, t = cfg.stage2, cfg.train
        if cfg.data.name == "folder":
            raise ConfigError("Stage II on a folder dataset is not wired in yet (in-memory datasets only)")
        self.gated, self.source = gated.to(self.device), source
        self.route_macs = gated.route_macs()
        try:
            self.target_macs = None if s2.target_macs is None else resolve_target_macs(s2.target_macs, self.route_macs)
        except ValueError as e:
            raise ConfigError(f"stage2.target_macs: {e}") from None
        self.train_ds = load_split(cfg.data, "train", t.seed)
        self.val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
        loader = train_loader(cfg.data, self.train_ds, t.seed, 0, 1)
        params = gated.freeze_for_stage2(s2.train_gate_trunk)
        optimizer = torch.optim.SGD(params, lr=s2.lr, momentum=s2.momentum)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s2.epochs * len(loader)))
        self.setup_loop(loader, s2.epochs, optimizer, scheduler)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        s2, gated, gate, n = self.cfg.stage2, self.gated, self.gated.gate, len(self.gated.routes)
        tau = anneal_tau(self.step, self.total_steps, s2.tau_start, s2.tau_end)
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
        loss = gate_loss(logits, targets, outputs, y, macs_weights, self.route_macs, self.target_macs,
                         s2.gate_weight, s2.task_weight, s2.macs_weight)  # fmt: skip
        loss.total.backward()
        log = {k: v for k, v in loss.log().items() if k != "total"}
        log.update(stage=2, tau=tau, routes=torch.bincount(idx.cpu(), minlength=n).tolist())
        return [loss.total.detach()], {"log": log, "names": ["the gate loss"]}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"model": self.gated}

    def meta(self) -> dict[str, Any]:
        return {
            "model": dict(self.source["model"]),
            **super().meta(),
            "stage": 2,
            "recalibrated": {k: a.to_dict() for k, a in self.gated.named_routes().items()},
            "stage2": {"target_macs": self.target_macs, "route_macs": self.route_macs.tolist()},
        }

    def evaluate_validation(self) -> dict[str, Any] | None:
        if self.val_ds is None:
            return None
        return evaluate_gated(self.gated, eval_loader(self.val_ds), self.val_ds.num_classes)

    def format_validation(self, result: Any) -> str:
        return (
            f" (gate): top-1 {result['accuracy']:.2f}% at {result['avg_macs'] / 1e6:.2f} MMACs, "
            f"routes {result['histogram']}"
        )

    def finish(self) -> dict[str, Any]:
        """Calibrate the route bias on validation (``stage2.calibrate``), save, evaluate."""
        gate = self.gated.gate
        if self.cfg.stage2.calibrate and self.target_macs is not None and self.val_ds is not None:
            shift = calibrate_route_bias(route_logits_of(self.gated, self.val_ds), self.route_macs, self.target_macs)
            with torch.no_grad():
                gate.slimming.bias.add_(shift.to(gate.slimming.bias))
            print(f"route bias calibrated on validation for <= {self.target_macs / 1e6:.2f} MMACs "
                  f"(logit shift {[round(b, 3) for b in shift.tolist()]})", flush=True)  # fmt: skip
            self.save()  # the final checkpoint holds the calibrated bias
        result = self.evaluate_validation() or {}
        self.report(result, self.epochs, final=True)
        return result


def train_gate(
    gated: GatedSupernet,
    cfg: Config,
    out_dir: str | Path,
    source: dict[str, Any],
    recalibrate: bool,
    resume: bool = False,
) -> dict[str, Any]:
    """Stage II on ``gated`` (changed in place) with ``cfg.stage2``, into ``out_dir``.

    ``recalibrate``: recompute BN statistics for the routes first (do it unless the file was
    recalibrated for them). ``resume``: continue an interrupted Stage II in ``out_dir``;
    without it a directory that already holds a checkpoint is refused. Returns the final
    validation result (empty when ``data.val_size`` is 0); ``OUT/final_eval.json`` holds it too.
    """
    out = Path(out_dir)
    if not resume and out.is_dir() and latest_checkpoint(out) is not None:
        raise CheckpointError(f"{out} already holds a Stage-II checkpoint; choose another --out directory")
    if recalibrate:
        recalibrate_routes(gated, cfg)
    trainer = GateTrainer(gated, cfg, out, source)
    if resume:
        trainer.resume()
    return trainer.fit()
