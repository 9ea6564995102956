"""FFSD and DML: online distillation among networks of one architecture, on the one engine.

FFSD (Li et al., "Distilling a Powerful Student Model via Online Knowledge Distillation", TNNLS;
the official code ``SJLeo/FFSD``, ``CIFARTrainer.py``), as that code computes it:

- ``m`` common students (``train.ffsd.students``, default 2) learn the labels and each other
  (DML: ``CE + T^2 * mean_{j != i} KL(p_i || p_j)``, the peers detached). Student ``i >= 1`` also
  gets a *diversity* term: its last-stage attention map against student ``i-1``'s "shifted" one
  (:func:`diversity_loss`), and a *self-distillation* term: its shallower stages' attention maps
  against what student ``i-1``'s decoder rebuilds from the shifted last-stage features
  (:func:`diversity_target`), both weighted by ``lambda_diversity`` (1e-5).
- The fusion module (:class:`FusionModule`) reads the students' detached last-stage features,
  concatenated, and learns ``CE + T^2 * KL(fusion || mean student logits)``.
- The student leader (same architecture) learns ``CE + T^2 * KL(leader || fusion)`` plus three
  terms weighted by ``lambda_fusion`` (10): its last-stage attention against the fused feature's,
  its :class:`TransFusion` output's attention against the concatenated students' features', and
  its shallower stages against what its decoder rebuilds from the fused feature.
- The decoders (:class:`Decoder`, one per student ``i >= 1`` and one for the leader) learn,
  with their own Adam optimiser, to rebuild each network's shallower stage features from its
  last stage (``lambda_decoder`` (1000) times feature + attention losses). They only serve as
  targets: the students and the leader never send them gradients.
- Every lambda is scaled by the warm-up factor ``exp(-5 (1 - e / 5)^2)`` in epoch ``e <= 5``
  (1-based, as the official loop counts).

At test time only the leader remains: :func:`train_online` saves it as a plain model
(``RUN/model.pt``, an extracted subnet, and ``RUN/model.onnx``), like ``dynaslice prune`` saves
its compact network. DML (Zhang et al. 2018) is the same code without the fusion module, the
leader, the diversity terms and the decoders; its kept network is student 0. With one student
and no teacher it is plain cross-entropy training of the network alone (the baseline on the
very same code); with a frozen ``teacher`` it is offline KD (Hinton et al.).

Each network is the config's model run as its largest subnet (the network the plain model file
holds), its stages (``forward_stem``/``forward_stage``) giving the features; a model whose stages
do not give ``[B, C, H, W]`` maps, or that has fewer than two stages, is refused before any step.
One optimiser step of the engine moves the students, the fusion module and the leader (their
losses share no gradient, so one step on the sum equals the official separate steps); the
fusion module's parameters sit in their own groups with ``fusion_weight_decay``.

Differences from the official code, kept on purpose: the schedule is the engine's (linear
warm-up, cosine; the official code steps 0.1x at epochs 150 and 225 of 300), weight decay is
the engine's (conv and linear weights only), the decoders' Adam follows the main schedule's
factor each step, and the fusion classifier's class count and every pooling and decoder size
come from the data (the official code hard-codes 100 classes and sizes from a 32x32 dummy).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import runs
from ..config_base import ConfigError
from ..counting import count_module_macs, count_module_params
from ..modelfile import model_spec
from ..models import create_supernet
from ..models.base import Supernet
from ..seeding import derive_seed
from ..torch_export import extract_subnet, save_torch_model
from .checkpoint import refuse_existing_run
from .config import Config
from .data import eval_loader, load_split, train_loader
from .distributed import DistEnv
from .engine import Trainer, total_steps
from .optim import build_optimizer, build_scheduler, param_groups
from .targets import Target, register_target

# --------------------------------------------------------------------------- loss building blocks


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """``A(f)``: the mean over channels of ``f^2``, ``[B, 1, H, W]``."""
    return f.pow(2).mean(1, keepdim=True)


def attention_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE between the per-sample L2-normalised (flattened) ``x`` and ``y``."""
    return (F.normalize(x.flatten(1)) - F.normalize(y.flatten(1))).pow(2).mean()


