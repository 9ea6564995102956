"""``dynaslice prune METHOD`` as one library call: :func:`prune_run`.

The config names the model (its largest subnet, as a plain network, is what gets pruned), the
data, the optimizer, the budget (``train.epochs``, ``prune.finetune_epochs``) and the method's
settings (``prune.*``, see :class:`~dynaslice.train.config.PruneConfig`). The run directory gets
``base/`` (the full network, for methods that prune a trained one), the method's own phases
(``train/``, ``finetune/``), then the compact network as ``model.pt`` (``torch.save`` of the
plain model) and ``model.onnx``, and ``final_eval.json`` (validation accuracy, dense and nominal
MACs, parameters and non-zero parameters) last: a run that has it is finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs, safejson
from ..atomic import atomic_write_json
from ..export import extract_subnet, save_torch_model
from ..modelfile import CheckpointError
from ..models import create_supernet
from ..profile import count_module_macs, count_module_params
from ..seeding import derive_seed
from ..train.config import Config, ConfigError
from ..train.data import load_split
from .common import PruneResult, channel_groups, export_onnx, resolve_widths
from .dcff import dcff_train
from .l1 import prune_l1, prune_random, train_from_scratch
from .onexn import magnitude_prune, onexn_prune
from .phases import train_base
from .whitebox import whitebox_prune

__all__ = ["full_network", "prune_run", "resolve_targets"]

CHANNEL_METHODS = ("dcff", "whitebox", "l1", "random", "scratch")


def full_network(cfg: Config) -> tuple[nn.Module, tuple[int, ...], int]:
    """The network to prune, untrained: the largest subnet of ``cfg.model`` as a plain model,
    initialised from ``train.seed``; with the input size and the number of classes of the data."""
    if cfg.data.name == "folder":
        raise ConfigError("dynaslice prune trains on in-memory datasets (fashion_mnist, cifar10/100, synthetic)")
    if cfg.model.gate.enabled:
        raise ConfigError("dynaslice prune prunes plain networks: set model.gate.enabled=false")
    ds = load_split(cfg.data, "train", cfg.train.seed)
    size = tuple(ds.images.shape[1:])
    kwargs = {"in_chans": size[0], "num_classes": ds.num_classes, "input_size": size[-1], **cfg.model.kwargs}
    torch.manual_seed(derive_seed("init", cfg.train.seed))
    try:
        net = create_supernet(cfg.model.name, **kwargs)
    except TypeError as e:  # an unknown keyword in model.kwargs
        raise ConfigError(f"model.kwargs does not fit {cfg.model.name}: {e}") from None
    return extract_subnet(net, net.space.largest(), size).train(), size, ds.num_classes


def resolve_targets(cfg: Config, model: nn.Module, input_size: tuple[int, ...]) -> tuple[int | None, int | None]:
    """``prune.target_macs`` / ``target_params`` as counts: a value <= 1 is a fraction of ``model``'s."""
    p = cfg.prune
    if p.method in CHANNEL_METHODS and (p.target_macs is None) == (p.target_params is None):
        raise ConfigError(
            f"{p.method} needs exactly one budget: --target-macs or --target-params "
            "(prune.target_macs / prune.target_params, the other null)"
        )
    if p.method not in CHANNEL_METHODS and (p.target_macs is not None or p.target_params is not None):
        raise ConfigError(
            f"{p.method} prunes prune.sparsity of the weights (--set prune.sparsity=0.5); "
            "--target-macs / --target-params are for channel pruning"
        )
    if p.method == "whitebox" and p.target_params is not None:
        raise ConfigError("White-Box's vote meets a MACs target: use --target-macs")

    def count(value: float | None, full: int) -> int | None:
        return None if value is None else int(value * full) if value <= 1 else int(value)

    return (
        count(p.target_macs, count_module_macs(model, input_size)),
        count(p.target_params, count_module_params(model)),
    )


def _method(
    cfg: Config, model: nn.Module, size: tuple[int, ...], classes: int, run_dir: Path, resume: bool
) -> PruneResult:
    """Run ``cfg.prune.method`` on the untrained full network ``model``."""
    p = cfg.prune
    macs, params = resolve_targets(cfg, model, size)
    budget = {"target_macs": macs, "target_params": params}
    common = {"cfg": cfg, "run_dir": run_dir, "resume": resume}
    if p.method == "dcff":
        return dcff_train(model, size, cfg, run_dir, **budget, include=p.include or "all", t_start=p.t_start,
                          t_end=p.t_end, k=p.k, updates_per_epoch=p.updates_per_epoch, resume=resume)  # fmt: skip
    if p.method == "whitebox":
        return whitebox_prune(model, size, classes, macs, cfg, run_dir, lam=p.lam, min_keep=p.min_keep,
                              include=p.include or "internal", resume=resume)  # fmt: skip
    include = p.include or "internal"
    if p.method == "scratch":
        return train_from_scratch(model, size, **budget, include=include, seed=cfg.train.seed, **common)
    if p.method in ("l1", "random"):  # the budget must be reachable before the base trains
        gm, groups = channel_groups(model, size)
        resolve_widths(gm, groups, size, include, None, macs, params)
    base = train_base(model, cfg, run_dir / runs.PRUNE_BASE, resume)
    if p.method == "l1":
        return prune_l1(base, size, **budget, include=include, **common)
    if p.method == "random":
        return prune_random(base, size, **budget, include=include, seed=cfg.train.seed, **common)
    if p.method == "onexn":
        return onexn_prune(base, size, p.n, p.sparsity, p.rearrange, **common)
    return magnitude_prune(base, size, p.sparsity, **common)


def prune_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Prune ``cfg.model`` with ``cfg.prune.method`` into ``run_dir``; returns ``final_eval.json``.

    ``resume=True`` continues an interrupted run (each phase from its newest checkpoint; a
    finished run returns its recorded result); without it, a run directory that holds training
    is an error. A budget the method cannot reach is a :class:`PruningError` before any training.
    """
    cfg.validate()
    run_dir = Path(run_dir)
    if runs.is_finished(run_dir):
        if not resume:
            raise CheckpointError(f"{run_dir} holds a finished pruning run; choose another --out directory")
        try:
            return safejson.loads((run_dir / runs.FINAL_EVAL).read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: the run's own record is damaged
            raise CheckpointError(f"{run_dir / runs.FINAL_EVAL} is damaged ({e}); prune into a new --out") from None
    model, size, classes = full_network(cfg)
    with runs.exclusive(run_dir):
        result = _method(cfg, model, size, classes, run_dir, resume)
        save_torch_model(result.model, run_dir / runs.PRUNED_MODEL)
        export_onnx(result, run_dir / runs.PRUNED_ONNX)
        out = {
            "method": cfg.prune.method, "accuracy": result.val_accuracy, "split": "val",
            "full_macs": count_module_macs(model, size), "full_params": count_module_params(model),
            **{k: v for k, v in result.summary().items() if k != "method"}, "name": result.method,
        }  # fmt: skip
        atomic_write_json(run_dir / runs.FINAL_EVAL, out, indent=1)
    return out
