"""PSS-Net: prioritized subnet sampling for a resource-adaptive supernet (SPEC §6).

Uniform sandwich sampling spends most steps on subnets nobody will deploy. PSS-Net instead keeps,
for every *budget bucket* (the resource metric -- MMACs, or milliseconds from a
:class:`dynaslice.latency.LatencyTable` -- rounded to ``bucket_step``), a **pool** of at most
``pool_size`` promising subnets with scores, and trains those preferentially:

- each step runs the largest subnet (on the labels), then ``n_pool`` subnets each from a
  uniformly chosen bucket, then the smallest subnet (both by in-place distillation from the
  largest: ``train.target=inplace``);
- the pool subnet is *new* with probability ``p_e`` (always while the pool is not full), drawn by
  the constraint-conditioned sampler, else one of the pool with probability
  ``softmax(score / t_e)``; ``p_e`` and ``t_e`` decay exponentially (1.0 -> 0.01 by default)
  from exploring to exploiting;
- after the step its score becomes ``-loss`` (rank-averaged; an EMA ``0.9 old + 0.1 new`` for a
  subnet already in the pool); over capacity the lowest score is evicted.

The constraint-conditioned sampler: from ``estimate_samples`` uniformly random subnets (one
vectorised pass of the resource function) we count, per bucket, how often each value of each
dimension occurs; a new subnet for bucket ``b`` draws every dimension independently from bucket
``b``'s marginals and is rejected until it lands in ``b`` (batches of candidates at once). After
``max_tries`` rejections it falls back to one of the estimation subnets seen in ``b`` (so a
known bucket never fails); a bucket no random subnet reached is an error.

Everything random comes from ``(seed, step)``: all ranks draw the same subnets, and a resumed
run (the pools are in the checkpoint through :meth:`PSSSampler.state_dict`) continues exactly.

At the end of training, :class:`BudgetTableWriter` (a fit-end callback the ``pss`` sampler
builder installs) picks the best subnet of each pool on the
*validation* split (never the test split) and writes ``RUN/budget_table.json`` plus
``RUN/budget.safetensors`` (the weights, and for every entry BatchNorm statistics recalibrated
for it alone); see :mod:`dynaslice.budget` for using it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import runs
from ..budget import BudgetEntry, BudgetTable, save_budget_file
from ..config_base import ConfigError
from ..counting import count_macs, resource_model
from ..latency import LatencyTable
from ..models.base import Supernet
from ..seeding import derive_seed
from ..space import Arch, SearchSpace
from .bn import bn_statistics, recalibrate_bn
from .config import Config
from .engine import Callback
from .evaluate import subnet_accuracy
from .samplers import need_subnets, register_sampler

if TYPE_CHECKING:  # pragma: no cover
    from .supernet import SupernetTrainer

MIN_BUCKETS = 3
"""Fewer budget buckets than this is refused: a bucket_step too coarse for the metric's range
(e.g. one in MMACs kept after switching to milliseconds) would silently give a table of two budgets."""

ResourceFn = Callable[[Sequence[Arch]], Sequence[float]]
"""Vectorised metric of many archs (e.g. MMACs), in the units of ``bucket_step``."""


def exp_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` at the last step (``total_steps - 1``), exponential between."""
    if total_steps <= 1:
        return start
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start * (end / start) ** frac


