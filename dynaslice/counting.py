"""Resource accounting: MACs and parameters of any subnet, fast enough for 100k archs.

Why this is exact and fast: a sliced layer's cost is a *monomial* in the arch's values -- a conv
costs ``out * in * k^2 * H * W`` MACs and has ``out * in * k^2`` weights, with ``out``/``in``
each a width dimension or a constant. So per model and input size we

1. run the largest subnet once through a *meta-device* copy of the network (shapes only, no
   arithmetic) under ``torch.utils.flop_counter.FlopCounterMode`` -- torch's own counter is the
   ground truth: MACs = FLOPs / 2 of convolutions, linear layers and attention matmuls --
   recording the cost of every module (MACs) and every parameter tensor (its sliced size, from
   the leaf's ``to_static``);
2. re-run it once per dimension with that dimension shrunk, which reveals each item's integer
   exponent in that dimension (``k^2`` for a sliced kernel, ``in*out`` gives 1 + 1, ...);
3. check the resulting formula on random archs it was not derived from (an error is raised if a
   model breaks the assumption, never a silently wrong number);
4. evaluate ``sum_items cost0 * prod_d (value_d / max_d) ** exponent`` with numpy for any batch of
   archs (microseconds each).

Depth is categorical: the procedure runs once per depth value, since skipped blocks vanish.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.base import Supernet
from .nn import SlicedModule
from .space import Arch, SearchSpace

ArchLike = Mapping[str, int]


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` on the meta device, made without copying any weight data."""
    memo: dict[int, object] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo).eval()


def _exclusive(counts: Mapping[str, Mapping[object, int]]) -> dict[str, int]:
    """Per-module FLOPs excluding those of its submodules (FlopCounterMode nests them)."""
    totals = {k: sum(v.values()) for k, v in counts.items() if k != "Global"}
    own = dict(totals)
    for name, total in totals.items():
        parent = name.rpartition(".")[0]
        while parent and parent not in totals:
            parent = parent.rpartition(".")[0]
        if parent:
            own[parent] -= total
    return own


