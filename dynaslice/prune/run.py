"""``dynaslice prune METHOD`` as one library call: :func:`prune_run`.

The config names the model (its largest subnet, as a plain network, is what gets pruned), the
data, the optimizer, the budget (``train.epochs``, ``prune.finetune_epochs``) and the method's
settings (``prune.*``, see :class:`~dynaslice.prune_settings.PruneConfig`). The run directory gets
``base/`` (the full network, for methods that prune a trained one), the method's own phases
(``train/``, ``finetune/``), then the compact network as ``model.pt`` (``torch.save`` of the
plain model) and ``model.onnx``, and ``final_eval.json`` (validation accuracy, dense and nominal
MACs, parameters and non-zero parameters) last: a run that has it is finished. Which method
runs, what budget it takes and whether it starts from a trained base is what the method
declared when it registered (:mod:`.registry`): nothing here names a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs, safejson
from ..atomic import atomic_write_json
from ..config_base import ConfigError
from ..counting import count_module_macs, count_module_params
from ..modelfile import CheckpointError
from ..models import create_supernet
from ..seeding import derive_seed
from ..torch_export import extract_subnet, save_torch_model
from ..train.config import Config
from ..train.data import load_split
from .common import export_pruned_onnx, model_channel_groups, resolve_widths
from .phases import train_base
from .registry import TARGET_KINDS, PruneContext, pruner

__all__ = ["full_network", "prune_run", "resolve_targets"]

_TARGET_WORDS = {"macs": "MACs", "params": "parameters"}


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
    """``prune.target_macs`` / ``target_params`` as counts: a value <= 1 is a fraction of ``model``'s.

    The budget the method declared when it registered decides what is allowed: a ``channels``
    method takes exactly one of them (of the kinds it lists), a ``sparsity`` method neither.
    """
    p, method = cfg.prune, pruner(cfg.prune.method)
    given = [kind for kind in TARGET_KINDS if getattr(p, f"target_{kind}") is not None]
    if method.budget == "sparsity" and given:
        raise ConfigError(
            f"{p.method} prunes prune.sparsity of the weights (--set prune.sparsity=0.5); "
            "--target-macs / --target-params are for channel pruning"
        )
    if method.budget == "channels" and len(given) != 1:
        raise ConfigError(
            f"{p.method} needs exactly one budget: --target-macs or --target-params "
            "(prune.target_macs / prune.target_params, the other null)"
        )
    if method.budget == "channels" and given[0] not in method.targets:
        kinds = " or ".join(_TARGET_WORDS[kind] for kind in method.targets)
        flags = " or ".join(f"--target-{kind}" for kind in method.targets)
        raise ConfigError(f"{p.method} prunes to a {kinds} target: use {flags}")

    def count(value: float | None, full: int) -> int | None:
        return None if value is None else int(value * full) if value <= 1 else int(value)

    return (
        count(p.target_macs, count_module_macs(model, input_size)),
        count(p.target_params, count_module_params(model)),
    )


def _context(cfg: Config, model: nn.Module, size: tuple[int, ...], classes: int, run_dir: Path,
             resume: bool) -> PruneContext:  # fmt: skip
    """The method's context: the budget resolved against the untrained full network ``model``,
    then, for a method that prunes a trained network, that network trained in ``RUN/base``.

    A channel budget such a method cannot reach is an error before the base trains.
    """
    method = pruner(cfg.prune.method)
    macs, params = resolve_targets(cfg, model, size)
    include = cfg.prune.include or method.include
    if method.trains_base:
        if method.budget == "channels":
            gm, groups = model_channel_groups(model, size)
            resolve_widths(gm, groups, size, include, None, macs, params)
        model = train_base(model, cfg, run_dir / runs.PRUNE_BASE, resume)
    return PruneContext(cfg, model, size, classes, run_dir, resume, macs, params, include)


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
        result = pruner(cfg.prune.method).run(_context(cfg, model, size, classes, run_dir, resume))
        save_torch_model(result.model, run_dir / runs.PRUNED_MODEL)
        export_pruned_onnx(result, run_dir / runs.PRUNED_ONNX)
        out = {
            "method": cfg.prune.method, "accuracy": result.val_accuracy, "split": "val",
            "full_macs": count_module_macs(model, size), "full_params": count_module_params(model),
            **{k: v for k, v in result.summary().items() if k != "method"}, "name": result.method,
        }  # fmt: skip
        atomic_write_json(run_dir / runs.FINAL_EVAL, out, indent=1)
    return out
