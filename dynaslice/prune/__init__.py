"""Structured pruning on the same data, MAC counter, training engine and exports as the supernets.

For the question "prune one network, or train a supernet and slice it?", this package gives the
pruning side, each method in one call on a plain model (for example
``ds.extract_subnet(net, net.space.largest())``), each returning a :class:`PruneResult` whose
network is plain ``torch.nn`` (an ``fx.GraphModule``) with exact MACs and parameters:

- :func:`dcff_train` -- DCFF, dynamic-coded filter fusion, trained from scratch;
- :func:`whitebox_prune` -- White-Box class-wise masks, global vote to a MACs target, fine-tuning;
- :func:`onexn_prune` -- 1xN block sparsity with filter rearrangement (nominal sparse MACs; it
  runs dense);
- baselines: :func:`prune_l1` (L1-norm filters + fine-tuning), :func:`prune_random`,
  :func:`train_from_scratch` (the same compact architecture trained alone) and
  :func:`magnitude_prune` (unstructured, equal parameters to 1xN).

Training is the project's engine: each phase of a method is a resumable run directory under
the method's ``run_dir`` (:mod:`.phases`), its budget set by the config (``train.epochs``,
``prune.finetune_epochs``). Each method module registers its method with
:func:`register_pruner` (one signature, ``run(ctx: PruneContext) -> PruneResult``; see
:mod:`.registry`), and is imported below: a new method is one new module and its import line.
:func:`prune_run` is ``dynaslice prune``: the config's model, its
base training when the method needs one, the method, and the compact network written as
``model.pt``, ``model.onnx`` and ``final_eval.json``. The channel machinery (groups found from
the fx graph, surgery, budgets) is in :mod:`.common`; ``docs/PRUNING.md`` states each method as
implemented and every departure from the official code.
"""

from .common import (
    ChannelGroup,
    PruneResult,
    PruningError,
    check_compact,
    export_pruned_onnx,
    model_accuracy,
    model_channel_groups,
    prune_channels,
    resolve_widths,
)
from .dcff import DCFFTrainer, dcff_train
from .jackpot import jackpot_prune
from .l1 import prune_l1, prune_random, train_from_scratch
from .onexn import MaskedTrainer, magnitude_prune, onexn_prune
from .phases import train_base
from .registry import PruneContext, PruningMethod, pruner, pruner_names, register_pruner
from .run import prune_run
from .whitebox import WhiteBoxTrainer, whitebox_prune

__all__ = [
    "ChannelGroup",
    "DCFFTrainer",
    "MaskedTrainer",
    "PruneContext",
    "PruneResult",
    "PruningMethod",
    "PruningError",
    "WhiteBoxTrainer",
    "model_accuracy",
    "model_channel_groups",
    "check_compact",
    "dcff_train",
    "export_pruned_onnx",
    "jackpot_prune",
    "magnitude_prune",
    "onexn_prune",
    "prune_channels",
    "prune_l1",
    "prune_random",
    "register_pruner",
    "prune_run",
    "pruner",
    "pruner_names",
    "resolve_widths",
    "train_base",
    "train_from_scratch",
    "whitebox_prune",
]