def cost_items(meta_net: nn.Module, arch: ArchLike, input_size: Sequence[int]) -> dict[str, int]:
    """Exact cost items of one subnet on a meta-device net (slow path, ~0.1 s).

    Keys ``macs:<module>`` hold MACs per image attributed to the module's own ops; keys
    ``params:<module>.<param>`` hold the size of each parameter in the extracted subnet.
    """
    names = {id(m): n for n, m in meta_net.named_modules()}
    items: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        own = dict(module.named_parameters(recurse=False))
        if not own:
            return
        if isinstance(module, SlicedModule):
            own = dict(module.to_static(args[0].shape, *args[1:], **kwargs).named_parameters())
        for pname, p in own.items():
            items[f"params:{names[id(module)]}.{pname}"] = p.numel()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in meta_net.modules()]
    try:
        x = torch.empty(1, *input_size, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta_net(x, arch)
    finally:
        for h in handles:
            h.remove()
    for name, flops in _exclusive(counter.get_flop_counts()).items():
        if flops:
            items[f"macs:{name}"] = flops // 2
    return items


class _Monomials:
    """``sum_i c_i * prod_d (v_d / v0_d) ** e_id`` for one depth setting, items grouped by kind."""

    def __init__(self, names: list[str], base: Arch, items: dict[str, int], exps: dict[str, np.ndarray]):
        self.names = names
        self.base = np.array([base[n] for n in names], dtype=np.float64)
        self.terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind in ("macs", "params"):
            keys = [k for k in items if k.startswith(kind + ":")]
            if not keys:
                self.terms[kind] = (np.zeros(1), np.zeros((1, len(names))))
                continue
            sig: dict[tuple[int, ...], float] = {}
            for k in keys:  # merge items with equal exponents into one term
                e = tuple(int(v) for v in exps[k])
                sig[e] = sig.get(e, 0.0) + items[k]
            self.terms[kind] = (np.array(list(sig.values())), np.array(list(sig.keys()), dtype=np.float64))

    def __call__(self, values: np.ndarray, kind: str) -> np.ndarray:
        coef, exps = self.terms[kind]
        ratios = values / self.base  # [n_archs, D]
        prod = np.prod(ratios[:, None, :] ** exps[None, :, :], axis=2)  # [n_archs, n_terms]
        return np.rint(prod @ coef).astype(np.int64)


class ResourceModel:
    """Exact MACs and parameter counts of every arch of one supernet at one input size."""

    def __init__(self, net: Supernet, input_size: Sequence[int], seed: int = 0, checks: int = 3):
        self.space: SearchSpace = net.space
        self.input_size = tuple(input_size)
        meta = meta_copy(net)
        # probes move one dimension at a time, so they ignore ties (the meta copy is ours)
        meta.space = SearchSpace(self.space.dims)
        self._cat = [d.name for d in self.space.dims if d.kind == "depth"]
        self._names = [d.name for d in self.space.dims if d.kind != "depth"]
        self._polys: dict[tuple[int, ...], _Monomials] = {}
        largest = self.space.largest()
        for key in itertools.product(*(self.space[c].choices for c in self._cat)):
            base = Arch({**largest.to_dict(), **dict(zip(self._cat, key, strict=True))})
            self._polys[key] = self._derive(meta, base)
        rng = random.Random(seed)
        for _ in range(checks):
            arch = self.space.sample(rng)
            exact = cost_items(meta, arch, self.input_size)
            for kind in ("macs", "params"):
                want = sum(v for k, v in exact.items() if k.startswith(kind + ":"))
                got = int(self._eval([arch], kind)[0])
                if got != want:
                    raise RuntimeError(
                        f"{type(net).__name__}: analytic {kind} {got} != measured {want} for {arch}; "
                        "its costs are not monomials in the arch values (use cost_items instead)"
                    )

    def _derive(self, meta: nn.Module, base: Arch) -> _Monomials:
        items = cost_items(meta, base, self.input_size)
        exps = {k: np.zeros(len(self._names)) for k in items}
        for d, name in enumerate(self._names):
            dim = self.space[name]
            if len(dim.choices) == 1:
                continue
            probe_value = dim.choices[0]
            probe = cost_items(meta, base.replace(**{name: probe_value}), self.input_size)
            ratio = math.log(probe_value / base[name])
            for k, c0 in items.items():
                e = math.log(probe.get(k, 0) / c0) / ratio if probe.get(k, 0) else float("nan")
                if not abs(e - round(e)) < 1e-6:
                    raise RuntimeError(f"cost item {k} does not scale as a power of {name}")
                exps[k][d] = round(e)
        return _Monomials(self._names, base, items, exps)

    def _eval(self, archs: Sequence[ArchLike], kind: str) -> np.ndarray:
        out = np.empty(len(archs), dtype=np.int64)
        keys = [tuple(a[c] for c in self._cat) for a in archs]
        for key in set(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            values = np.array([[archs[i][n] for n in self._names] for i in idx], dtype=np.float64)
            out[idx] = self._polys[key](values.reshape(len(idx), -1), kind)
        return out

    def macs(self, archs: Sequence[ArchLike]) -> np.ndarray:
        """MACs per image of each arch (validate archs yourself on hot paths)."""
        return self._eval(archs, "macs")

    def params(self, archs: Sequence[ArchLike]) -> np.ndarray:
        """Parameters of each arch's extracted subnet."""
        return self._eval(archs, "params")


class ExtractedCosts:
    """Exact costs of each arch counted on its extracted subnet: for supernets whose costs are
    *sums* of monomials, which :class:`ResourceModel` cannot derive.

    A network converted by :func:`dynaslice.make_supernet` is one when a layer reads a
    concatenation of sliced channel groups (DenseNet, SqueezeNet): its MACs are
    ``out * (w_a + w_b) * ...``. Each arch is extracted from a meta-device copy (shapes only) and
    counted with ``FlopCounterMode``, like any plain model -- the same numbers, about 0.1 s per
    new arch instead of microseconds (results are memoised per arch).
    """

    def __init__(self, net: Supernet, input_size: Sequence[int]):
        self.space: SearchSpace = net.space
        self.input_size = tuple(input_size)
        self._meta = meta_copy(net)
        self._memo: dict[Arch, tuple[int, int]] = {}

    def _costs(self, arch: ArchLike) -> tuple[int, int]:
        from .torch_export import extract_subnet  # export needs the models; counting sits below them

        arch = self.space.validate(arch)
        if arch not in self._memo:
            sub = extract_subnet(self._meta, arch, self.input_size)  # type: ignore[arg-type]
            self._memo[arch] = (count_module_macs(sub, self.input_size), count_module_params(sub))
        return self._memo[arch]

    def macs(self, archs: Sequence[ArchLike]) -> np.ndarray:
        return np.array([self._costs(a)[0] for a in archs], dtype=np.int64)

    def params(self, archs: Sequence[ArchLike]) -> np.ndarray:
        return np.array([self._costs(a)[1] for a in archs], dtype=np.int64)


_MODELS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], ResourceModel | ExtractedCosts]] = (
    weakref.WeakKeyDictionary()
)