class PSSSampler:
    """The PSS-Net :class:`~dynaslice.train.samplers.ArchSampler` (see the module docstring).

    ``resource_fn`` maps a list of archs to their metric (one vectorised call), in the units of
    ``bucket_step``. ``p_e``/``t_e``: ``(start, end)`` of the exponential schedules.
    """

    def __init__(
        self,
        space: SearchSpace,
        resource_fn: ResourceFn,
        bucket_step: float,
        total_steps: int,
        pool_size: int = 50,
        n_pool: int = 1,
        p_e: Sequence[float] = (1.0, 0.01),
        t_e: Sequence[float] = (1.0, 0.01),
        seed: int = 0,
        estimate_samples: int = 20000,
        max_tries: int = 2048,
    ):
        if bucket_step <= 0:
            raise ValueError(f"bucket_step must be > 0, got {bucket_step}")
        if pool_size < 1 or n_pool < 1 or total_steps < 1:
            raise ValueError("pool_size, n_pool and total_steps must be >= 1")
        for name, sched in (("p_e", p_e), ("t_e", t_e)):
            if len(sched) != 2 or min(sched) <= 0:
                raise ValueError(f"{name} must be (start, end) with positive values, got {list(sched)}")
        self.space, self.resource_fn = space, resource_fn
        self.bucket_step, self.total_steps = float(bucket_step), int(total_steps)
        self.pool_size, self.n_pool, self.seed = int(pool_size), int(n_pool), int(seed)
        self.p_e_range, self.t_e_range = tuple(map(float, p_e)), tuple(map(float, t_e))
        self.max_tries = int(max_tries)
        self._sizes = np.array(space.group_sizes())  # tied dimensions move together: sample group indices
        self._largest, self._smallest = space.largest(), space.smallest()
        self._metric_cache: dict[Arch, float] = {}  # a pure cache of resource_fn
        # pools[bucket] = [[arch, score], ...] in insertion order (deterministic eviction ties)
        self.pools: dict[int, list[list[Any]]] = {}
        self._estimate(estimate_samples)

    # ------------------------------------------------------------------ buckets and drawing

    def _archs(self, idx: np.ndarray) -> list[Arch]:
        return [self.space.from_indices(row) for row in idx.tolist()]

    def _metric(self, archs: Sequence[Arch]) -> np.ndarray:
        missing = [a for a in dict.fromkeys(archs) if a not in self._metric_cache]
        if missing:
            for a, m in zip(missing, np.asarray(self.resource_fn(missing), dtype=np.float64), strict=True):
                self._metric_cache[a] = float(m)
            if len(self._metric_cache) > 200_000:
                self._metric_cache.clear()
                return self._metric(archs)
        return np.array([self._metric_cache[a] for a in archs])

    def bucket_of(self, arch: Arch) -> int:
        """The bucket index ``k`` of ``arch``: its metric rounded to ``k * bucket_step``."""
        return int(np.rint(self._metric([arch])[0] / self.bucket_step))

    def _estimate(self, n: int) -> None:
        """Per-bucket marginals of every dimension group, from ``n`` uniformly random subnets."""
        rng = np.random.default_rng(derive_seed("pss-estimate", self.seed))
        idx = rng.integers(0, self._sizes, size=(max(n, 1), len(self._sizes)))
        archs = self._archs(idx)
        # metric of every sample in one call (bypass the cache: these are mostly one-offs)
        metric = np.asarray(self.resource_fn(archs), dtype=np.float64)
        buckets = np.rint(metric / self.bucket_step).astype(np.int64)
        keep = np.array([a != self._largest and a != self._smallest for a in archs])
        self.buckets: list[int] = sorted(int(b) for b in np.unique(buckets[keep]))
        if not self.buckets:
            raise ValueError("the search space has no subnet besides the largest and smallest")
        if len(self.buckets) < MIN_BUCKETS:  # a table of one or two budgets: not what PSS is for
            lo, hi = float(metric.min()), float(metric.max())
            raise ValueError(
                f"bucket_step {self.bucket_step:g} (train.pss.bucket_step) gives {len(self.buckets)} budget "
                f"bucket(s) over this space's {lo:.3g}..{hi:.3g} (MMACs, or ms with a latency table); "
                f"PSS needs at least {MIN_BUCKETS}: use a smaller one, e.g. {(hi - lo) / 5:.2g}"
            )
        self._marginals: dict[int, list[np.ndarray]] = {}
        self._examples: dict[int, np.ndarray] = {}
        for b in self.buckets:
            rows = idx[keep & (buckets == b)]
            self._marginals[b] = [
                np.bincount(rows[:, g], minlength=int(s)) / len(rows) for g, s in enumerate(self._sizes)
            ]
            self._examples[b] = rows[:64]

    def bucket_value(self, bucket: int) -> float:
        """The metric value a bucket stands for (``bucket * bucket_step``)."""
        return round(bucket * self.bucket_step, 9)

    def sample_in_bucket(self, bucket: int, rng: np.random.Generator) -> Arch:
        """A new random subnet (not the largest or smallest) whose metric rounds to ``bucket``."""
        if bucket not in self._marginals:
            known = ", ".join(f"{self.bucket_value(b):g}" for b in self.buckets)
            raise ValueError(
                f"bucket {self.bucket_value(bucket):g} is unreachable: no random subnet of the space "
                f"falls in it; reachable buckets are {known}"
            )
        batch, tries = 64, 0
        marg = self._marginals[bucket]
        while tries < self.max_tries:
            idx = np.stack([rng.choice(len(p), size=batch, p=p) for p in marg], axis=1)
            archs = self._archs(idx)
            hit = np.rint(self._metric(archs) / self.bucket_step) == bucket
            for a, h in zip(archs, hit, strict=True):
                if h and a != self._largest and a != self._smallest:
                    return a
            tries += batch
        # rare buckets whose members the independent marginals seldom produce: a known member
        ex = self._examples[bucket]
        return self._archs(ex[rng.integers(len(ex))][None])[0]

    # ------------------------------------------------------------------ ArchSampler protocol

    def p_e(self, step: int) -> float:
        return exp_schedule(step, self.total_steps, *self.p_e_range)

    def t_e(self, step: int) -> float:
        return exp_schedule(step, self.total_steps, *self.t_e_range)

    def sample(self, step: int) -> list[Arch]:
        """Largest, ``n_pool`` pool-or-new subnets (each in a uniformly chosen bucket), smallest."""
        rng = np.random.default_rng(derive_seed("pss", self.seed, step))
        p_e, t_e = self.p_e(step), self.t_e(step)
        out = [self._largest]
        for _ in range(self.n_pool):
            bucket = self.buckets[int(rng.integers(len(self.buckets)))]
            pool = self.pools.get(bucket, [])
            if len(pool) < self.pool_size or rng.random() < p_e:
                out.append(self.sample_in_bucket(bucket, rng))
            else:
                scores = np.array([s for _, s in pool]) / t_e
                p = np.exp(scores - scores.max())
                out.append(pool[int(rng.choice(len(pool), p=p / p.sum()))][0])
        out.append(self._smallest)
        return out

    def observe(self, arch: Arch, loss: float) -> None:
        """Score = -loss: EMA (0.9 old, 0.1 new) if pooled, else insert; evict the lowest over capacity."""
        if arch == self._largest or arch == self._smallest or not math.isfinite(loss):
            return
        pool = self.pools.setdefault(self.bucket_of(arch), [])
        for entry in pool:
            if entry[0] == arch:
                entry[1] = 0.9 * entry[1] + 0.1 * -float(loss)
                return
        pool.append([arch, -float(loss)])
        if len(pool) > self.pool_size:
            pool.pop(min(range(len(pool)), key=lambda i: pool[i][1]))

    def _key(self) -> dict[str, Any]:
        return {
            "kind": "pss",
            "seed": self.seed,
            "bucket_step": self.bucket_step,
            "pool_size": self.pool_size,
            "n_pool": self.n_pool,
        }

    def state_dict(self) -> dict[str, Any]:
        pools = {str(b): [[a.to_dict(), float(s)] for a, s in pool] for b, pool in self.pools.items()}
        return {**self._key(), "pools": pools}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = {k: state.get(k) for k in self._key()}
        if key != self._key():
            raise ValueError(f"sampler state {key} does not belong to this PSSSampler {self._key()}")
        self.pools = {
            int(b): [[self.space.validate(a), float(s)] for a, s in pool]
            for b, pool in state["pools"].items()
        }

    # ------------------------------------------------------------------ the deployable subnets

    def candidates(self, bucket: int, top_k: int) -> list[Arch]:
        """The ``top_k`` highest-scored subnets of a bucket's pool (plus the largest / smallest
        subnet when its metric falls in this bucket: they are trained every step)."""
        pool = sorted(self.pools.get(bucket, []), key=lambda e: -e[1])
        out = [a for a, _ in pool[:top_k]]
        for a in (self._largest, self._smallest):
            if self.bucket_of(a) == bucket:
                out.append(a)
        return out