def _shifted(a: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The official "diversity" target of normalised maps ``a`` ``[B, N]``: every position above
    the ``N // 3``-th smallest value becomes ``norm - a``, the others stay (one at the threshold
    itself becomes ``norm / 2``). ``norm``: the un-normalised map's L2 norm ``[B, 1]``, as in the
    code (it mixes the two scales)."""
    threshold = a.topk(a.shape[1] // 3, largest=False).values[:, -1:]
    return (norm / 2 - a) * torch.sign(a - threshold) + norm / 2


def diversity_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Attention map ``x`` against the shifted attention map ``y`` of the previous student:
    minimising it pushes ``x`` away from ``y`` where ``y`` is high (student diversity)."""
    norm = y.flatten(1).norm(dim=1, keepdim=True)
    return (F.normalize(x.flatten(1)) - _shifted(F.normalize(y.flatten(1)), norm)).pow(2).mean()


def diversity_target(y: torch.Tensor) -> torch.Tensor:
    """Features ``y`` ``[B, C, H, W]`` moved so that their attention map becomes the shifted one
    (the same change added to every channel): the decoder's input for the next student."""
    a = attention_map(y)
    norm = a.flatten(1).norm(dim=1, keepdim=True)
    flat = F.normalize(a.flatten(1))
    diff = _shifted(flat, norm) - flat
    return y + (diff * norm / y.shape[1]).view_as(a)


