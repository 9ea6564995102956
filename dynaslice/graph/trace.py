"""Tracing a user's model with ``torch.fx``, with refusals a user can act on.

``torch.fx`` records one run of ``forward`` on symbolic tensors. Two things make that record
differ from the model: Python control flow that depends on tensor *values* (fx cannot follow
it; refused, naming the module and the line), and branches on ``self.training`` outside
``torch.nn`` layers (fx bakes in the mode it traced in). The second is caught by tracing in
both modes and comparing: a network that would silently lose its training-only behaviour is
refused rather than converted.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import os
import traceback
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.passes.shape_prop import ShapeProp

from ..nn import SlicedModule
from .rules import POINTWISE_LIBRARY_MODULES, attention_spec, class_name, norm_act_parts, norm_act_refusal


class GraphError(ValueError):
    """A network the channel-group engine cannot trace or follow (the message says where)."""


class Tracer(fx.Tracer):
    """torch.nn layers, dynaslice's sliced leaves, a few known library layers, norm+activation
    layers (timm's BatchNormAct2d, see :func:`~dynaslice.graph.rules.norm_act_parts`) and the
    attention layers sliced by heads (:func:`~dynaslice.graph.rules.attention_spec`) stay one
    node each; everything else is traced through. Remembers the module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = isinstance(m, SlicedModule) or class_name(m) in POINTWISE_LIBRARY_MODULES
        leaf = leaf or norm_act_parts(m) is not None or attention_spec(m) is not None
        return leaf or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001 - fx's signature
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                path = self.path_of_module(m)
                self.failed_in = f"{path or 'the model'} ({type(m).__name__})"
            raise


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block, then give every module back its own train/eval mode (modes may be mixed)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _user_line(error: BaseException) -> str:
    """The last line of the model's own code in the error's traceback (not torch's)."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith(torch_dir) and "/dynaslice/" not in frame.filename:
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f"{os.path.basename(frame.filename)}:{frame.lineno} `{code}`"
    return "unknown line"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _defaults(model: nn.Module) -> dict[str, object]:
    """``forward``'s inputs after the first, fixed to their defaults (timm's ViT takes
    ``attn_mask=None``): the converted network takes one input, so these are traced as constants.
    An input without a default is refused."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin forward: fx reports what it cannot trace
        return {}
    extra = [p for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in extra if p.default is p.empty]
    if required:
        raise GraphError(
            f"{type(model).__name__}.forward takes {len(required) + 1} inputs without defaults "
            f"({', '.join([params[0].name, *required])}); make_supernet needs exactly one"
        )
    return {p.name: p.default for p in extra}


def _strip_constant_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for inputs traced as constants, and the checks it adds
    that they hold their traced value (``_assert_is_none``; ``eq`` then ``_assert``): the
    network's one input is then its only placeholder."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for node in placeholders:
        for user in list(node.users):
            checks = [user] if user.target is _assert_is_none else [*user.users, user]
            for check in checks:
                if not check.users and check.target in (_assert_is_none, torch._assert, operator.eq):
                    graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)


def _trace_once(model: nn.Module, training: bool) -> fx.GraphModule:
    tracer = Tracer()
    model.train(training)
    fixed = _defaults(model)
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as e:  # fx raises many types; the user needs one line naming where
        where = tracer.failed_in or f"{type(model).__name__}.forward"
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx: in {where}, {_user_line(e)}: {_first_line(e)} "
            "(data-dependent control flow cannot be traced; move it into a torch.nn layer or make it static)"
        ) from e
    _strip_constant_inputs(graph)
    return fx.GraphModule(model, graph)


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` whose nodes carry their output shapes (``tensor_meta``).

    ``example_input`` runs through the model once in eval mode, without gradients (statistics
    untouched). Raises :class:`GraphError` (one line) when the input does not fit the model, the
    model cannot be traced, or its traced code differs between training and eval mode.
    """
    if not isinstance(example_input, torch.Tensor):
        raise GraphError(f"example_input must be a tensor, got {type(example_input).__name__}")
    for name, m in model.named_modules():
        why = norm_act_parts(m) is not None and norm_act_refusal(m)
        if why:
            raise GraphError(
                f"{name or 'the model'} ({type(m).__name__}) is a BatchNorm with its own forward, but {why}; "
                "only a BatchNorm followed by pointwise activations can be sliced"
            )
    _defaults(model)  # refuses a second input without a default before running the model
    with modes_kept(model):
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        except Exception as e:
            raise GraphError(
                f"the example input of shape {tuple(example_input.shape)} does not run through "
                f"{type(model).__name__}: {_first_line(e)}"
            ) from e
        train_graph = _trace_once(model, True)
        gm = _trace_once(model, False)
        if train_graph.code != gm.code:
            raise GraphError(
                f"{type(model).__name__} runs different code in training and in eval mode outside torch.nn "
                "layers (e.g. F.dropout(training=self.training) or an auxiliary head); a traced copy would "
                "keep only one of them -- use torch.nn layers (nn.Dropout) for mode-dependent parts"
            )
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    return gm