# ---------------------------------------------------------------------------- wiring


def macs_fn(net: Supernet) -> ResourceFn:
    """MMACs per image of many archs at once (the analytic :class:`~dynaslice.counting.ResourceModel`)."""
    rm = resource_model(net)
    return lambda archs: rm.macs(archs) / 1e6


def make_pss_sampler(net: Supernet, t: Any, total_steps: int) -> PSSSampler:
    """The sampler a ``train`` config section's ``pss`` settings describe (``t``: the TrainConfig)."""
    p = t.pss
    fn: ResourceFn = LatencyTable.load(p.latency_table).predict_many if p.metric == "latency" else macs_fn(net)
    return PSSSampler(
        net.space, fn, p.bucket_step, total_steps, pool_size=p.pool_size, n_pool=max(1, t.num_subnets - 2),
        p_e=p.p_e, t_e=p.t_e, seed=t.seed, estimate_samples=p.estimate_samples,
    )  # fmt: skip


def check_pss_config(cfg: Config) -> None:
    """PSS-Net's rules between config keys (run by every ``Config.validate`` with ``train.sampler: pss``)."""
    t, d = cfg.train, cfg.data
    need_subnets(cfg, 3, "largest, pool, smallest")
    if t.pss.metric == "latency" and not t.pss.latency_table:
        raise ConfigError(
            "train.pss.metric=latency needs train.pss.latency_table (dynaslice profile MODEL --latency-table PATH)"
        )
    if d.val_size == 0 and d.name != "folder":
        raise ConfigError("train.sampler=pss selects its budget table on the validation split: set data.val_size > 0")


