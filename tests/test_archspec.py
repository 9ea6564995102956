"""Arch strings read the same everywhere: every documented form names the same subnet in
``dynaslice export --arch`` (parse_arch), ``dynaslice eval --archs`` (parse_archs) and
``serve.load(arch=...)``."""

from __future__ import annotations

import json

import pytest
import torch

import dynaslice as ds
from dynaslice import serve
from dynaslice.archspec import ARCH_FORMS, parse_arch, parse_archs
from dynaslice.modelfile import prefixed, save_model_file

KWARGS = {"in_chans": 1, "num_classes": 10, "input_size": 12, "ratios": [0.5, 0.75, 1.0]}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ds.create_supernet("resnet_small", **KWARGS).eval()


@pytest.fixture(scope="module")
def model_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    save_model_file(path, prefixed("model", net), {"model": {"name": "resnet_small", "kwargs": KWARGS}})
    return path


def documented_forms(net, folder) -> dict[str, object]:
    """Each form ARCH_FORMS names, with the arch it must mean."""
    half = net.space.uniform(0.5)
    one = folder / "one.json"
    one.write_text(json.dumps(dict(half)))
    return {
        "largest": net.space.largest(),
        "smallest": net.space.smallest(),
        "x0.5": half,
        "0.5": half,
        json.dumps(dict(half)): half,
        str(one): half,
    }


def test_every_documented_form_is_listed_in_the_message():
    for word in ("largest", "smallest", "x0.5", "0.5", "routeN", "JSON"):
        assert word in ARCH_FORMS


def test_every_form_names_the_same_arch_in_every_command(net, model_file, tmp_path):
    for form, want in documented_forms(net, tmp_path).items():
        assert parse_arch(form, net) == want, form  # dynaslice export --arch
        assert list(parse_archs([form], net, [])) != [] and set(parse_archs([form], net, []).values()) == {want}, form
        assert serve.load(model_file, runtime="eager", arch=form).arch == dict(want), form  # serve.load(arch=)
    assert parse_arch(0.5, net) == net.space.uniform(0.5)  # a number from Python, as serve.load took
    assert parse_arch(dict(net.space.largest()), net) == net.space.largest()


def test_routes_read_the_same_in_both_parsers(net):
    import copy

    gated = ds.GatedSupernet(copy.deepcopy(net), cut=1, routes=3)
    for i, route in enumerate(gated.routes):
        assert parse_arch(f"route{i}", gated) == route
        assert parse_archs([f"route{i}"], gated, []) == {f"route{i}": route}
    assert parse_archs(["routes"], gated, []) == gated.named_routes()
    with pytest.raises(ValueError, match="the gate has 3 routes"):
        parse_arch("route3", gated)


def test_a_mistake_is_one_value_error_naming_the_forms(net, model_file):
    with pytest.raises(ValueError, match="use largest, smallest"):
        parse_arch("half", net)
    with pytest.raises(ValueError, match="names several subnets"):
        parse_arch("uniform", net)
    with pytest.raises(ValueError, match="outside"):
        serve.load(model_file, runtime="eager", arch="x0.1")
    with pytest.raises(ValueError, match="routes belong to gated checkpoints"):
        serve.load(model_file, runtime="eager", arch="route0")
