"""FDDA: Fine-grained Data Distribution Alignment for post-training quantization (ECCV 2022).

FDDA makes synthetic calibration images with a conditional generator trained against the frozen
full-precision network (as GDFQ does: cross-entropy on the conditioning label plus a loss that
pulls every BatchNorm layer's batch statistics towards its running statistics), and adds two
losses built from one real image per class, on the deeper BN layers only:

- **BNS centres**: the per-class BN statistics (mean and biased variance, per channel, of every
  BN layer's *input*) of that class's real image -- :func:`bn_centres`;
- **BNS-centralised loss** (weight 0.01): a batch of one class is pulled to its class's centre
  (*inter-class separation*) -- :func:`bns_centre_loss`;
- **BNS-distorted loss** (weight 0.9): the same, towards the centre plus Gaussian noise (std 0.5
  on means, 1.0 on variances), redrawn every step, to imitate *intra-class incohesion* --
  :func:`bns_distorted_loss`.

The pieces here (statistics capture, centres, losses, generator, one generator step) are
independent of any training loop; :class:`GeneratorTrainer` trains the generator with them on
dynaslice's training engine (checkpoints, exact resume, metrics), :func:`train_generator` is the
one-call version. Defaults follow the official code
(``zysxmu/FDDA``, ``imagenet_config.hocon`` and ``trainer_DBNS_CBNS.py``); every departure is
listed in ``docs/QUANT.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modelfile import CheckpointError
from ..seeding import derive_seed
from ..train.config import Config, TrainConfig
from ..train.engine import Trainer

__all__ = [
    "BNCentres",
    "BNStat",
    "ConditionalGenerator",
    "FDDAConfig",
    "GeneratorTrainer",
    "LatentBatches",
    "bn_centres",
    "bns_centre_loss",
    "bns_distorted_loss",
    "bns_loss",
    "check_same_run",
    "deep_start",
    "fingerprint",
    "forward_with_bn_stats",
    "generator_step",
    "one_per_class",
    "train_generator",
]


# --------------------------------------------------------------------------- BN statistics


@dataclass(frozen=True)
class BNStat:
    """Batch statistics of one BatchNorm2d call: per-channel mean and biased variance of its input."""

    mean: torch.Tensor
    var: torch.Tensor
    module: nn.BatchNorm2d


def _bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm2d layers; FDDA aligns BN statistics, so it needs "
            "a full-precision network with BatchNorm (an extracted subnet, before any BN folding)"
        )
    return layers


def forward_with_bn_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[BNStat]]:
    """``model(x)`` and the batch statistics of every BatchNorm2d input, in call order.

    The hooks live only for this call, so nothing in ``model`` changes. Statistics are those the
    official code records (``input.mean([0, 2, 3])``, ``input.var([0, 2, 3], unbiased=False)``)
    and keep their graph, so losses on them reach the input (and a generator behind it).
    """
    stats: list[BNStat] = []

    def hook(module: nn.Module, args: tuple) -> None:
        h = args[0]
        stats.append(BNStat(h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False), module))

    handles = [m.register_forward_pre_hook(hook) for m in _bn_layers(model)]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, stats


def deep_start(num_layers: int) -> int:
    """Index of the first "deep" BN layer, where FDDA's class-wise losses apply.

    The official rule, ``int((L + 1) / 2) - 2`` (ResNet-18: layer 8 of 20), kept at >= 0.
    """
    return max(0, (num_layers + 1) // 2 - 2)


@dataclass(frozen=True)
class BNCentres:
    """Per-class BN statistics of the real calibration images.

    ``means[l]`` / ``vars[l]`` are ``[num_classes, C_l]`` for BN call ``l`` (forward order);
    ``correct[c]`` says whether the network classifies class ``c``'s image(s) correctly (most of
    them, when there are several): FDDA draws its class-wise batches only from those classes.
    """

    means: list[torch.Tensor]
    vars: list[torch.Tensor]
    correct: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.correct.numel())

    def to(self, device: torch.device | str) -> BNCentres:
        return BNCentres(
            [m.to(device) for m in self.means], [v.to(device) for v in self.vars], self.correct.to(device)
        )


@torch.no_grad()
def bn_centres(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> BNCentres:
    """The BNS centres of ``model`` from real ``images`` (normalised, ``[N, C, H, W]``) and ``labels``.

    Each class's images go through the network as one batch, in eval mode (the paper's setting is
    one image per class, batch size 1: the statistics are then that image's spatial statistics).
    ``model``'s mode is restored afterwards.
    """
    labels = torch.as_tensor(labels, device=images.device).long()
    missing = [c for c in range(num_classes) if not bool((labels == c).any())]
    if missing:
        raise ValueError(
            f"bn_centres needs at least one image of every class; classes {missing} have none "
            "(pick the images with one_per_class)"
        )
    training = model.training
    model.eval()
    try:
        per_class = []
        correct = torch.zeros(num_classes, dtype=torch.bool)
        for c in range(num_classes):
            logits, stats = forward_with_bn_stats(model, images[labels == c])
            per_class.append(stats)
            correct[c] = (logits.argmax(1) == c).float().mean() > 0.5
    finally:
        model.train(training)
    means = [
        torch.stack([per_class[c][i].mean for c in range(num_classes)]) for i in range(len(per_class[0]))
    ]
    vars_ = [torch.stack([per_class[c][i].var for c in range(num_classes)]) for i in range(len(per_class[0]))]
    return BNCentres(means, vars_, correct)


def one_per_class(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one random sample of every class (FDDA's calibration set), in class order."""
    labels = torch.as_tensor(labels)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() == 0:
            raise ValueError(f"no sample of class {c} to pick; FDDA needs one real image per class")
        picks.append(idx[torch.randint(idx.numel(), (1,), generator=generator)])
    return torch.cat(picks)