def resource_model(net: Supernet, input_size: Sequence[int] | None = None) -> ResourceModel | ExtractedCosts:
    """The (cached) :class:`ResourceModel` of ``net`` at ``input_size`` (default ``net.input_size``),
    or its :class:`ExtractedCosts` when ``net.analytic_costs`` is false (costs that are sums)."""
    size = tuple(input_size or net.input_size)
    if len(size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {size}")
    per_net = _MODELS.setdefault(net, {})
    if size not in per_net:
        analytic = getattr(net, "analytic_costs", True)
        per_net[size] = ResourceModel(net, size) if analytic else ExtractedCosts(net, size)
    return per_net[size]


def count_macs(
    net: Supernet, arch: ArchLike | Sequence[ArchLike], input_size: Sequence[int] | None = None
) -> int | np.ndarray:
    """MACs per image of ``arch`` (an int), or of a sequence of archs (an int64 array)."""
    rm = resource_model(net, input_size)
    if isinstance(arch, Mapping):
        return int(rm.macs([net.space.validate(arch)])[0])
    return rm.macs([net.space.validate(a) for a in arch])


def count_params(net: Supernet, arch: ArchLike | Sequence[ArchLike]) -> int | np.ndarray:
    """Parameters of the extracted subnet ``arch`` (an int), or of a sequence of archs."""
    rm = resource_model(net)
    if isinstance(arch, Mapping):
        return int(rm.params([net.space.validate(arch)])[0])
    return rm.params([net.space.validate(a) for a in arch])


def module_macs(model: nn.Module, input_size: Sequence[int]) -> tuple[int, dict[str, int]]:
    """MACs per image of any plain module at ``input_size`` ``(C, H, W)``, and those of each leaf module.

    One pass of a meta-device copy (shapes only) under ``FlopCounterMode``, the counter
    :func:`count_macs` is checked against: MACs = FLOPs / 2 of convolutions and matmuls. The
    total also holds ops called outside any leaf (a functional ``F.linear`` in a ``forward``).
    """
    meta = meta_copy(model)
    root = type(meta).__name__
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, *input_size, device="meta"))
    leaves = {name for name, m in meta.named_modules() if name and next(m.children(), None) is None}
    per_leaf = {}
    for key, counts in counter.get_flop_counts().items():
        name = key.removeprefix(root + ".")
        if name in leaves:
            per_leaf[name] = sum(counts.values()) // 2
    return counter.get_total_flops() // 2, per_leaf


def count_module_macs(model: nn.Module, input_size: Sequence[int], sparse: bool = False) -> int:
    """MACs per image of a plain model (a pruned network, an extracted subnet) at ``input_size``.

    ``sparse=True`` counts *nominal* MACs: each leaf's MACs scaled by the fraction of its
    ``weight`` that is non-zero -- what a sparse kernel would compute. Torch and onnxruntime run
    the dense weights, so report nominal MACs next to measured latency, never as a speed.
    """
    total, per_leaf = module_macs(model, input_size)
    if not sparse:
        return total
    for name, macs in per_leaf.items():
        w = getattr(model.get_submodule(name), "weight", None)
        if isinstance(w, torch.Tensor) and macs:
            nnz, numel = int(torch.count_nonzero(w)), w.numel()
            if (macs * nnz) % numel:
                raise RuntimeError(f"{name}: {macs} MACs are not a whole number per weight; cannot scale them")
            total -= macs - macs * nnz // numel
    return total


def count_module_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of a plain model (a tensor shared by several modules once); ``nonzero=True``
    counts only the non-zero entries (unstructured or 1xN sparsity)."""
    # parameters() yields a shared tensor once
    return sum(int(torch.count_nonzero(p)) if nonzero else p.numel() for p in model.parameters())
