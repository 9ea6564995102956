"""The DS-Net dynamic gate: routes, the double-headed gate, Gumbel straight-through and SGS.

A gated supernet is a supernet cut in two at a stage boundary ``cut``:

- the **trunk** (stem and stages ``0..cut-1``) always runs at one fixed width, shared by every
  route, so the gate can be a plain, fixed-width module;
- the **gate** (:mod:`.module`) reads the trunk's output: a shared squeeze (global average pool
  -> 1x1 conv to ``R`` -> ReLU) feeds an *attention head* (1x1 conv ``R -> C`` -> sigmoid ->
  channel-wise scale, i.e. squeeze-and-excitation; trained in Stage I with the supernet) and a
  *slimming head* (1x1 conv ``R -> n_routes``: logits over the routes; trained in Stage II);
- the **rest** (stages ``cut..`` and the head) runs with the chosen route's slices.

The pieces, one job per module: :mod:`.module` (the gate), :mod:`.routes` (where it sits, which
routes), :mod:`.gated` (:class:`GatedSupernet`), :mod:`.sgs` (Stage II's Gumbel routing, SGS
targets, loss and route-bias calibration). Stage II training is
:class:`dynaslice.train.stage2.GateTrainer`; inference is :class:`dynaslice.dynamic.DynamicNet`,
which routes by ``logits.argmax(1)``, never with noise.
"""

from .gated import GatedSupernet
from .module import DynamicGate
from .routes import check_cut, routes_even, validate_routes
from .sgs import (
    GateLoss,
    anneal_tau,
    calibrate_route_bias,
    gate_loss,
    gumbel_routes,
    resolve_target_macs,
    sgs_targets,
)

__all__ = [
    "DynamicGate",
    "GateLoss",
    "GatedSupernet",
    "anneal_tau",
    "calibrate_route_bias",
    "check_cut",
    "gate_loss",
    "gumbel_routes",
    "resolve_target_macs",
    "routes_even",
    "sgs_targets",
    "validate_routes",
]