# --------------------------------------------------------------------------- losses


def bns_loss(stats: Sequence[BNStat]) -> torch.Tensor:
    """GDFQ's global BN-statistics loss: mean over BN layers of
    ``MSE(batch mean, running mean) + MSE(batch var, running var)``."""
    terms = [
        F.mse_loss(s.mean, s.module.running_mean) + F.mse_loss(s.var, s.module.running_var) for s in stats
    ]
    return torch.stack(terms).mean()


def _check_layers(stats: Sequence[BNStat], centres: BNCentres, start: int) -> None:
    if len(stats) != len(centres.means):
        raise ValueError(
            f"the forward pass recorded {len(stats)} BN layers, the centres have {len(centres.means)}: "
            "compute the centres with the same network"
        )
    if not 0 <= start < len(stats):
        raise ValueError(f"start layer {start} outside 0..{len(stats) - 1}")


def bns_centre_loss(stats: Sequence[BNStat], centres: BNCentres, label: int, start: int) -> torch.Tensor:
    """BNS-centralised loss of a one-class batch of class ``label``: mean over BN layers
    ``start..`` of ``MSE(mean, centre mean) + MSE(var, centre var)``."""
    _check_layers(stats, centres, start)
    terms = [
        F.mse_loss(s.mean, centres.means[i][label]) + F.mse_loss(s.var, centres.vars[i][label])
        for i, s in enumerate(stats)
        if i >= start
    ]
    return torch.stack(terms).mean()


