"""Nested training of a language-model supernet on the one engine (MatFormer, issue 32).

A config with ``model.name: hf:llama`` (or ``hf:gpt2``) and ``data.name: text`` trains a
Hugging Face causal LM built from ``model.kwargs`` (its config's fields, e.g. ``hidden_size``;
``vocab_size`` is the byte tokenizer's 256), or started from a trained model's weights
(``train.init_from``), as a supernet (:func:`~dynaslice.lm.make_lm_supernet`; ``model.kwargs``
may also hold its ``ratios``, ``round_to`` and ``heads``). :class:`LMTrainer` is a
:class:`~dynaslice.train.engine.Trainer`: checkpoints, bit-exact resume, progress, metrics and
``final_eval.json`` are the engine's.

Which subnets a step trains (``train.sampler``):

- ``sandwich``: MatFormer's fixed granularities, every step: each named width of
  ``train.eval_widths`` (uniform ratios of every sliced dimension, largest first), then
  ``train.num_subnets - len(eval_widths)`` random Mix'n'Match subnets (each layer's widths drawn
  from the grid, all layers kept). The granularities are the sandwich's largest and smallest
  and the widths in between; fixing the middle ones, as MatFormer does, rather than drawing
  them, gives every subnet that will be deployed and compared an update every step: at a few
  hundred steps a randomly drawn width would get a third of them.
- ``fixed``: the uniform subnet ``train.fixed_width`` alone: an ordinary model of that size
  (weights outside the slice get no gradient), the baseline "trained alone".

What each learns (``train.target``): ``inplace`` (DS-Net's in-place distillation: the largest
learns the next tokens, every other subnet the KL divergence to the largest's detached
next-token distribution of the same step) or ``labels`` (every subnet the next tokens:
MatFormer's plain joint objective). The loss of a step is the sum over its subnets, each
backpropagated at once (only one subnet's activations alive).

``train.order_channels`` with ``train.init_from`` sorts every layer's FFN units and heads by
activation importance on training batches first (:func:`~dynaslice.lm.reorder_by_importance`),
so the slices start from the trained model's most important units. The result,
``final_eval.json``: per named subnet its validation perplexity (``exp`` of the mean next-token
negative log-likelihood in nats, per byte), parameters, MACs per token, and the training
tokens and FLOPs.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .. import runs
from ..archspec import uniform_archs
from ..config_base import ConfigError
from ..modelfile import CheckpointError, load_model_file, resolve_model_file, unprefixed
from ..seeding import derive_seed
from ..space import Arch
from ..train.checkpoint import refuse_existing_run
from ..train.config import Config, from_dict, register_check
from ..train.distributed import DistEnv
from ..train.engine import Trainer
from ..train.optim import build_optimizer, build_scheduler
from .data import VOCAB_SIZE, BlockBatches, TextBlocks, eval_batches, load_text_split
from .ordering import reorder_by_importance
from .supernet import LMSupernet, count_macs, count_params, make_lm_supernet

FAMILIES = {"hf:llama": ("LlamaConfig", "LlamaForCausalLM"), "hf:gpt2": ("GPT2Config", "GPT2LMHeadModel")}
"""``model.name`` -> the ``transformers`` config and causal-LM classes it builds."""
SUPERNET_KEYS = ("ratios", "round_to", "heads")
"""``model.kwargs`` keys that shape the supernet (:func:`make_lm_supernet`), not the model."""
TARGETS = ("inplace", "labels")
SAMPLERS = ("sandwich", "fixed")
EVAL_BATCH = 32
CALIBRATION_BATCHES = 8  # training batches that measure importance for train.order_channels


def is_lm_config(cfg: Config) -> bool:
    """Whether ``cfg`` trains a language model (``model.name`` ``hf:...``): :func:`train_lm`'s."""
    return cfg.model.name.startswith("hf:")


