"""Stage I: a supernet (or a static network) trained on the engine, with pluggable samplers and targets.

Each step the sampler names the subnets (:mod:`.samplers`, a registry: ``train.sampler``), the
target decides what each learns from (:mod:`.targets`; teacher forwards happen first), then
every subnet runs forward and backward *immediately* -- gradients accumulate in the shared
weights while only one subnet's activations are alive -- and the engine takes one optimizer
step. Under DDP all but the last subnet's backward run inside ``no_sync()``, so gradients are
all-reduced once per step.

Everything random is a function of ``(seed, step)`` or ``(seed, epoch, batch, rank)``: the
batches (:class:`dynaslice.data.BatchLoader`), the subnets, and the global torch RNG (reseeded
every step by the engine, for dropout). So a run resumed from any checkpoint, even one taken
mid-epoch, continues bit for bit as the uninterrupted run would have on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import runs
from ..archspec import uniform_archs
from ..atomic import atomic_write_json
from ..config_base import ConfigError
from ..gate import GatedSupernet
from ..modelfile import model_spec, prefixed, save_model_file
from ..models import create_supernet
from ..ordering import reorder_channels
from ..seeding import derive_seed
from ..space import Arch
from .bn import recalibrate_bn
from .checkpoint import refuse_existing_run
from .config import Config
from .data import FolderBatches, eval_loader, folder_loader, folder_recal_batches, load_split, train_loader
from .distributed import DistEnv
from .ema import ema_decay_for, half_life_steps, make_ema
from .engine import Trainer
from .evaluate import evaluate, format_rows
from .init import frozen_copy, init_from, zero_init_last_bn
from .optim import build_optimizer, build_scheduler
from .samplers import ArchSampler, FixedSampler, build_sampler
from .targets import make_target, target_run

SLOW_TEACHER_EPOCHS = 0.25  # EMA half-life from which the trainer notes that the teacher lags


class SupernetTrainer(Trainer):
    """Builds every piece a :class:`Config` names, then :meth:`fit` trains (resumable).

    The pieces are plain attributes (``net``, ``sampler``, ``target``, ``optimizer``,
    ``scheduler``, ``ema``, ``train_loader``); replace one after construction to try a new
    strategy, e.g. ``trainer.sampler = MySampler(...)`` (or register it: :func:`register_sampler`).
    """


    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None):
        super().__init__(cfg, run_dir, env)
        t = cfg.train
        views = 2 if t.mvco else 1
        loader, shape, num_classes = self._data(views)
        self.net = self._build_net(shape, num_classes).to(self.device)
        self.space = self.net.space
        optimizer = build_optimizer(self.net, cfg.optim)
        spe = len(loader)
        scheduler = build_scheduler(optimizer, cfg.optim, t.epochs * spe, spe)
        self.setup_loop(loader, t.epochs, optimizer, scheduler, cfg.optim.clip_grad_norm, cfg.optim.clip_grad_value)
        self.setup_amp(t.amp)
        self.sampler: ArchSampler = build_sampler(t.sampler, self)
        teacher: dict[str, Any] = {}
        if t.target == "teacher":  # the trained network init_from loaded, frozen before any step
            teacher = {"teacher": frozen_copy(self.net), "label_term": t.teacher_label_term,
                       "kd_largest": t.teacher_kd_largest, "ramp_steps": round(t.kd_ramp_epochs * self.steps_per_epoch)}  # fmt: skip
        self.target = make_target(
            t.target, self.space, label_smoothing=t.label_smoothing, temperature=t.temperature,
            views=views, view_weight=t.mvco_weight, **teacher,
        )  # fmt: skip
        self.ema_decay = ema_decay_for(t.ema_decay, t.ema_half_life_epochs, self.steps_per_epoch)
        self.ema = make_ema(self.net, self.ema_decay) if self.target.uses_teacher else None
        if self.ema is not None:
            self._check_teacher_horizon()
        self.dropouts = [m for m in self.net.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        self._check_net(shape)
        self.model: nn.Module = self.net
        if self.env.distributed:
            # Narrow subnets give zero gradients to the unused part of a sliced weight, so every
            # parameter gets a gradient each step, unless a depth dimension skips whole blocks.
            skips_blocks = any(d.kind == "depth" for d in self.space.dims)
            cuda = self.device.type == "cuda"
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if cuda else None, find_unused_parameters=skips_blocks
            )

    # ------------------------------------------------------------------ set-up

    def _check_teacher_horizon(self) -> None:
        """Say so when the EMA teacher averages over a large part of an epoch: it then lags the
        subnets it teaches. ImageNet's 0.997 per step is ~0.1 epoch; the same decay on a small
        dataset is ~1 epoch, and IB lost 6-8 points on its subnets for it (docs/RESULTS.md,
        "Short-budget stabilisers"). A note, not a change: the decay is the user's choice."""
        epochs = half_life_steps(self.ema_decay) / self.steps_per_epoch
        if epochs >= SLOW_TEACHER_EPOCHS:
            self._note(
                f"note: the EMA teacher's half-life is {epochs:.2g} epochs (decay {self.ema_decay:g} per step, "
                f"{self.steps_per_epoch} steps per epoch), so it lags the subnets it teaches; "
                "set train.ema_half_life_epochs=0.1 for ImageNet's horizon"
            )

    def _data(self, views: int) -> tuple[Any, tuple[int, ...], int]:
        """The training batches, the image shape and the number of classes."""
        cfg, t, env = self.cfg, self.cfg.train, self.env
        if cfg.data.name == "folder":
            loader = folder_loader(cfg.data, "train", True, t.seed, env.rank, env.world_size)
            self.train_ds = self.val_ds = None
            return FolderBatches(loader, t.seed), (3, cfg.data.image_size, cfg.data.image_size), len(
                loader.dataset.classes
            )
        self.train_ds = load_split(cfg.data, "train", t.seed)
        self.val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
        loader = train_loader(cfg.data, self.train_ds, t.seed, env.rank, env.world_size, views)
        return loader, tuple(self.train_ds.images.shape[1:]), self.train_ds.num_classes

    def _check_net(self, shape: tuple[int, ...]) -> None:
        """What only the built net can judge, checked before the first step (and before anything
        is written): the evaluated widths exist in its space, and it runs on the data's images.

        One forward of one image through the smallest subnet, in eval mode (no statistics change,
        no randomness used), so a too-small ``data.image_size`` fails now and not mid-training.
        """
        try:
            self.eval_archs()
        except ValueError as e:
            raise ConfigError(f"train.eval_widths={self.cfg.train.eval_widths}: {e}") from None
        self.net.eval()
        try:
            self.net(torch.zeros(1, *shape, device=self.device), self.space.smallest())
        except (RuntimeError, ValueError) as e:
            size = "x".join(map(str, shape))
            raise ConfigError(
                f"{self.cfg.model.name} cannot run on {size} images ({str(e).splitlines()[0]}); "
                "use a larger data.image_size or another model.name"
            ) from None
        finally:
            self.net.train()

    def _build_net(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """The supernet (gated when ``model.gate.enabled``), identically initialised on every rank."""
        cfg = self.cfg
        from_data = {"in_chans": shape[0], "num_classes": num_classes}
        clash = {k: v for k, v in cfg.model.kwargs.items() if k in from_data and v != from_data[k]}
        if clash:  # a net for 3 channels would silently run on 1 (slices), 5 classes fail mid-training
            raise ConfigError(
                f"model.kwargs {clash} contradict the data ({shape[0]} channels, {num_classes} classes); "
                "leave them out: they are filled in from the data"
            )
        kwargs = {**from_data, "input_size": shape[-1], **cfg.model.kwargs}
        torch.manual_seed(derive_seed("init", cfg.train.seed))
        try:
            net = create_supernet(cfg.model.name, **kwargs)
        except TypeError as e:  # an unknown keyword in model.kwargs
            raise ConfigError(f"model.kwargs does not fit {cfg.model.name}: {e}") from None
        if cfg.train.zero_init_last_bn:
            zero_init_last_bn(net)
        g = cfg.model.gate
        if g.enabled:
            # Stage I of DS-Net: the gate's attention head trains with the supernet; the slimming
            # head is not used until Stage II, so it gets no gradient (and no DDP reduction) here.
            try:
                net = GatedSupernet(net, g.cut, g.routes, g.pre_gate or None, reduction=g.reduction)
            except ValueError as e:
                raise ConfigError(f"model.gate: {e}") from None
            net.gate.slimming.requires_grad_(False)
        if cfg.train.init_from:  # a trained network; on resume the checkpoint then overwrites it
            loaded = init_from(net, cfg.train.init_from, {"name": cfg.model.name, "kwargs": kwargs})
            if self.env.is_main:
                gate = f"; gate {loaded['gate']}" if "gate" in loaded else ""
                # "loaded", not "train.init_from": phase 2 of train.phase1_epochs sets it, not the user
                print(f"loaded the starting weights: {loaded['source']} ({loaded['kind']}{gate})", flush=True)
        if cfg.train.order_channels:
            reorder_channels(net)
        self.model_spec = model_spec(net, kwargs, cfg.model.name)
        return net

    # ------------------------------------------------------------------ one step

    def _teacher(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        return self.ema.module(x, arch)  # type: ignore[union-attr]

    @contextlib.contextmanager
    def _dropout_for(self, arch: Arch) -> Iterator[None]:
        """Dropout only in the largest subnet (the DS-Net recipe): switched off for the others."""
        off = self.cfg.train.dropout_largest_only and arch != self.space.largest()
        modes = [m.training for m in self.dropouts]
        if off:
            for m in self.dropouts:
                m.training = False
        try:
            yield
        finally:
            for m, mode in zip(self.dropouts, modes, strict=True):
                m.training = mode

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Every subnet the sampler names: forward + backward; ``x`` is ``[V, B, ...]`` with views."""
        if x.dim() == 5:  # views, view-major: [V*B, C, H, W], labels repeated per view
            views = x.shape[0]
            x, y = x.flatten(0, 1), y.repeat(views)
        self.net.train()
        archs = self.sampler.sample(self.step)
        with self.autocast():
            targets = self.target.begin(x, y, archs, self._teacher if self.ema is not None else None, self.step)
        losses = []
        for i, arch in enumerate(archs):
            last = i == len(archs) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.model.no_sync()
            with sync:
                with self.autocast(), self._dropout_for(arch):
                    loss = targets.loss(arch, self.model(x, arch))
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        return losses, {"archs": archs, "names": [f"subnet {dict(a)}" for a in archs]}

    def after_step(self, losses: list[float], info: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        for arch, value in zip(info["archs"], losses, strict=True):
            self.sampler.observe(arch, value)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"model": self.net}
        if self.ema is not None:
            modules["ema"] = self.ema.module
        return modules

    def extra_state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            self.ema.n_averaged.fill_(state["ema_n_averaged"])

    def meta(self) -> dict[str, Any]:
        return {"model": self.model_spec, **super().meta()}

    # ------------------------------------------------------------------ evaluation

    def eval_archs(self) -> dict[str, Arch]:
        widths = self.cfg.train.eval_widths
        if isinstance(self.sampler, FixedSampler) and len(self.sampler.archs) == 1:
            widths = [self.cfg.train.fixed_width]
        return uniform_archs(self.net, widths)

    def recal_data(self) -> Any:
        """What BN recalibration reads: the training split (a seeded subset, eval preprocessing)."""
        t = self.cfg.train
        if self.train_ds is not None:
            return self.train_ds
        return folder_recal_batches(self.cfg.data, t.recal_images, t.recal_batch_size, t.seed)

    def val_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        if self.val_ds is not None:
            return eval_loader(self.val_ds)
        if self.cfg.data.name == "folder":
            return folder_loader(self.cfg.data, "val", False, self.cfg.train.seed)
        return None

    def recalibrated_copy(self, archs: dict[str, Arch]) -> nn.Module:
        """A copy of the net with BN statistics recomputed for ``archs`` (training state untouched)."""
        t = self.cfg.train
        net = copy.deepcopy(self.net)
        return recalibrate_bn(net, list(archs.values()), self.recal_data(), t.recal_images,
                              t.recal_batch_size, seed=t.seed)  # fmt: skip

    def evaluate_validation(self, save_to: str | Path | None = None) -> list[dict[str, Any]]:
        """Recalibrate a copy and evaluate the eval archs on the validation split (rank 0 only).

        ``save_to``: also write the recalibrated net there as a model file.
        """
        rows: list[dict[str, Any]] = []
        if self.env.is_main:
            archs = self.eval_archs()
            net = self.recalibrated_copy(archs)
            batches = self.val_batches()
            if batches is not None:
                rows = evaluate(net, archs, batches, input_size=self.net.input_size)
            if save_to is not None:
                recal = {k: a.to_dict() for k, a in archs.items()}
                save_model_file(save_to, prefixed("model", net), {**self.meta(), "step": self.step,
                                                                  "recalibrated": recal})  # fmt: skip
        return rows

    def format_validation(self, result: Any) -> str:
        return " (BN recalibrated):\n" + format_rows(result)

    def finish(self) -> list[dict[str, Any]]:
        rows = self.evaluate_validation(save_to=self.run_dir / runs.RECALIBRATED)
        self.report(rows, self.epochs, final=True)
        return rows


# --------------------------------------------------------------------------- entry points


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    env: DistEnv | None = None,
    allow_changes: Iterable[str] = (),
) -> Any:
    """Train the run ``cfg`` describes into ``run_dir``; return the final validation rows (a
    target that trains networks of its own, :attr:`~dynaslice.train.targets.Target.run`: its record).

    With ``train.static_widths`` set, trains one ordinary network per width instead
    (:func:`train_static`). ``resume=True`` continues from the run's newest intact checkpoint
    (or starts when there is none); without it an existing checkpoint is an error, never
    silently overwritten. ``allow_changes``: config keys that may differ from the run's (see
    :meth:`Trainer.resume`).
    """
    own = target_run(cfg.train.target)
    if own is not None:  # a method that trains networks of its own (FFSD, DML)
        return own(cfg, run_dir, resume, env, allow_changes)
    if cfg.train.static_widths:
        return train_static(cfg, run_dir, resume, env)
    if cfg.train.phase1_epochs:
        phase1 = Path(run_dir) / runs.PHASE1
        train(phase1_config(cfg), phase1, resume, env)
        cfg = phase2_config(cfg, phase1)
        if env is None or env.is_main:
            print(phase2_note(cfg), flush=True)
    return _trainer(cfg, run_dir, resume, env, allow_changes).fit()


def _trainer(
    cfg: Config, run_dir: str | Path, resume: bool, env: DistEnv | None, allow_changes: Iterable[str] = ()
) -> SupernetTrainer:
    """The trainer of run ``run_dir``, resumed from its newest intact checkpoint when asked."""
    refuse_existing_run(run_dir, resume)
    trainer = SupernetTrainer(cfg, run_dir, env)
    if resume and trainer.resume(allow_changes) and trainer.env.is_main:
        print(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}", flush=True)
    return trainer


def phase1_config(cfg: Config) -> Config:
    """The first phase of ``train.phase1_epochs``: the largest network alone (labels, one view)."""
    cfg = static_config(cfg, 1.0)
    t = dataclasses.replace(cfg.train, epochs=cfg.train.phase1_epochs, phase1_epochs=0, phase1_lr=None)
    optim = dataclasses.replace(cfg.optim, lr=cfg.train.phase1_lr or cfg.optim.lr)
    return dataclasses.replace(cfg, train=t, optim=optim)


def phase2_config(cfg: Config, phase1: Path) -> Config:
    """The rest of the epochs: the supernet, started from the first phase's network."""
    t = dataclasses.replace(cfg.train, epochs=cfg.train.epochs - cfg.train.phase1_epochs, phase1_epochs=0,
                            phase1_lr=None, init_from=str(phase1))  # fmt: skip
    return dataclasses.replace(cfg, train=t)


def phase2_note(cfg: Config) -> str:
    """The one line that says where phase 2 starts and why its loss is not phase 1's: the user
    set neither ``train.init_from`` nor a new objective, so both need saying (a loss of 4.9 after
    phase 1's 0.7 otherwise reads as a divergence)."""
    t = cfg.train
    return (
        f"phase 2: the supernet starts from phase 1's network ({t.init_from}); its loss is the sum over "
        f"{t.num_subnets} subnets per step of the {t.target} objective, not comparable with phase 1's "
        "loss of one network on the labels"
    )


def static_config(cfg: Config, width: float) -> Config:
    """The same recipe for one ordinary network of uniform ``width``: one subnet, labels, one view."""
    t = dataclasses.replace(
        cfg.train, sampler="fixed", fixed_width=width, target="labels", mvco=False,
        static_widths=[], eval_widths=[width], order_channels=False,
    )  # fmt: skip
    return dataclasses.replace(cfg, train=t)


def train_static(
    cfg: Config, run_dir: str | Path, resume: bool = False, env: DistEnv | None = None
) -> list[dict[str, Any]]:
    """Static counterparts: one network per ``train.static_widths`` entry, each in ``RUN/static-xW``.

    Each is the supernet's uniform subnet of that width trained alone (a :class:`FixedSampler`)
    with the same optimizer, schedule, data and epochs. Its weights outside the slice get no
    gradient, so it *is* an ordinary network of that width (initialised as a slice of the
    wide one).
    """
    rows: list[dict[str, Any]] = []
    for i, width in enumerate(cfg.train.static_widths):
        trainer = _trainer(static_config(cfg, width), Path(run_dir) / runs.static_name(width), resume, env)
        if i == 0:  # every width must exist before the first network trains
            try:
                uniform_archs(trainer.net, cfg.train.static_widths)
            except ValueError as e:
                raise ConfigError(f"train.static_widths={cfg.train.static_widths}: {e}") from None
        rows += trainer.fit()
    # written also without a validation split (no rows): the marker that every network finished
    atomic_write_json(Path(run_dir) / runs.FINAL_EVAL, rows, indent=1)
    return rows
