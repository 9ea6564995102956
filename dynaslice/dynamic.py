"""Dynamic inference: each input runs the subnet its gate picks, with dense weight slices.

Batch of 1: the trunk, the gate's argmax route, then the rest of the network with that route's
slices -- a narrower route is really cheaper. Batch of N: the trunk once on the whole batch,
then the samples grouped by route, each group run densely with its route's slices, and the
outputs put back in input order. (The original DS-Net code ran batches at full width with
masked channels, which saved nothing.) Results equal running each sample alone.

This is the torch-module form of a gated model; its onnxruntime form is
:class:`dynaslice.onnx_package.GatedOnnxRunner` and its served form ``dynaslice.serve.ServedGated``.
All three split a batch with the one :func:`dynaslice.onnx_package.run_grouped`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .gate import GatedSupernet


class DynamicNet(nn.Module):
    """Inference wrapper of a (Stage-II-trained) :class:`GatedSupernet`.

    Always in eval mode: BatchNorm uses each width's private running statistics, and routing is
    the deterministic ``argmax`` of the gate's logits (no Gumbel noise). The routes are those of
    ``gated`` (``gated.routes``); the module shares ``gated``'s weights, it does not copy them.
    """

    def __init__(self, gated: GatedSupernet):
        super().__init__()
        self.gated = gated
        self.eval()

    def train(self, mode: bool = True) -> DynamicNet:
        if mode:
            raise RuntimeError(
                "DynamicNet is inference-only (BN running stats, argmax routing); "
                "train its GatedSupernet instead"
            )
        return super().train(False)

    def _check_eval(self) -> None:
        if self.gated.training:
            raise RuntimeError(
                "DynamicNet's GatedSupernet was put in train mode (gated.train()); "
                "call dynamic_net.eval() before inference"
            )

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The route index of each sample (``LongTensor [B]``): argmax of the gate's logits."""
        self._check_eval()
        _, logits = self.gated.trunk(x)
        return logits.argmax(1)

    def forward_with_routes(
        self, x: torch.Tensor, routes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class logits, route index per sample)``.

        ``routes`` overrides the gate's choice (the gate still runs, so timings stay honest):
        for benchmarks with a fixed route mix and for oracle-routing analyses.
        """
        self._check_eval()
        h, logits = self.gated.trunk(x)
        if routes is None:
            routes = logits.argmax(1)
        return self.gated.forward_routes(h, routes), routes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routes(x)[0]

    def route_counts(self, routes: torch.Tensor) -> list[int]:
        """How many samples took each route (a histogram, narrowest route first)."""
        return torch.bincount(routes.flatten().cpu(), minlength=len(self.gated.routes)).tolist()

    def avg_macs(self, routes: torch.Tensor, input_size: Sequence[int] | None = None) -> float:
        """Average MACs per image for these route choices: route subnet (trunk included) + gate.

        Accumulate routes over an evaluation set and call once for the set's average.
        """
        if routes.numel() == 0:
            raise ValueError("avg_macs needs at least one route choice")
        macs = self.gated.route_macs(input_size)
        return float(macs[routes.flatten().cpu()].mean())
