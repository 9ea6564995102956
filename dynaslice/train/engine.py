"""The one training engine. Every kind of training in dynaslice is a :class:`Trainer` subclass.

The loop is the same for all of them: epochs of steps over a batch loader; each step seeds the
global RNG from ``(seed, step)``, lets the subclass run forward and backward
(:meth:`Trainer.train_step`), checks that every loss is finite, clips, steps the optimizer and
the per-iteration scheduler, and lets the subclass update what follows the weights (an EMA
teacher, a sampler's scores: :meth:`Trainer.after_step`). Around it the engine owns what every
method needs alike: the device and threads, progress (:mod:`dynaslice.progress`: a bar on a
terminal, a line every ~10 s in a log file), metrics (:class:`MetricsLogger`),
atomic checksummed checkpoints every ``train.ckpt_every_steps`` and at each epoch end, bit-exact
resume from the newest intact checkpoint, an exclusive lock on the run directory, periodic
validation and the end of training (:meth:`Trainer.finish`, then every
:class:`Callback`'s ``on_fit_end``, then ``final_eval.json``, written last: a run whose
directory has it is finished, see :func:`dynaslice.runs.is_finished`).

Subclasses: :class:`~dynaslice.train.supernet.SupernetTrainer` (Stage I: supernets and static
networks, with pluggable samplers and targets) and :class:`~dynaslice.train.stage2.GateTrainer`
(Stage II: the gate's slimming head on a frozen supernet).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs, safejson
from ..atomic import atomic_write_json
from ..modelfile import CheckpointError, prefixed, unprefixed
from ..progress import Progress
from ..seeding import derive_seed
from .checkpoint import load_resumable, save_checkpoint
from .config import RESUMABLE_CHANGES, Config, flatten, from_dict, save_config
from .distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from .metrics import MetricsLogger


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` (possibly fractional) epochs: at least one."""
    if not epochs > 0:
        raise ValueError(f"the number of epochs must be > 0, got {epochs}")
    return max(1, round(epochs * steps_per_epoch))


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; training stopped (the message says what is kept and what to do)."""


class Callback:
    """A hook into :meth:`Trainer.fit`, for strategies that add work to the end of training
    (PSS-Net's budget-table selection). Override what you need."""

    def on_fit_end(self, trainer: Trainer, result: Any) -> None:
        """After :meth:`Trainer.finish` (final evaluation), before ``final_eval.json`` is written."""


class Trainer:
    """The training loop; subclasses say what one step does and what a checkpoint holds.

    A subclass's ``__init__`` calls ``super().__init__(cfg, run_dir, env)``, builds its data
    loader, modules and optimizer, then :meth:`setup_loop` with them. It implements
    :meth:`forward_backward` and :meth:`checkpoint_modules`, and may override :meth:`after_step`,
    :meth:`extra_state`/:meth:`load_extra_state`, :meth:`evaluate_validation`, :meth:`format_validation`,
    :meth:`finish` and :meth:`meta`.
    """

    name = "train"  # the progress bar's and the epoch line's prefix
    rng_name = "step"  # the global RNG of step s is seeded from (rng_name, seed, s)

    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.env = env or init_distributed(t.device)
        self.device = self.env.device
        self.seed = t.seed
        self.step = 0
        self.callbacks: list[Callback] = []
        self.logger = MetricsLogger(self.run_dir, enabled=self.env.is_main)
        self.amp_dtype: torch.dtype | None = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)  # a no-op unless setup_amp enables it
        self.clip_grad_norm: float | None = None
        self.clip_grad_value: float | None = None
        self._lock: contextlib.ExitStack | None = None  # the run directory's lock, from resume/fit to fit's end

    # ------------------------------------------------------------------ set-up by subclasses

    def setup_loop(
        self,
        loader: Any,
        epochs: float,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
    ) -> None:
        """The batches (anything with ``len()`` and ``epoch_batches(epoch, start)``), the length
        of training and the optimizer and per-iteration scheduler that drive it.

        ``epochs`` may be fractional (a fine-tuning phase of a quarter epoch): training then
        stops within its last epoch, after :func:`total_steps` steps.
        """
        self.train_loader = loader
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError(
                "no training steps: the training split holds fewer images than one batch "
                f"(data.batch_size {self.cfg.data.batch_size})"
            )
        self.total_steps = total_steps(epochs, self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)  # started epochs, the last maybe partial
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value

    def setup_amp(self, enabled: bool) -> None:
        """Mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler)."""
        if enabled and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # a disabled scaler is a no-op: one code path for fp32, bf16 and fp16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ the subclass's part

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Forward and backward on one batch (no optimizer step): ``(losses, info)``.

        Each loss is a detached scalar on which backward has already run (call
        ``self.scaler.scale(loss).backward()``). ``info``: anything :meth:`after_step` needs;
        ``info["names"]`` names the losses (in error messages), ``info["log"]`` holds extra
        JSON values for the metrics log.
        """
        raise NotImplementedError

    def after_step(self, losses: list[float], info: dict[str, Any]) -> None:
        """After the optimizer step; ``losses`` are the rank-averaged values of :meth:`forward_backward`'s."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based), also when a resume lands mid-epoch: for
        per-epoch schedules (e.g. DCFF's fusion temperature). Must depend on ``epoch`` alone."""

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """``{prefix: module}`` whose state dicts a checkpoint's model file holds (``model``, ``ema``)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Plain data beyond the modules and optimizer that a resume needs (a sampler's pools)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def meta(self) -> dict[str, Any]:
        """Metadata of the checkpoints' model files (what rebuilds the net; the config)."""
        return {"config": self.cfg.to_dict(), "epoch": self.step / self.steps_per_epoch}

    def evaluate_validation(self) -> Any:
        """Evaluate on the validation split (after some epochs); None: nothing to report."""
        return None

    def format_validation(self, result: Any) -> str:
        """How :meth:`report` prints a result, after "validation after epoch N"."""
        return f": {json.dumps(result)}"

    def finish(self) -> Any:
        """The end of training (final evaluation, files); returns what ``fit`` returns."""
        return self.evaluate_validation()

    # ------------------------------------------------------------------ one step

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on batch ``(x, y)``: ``{"losses": [rank-averaged floats], **info}``."""
        torch.manual_seed(derive_seed(self.rng_name, self.seed, self.step))  # dropout, Gumbel noise
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        losses, info = self.forward_backward(x, y)
        values = all_reduce_mean(torch.stack([v.float() for v in losses]), self.env).tolist()
        if not all(math.isfinite(v) for v in values):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message(values, info))
        if self.clip_grad_norm or self.clip_grad_value:
            info = {**info, **self._clip_gradients()}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.after_step(values, info)
        self.step += 1
        return {"losses": values, **info}

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clip each gradient entry (``clip_grad_value``), then the total norm (``clip_grad_norm``);
        returns the norm before its clip, which the metrics log shows (how often the clip bites)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.clip_grad_value:
            torch.nn.utils.clip_grad_value_(params, self.clip_grad_value)
        if self.clip_grad_norm:
            return {"grad_norm": torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)}
        return {}

    def _diverged_message(self, values: list[float], info: dict[str, Any]) -> str:
        which = info.get("names") or list(range(len(values)))
        bad = next((n, v) for n, v in zip(which, values, strict=False) if not math.isfinite(v))
        kept = (
            f"the last good checkpoint in {runs.checkpoints_dir(self.run_dir)} is kept; "
            "resume it with a lower optim.lr or with optim.clip_grad_norm set: "
            "dynaslice train CONFIG --resume --allow-change optim.lr=X"
            if runs.checkpoint_steps(self.run_dir)
            else "no checkpoint was written yet: start again with a lower optim.lr, more "
            "optim.warmup_epochs or optim.clip_grad_norm set"
        )
        return f"step {self.step}: the loss of {bad[0]} is {bad[1]}; training stopped and {kept}"

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits for it)."""
        path = None
        if self.env.is_main:
            if self._lock is not None:  # our lock deleted or replaced: another process may write here now
                runs.check_lock(self.run_dir)
            tensors: dict[str, torch.Tensor] = {}
            for prefix, module in self.checkpoint_modules().items():
                tensors.update(prefixed(prefix, module))
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "extra": self.extra_state(),
                # all randomness is derived from (seed, step): the seed is the whole RNG state
                "rng": {"seed": self.seed},
                "world_size": self.env.world_size,
            }
            path = save_checkpoint(
                self.run_dir, self.step, tensors, self.meta(), state, self.cfg.train.keep_checkpoints
            )
        barrier(self.env)
        return path

    def resume(self, allow_changes: Iterable[str] = ()) -> bool:
        """Load the newest intact checkpoint of the run; False if it has none.

        The run's config must equal this trainer's, except for keys in ``allow_changes`` (only
        those of :data:`~dynaslice.train.config.RESUMABLE_CHANGES`, e.g. a lower ``optim.lr`` after
        a divergence), which are applied to the optimizer and recorded in ``metrics.jsonl``.
        """
        self._hold_lock()  # before the first read: a run being written by another process is not ours to load
        try:
            return self._resume(allow_changes)
        except BaseException:
            self._release_lock()
            raise

    def _resume(self, allow_changes: Iterable[str]) -> bool:
        ckpt = load_resumable(self.run_dir, log=self._note)
        if ckpt is None:
            return False
        changed = self._check_config(ckpt.path, ckpt.meta.get("config", {}), set(allow_changes))
        state = ckpt.state
        if state.get("world_size") != self.env.world_size:
            raise CheckpointError(
                f"{ckpt.path} was written by {state.get('world_size')} process(es), this job has "
                f"{self.env.world_size}: the data shards would differ; resume with the same number"
            )
        for prefix, module in self.checkpoint_modules().items():
            module.load_state_dict(unprefixed(prefix, ckpt.tensors))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state.get("extra", state))  # 0.1 kept it at the top level
        self.step = int(state["step"])
        if changed:
            self._apply_changes(changed)
        return True

    def _check_config(self, path: Path, saved: dict[str, Any], allowed: set[str]) -> dict[str, tuple]:
        """The allowed keys that differ between the checkpoint's config and ours; refuses any other."""
        bad = allowed - RESUMABLE_CHANGES
        if bad:
            raise CheckpointError(
                f"--allow-change takes only {', '.join(sorted(RESUMABLE_CHANGES))}; not {', '.join(sorted(bad))}"
            )
        # resolve the saved config against today's defaults: a key added since must not block a resume
        old, now = flatten(from_dict(saved).to_dict()), flatten(self.cfg.to_dict())
        diff = sorted(k for k in old.keys() | now.keys() if old.get(k) != now.get(k))
        refused = [k for k in diff if k not in allowed]
        if refused:
            hint = (
                f" (to change {', '.join(sorted(RESUMABLE_CHANGES))} on resume, pass --allow-change KEY=VALUE)"
                if set(refused) <= RESUMABLE_CHANGES
                else ""
            )
            raise CheckpointError(
                f"{path} was trained with a different config (keys {', '.join(refused[:5])}); resume "
                f"with the run's own config.yaml or start a new --out directory{hint}"
            )
        return {k: (old.get(k), now.get(k)) for k in diff}

    def _apply_changes(self, changed: dict[str, tuple]) -> None:
        """A changed learning rate rescales the schedule from here on; clipping is read per step."""
        if "optim.lr" in changed:
            factor = changed["optim.lr"][1] / changed["optim.lr"][0]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            for sched in [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]:
                if hasattr(sched, "base_lrs"):  # SequentialLR has none: its parts do
                    sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        self._note(f"resuming at step {self.step} with changed settings: "
                   + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))  # fmt: skip
        self.logger.log({"step": self.step, "config_changes": {k: list(v) for k, v in changed.items()}})

    def _note(self, text: str) -> None:
        if self.env.is_main:
            print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Any:
        """Train until the last epoch is done, then :meth:`finish`; returns its result.

        A finished run (its ``final_eval.json`` exists) returns its recorded result without
        evaluating again. Holds the run directory's lock throughout (rank 0; taken already by
        :meth:`resume`), and releases it when it returns or raises.
        """
        self._hold_lock()
        try:
            if self.step >= self.total_steps and runs.is_finished(self.run_dir):
                try:
                    return safejson.loads((self.run_dir / runs.FINAL_EVAL).read_text())
                except ValueError:  # damaged: the final checkpoint is intact, evaluate it again
                    self._note(f"note: {self.run_dir / runs.FINAL_EVAL} is damaged; evaluating the final checkpoint again")
            if self.env.is_main:
                save_config(self.cfg, self.run_dir / runs.CONFIG)
            try:
                while self.step < self.total_steps:
                    self._epoch(*divmod(self.step, self.steps_per_epoch))
                result = self.finish()
                for callback in self.callbacks:
                    callback.on_fit_end(self, result)
                if self.env.is_main:
                    atomic_write_json(self.run_dir / runs.FINAL_EVAL, result, indent=1)
            finally:
                self.logger.close()
            barrier(self.env)
        finally:
            self._release_lock()
        return result

    def _hold_lock(self) -> None:
        """Take the run directory's exclusive lock (rank 0) unless this trainer holds it already."""
        if self.env.is_main and self._lock is None:
            lock = contextlib.ExitStack()
            lock.enter_context(runs.exclusive(self.run_dir))
            self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _epoch(self, epoch: int, start: int) -> None:
        t, spe = self.cfg.train, self.steps_per_epoch
        # the epoch's last step (a fractional last epoch stops early)
        end = min(spe, start + self.total_steps - self.step)
        desc = f"{self.name} epoch {epoch + 1}/{self.epochs}"
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        self.on_epoch_start(epoch)
        batches = self.train_loader.epoch_batches(epoch, start)
        with Progress(end, desc, initial=start, enabled=self.env.is_main) as bar:
            # islice: a fractional last epoch stops early; whole epochs end on their own
            for x, y in itertools.islice(batches, self.total_steps - self.step):
                out = self.train_step(x, y)
                losses = out["losses"]
                seen, loss_sum = seen + 1, loss_sum + sum(losses)
                bar.update(loss=sum(losses))
                if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    record = {"step": self.step, "epoch": self.step / spe, "lr": lr, "loss": sum(losses)}
                    if "grad_norm" in out:  # with optim.clip_grad_norm; float() syncs, so only when logged
                        record["grad_norm"] = float(out["grad_norm"])
                    self.logger.log({**record, "losses": losses, **out.get("log", {})})
                if t.ckpt_every_steps and self.step % t.ckpt_every_steps == 0 and self.step % spe:
                    self.save()
        self.save()
        if self.env.is_main:
            print(
                f"{self.name} epoch {epoch + 1}/{self.epochs}: mean loss {loss_sum / max(seen, 1):.4f}, "
                f"{seen} steps in {time.perf_counter() - t0:.1f} s, lr {self.scheduler.get_last_lr()[0]:.4g}",
                flush=True,
            )
        every = t.eval_every_epochs
        if epoch + 1 < self.epochs and every and (epoch + 1) % every == 0:
            self.report(self.evaluate_validation(), epoch + 1)

    def report(self, result: Any, epoch: float, final: bool = False) -> None:
        """Log and print a validation result (rank 0; nothing when there is none)."""
        if not self.env.is_main or not result:
            return
        self.logger.log({"epoch": epoch, "step": self.step, "val": result})
        print(f"validation after epoch {epoch:g}{self.format_validation(result)}", flush=True)