@register_check
def check_lm_config(cfg: Config) -> None:
    """The keys a language-model run reads, and the image-only ones it refuses (one line each)."""
    t, lm, text = cfg.train, is_lm_config(cfg), cfg.data.name == "text"
    if lm != text:
        raise ConfigError(
            f"model.name={cfg.model.name!r} with data.name={cfg.data.name!r}: language models (hf:...) train on "
            "data.name: text, and text trains only hf: language models"
        )
    if not lm:
        return
    if cfg.model.name not in FAMILIES:
        raise ConfigError(f"model.name={cfg.model.name!r}: the language models are {', '.join(FAMILIES)}")
    if t.target not in TARGETS:
        raise ConfigError(f"train.target={t.target!r}: a language model trains with {' or '.join(TARGETS)}")
    if t.sampler not in SAMPLERS:
        raise ConfigError(
            f"train.sampler={t.sampler!r}: a language model trains with {' or '.join(SAMPLERS)}"
        )
    if t.sampler == "sandwich" and t.num_subnets < len(t.eval_widths):
        raise ConfigError(
            f"train.num_subnets={t.num_subnets} is below the {len(t.eval_widths)} widths of train.eval_widths, "
            "which every step trains: raise it (more adds random Mix'n'Match subnets)"
        )
    if t.sampler == "sandwich" and t.target == "inplace" and 1.0 not in t.eval_widths:
        raise ConfigError(
            "train.target=inplace distils from the largest subnet: train.eval_widths must hold 1.0"
        )
    unsupported = {
        "train.static_widths": t.static_widths, "train.mvco": t.mvco, "train.phase1_epochs": t.phase1_epochs,
        "model.gate.enabled": cfg.model.gate.enabled,
    }  # fmt: skip
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ConfigError(
            f"{found[0]} is not supported for language models yet (train each width alone with "
            "train.sampler: fixed and train.fixed_width)"
        )
    if t.order_channels and not t.init_from:
        raise ConfigError("train.order_channels sorts a trained model's units: it goes with train.init_from")


# --------------------------------------------------------------------------- the model