def distill_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(target / T) || softmax(logits / T))``, summed over classes and averaged
    over the batch; the target is detached (it teaches, it does not learn here)."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    p = F.softmax(target_logits.detach().float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, p, reduction="batchmean")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """The official lambdas' factor in 1-based ``epoch``: ``exp(-5 (1 - epoch / W)^2)`` while
    ``epoch <= W``, then 1 (``W = 0``: always 1)."""
    if warmup_epochs <= 0 or epoch > warmup_epochs:
        return 1.0
    return math.exp(-5 * (1 - epoch / warmup_epochs) ** 2)


# --------------------------------------------------------------------------- modules


def _conv_bn_relu(cin: int, cout: int, kernel: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]  # fmt: skip


class FusionModule(nn.Module):
    """The common students' concatenated last-stage features (``channels * students``) ->
    depthwise 3x3 + BN + ReLU -> 1x1 to ``channels`` + BN + ReLU (the *fused feature*) -> average
    pool over the whole ``spatial`` map -> its own classifier. ``forward`` returns both."""

    def __init__(self, channels: int, students: int, num_classes: int, spatial: tuple[int, int]):
        super().__init__()
        wide = channels * students
        self.fuse = nn.Sequential(*_conv_bn_relu(wide, wide, 3, groups=wide), *_conv_bn_relu(wide, channels, 1))
        self.pool = nn.AvgPool2d(spatial)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.fuse.modules():  # the official normal(0, sqrt(2 / (k * k * out)))
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fuse(x)
        return self.fc(self.pool(fused).flatten(1)), fused


class TransFusion(nn.Module):
    """The leader's side branch (dropped at test time): its last-stage features -> depthwise 3x3
    + BN + ReLU -> 1x1 to ``channels * students`` + BN + ReLU, compared with the students'
    concatenated features."""

    def __init__(self, channels: int, students: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(channels, channels, 3, groups=channels),
                                  *_conv_bn_relu(channels, channels * students, 1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _reachable(deep: int, shallow: int, stride: int) -> bool:
    """A 3x3 transposed conv (padding 1) of ``stride`` turns ``deep`` pixels into ``shallow``
    ones with some output padding below the stride."""
    return (deep - 1) * stride + 1 <= shallow <= deep * stride


class Decoder(nn.Module):
    """Rebuilds a network's shallower stage features from its last stage: one transposed conv
    (3x3, stride from the sizes, usually 2) + BN + ReLU per stage, deepest first.

    ``shapes``: the ``(C, H, W)`` of every stage's output, shallowest first (measured on the
    data's images). ``forward`` returns the rebuilt maps shallowest first, one per stage but the
    last, each the shape of that stage's output.
    """

    def __init__(self, shapes: list[tuple[int, ...]]):
        super().__init__()
        self.sizes = [tuple(s[1:]) for s in shapes[:-1]]
        layers = []
        for (cd, hd, wd), (cs, hs, ws) in zip(shapes[:0:-1], shapes[-2::-1], strict=True):
            stride = max(-(-hs // hd), 1)
            if -(-ws // wd) != stride or not (_reachable(hd, hs, stride) and _reachable(wd, ws, stride)):
                raise ValueError(f"no 3x3 transposed conv maps a {hd}x{wd} stage output to the {hs}x{ws} one before it")
            layers.append(nn.ModuleDict({
                "up": nn.ConvTranspose2d(cd, cs, 3, stride=stride, padding=1, bias=False),
                "bn": nn.BatchNorm2d(cs),
            }))  # fmt: skip
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer, size in zip(self.layers, self.sizes[::-1], strict=True):
            x = F.relu(layer["bn"](layer["up"](x, output_size=size)))
            out.append(x)
        return out[::-1]


def _decoder_loss(decoder: Decoder, feats: list[torch.Tensor], weight: float) -> torch.Tensor:
    """The decoder's own training loss (train mode): rebuild ``feats[:-1]`` from ``feats[-1]``,
    features and attention maps, times ``weight`` (``lambda_decoder`` with its warm-up)."""
    decoder.train()
    rebuilt = decoder(feats[-1].detach())
    loss = sum(attention_loss(r, f.detach()) + attention_loss(attention_map(r), attention_map(f.detach()))
               for r, f in zip(rebuilt, feats, strict=False))  # fmt: skip
    return weight * loss


def _decoded_loss(decoder: Decoder, feats: list[torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """A network's self-distillation term: its shallower stages' attention maps against those
    of the decoder's (eval mode, no gradient) rebuilding from ``source``."""
    decoder.eval()
    with torch.no_grad():
        rebuilt = decoder(source.detach())
    return sum(attention_loss(attention_map(f), attention_map(r)) for f, r in zip(feats, rebuilt, strict=False))


# --------------------------------------------------------------------------- config rules


def _check(cfg: Config) -> None:
    """Rules of ``train.target: ffsd / dml`` that need neither the data nor the model."""
    t, f = cfg.train, cfg.train.ffsd
    if f.students < 1:
        raise ConfigError(f"train.ffsd.students={f.students}: {t.target} needs at least one common student (m >= 1)")
    if f.warmup_epochs < 0 or f.decoder_lr <= 0 or min(f.lambda_fusion, f.lambda_diversity, f.lambda_decoder,
                                                           f.fusion_weight_decay) < 0:  # fmt: skip
        raise ConfigError("train.ffsd needs warmup_epochs >= 0, decoder_lr > 0 and lambdas and fusion_weight_decay >= 0")
    if cfg.model.gate.enabled:
        raise ConfigError(f"train.target={t.target} trains plain networks: set model.gate.enabled=false")
    for key, value in (("static_widths", t.static_widths), ("init_from", t.init_from),
                       ("phase1_epochs", t.phase1_epochs), ("mvco", t.mvco)):  # fmt: skip
        if value:
            raise ConfigError(f"train.{key} goes with the supernet targets, not train.target={t.target}; leave it unset")
    if cfg.data.name == "folder":
        raise ConfigError(f"train.target={t.target} trains on in-memory datasets (fashion_mnist, cifar10/100, synthetic)")


