"""The one Stage-I training loop. Strategies plug in; the loop stays the same.

Each step: the sampler names the subnets (:mod:`.samplers`), the target decides what each
learns from (:mod:`.targets`; teacher forwards happen first), then every subnet runs forward
and backward *immediately* -- gradients accumulate in the shared weights while only one
subnet's activations are alive -- and one optimizer step follows. Under DDP all but the last
subnet's backward run inside ``no_sync()``, so gradients are all-reduced once per step.

Everything random is a function of ``(seed, step)`` or ``(seed, epoch, batch, rank)``: the
batches (:class:`dynaslice.data.BatchLoader`), the subnets, and the global torch RNG (reseeded
every step, for dropout). So a run resumed from any checkpoint, even one taken mid-epoch,
continues bit for bit as the uninterrupted run would have on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..atomic import atomic_write_json
from ..gate import GatedSupernet
from ..models import create_supernet
from ..ordering import reorder_channels
from ..space import Arch
from .bn import recalibrate_bn
from .checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    gate_spec,
    latest_checkpoint,
    load_model_file,
    load_state,
    save_checkpoint,
    save_model_file,
)
from .config import Config, ConfigError, flatten, from_dict, save_config
from .data import FolderBatches, eval_loader, folder_loader, folder_recal_batches, load_split, train_loader
from .distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from .ema import ema_decay_for, make_ema
from .evaluate import evaluate, format_table, uniform_archs
from .init import frozen_copy, init_from, zero_init_last_bn
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler
from .samplers import ArchSampler, FixedSampler, SandwichSampler, derive_seed
from .targets import make_target


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


class Trainer:
    """Builds every piece a :class:`Config` names, then :meth:`fit` trains (resumable).

    The pieces are plain attributes (``net``, ``sampler``, ``target``, ``optimizer``,
    ``scheduler``, ``ema``, ``train_loader``); replace one after construction to try a new
    strategy, e.g. ``trainer.sampler = MyPSSSampler(...)``.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.env = env or init_distributed(t.device)
        self.device = self.env.device

        # data
        views = 2 if t.mvco else 1
        if cfg.data.name == "folder":
            loader = folder_loader(cfg.data, "train", True, t.seed, self.env.rank, self.env.world_size)
            self.train_loader: Any = FolderBatches(loader, t.seed)
            shape = (3, cfg.data.image_size, cfg.data.image_size)
            num_classes = len(loader.dataset.classes)
            self.train_ds = self.val_ds = None
        else:
            self.train_ds = load_split(cfg.data, "train", t.seed)
            self.val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
            self.train_loader = train_loader(
                cfg.data, self.train_ds, t.seed, self.env.rank, self.env.world_size, views
            )
            shape, num_classes = tuple(self.train_ds.images.shape[1:]), self.train_ds.num_classes
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = t.epochs * self.steps_per_epoch

        # model: identical initialisation on every rank (DDP also broadcasts rank 0's)
        kwargs = {
            "in_chans": shape[0],
            "num_classes": num_classes,
            "input_size": shape[-1],
            **cfg.model.kwargs,
        }
        torch.manual_seed(derive_seed("init", t.seed))
        net = create_supernet(cfg.model.name, **kwargs)
        if t.zero_init_last_bn:
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
        if t.init_from:  # a trained network; rebuilt the same way on resume, then overwritten
            init_from(net, t.init_from, {"name": cfg.model.name, "kwargs": kwargs})
        if t.order_channels:
            reorder_channels(net)
        self.model_spec = {"name": cfg.model.name, "kwargs": kwargs}
        if g.enabled:
            self.model_spec["gate"] = gate_spec(net)
        self.net = net.to(self.device)
        self.space = self.net.space

        # strategy pieces
        if t.sampler == "sandwich":
            self.sampler: ArchSampler = SandwichSampler(
                self.space, t.num_subnets, seed=t.seed, uniform=t.sandwich_uniform
            )
        elif t.sampler == "pss":
            from .pss import build_pss_sampler

            self.sampler = build_pss_sampler(self.net, t, self.total_steps)
        else:
            self.sampler = FixedSampler(self.space.uniform(t.fixed_width))
        teacher: dict[str, Any] = {}
        if t.target == "teacher":
            teacher = {
                "teacher": frozen_copy(self.net),
                "label_term": t.teacher_label_term,
                "kd_largest": t.teacher_kd_largest,
                "ramp_steps": round(t.kd_ramp_epochs * self.steps_per_epoch),
            }
        self.target = make_target(
            t.target,
            self.space,
            label_smoothing=t.label_smoothing,
            temperature=t.temperature,
            views=views,
            view_weight=t.mvco_weight,
            **teacher,
        )
        self.ema_decay = ema_decay_for(t.ema_decay, t.ema_half_life_epochs, self.steps_per_epoch)
        self.ema = make_ema(self.net, self.ema_decay) if self.target.uses_teacher else None
        self.optimizer = build_optimizer(self.net, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if t.amp and cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # a disabled scaler is a no-op: one code path for fp32, bf16 and fp16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.dropouts = [m for m in self.net.modules() if isinstance(m, nn.Dropout) and m.p > 0]

        self.model: nn.Module = self.net
        if self.env.distributed:
            # Narrow subnets give zero gradients to the unused part of a sliced weight, so every
            # parameter gets a gradient each step, unless a depth dimension skips whole blocks.
            skips_blocks = any(d.kind == "depth" for d in self.space.dims)
            self.model = DistributedDataParallel(
                self.net,
                device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=skips_blocks,
            )
        self.step = 0
        self.logger = MetricsLogger(self.run_dir, enabled=self.env.is_main)

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

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on batch ``(x, y)``; ``x`` is ``[V, B, ...]`` with several views."""
        step = self.step
        torch.manual_seed(derive_seed("step", self.cfg.train.seed, step))  # dropout masks
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if x.dim() == 5:  # views, view-major: [V*B, C, H, W], labels repeated per view
            views = x.shape[0]
            x, y = x.flatten(0, 1), y.repeat(views)
        self.net.train()
        archs = self.sampler.sample(step)
        with self._autocast():
            targets = self.target.begin(x, y, archs, self._teacher if self.ema is not None else None, step)
        losses = []
        for i, arch in enumerate(archs):
            last = i == len(archs) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.model.no_sync()
            with sync:
                with self._autocast(), self._dropout_for(arch):
                    loss = targets.loss(arch, self.model(x, arch))
                self.scaler.scale(loss).backward()
            losses.append(loss.detach().float())
        values = all_reduce_mean(torch.stack(losses), self.env).tolist()
        bad = [(a, v) for a, v in zip(archs, values, strict=True) if not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"step {step}: the loss of subnet {dict(bad[0][0])} is {bad[0][1]}; training stopped "
                f"and the last good checkpoint in {self.run_dir / 'checkpoints'} is kept "
                "(lower optim.lr, add warm-up or set optim.clip_grad_norm, then --resume)"
            )
        clip, clip_value = self.cfg.optim.clip_grad_norm, self.cfg.optim.clip_grad_value
        if clip or clip_value:
            self.scaler.unscale_(self.optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        if clip_value:
            torch.nn.utils.clip_grad_value_(self.net.parameters(), clip_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        for arch, value in zip(archs, values, strict=True):
            self.sampler.observe(arch, value)
        self.step += 1
        return {"archs": archs, "losses": values}

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict[str, Any]:
        return {
            "model": self.model_spec,
            "config": self.cfg.to_dict(),
            "epoch": self.step / self.steps_per_epoch,
        }

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits for it)."""
        path = None
        if self.env.is_main:
            tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
                # all randomness is derived from (seed, step): the seed is the whole RNG state
                "rng": {"seed": self.cfg.train.seed},
                "world_size": self.env.world_size,
            }
            path = save_checkpoint(
                self.run_dir, self.step, tensors, self._meta(), state, self.cfg.train.keep_checkpoints
            )
        barrier(self.env)
        return path

    def resume(self, ckpt_dir: str | Path | None = None) -> bool:
        """Load the latest checkpoint of the run (or ``ckpt_dir``); False if there is none."""
        ckpt = Path(ckpt_dir) if ckpt_dir is not None else latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        tensors, meta = load_model_file(ckpt / MODEL_FILE)
        state = load_state(ckpt / STATE_FILE)
        # Resolve the saved config against today's defaults: a section added to Config after the
        # run started (left at its default) must not block resuming it.
        saved_cfg = from_dict(meta.get("config", {})).to_dict()
        if saved_cfg != self.cfg.to_dict():
            saved, now = flatten(saved_cfg), flatten(self.cfg.to_dict())
            diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise CheckpointError(
                f"{ckpt} was trained with a different config (keys {', '.join(diff[:5])}); "
                "resume with the run's own config.yaml or start a new --out directory"
            )
        if state.get("world_size") != self.env.world_size:
            raise CheckpointError(
                f"{ckpt} was written by {state.get('world_size')} process(es), this job has "
                f"{self.env.world_size}: the data shards would differ; resume with the same number"
            )
        own = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.net.load_state_dict(own)
        if self.ema is not None:
            self.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ evaluation

    def eval_archs(self) -> dict[str, Arch]:
        widths = self.cfg.train.eval_widths
        if isinstance(self.sampler, FixedSampler) and len(self.sampler.archs) == 1:
            widths = [self.cfg.train.fixed_width]
        return uniform_archs(self.net, widths)

    def recalibrated_copy(self, archs: dict[str, Arch]) -> nn.Module:
        """A copy of the net with BN statistics recomputed for ``archs`` (training state untouched)."""
        net = copy.deepcopy(self.net)
        t = self.cfg.train
        if self.train_ds is not None:
            data: Any = self.train_ds
        else:
            data = folder_recal_batches(self.cfg.data, t.recal_images, t.recal_batch_size, t.seed)
        return recalibrate_bn(
            net, list(archs.values()), data, t.recal_images, t.recal_batch_size, seed=t.seed
        )

    def validate(self, save_to: str | Path | None = None) -> list[dict[str, Any]]:
        """Recalibrate a copy and evaluate the eval archs on the validation split (rank 0 only).

        ``save_to``: also write the recalibrated net there as a model file.
        """
        rows: list[dict[str, Any]] = []
        if self.env.is_main:
            archs = self.eval_archs()
            net = self.recalibrated_copy(archs)
            if self.val_ds is not None:
                batches: Any = eval_loader(self.val_ds)
            elif self.cfg.data.name == "folder":
                batches = folder_loader(self.cfg.data, "val", False, self.cfg.train.seed)
            else:
                batches = None
            if batches is not None:
                rows = evaluate(net, archs, batches, input_size=self.net.input_size)
            if save_to is not None:
                meta = {
                    **self._meta(),
                    "step": self.step,
                    "recalibrated": {k: a.to_dict() for k, a in archs.items()},
                }
                save_model_file(save_to, {f"model.{k}": v for k, v in net.state_dict().items()}, meta)
        barrier(self.env)
        return rows

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``train.epochs`` are done; return the final validation rows."""
        t, spe = self.cfg.train, self.steps_per_epoch
        if self.step >= self.total_steps and run_finished(self.run_dir, self.cfg):
            # resumed a finished run: its results are on disk; re-evaluating would only repeat
            # them (and a PSS run's budget-table selection) and log them twice
            return json.loads((self.run_dir / "final_eval.json").read_text())
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.logger.open()
        show_bar = self.env.is_main and sys.stderr.isatty()
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, spe)
            bar = tqdm(
                total=spe,
                initial=start,
                desc=f"epoch {epoch + 1}/{t.epochs}",
                disable=not show_bar,
                leave=False,
            )
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            for x, y in self.train_loader.epoch_batches(epoch, start):
                out = self.train_step(x, y)
                seen += 1
                loss_sum += sum(out["losses"])
                bar.update()
                bar.set_postfix(loss=f"{sum(out['losses']):.3f}")
                if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                    self.logger.log(
                        {
                            "step": self.step,
                            "epoch": self.step / spe,
                            "lr": self.scheduler.get_last_lr()[0],
                            "loss": sum(out["losses"]),
                            "losses": out["losses"],
                        }
                    )
                if t.ckpt_every_steps and self.step % t.ckpt_every_steps == 0 and self.step % spe:
                    self.save()
            bar.close()
            self.save()
            if self.env.is_main:
                secs = time.perf_counter() - t0
                print(
                    f"epoch {epoch + 1}/{t.epochs}: mean summed loss {loss_sum / max(seen, 1):.4f}, "
                    f"{seen} steps in {secs:.1f} s, lr {self.scheduler.get_last_lr()[0]:.4g}",
                    flush=True,
                )
            last = epoch + 1 == t.epochs
            if not last and t.eval_every_epochs and (epoch + 1) % t.eval_every_epochs == 0:
                self._report(self.validate(), epoch + 1)
        rows = self.validate(save_to=self.run_dir / "recalibrated.safetensors")
        self._report(rows, t.epochs, final=True)
        if t.sampler == "pss":  # the deployable subnet per budget, chosen on the validation split
            from .pss import write_budget_table

            write_budget_table(self)
        self.logger.close()
        return rows

    def _report(self, rows: list[dict[str, Any]], epoch: int, final: bool = False) -> None:
        if not self.env.is_main or not rows:
            return
        self.logger.log({"epoch": epoch, "step": self.step, "val": rows})
        print(f"validation after epoch {epoch} (BN recalibrated):\n{format_table(rows)}", flush=True)
        if final:
            atomic_write_json(self.run_dir / "final_eval.json", rows, indent=1)


def run_finished(run_dir: str | Path, cfg: Config) -> bool:
    """Whether the end of training wrote everything it writes into ``run_dir``:
    ``final_eval.json`` (after ``recalibrated.safetensors``) and, for PSS, ``budget.safetensors``
    (written last). A run killed during its final evaluation or selection lacks one and redoes
    them on resume; a finished one is not evaluated again."""
    run = Path(run_dir)
    done = (run / "final_eval.json").is_file()
    if cfg.train.sampler == "pss":
        done = done and (run / "budget.safetensors").is_file()
    return done


def train(
    cfg: Config, run_dir: str | Path, resume: bool = False, env: DistEnv | None = None
) -> list[dict[str, Any]]:
    """Train the run ``cfg`` describes into ``run_dir``; return the final validation rows.

    With ``train.static_widths`` set, trains one ordinary network per width instead
    (:func:`train_static`). ``resume=True`` continues from the run's latest checkpoint (or
    starts when there is none); without it an existing checkpoint is an error, never
    silently overwritten.
    """
    if cfg.train.static_widths:
        return train_static(cfg, run_dir, resume, env)
    existing = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if existing is not None and not resume:
        raise CheckpointError(
            f"{run_dir} already holds a checkpoint ({existing.name}): pass --resume to continue it, "
            "or choose another --out directory"
        )
    trainer = Trainer(cfg, run_dir, env)
    if resume and trainer.resume() and trainer.env.is_main:
        print(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}", flush=True)
    return trainer.fit()


def static_config(cfg: Config, width: float) -> Config:
    """The same recipe for one ordinary network of uniform ``width``: one subnet, labels, one view."""
    t = dataclasses.replace(
        cfg.train,
        sampler="fixed",
        fixed_width=width,
        target="labels",
        mvco=False,
        static_widths=[],
        eval_widths=[width],
    )
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
    for width in cfg.train.static_widths:
        rows += train(static_config(cfg, width), Path(run_dir) / f"static-x{width:g}", resume, env)
    if rows:
        atomic_write_json(Path(run_dir, "final_eval.json"), rows, indent=1)
    return rows