@register_sampler("pss", check=check_pss_config)
def build_pss_sampler(trainer: SupernetTrainer) -> PSSSampler:
    """``train.sampler: pss``: the sampler, and the callback that selects the budget table at the end."""
    sampler = make_pss_sampler(trainer.net, trainer.cfg.train, trainer.total_steps)
    trainer.callbacks.append(BudgetTableWriter(sampler))
    return sampler


def val_accuracy(net: Supernet, arch: Arch, recal_data: Any, val_batches: Any, t: Any) -> float:
    """Top-1 (%) of ``arch`` on the validation batches after recalibrating BN for it alone."""
    recalibrate_bn(net, [arch], recal_data, t.recal_images, t.recal_batch_size, seed=t.seed)
    return subnet_accuracy(net, arch, val_batches)


def select_budget_table(
    net: Supernet,
    candidates: dict[float, list[Arch]],
    recal_data: Any,
    val_batches: Any,
    t: Any,
    latency_table: str | None = None,
) -> tuple[BudgetTable, list[dict[str, torch.Tensor]]]:
    """Per bucket, the candidate with the best validation accuracy, each with BN statistics
    recalibrated for it alone; returns the table and, per entry, those statistics.

    The statistics are kept per entry because BatchNorm rows are per *layer width*: subnets of
    different buckets that share a width in one layer would otherwise share that row, averaged
    over inputs from different upstream widths -- with non-uniform widths that costs the
    subnets tens of points (see :class:`dynaslice.budget.BudgetNet`, which switches them).
    ``net`` itself is left untouched.
    """
    work = copy.deepcopy(net)
    lat = LatencyTable.load(latency_table) if latency_table else None
    entries, stats = [], []
    for bucket, archs in sorted(candidates.items()):
        best = None  # (accuracy, arch, its BN statistics); the first candidate wins a tie
        for a in archs:
            acc = val_accuracy(work, a, recal_data, val_batches, t)
            if best is None or acc > best[0]:
                best = (acc, a, bn_statistics(work))
        if best is None:
            continue
        acc, arch, bn = best
        entries.append(
            BudgetEntry(
                bucket=bucket, arch=arch, macs=int(count_macs(net, arch)), val_accuracy=acc,
                candidates=len(archs), latency_ms=lat.predict(arch) if lat is not None else None,
            )
        )  # fmt: skip
        stats.append(bn)
    return BudgetTable(entries), stats


class BudgetTableWriter(Callback):
    """At the end of a PSS run: the best pool subnet per bucket on the validation split, written
    to ``RUN/budget_table.json`` and ``RUN/budget.safetensors`` (the weights plus each entry's
    BN statistics, see :class:`dynaslice.budget.BudgetNet`; rank 0)."""

    def __init__(self, sampler: PSSSampler):
        self.sampler = sampler

    def on_fit_end(self, trainer: SupernetTrainer, result: Any) -> None:
        if not trainer.env.is_main:
            return
        sampler, t = self.sampler, trainer.cfg.train
        batches = trainer.val_batches()
        if batches is None:
            raise ValueError("the PSS budget table is selected on the validation split: set data.val_size > 0")
        cands = {sampler.bucket_value(b): sampler.candidates(b, t.pss.select_top_k) for b in sampler.buckets}
        lat = t.pss.latency_table
        table, stats = select_budget_table(trainer.net, cands, trainer.recal_data(), batches, t, lat)
        table.meta = {"metric": t.pss.metric, "bucket_step": t.pss.bucket_step, "split": "val"}
        run = Path(trainer.run_dir)
        table.save(run / runs.BUDGET_TABLE)
        save_budget_file(run / runs.BUDGET_WEIGHTS, trainer.net, table, stats, {**trainer.meta(), "step": trainer.step})
        print(f"PSS budget table (best pool subnet per bucket, validation split):\n{table.format()}")


__all__ = [
    "BudgetTableWriter",
    "PSSSampler",
    "build_pss_sampler",
    "exp_schedule",
    "make_pss_sampler",
    "macs_fn",
    "select_budget_table",
    "val_accuracy",
]
