"""Training a binary network on the one engine: ``dynaslice binarize METHOD`` and the benchmark.

:class:`BinaryTrainer` is a :class:`~dynaslice.train.model.ModelTrainer` (cross-entropy, the
config's optimizer and cosine schedule, checkpoints, metrics) whose only additions are the
method's per-epoch schedule (ReCU's tau, SiMaN's clipping percentile, set in
:meth:`~dynaslice.train.engine.Trainer.on_epoch_start`) and the end of the run: ``model.pt``
(state dict + what rebuilds the net, :func:`load_binary_model`) and ``final_eval.json`` (val
top-1, test top-1 when asked, OPs). Weight-decay groups come from the optimizer builder, which
asks each binary layer for its method's rule (:mod:`dynaslice.binary.methods`).

The method's own settings are a ``binary:`` section of the config file (:class:`BinaryConfig`),
kept here rather than in :class:`~dynaslice.train.config.Config`: ``--set binary.KEY=VALUE``
updates it, every other ``--set`` the training config.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs
from ..atomic import atomic_write_bytes, atomic_write_json
from ..config_base import ConfigError
from ..seeding import derive_seed
from ..train.config import Config, load_config_with_section
from ..train.data import eval_loader, load_split
from ..train.model import ModelTrainer
from .layers import BinaryConv2d
from .methods import binary_method_names, binary_model_spec, build_binary_model, method

MODEL_FILE = "model.pt"


@dataclass
class BinaryConfig:
    """The ``binary:`` section: ``method`` (a name registered by :func:`~dynaslice.binary.methods.register_binary`)
    and ``width_mult`` of the small ResNet (widths 16/32/64/128 times it)."""

    method: str = "recu"
    width_mult: float = 1.0

    def validate(self) -> BinaryConfig:
        method(self.method)
        if not 0 < self.width_mult <= 8:
            raise ConfigError(f"binary.width_mult must lie in (0, 8], got {self.width_mult}")
        return self


def load_binary_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Config, BinaryConfig]:
    """The training config and the ``binary:`` section of the file at ``path`` (a path or preset
    name), each ``binary.KEY=VALUE`` override applied to the latter, every other to the former."""
    cfg, bcfg = load_config_with_section(path, overrides, "binary", BinaryConfig)
    return cfg, bcfg.validate()


def count_ops(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs (multiply-accumulates of full-precision convs and linears), BOPs (those of binary
    convs) and ``OPs = FLOPs + BOPs / 64`` for one image of ``input_size`` (C, H, W), the count
    the BNN papers report (norms, activations and adds left out, as theirs)."""
    counts = {"flops": 0.0, "bops": 0.0}

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            macs = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs = out.numel() * m.in_features
        counts["bops" if isinstance(m, BinaryConv2d) else "flops"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {**counts, "ops": counts["flops"] + counts["bops"] / 64}


class BinaryTrainer(ModelTrainer):
    """A :class:`ModelTrainer` that applies the method's per-epoch schedule to ``model``."""

    name = "binarize"

    def __init__(self, model: nn.Module, cfg: Config, bcfg: BinaryConfig, run_dir: str | Path):
        self.bcfg = bcfg
        super().__init__(model, cfg, run_dir)

    def on_epoch_start(self, epoch: int) -> None:
        method(self.bcfg.method).epoch_hook(self.model, epoch, self.epochs)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "binary": dataclasses.asdict(self.bcfg)}


@torch.no_grad()
def dataset_accuracy(model: nn.Module, dataset: Any) -> float:
    """Top-1 (%) of ``model`` in eval mode on an in-memory dataset."""
    model.eval()
    correct = total = 0
    for x, y in eval_loader(dataset):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def binarize_run(cfg: Config, bcfg: BinaryConfig, run_dir: str | Path, test: bool = False) -> dict[str, Any]:
    """Train ``bcfg.method``'s binary small ResNet into a new ``run_dir``; returns ``final_eval.json``:
    ``accuracy`` (val top-1, last epoch), ``test_accuracy`` (the whole test split, only with
    ``test``: decisions are made on val), OPs, and the method's settings. Writes ``model.pt``."""
    cfg.validate()
    bcfg.validate()
    run_dir = Path(run_dir)
    if runs.is_finished(run_dir) or runs.checkpoint_steps(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; choose another --out directory")
    if cfg.data.name == "folder":
        raise ConfigError("dynaslice binarize trains on in-memory datasets (fashion_mnist, cifar10/100, synthetic)")
    test_ds = load_split(cfg.data, "test", cfg.train.seed)  # a missing dataset fails before any training
    in_chans, size, classes = int(test_ds.images.shape[1]), int(test_ds.images.shape[-1]), test_ds.num_classes
    torch.manual_seed(derive_seed("init", cfg.train.seed))  # the initial weights (and ReCU's random alpha)
    model = build_binary_model(bcfg.method, width_mult=bcfg.width_mult, in_chans=in_chans, num_classes=classes)
    trainer = BinaryTrainer(model, cfg, bcfg, run_dir)
    result = dict(trainer.fit())
    model.eval()
    result.update(method=bcfg.method, width_mult=bcfg.width_mult, split="val", **count_ops(model, (in_chans, size, size)))
    if test:
        result.update(test_accuracy=dataset_accuracy(model, test_ds), test_images=len(test_ds))
    save_binary_model(model, binary_model_spec(bcfg.method, bcfg.width_mult, in_chans, classes), run_dir / MODEL_FILE)
    atomic_write_json(run_dir / runs.FINAL_EVAL, result, indent=1)
    return result


def save_binary_model(model: nn.Module, spec: dict[str, Any], path: str | Path) -> None:
    """``model.pt``: ``{"spec": build_binary_model's keywords, "state_dict": ...}``, written atomically."""
    buf = io.BytesIO()
    torch.save({"spec": spec, "state_dict": model.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_binary_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained binary network of a ``model.pt`` (tensors and plain data only), in eval mode."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        spec = data["spec"]
        method_name = spec.get("method")
    except Exception as e:  # a damaged or foreign file: pickle, zip and key errors alike
        raise ValueError(f"{path} is not a binary network of dynaslice binarize ({type(e).__name__})") from None
    if method_name not in binary_method_names():
        raise ValueError(f"{path} names no known binary method ({method_name!r})")
    try:
        model = build_binary_model(
            method_name, width_mult=spec["width_mult"], in_chans=spec["in_chans"], num_classes=spec["num_classes"]
        )
        model.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:  # a spec or weights that do not fit the network
        raise ValueError(f"{path} does not hold a consistent binary network ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.eval(), spec