# --------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class StepLosses:
    """One step's loss terms, each a scalar tensor (the students' are lists, one per student)."""

    students: list[torch.Tensor]
    fusion: torch.Tensor | None = None
    leader: torch.Tensor | None = None
    decoders: torch.Tensor | None = None


class OnlineDistillTrainer(Trainer):
    """FFSD (``train.target: ffsd``) or DML (``dml``) on the engine: every network of the method,
    one optimizer step per batch.

    ``teacher``: a trained plain network, frozen, whose logits every student also matches
    (``T^2 * KL``; offline KD when there is one student and no fusion). Checkpoints hold the kept
    network as ``model`` (the leader, or student 0) and the others under their own prefixes;
    the decoders' Adam state is extra state, so a resume continues bit for bit.
    """

    name = "ffsd"

    def __init__(self, cfg: Config, run_dir: str | Path, env: DistEnv | None = None,
                 teacher: nn.Module | None = None):  # fmt: skip
        super().__init__(cfg, run_dir, env)
        t, f = cfg.train, cfg.train.ffsd
        self.fusion_on = t.target == "ffsd"
        self.name = t.target
        if self.env.distributed:
            raise ConfigError(f"train.target={t.target} trains in one process; run it without torchrun")
        train_ds = load_split(cfg.data, "train", t.seed)
        self.val_ds = load_split(cfg.data, "val", t.seed) if cfg.data.val_size > 0 else None
        self.input_size = tuple(train_ds.images.shape[1:])
        self.num_classes = train_ds.num_classes
        batches = train_loader(cfg.data, train_ds, t.seed, self.env.rank, self.env.world_size)
        self.students = nn.ModuleList([self._network(i) for i in range(f.students)]).to(self.device)
        self.teacher = teacher.to(self.device).requires_grad_(False).eval() if teacher is not None else None
        self.lambdas = 1.0
        nets: list[nn.Module] = [self.students]
        shapes = self._stage_shapes(self.students[0])
        if self.fusion_on:
            channels, spatial = shapes[-1][0], shapes[-1][1:]
            self.leader = self._network(f.students).to(self.device)
            self.trans_fusion = TransFusion(channels, f.students).to(self.device)
            self.fusion = FusionModule(channels, f.students, self.num_classes, spatial).to(self.device)
            try:
                self.decoders = nn.ModuleList([Decoder(shapes) for _ in range(f.students)]).to(self.device)
            except ValueError as e:
                raise ConfigError(f"train.target=ffsd cannot use {cfg.model.name}'s stages: {e}") from None
            nets += [self.leader, self.trans_fusion]
            self.kept: nn.Module = self.leader
            self.peers = self.students
        else:
            self.kept, self.peers = self.students[0], nn.ModuleList(self.students[1:])
        optimizer = build_optimizer(nn.ModuleList(nets), cfg.optim)
        if self.fusion_on:
            for group in param_groups(self.fusion, f.fusion_weight_decay):
                optimizer.add_param_group(group)  # its own (lower) weight decay; lr, momentum: the optimizer's
            # decoders: the last entry rebuilds the leader's stages, the others student i's (i >= 1)
            self.decoder_optimizer = torch.optim.Adam(self.decoders.parameters(), lr=f.decoder_lr,
                                                      weight_decay=cfg.optim.weight_decay)  # fmt: skip
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps(t.epochs, len(batches)), len(batches))
        self.setup_loop(batches, t.epochs, optimizer, scheduler, cfg.optim.clip_grad_norm, cfg.optim.clip_grad_value)
        self.setup_amp(t.amp)

    # ------------------------------------------------------------------ set-up

    def _network(self, index: int) -> Supernet:
        """Network ``index`` (students first, the leader last), initialised from ``(seed, index)``."""
        cfg = self.cfg
        from_data = {"in_chans": self.input_size[0], "num_classes": self.num_classes}
        clash = {k: v for k, v in cfg.model.kwargs.items() if k in from_data and v != from_data[k]}
        if clash:
            raise ConfigError(f"model.kwargs {clash} contradict the data; leave them out: they are filled in from the data")
        self.kwargs = {**from_data, "input_size": self.input_size[-1], **cfg.model.kwargs}
        torch.manual_seed(derive_seed("init", cfg.train.seed, "online", index))
        try:
            return create_supernet(cfg.model.name, **self.kwargs)
        except TypeError as e:
            raise ConfigError(f"model.kwargs does not fit {cfg.model.name}: {e}") from None

    def _stage_shapes(self, net: Supernet) -> list[tuple[int, ...]]:
        """Every stage output's shape (without the batch) on one of the data's images, in eval
        mode (no statistics change), so that a model too small for the images fails now, not
        mid-training. FFSD also refuses a model whose stages it cannot use (not ``[B, C, H, W]``
        maps, fewer than two stages, a last stage too small for the diversity ranking)."""
        net.eval()
        try:
            with torch.no_grad():
                feats, _ = run_stages(net, torch.zeros(1, *self.input_size, device=self.device))
        except (RuntimeError, ValueError) as e:
            size = "x".join(map(str, self.input_size))
            raise ConfigError(f"{self.cfg.model.name} cannot run on {size} images ({str(e).splitlines()[0]}); "
                              "use a larger data.image_size or another model.name") from None  # fmt: skip
        finally:
            net.train()
        shapes = [tuple(f.shape[1:]) for f in feats]
        if not self.fusion_on:
            return shapes
        if len(shapes) < 2 or any(len(s) != 3 for s in shapes):
            raise ConfigError(
                f"train.target=ffsd needs a model whose stages give [B, C, H, W] feature maps, at least two of "
                f"them; {self.cfg.model.name} gives {len(shapes)} stage(s), the last of shape {shapes[-1]}: use a CNN (resnet_small, "
                "mobilenet) or train.target=dml"
            )
        h, w = shapes[-1][1:]
        if len(self.students) > 1 and h * w < 3:  # the official threshold is the (HW // 3)-th smallest
            raise ConfigError(
                f"train.target=ffsd: {self.cfg.model.name}'s last stage gives {h}x{w} maps on these images, and the "
                "diversity term ranks at least 3 positions; use larger images (data.image_size) or one student"
            )
        return shapes

    # ------------------------------------------------------------------ one step

    def on_epoch_start(self, epoch: int) -> None:
        self.lambdas = warmup_factor(epoch + 1, self.cfg.train.ffsd.warmup_epochs)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> StepLosses:
        """Every loss term of one batch (networks in train mode; see the module docstring)."""
        t, f = self.cfg.train, self.cfg.train.ffsd
        T, ls = t.temperature, t.label_smoothing
        ce = lambda logits: F.cross_entropy(logits.float(), y, label_smoothing=ls)  # noqa: E731
        runs_ = [run_stages(s, x) for s in self.students]
        logits = [out for _, out in runs_]
        feats = [fs for fs, _ in runs_]
        m = len(self.students)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(x)
        students = []
        for i in range(m):
            loss = ce(logits[i])
            if m > 1:
                loss = loss + sum(distill_kl(logits[i], logits[j], T) for j in range(m) if j != i) / (m - 1)
            if teacher is not None:
                loss = loss + distill_kl(logits[i], teacher, T)
            if self.fusion_on and i > 0:
                lam = self.lambdas * f.lambda_diversity
                prev = feats[i - 1][-1].detach()
                loss = loss + lam * diversity_loss(attention_map(feats[i][-1]), attention_map(prev))
                loss = loss + lam * _decoded_loss(self.decoders[i - 1], feats[i], diversity_target(prev))
            students.append(loss)
        if not self.fusion_on:
            return StepLosses(students)
        inputs = torch.cat([fs[-1].detach() for fs in feats], dim=1)
        fusion_logits, fused = self.fusion(inputs)
        fusion = ce(fusion_logits) + distill_kl(fusion_logits, torch.stack(logits).mean(0), T)
        leader_feats, leader_logits = run_stages(self.leader, x)
        lam = self.lambdas * f.lambda_fusion
        leader = ce(leader_logits) + distill_kl(leader_logits, fusion_logits, T) + lam * (
            attention_loss(attention_map(leader_feats[-1]), attention_map(fused.detach()))
            + attention_loss(attention_map(self.trans_fusion(leader_feats[-1])), attention_map(inputs))
            + _decoded_loss(self.decoders[-1], leader_feats, fused)
        )
        # the decoders learn last, from this step's features (the official order: after the networks)
        lam_dec = self.lambdas * f.lambda_decoder
        decoders = sum(_decoder_loss(self.decoders[i - 1], feats[i], lam_dec) for i in range(1, m))
        decoders = decoders + _decoder_loss(self.decoders[-1], leader_feats, lam_dec)
        return StepLosses(students, fusion, leader, decoders)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        for module in (self.students, *([self.leader, self.trans_fusion, self.fusion] if self.fusion_on else [])):
            module.train()
        with self.autocast():
            parts = self.losses(x, y)
        named = [(f"student {i}", loss) for i, loss in enumerate(parts.students)]
        if self.fusion_on:
            named += [("the fusion module", parts.fusion), ("the leader", parts.leader)]
        # the networks' losses share no gradient: one backward of the sum is each one's own
        self.scaler.scale(sum(loss for _, loss in named)).backward()
        if parts.decoders is not None:
            parts.decoders.backward()  # only the decoders' parameters: their own optimizer's
            named.append(("the decoders", parts.decoders))
        return [loss.detach() for _, loss in named], {"names": [n for n, _ in named]}

    def after_step(self, losses: list[float], info: dict[str, Any]) -> None:
        if not self.fusion_on:
            return
        # the decoders follow the main schedule's factor (the official code steps every optimizer's lr alike)
        group = self.optimizer.param_groups[0]
        factor = group["lr"] / group.get("initial_lr", self.cfg.optim.lr)
        for g in self.decoder_optimizer.param_groups:
            g["lr"] = self.cfg.train.ffsd.decoder_lr * factor
        self.decoder_optimizer.step()
        self.decoder_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"model": self.kept, "peers": self.peers}
        if self.fusion_on:
            modules.update(trans_fusion=self.trans_fusion, fusion=self.fusion, decoders=self.decoders)
        return modules

    def extra_state(self) -> dict[str, Any]:
        return {"decoder_optimizer": self.decoder_optimizer.state_dict()} if self.fusion_on else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.fusion_on:
            self.decoder_optimizer.load_state_dict(state["decoder_optimizer"])

    def meta(self) -> dict[str, Any]:
        return {"model": model_spec(self.kept, self.kwargs, self.cfg.model.name), **super().meta()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate_validation(self) -> dict[str, Any] | None:
        """Top-1 (%) on the validation split of the kept network (``accuracy``), every student
        and the fusion module, in eval mode."""
        if self.val_ds is None:
            return None
        nets = list(self.students) + ([self.leader] if self.fusion_on else [])
        for module in (*nets, *([self.fusion] if self.fusion_on else [])):
            module.eval()
        correct = torch.zeros(len(nets) + self.fusion_on, dtype=torch.long)
        total = 0
        for x, y in eval_loader(self.val_ds):
            x = x.to(self.device)
            runs_ = [run_stages(n, x) for n in nets]
            outs = [out for _, out in runs_]
            if self.fusion_on:
                outs.append(self.fusion(torch.cat([fs[-1] for fs, _ in runs_[:-1]], dim=1))[0])
            correct += torch.tensor([int((o.argmax(-1).cpu() == y).sum()) for o in outs])
            total += len(y)
        acc = (100.0 * correct / total).tolist()
        m = len(self.students)
        result: dict[str, Any] = {"students": acc[:m], "images": total}
        if self.fusion_on:
            result.update(leader=acc[m], fusion=acc[m + 1])
        result["accuracy"] = result.get("leader", acc[0])
        return result

    def format_validation(self, result: Any) -> str:
        kept = "leader" if self.fusion_on else "student 0"
        extra = f", fusion {result['fusion']:.2f}%" if self.fusion_on else ""
        students = ", ".join(f"{a:.2f}" for a in result["students"])
        return f": {kept} top-1 {result['accuracy']:.2f}% (students {students}{extra}) on {result['images']} images"

    def plain_model(self) -> nn.Module:
        """The kept network (the leader; DML: student 0) as a plain model in eval mode."""
        return extract_subnet(self.kept, self.kept.space.largest(), self.input_size).eval()

    def finish(self) -> dict[str, Any]:
        """Validate, then write the kept network alone: ``model.pt`` (plain torch) and ``model.onnx``."""
        from ..onnx_export import export_module

        result = self.evaluate_validation() or {}
        self.report(result, self.total_steps / self.steps_per_epoch, final=True)
        plain = self.plain_model()
        save_torch_model(plain, self.run_dir / runs.PRUNED_MODEL)
        export_module(copy.deepcopy(plain), self.run_dir / runs.PRUNED_ONNX, self.input_size,
                      metadata={"dynaslice.method": self.cfg.train.target})  # fmt: skip
        return {"method": self.cfg.train.target, **result, "split": "val",
                "macs": count_module_macs(plain, self.input_size), "params": count_module_params(plain)}  # fmt: skip


def run_stages(net: Supernet, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``net`` as its largest subnet: every stage's output, and the logits."""
    arch = net.space.largest()
    h = net.forward_stem(x, arch)
    feats = []
    for i in range(net.n_stages):
        h = net.forward_stage(i, h, arch)
        feats.append(h)
    return feats, net.forward_head(h, arch)


def train_online(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    env: DistEnv | None = None,
    allow_changes: tuple[str, ...] | list[str] = (),
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` (``train.target`` ffsd or dml) into ``run_dir``; returns ``final_eval.json``'s
    record. ``resume``, ``allow_changes``: as :func:`dynaslice.train.train`. ``teacher``: see
    :class:`OnlineDistillTrainer`."""
    refuse_existing_run(run_dir, resume)
    trainer = OnlineDistillTrainer(cfg, run_dir, env, teacher)
    if resume and trainer.resume(allow_changes) and trainer.env.is_main:
        print(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}", flush=True)
    result = trainer.fit()
    if trainer.env.is_main:
        print(f"{cfg.train.target}: kept network {Path(run_dir) / runs.PRUNED_MODEL}, {Path(run_dir) / runs.PRUNED_ONNX}; "
              f"results {Path(run_dir) / runs.FINAL_EVAL}", flush=True)  # fmt: skip
    return result


# --------------------------------------------------------------------------- the targets


class _WholeRun(Target):
    """A target whose ``run`` trains networks of its own: it gives no per-subnet targets, so a
    supernet trainer built with it (instead of :func:`dynaslice.train.train`) would silently
    train on the labels alone; it is refused."""

    run = staticmethod(train_online)

    def __init__(self, *args: Any, **kwargs: Any):
        raise ValueError(
            f"train.target={self.name} trains networks of its own: use dynaslice.train.train or train_online, "
            "not a supernet trainer"
        )


@register_target("ffsd", check=_check)
class FFSDTarget(_WholeRun):
    """``train.target: ffsd``: the whole run is :func:`train_online` (FFSD's networks, not the supernet)."""


@register_target("dml", check=_check)
class DMLTarget(_WholeRun):
    """``train.target: dml``: the whole run is :func:`train_online` (DML's students, not the supernet)."""
