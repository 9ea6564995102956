"""The model registry's names: the zoo's (``resnet50``) and converted networks (``source:factory``).

``create_supernet(name, **kwargs)`` builds a registered family, or builds the network a
``source:factory`` name names and converts it with :func:`~dynaslice.make_supernet`:

- ``torchvision:<model>`` (``torchvision.models.get_model``; 3 input channels),
- ``timm:<model>`` (``timm.create_model``; ``pip install 'dynaslice[models]'``),
- ``package.module:factory``: your own code, imported and called.

This is what ``model.name`` in a config means; a model file records the same name and keyword
arguments, so the same call rebuilds the net. Building a ``package.module:factory`` name imports
that module: fine from the user's own config (it is code, like a script), never from a model file
(:func:`imports_code`, :func:`dynaslice.modelfile.build_model`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import Supernet, create_registered
from .converted import make_supernet


def create_supernet(name: str, **kwargs) -> Supernet:
    """Build a registered supernet, e.g. ``create_supernet("resnet50", num_classes=1000)``, or
    convert a network named ``source:factory`` (:func:`create_converted`), e.g.
    ``create_supernet("torchvision:resnet18", num_classes=10, input_size=64)``."""
    if ":" in name:
        return create_converted(name, **kwargs)
    return create_registered(name, **kwargs)


TRUSTED_SOURCES = ("torchvision", "timm")
"""Sources whose factories are looked up in a library's own table of models: naming one imports
nothing else, so a model file may name them (:func:`imports_code`)."""


WEIGHT_KEYWORDS = frozenset(
    {"weights", "weights_backbone", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
     "cache_dir"}
)  # fmt: skip
"""torchvision's and timm's factory keywords that fetch or read starting weights (the network, a
file). A config may use them (``model.kwargs.weights: DEFAULT``); a model file's net is rebuilt
without them (:func:`dynaslice.modelfile.build_model`): its own tensors replace every weight."""


def imports_code(name: str) -> bool:
    """Whether building ``name`` imports a module the name chooses (``package.module:factory``).

    The user's own config may do so (it is code, like a Python script); a model file may not:
    :func:`dynaslice.modelfile.build_model` refuses such names unless the caller trusts them.
    """
    return ":" in name and name.partition(":")[0] not in TRUSTED_SOURCES


def _torchvision_model(
    factory: str, in_chans: int, num_classes: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if factory not in names:
        close = difflib.get_close_matches(factory, names, n=1)
        hint = f" Did you mean 'torchvision:{close[0]}'?" if close else ""
        raise ValueError(f"torchvision has no model {factory!r}.{hint}")
    if in_chans != 3:  # torchvision's factories take no in_chans; a swapped first conv would be ours
        raise ValueError(
            f"torchvision:{factory} takes 3-channel images, these have {in_chans}: use 3-channel data "
            "(e.g. data.synthetic_channels: 3), a timm: model (it takes in_chans) or your own package.module:factory"
        )
    if num_classes is not None:
        kwargs = {"num_classes": num_classes, **kwargs}
    return torchvision.models.get_model(factory, **kwargs)


def _timm_model(factory: str, in_chans: int, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ImportError(f"timm:{factory} needs timm: pip install 'dynaslice[models]'") from None
    if not timm.is_model(factory):  # also refuses hf-hub:/local-dir: names, which read files or the network
        close = difflib.get_close_matches(factory, timm.list_models(), n=1)
        hint = f" Did you mean 'timm:{close[0]}'?" if close else ""
        raise ValueError(f"timm has no model {factory!r}.{hint}")
    kwargs = {"in_chans": in_chans, **kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(factory, **kwargs)


def _imported_model(name: str, in_chans: int, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """``package.module:factory``: the factory gets ``kwargs``, plus ``in_chans`` and ``num_classes``
    when its signature names them (or takes ``**kwargs``); the built model is checked either way."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.name {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model.name {name!r}: {module_name} has no callable {attr!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("in_chans", in_chans), ("num_classes", num_classes)):
        if value is not None and key not in kwargs and (takes_any or key in params):
            kwargs = {**kwargs, key: value}
    return factory(**kwargs)


def create_converted(
    name: str,
    *,
    in_chans: int = 3,
    num_classes: int | None = None,
    input_size: int | Sequence[int] = 224,
    ratios: Sequence[float] | None = None,
    round_to: int = 8,
    **kwargs: Any,
) -> Supernet:
    """Build the network ``name`` names and convert it with :func:`~dynaslice.make_supernet`.

    ``name`` is ``torchvision:<model>`` (e.g. ``torchvision:resnet18``; 3 input channels),
    ``timm:<model>`` (``pip install 'dynaslice[models]'``) or ``package.module:factory`` (your
    own code, imported). ``num_classes`` and ``in_chans`` go to the factory (a factory of yours
    gets them when it takes them); ``input_size`` (a side, or ``[H, W]``) sizes the example input
    that tracing, MAC counting and export use; ``ratios`` and ``round_to`` are make_supernet's;
    every other keyword goes to the factory. The same arguments rebuild the same net, which is
    how a model file records it. Mistakes are one line (ValueError, ImportError without timm).
    """
    source, _, factory = name.partition(":")
    if not source or not factory:
        raise ValueError(
            f"model.name {name!r}: write torchvision:<model>, timm:<model> or package.module:factory"
        )
    side = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(side) != 2 or not all(isinstance(v, int) and v > 0 for v in (*side, in_chans)):
        raise ValueError(f"{name}: input_size must be a side or [H, W] and in_chans a positive integer")
    build = {"torchvision": _torchvision_model, "timm": _timm_model}.get(source)
    try:
        if build is not None:
            model = build(factory, in_chans, num_classes, dict(kwargs))
        else:
            model = _imported_model(name, in_chans, num_classes, dict(kwargs))
    except (ValueError, ImportError):
        raise
    except Exception as e:  # the factory's own error (a keyword it rejects, a failing build): one line
        text = f": {str(e).strip().splitlines()[0]}" if str(e).strip() else ""
        raise ValueError(f"{name}({_kwargs_text(kwargs)}) failed: {type(e).__name__}{text}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    example = torch.randn(1, in_chans, *side, generator=torch.Generator().manual_seed(0))
    net = make_supernet(model, example, ratios=ratios, round_to=round_to)
    if num_classes is not None and net.num_classes != num_classes:
        raise ValueError(
            f"{name} predicts {net.num_classes} classes, the data has {num_classes}: "
            "give the factory a num_classes keyword (or build it for these classes)"
        )
    return net


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