def bns_distorted_loss(
    stats: Sequence[BNStat],
    centres: BNCentres,
    label: int,
    start: int,
    mean_std: float = 0.5,
    var_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BNS-distorted loss: as :func:`bns_centre_loss`, towards centres plus fresh Gaussian noise
    (``mean_std`` on means, ``var_std`` on variances; the official 0.5 and 1.0)."""
    _check_layers(stats, centres, start)
    terms = []
    for i, s in enumerate(stats):
        if i < start:
            continue
        mean_c, var_c = centres.means[i][label], centres.vars[i][label]
        noise_m = torch.randn(mean_c.shape, generator=generator).to(mean_c.device) * mean_std
        noise_v = torch.randn(var_c.shape, generator=generator).to(var_c.device) * var_std
        terms.append(F.mse_loss(s.mean, mean_c + noise_m) + F.mse_loss(s.var, var_c + noise_v))
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- generator


class _ConditionalBN(nn.Module):
    """BatchNorm without affine parameters, then a per-class scale and shift (embeddings)."""

    def __init__(self, num_classes: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class ConditionalGenerator(nn.Module):
    """GDFQ's conditional generator, as FDDA uses it: ``G(z, labels) -> images``.

    Linear to 128 x (S/4)^2, class-conditional BN, two (upsample x2, conv 3x3, class-conditional BN,
    LeakyReLU 0.2) stages (128 then 64 channels), conv 3x3 to the image channels, tanh, and a final
    BatchNorm without affine parameters so every output channel is roughly standardised, like
    normalised images. The two inner conditional BNs keep the original's ``eps=0.8`` (GDFQ passes
    0.8 where ``nn.BatchNorm2d`` expects ``eps``; it is kept since it shapes what was published).
    Always run in train mode (batch statistics), as the official code does; batches need >= 2 images.
    """

    def __init__(self, num_classes: int, image_size: int, channels: int, latent_dim: int = 100):
        super().__init__()
        if image_size % 4:
            raise ValueError(
                f"the generator upsamples twice by 2, so image_size must be a multiple of 4, got {image_size}"
            )
        self.num_classes, self.latent_dim, self.init_size = num_classes, latent_dim, image_size // 4
        self.fc = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = _ConditionalBN(num_classes, 128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = _ConditionalBN(num_classes, 128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = _ConditionalBN(num_classes, 64, eps=0.8)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = F.interpolate(self.bn0(h, labels), scale_factor=2)
        h = F.leaky_relu(self.bn1(self.conv1(h), labels), 0.2)
        h = F.interpolate(h, scale_factor=2)
        h = F.leaky_relu(self.bn2(self.conv2(h), labels), 0.2)
        return self.out_bn(torch.tanh(self.conv3(h)))

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images and their labels (uniform over classes unless given), with gradients."""
        device = self.fc.weight.device
        if labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=generator).to(device)
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self(z, labels), labels


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class FDDAConfig:
    """Generator training settings; defaults are the official ImageNet ones unless noted.

    ``fdda=False`` gives GDFQ's generator (CE + global BNS loss only), the ablation baseline.
    ``epochs`` x ``steps_per_epoch`` is ours to size (the official generator trains 400 x 200
    steps); the learning rate drops x0.1 at 25 %, 50 % and 75 % of the steps (official: epochs
    100/200/300 of 400).
    """

    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    bns_weight: float = 0.2
    fdda: bool = True
    centre_weight: float = 0.01
    distorted_weight: float = 0.9
    mean_std: float = 0.5
    var_std: float = 1.0
    fdda_every: int = 1
    latent_dim: int = 100

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def generator_step(
    gen: ConditionalGenerator,
    teacher: nn.Module,
    cfg: FDDAConfig,
    step: int,
    centres: BNCentres | None,
    z: torch.Tensor,
    labels: torch.Tensor,
    rng: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The losses of one generator step (the official ``train``/``cal_true_BNLoss`` pair).

    The batch ``gen(z, labels)`` gives ``ce + bns_weight * bns``. With FDDA (every ``fdda_every``
    steps) a second, one-class batch of a random class that the teacher gets right on its real
    image adds ``distorted_weight * D-BNS + centre_weight * C-BNS`` and its own CE; both CE terms
    are then halved. The class, the second batch and the distortion noise are drawn from ``rng``
    (None: the global RNG, which the training engine seeds per step). Returns the named terms
    and ``total``.
    """
    logits, stats = forward_with_bn_stats(teacher, gen(z, labels))
    out = {"ce": F.cross_entropy(logits, labels), "bns": cfg.bns_weight * bns_loss(stats)}
    if cfg.fdda and step % cfg.fdda_every == 0:
        if centres is None:
            raise ValueError("FDDA needs BN centres (bn_centres); pass fdda=False for the GDFQ generator")
        good = torch.nonzero(centres.correct).flatten()
        if good.numel() == 0:
            raise ValueError("the network misclassifies every class's real image; FDDA has no usable centre")
        label = int(good[int(torch.randint(good.numel(), (1,), generator=rng))])
        device = gen.fc.weight.device
        images_c, labels_c = gen.sample(
            cfg.batch_size, rng, torch.full((cfg.batch_size,), label, device=device)
        )
        logits_c, stats_c = forward_with_bn_stats(teacher, images_c)
        start = deep_start(len(stats_c))
        out["ce"] = 0.5 * out["ce"]
        out["ce_class"] = 0.5 * F.cross_entropy(logits_c, labels_c)
        out["c_bns"] = cfg.centre_weight * bns_centre_loss(stats_c, centres, label, start)
        out["d_bns"] = cfg.distorted_weight * bns_distorted_loss(
            stats_c, centres, label, start, cfg.mean_std, cfg.var_std, rng
        )
    out["total"] = sum(out.values())
    return out


class LatentBatches:
    """The generator's inputs as training batches: ``(z, labels)``, ``steps`` per epoch, labels
    uniform over the classes. Every batch is seeded from ``(seed, epoch, index)`` alone, so a
    resumed run sees the batches an uninterrupted one would."""

    def __init__(self, num_classes: int, latent_dim: int, batch_size: int, steps: int, seed: int = 0):
        if min(num_classes, latent_dim, batch_size, steps) < 1:
            raise ValueError("LatentBatches needs num_classes, latent_dim, batch_size and steps >= 1")
        self.num_classes, self.latent_dim, self.batch_size = num_classes, latent_dim, batch_size
        self.steps, self.seed = steps, seed

    def __len__(self) -> int:
        return self.steps

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(start, self.steps):
            g = torch.Generator().manual_seed(derive_seed("fdda-latent", self.seed, epoch, i))
            labels = torch.randint(self.num_classes, (self.batch_size,), generator=g)
            yield torch.randn(self.batch_size, self.latent_dim, generator=g), labels


def fingerprint(*tensors: Iterable[torch.Tensor]) -> str:
    """A SHA-256 over tensors (values, shapes, dtypes): what a resume checks it continues against."""
    h = hashlib.sha256()
    for group in tensors:
        for t in group:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_run(run_dir: Path, saved: dict[str, Any], now: dict[str, Any], what: str) -> None:
    """Refuse to resume a run whose recorded identity (settings, fingerprints) differs from ``now``."""
    if any(saved.get(k) != v for k, v in now.items()):
        raise CheckpointError(
            f"{run_dir} was trained with other {what}; resume with the same ones or start a new run directory"
        )


class GeneratorTrainer(Trainer):
    """FDDA's (or, with ``fdda=False``, GDFQ's) generator training on dynaslice's engine.

    The conditional generator is the trained module; a frozen copy of the full-precision
    ``teacher`` (eval mode, no gradients; the caller's module is not touched) computes the losses
    of :func:`generator_step`. Adam and the step-decay schedule come from ``fdda``; the engine
    settings (seed, device, threads, checkpoints, logging) from ``cfg.train``. A resume must
    continue with the same ``fdda`` settings, teacher and centres (checked). The result is
    ``self.generator`` (use it through :class:`dynaslice.quant.GeneratorImages`).
    """

    name = "generator"
    rng_name = "generator-step"

    def __init__(
        self,
        teacher: nn.Module,
        num_classes: int,
        image_size: int,
        channels: int,
        cfg: Config,
        run_dir: str | Path,
        fdda: FDDAConfig = FDDAConfig(),
        centres: BNCentres | None = None,
    ):
        super().__init__(cfg, run_dir)
        if fdda.fdda and centres is None:
            raise ValueError("FDDA needs BN centres (bn_centres); pass fdda=False for the GDFQ generator")
        _bn_layers(teacher)
        self.fdda = fdda
        self.teacher = copy.deepcopy(teacher).to(self.device).eval().requires_grad_(False)
        self.centres = centres.to(self.device) if centres is not None else None
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(derive_seed("fdda-generator", self.seed))
            gen = ConditionalGenerator(num_classes, image_size, channels, fdda.latent_dim)
        self.generator = gen.to(self.device).train()
        batches = LatentBatches(num_classes, fdda.latent_dim, fdda.batch_size, fdda.steps_per_epoch, self.seed)
        opt = torch.optim.Adam(self.generator.parameters(), lr=fdda.lr, betas=fdda.betas)
        milestones = [math.ceil(fdda.steps * f) for f in (0.25, 0.5, 0.75)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
        self.setup_loop(batches, fdda.epochs, opt, sched)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        losses = generator_step(self.generator, self.teacher, self.fdda, self.step, self.centres, x, y)
        losses.pop("total").backward()
        return [v.detach() for v in losses.values()], {"names": list(losses)}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def _identity(self) -> dict[str, Any]:
        parts = [self.teacher.state_dict().values()]
        if self.centres is not None:
            parts += [self.centres.means, self.centres.vars, [self.centres.correct]]
        return {"fdda": dataclasses.asdict(self.fdda), "teacher_and_centres": fingerprint(*parts)}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "fdda": dataclasses.asdict(self.fdda)}

    def extra_state(self) -> dict[str, Any]:
        return self._identity()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        check_same_run(self.run_dir, state, self._identity(), "FDDA settings, teacher or BN centres")

    def finish(self) -> dict[str, Any]:
        return {"generator_steps": self.total_steps, "method": "fdda" if self.fdda.fdda else "gdfq"}


def train_generator(
    teacher: nn.Module,
    num_classes: int,
    image_size: int,
    channels: int,
    run_dir: str | Path,
    fdda: FDDAConfig = FDDAConfig(),
    centres: BNCentres | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ConditionalGenerator:
    """Train (or finish, resuming ``run_dir``) a generator with :class:`GeneratorTrainer` on the
    teacher's device, default engine settings (a checkpoint every 100 steps), ``seed`` and
    ``threads``; returns the generator."""
    device = next(teacher.parameters()).device.type
    cfg = Config(train=TrainConfig(seed=seed, threads=threads, device=device, ckpt_every_steps=100))
    trainer = GeneratorTrainer(teacher, num_classes, image_size, channels, cfg, run_dir, fdda, centres)
    trainer.resume()
    trainer.fit()
    return trainer.generator