def build_lm(name: str, kwargs: Mapping[str, Any], seq_len: int, seed: int) -> LMSupernet:
    """The supernet of a new ``name`` model (``hf:llama``, ``hf:gpt2``) with config fields and
    supernet keys ``kwargs``, initialised from ``seed``. Raises ConfigError (one line) for an
    unknown field or a model that cannot read ``seq_len`` tokens."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[name])
    fields = {k: v for k, v in kwargs.items() if k not in SUPERNET_KEYS}
    known = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(fields) - known)
    if unknown:  # a config class keeps unknown keywords as attributes: a typo would be ignored
        raise ConfigError(
            f"model.kwargs {unknown} are not fields of {config_cls.__name__} (nor {', '.join(SUPERNET_KEYS)})"
        )
    if fields.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ConfigError(
            f"model.kwargs.vocab_size={fields['vocab_size']}: the byte tokenizer has {VOCAB_SIZE} tokens; leave it out"
        )
    try:
        config = config_cls(**{**fields, "vocab_size": VOCAB_SIZE})
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model.kwargs do not make a {config_cls.__name__}: {str(e).splitlines()[0]}"
        ) from None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and positions < seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's {positions} positions")
    config._attn_implementation = "sdpa"
    torch.manual_seed(derive_seed("init", seed))
    model = model_cls(config)
    try:
        return make_lm_supernet(
            model, torch.zeros(1, seq_len, dtype=torch.long),
            **{k: kwargs[k] for k in SUPERNET_KEYS if k in kwargs},
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"model.kwargs: {e}") from None


def load_lm_weights(net: LMSupernet, source: str | Path) -> str:
    """Load a trained model's weights into ``net``'s model (``train.init_from``): a run directory,
    checkpoint directory or model file of a language-model run, a Hugging Face directory
    (``save_pretrained``'s), or a ``.safetensors`` state dict of the model. Returns what was
    loaded; raises CheckpointError (one line) when it does not fit."""
    path = Path(source)
    try:
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            state, what = load_file(str(path / "model.safetensors")), "a Hugging Face checkpoint"
        elif path.suffix == ".safetensors" and path.is_file() and not _is_model_file(path):
            state, what = load_file(str(path)), "a state dict"
        else:
            file = resolve_model_file(path)
            state, what = unprefixed("model.model", load_model_file(file)[0]), f"the run's {file.name}"
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"train.init_from {source}: {str(e).splitlines()[0]}") from None
    if getattr(net.model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != net.HEAD}
    try:
        missing, unexpected = net.model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"train.init_from {source} does not fit the model: {str(e).splitlines()[-1].strip()}"
        ) from None
    if unexpected or [k for k in missing if k != net.HEAD or not net.model.config.tie_word_embeddings]:
        raise CheckpointError(
            f"train.init_from {source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return f"{source} ({what})"


def _is_model_file(path: Path) -> bool:
    """A dynaslice model file (weights under ``model.``) rather than a plain state dict."""
    try:
        load_model_file(path)
        return True
    except CheckpointError:
        return False


def load_lm_run(path: str | Path) -> tuple[LMSupernet, dict[str, Any], Config, Path]:
    """``(net, metadata, config, file)`` of a language-model run directory, checkpoint directory
    or model file (its newest checkpoint), the net in eval mode with the trained weights."""
    file = resolve_model_file(path)
    tensors, meta = load_model_file(file)
    spec = meta.get("model") or {}
    if spec.get("name") not in FAMILIES or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{file} is not a language-model run (its model is {spec.get('name')!r})")
    cfg = from_dict(meta["config"])
    net = build_lm(spec["name"], spec["kwargs"], cfg.data.seq_len, cfg.train.seed)
    try:
        net.load_state_dict(unprefixed("model", tensors))
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not match its model: {str(e).splitlines()[-1].strip()}") from None
    return net.eval(), meta, cfg, file


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(
    net: LMSupernet, arch: Mapping[str, int], data: TextBlocks, batch_size: int = EVAL_BATCH
) -> dict[str, float]:
    """Subnet ``arch``'s next-token loss on every block of ``data``: ``nll`` (mean over tokens, in
    nats), ``ppl`` (``exp(nll)``) and ``tokens``. The net runs in eval mode; its mode is restored."""
    was, device = net.training, next(net.parameters()).device
    net.eval()
    total, count = 0.0, 0
    try:
        for x, y in eval_batches(data, batch_size):
            logits = net(x.to(device), arch)
            total += float(
                F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
            )
            count += y.numel()
    finally:
        net.train(was)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


# --------------------------------------------------------------------------- the trainer


class LMTrainer(Trainer):
    """Nested (or alone) training of a language-model supernet: see the module docstring."""

    name = "train-lm"

    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None):
        super().__init__(cfg, run_dir, env)
        if self.env.distributed:
            raise ConfigError("language-model training runs in one process (no torchrun) for now")
        t, d = cfg.train, cfg.data
        if not d.root:
            raise ConfigError(
                "data.root: give the folder of the text corpus (e.g. /usr/share/games/fortunes)"
            )
        try:
            train_data = load_text_split(d.root, "train", d.seq_len)
            self.val_data = load_text_split(d.root, "val", d.seq_len)
            loader = BlockBatches(train_data, d.batch_size, t.seed, d.train_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.spec = {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)}
        self.net = build_lm(cfg.model.name, cfg.model.kwargs, d.seq_len, t.seed).to(self.device)
        self.space = self.net.space
        if t.init_from:  # a trained model; on resume the checkpoint then overwrites it
            print(f"loaded the starting weights: {load_lm_weights(self.net, t.init_from)}", flush=True)
            if t.order_channels:
                calib = [x for x, _ in itertools.islice(loader.epoch_batches(0), CALIBRATION_BATCHES)]
                reorder_by_importance(self.net, [x.to(self.device) for x in calib])
        self.archs = self._named_archs()
        optimizer = build_optimizer(self.net, cfg.optim)
        spe = len(loader)
        scheduler = build_scheduler(optimizer, cfg.optim, t.epochs * spe, spe)
        self.setup_loop(
            loader, t.epochs, optimizer, scheduler, cfg.optim.clip_grad_norm, cfg.optim.clip_grad_value
        )
        self.setup_amp(t.amp)
        self.net.train()
        self.train_seconds = 0.0  # wall-clock of the training steps, over resumes (final_eval.json's)

    def _named_archs(self) -> dict[str, Arch]:
        """The subnets a run names, evaluates and trains every step (the module docstring)."""
        t = self.cfg.train
        widths = [t.fixed_width] if t.sampler == "fixed" else sorted(t.eval_widths, reverse=True)
        try:
            return uniform_archs(self.net, widths)
        except ValueError as e:
            key = "train.fixed_width" if t.sampler == "fixed" else "train.eval_widths"
            ffn = self.space["layers.0.ffn"].choices
            raise ConfigError(
                f"{key}={widths}: {e} (FFN widths {list(ffn)}; set model.kwargs.ratios)"
            ) from None

    def step_archs(self, step: int) -> list[Arch]:
        """The subnets of ``step``: the named ones, then random Mix'n'Match ones (seeded by the step)."""
        archs = list(self.archs.values())
        if self.cfg.train.sampler == "fixed":
            return archs
        rng = random.Random(derive_seed("lm-mix", self.seed, step))
        for _ in range(self.cfg.train.num_subnets - len(archs)):
            archs.append(
                Arch({d.name: rng.choice(d.choices) if d.kind == "width" else d.max for d in self.space.dims})
            )
        return archs

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        start = time.perf_counter()
        out = super().train_step(x, y)
        self.train_seconds += time.perf_counter() - start
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state["train_seconds"])

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        t = self.cfg.train
        self.net.train()
        archs, losses, teacher = self.step_archs(self.step), [], None
        for i, arch in enumerate(archs):
            with self.autocast():
                logits = self.net(x, arch).flatten(0, 1).float()
            if teacher is None or t.target == "labels":
                loss = F.cross_entropy(logits, y.flatten(), label_smoothing=t.label_smoothing)
            else:  # in-place distillation: KL(largest || this subnet), per token
                loss = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
            if i == 0 and t.target == "inplace" and t.sampler == "sandwich":
                teacher = F.log_softmax(logits.detach(), -1)
            self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        names = [
            next((n for n, a in self.archs.items() if a == arch), f"mix{i}") for i, arch in enumerate(archs)
        ]
        return losses, {"names": names, "log": {"subnets": names}}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def meta(self) -> dict[str, Any]:
        return {"model": self.spec, **super().meta()}

    def train_flops(self) -> float:
        """Training FLOPs so far: per token and subnet run, 3 x 2 x its MACs per token (forward and
        the two products of backward; attention as eager runs it over the block's tokens)."""
        seq_len, per_token = self.cfg.data.seq_len, 0.0
        for step in range(self.step):  # random Mix'n'Match subnets differ per step
            per_token += sum(6 * count_macs(self.net, a, context=seq_len) for a in self.step_archs(step))
        return per_token * self.train_loader.tokens_per_step

    def evaluate_validation(self) -> list[dict[str, Any]]:
        rows = []
        for name, arch in self.archs.items():
            ppl = perplexity(self.net, arch, self.val_data)
            rows.append({
                "name": name, "arch": arch.to_dict(), "split": "val", "val_ppl": ppl["ppl"], "val_nll": ppl["nll"],
                "val_tokens": ppl["tokens"], "params": count_params(self.net, arch),
                "macs_per_token": count_macs(self.net, arch, context=self.cfg.data.seq_len),
            })  # fmt: skip
        return rows

    def format_validation(self, result: Any) -> str:
        return ":\n" + "\n".join(
            f"  {r['name']:>6}  ppl {r['val_ppl']:.3f}  ({r['params'] / 1e6:.2f} M params)" for r in result
        )

    def finish(self) -> dict[str, Any]:
        rows = self.evaluate_validation()
        self.report(rows, self.epochs, final=True)
        tokens = self.train_loader.tokens_per_step * self.step
        return {
            "subnets": rows,
            "train_tokens": tokens,
            "train_flops": self.train_flops(),
            "steps": self.step,
            "train_seconds": self.train_seconds,
            "threads": torch.get_num_threads(),
        }


def train_lm(
    cfg: Config, run_dir: str | Path, resume: bool = False, env: DistEnv | None = None,
    allow_changes: Iterable[str] = (),
) -> dict[str, Any]:  # fmt: skip
    """Train the language-model run ``cfg`` describes into ``run_dir`` (see the module docstring);
    ``resume`` continues its newest intact checkpoint. Returns what ``final_eval.json`` holds."""
    refuse_existing_run(run_dir, resume)
    trainer = LMTrainer(cfg, run_dir, env)
    if resume and trainer.resume(allow_changes):
        print(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}", flush=True)
    return trainer.fit()


def final_rows(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's ``final_eval.json``."""
    return json.loads((Path(run_dir) / runs.FINAL_EVAL).read_text())
