"""Arch and SearchSpace: grids, sampling, enumeration, JSON, errors."""

import json
import random

import pytest
import torch

from dynaslice.space import Arch, Dim, SearchSpace, dsnet_ratios, make_divisible, width_grid


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace((Dim("a", (8, 16, 24, 32)), Dim("b", (16, 48, 64)), Dim("k", (3, 5, 7), "kernel")))


def test_make_divisible_and_grid():
    assert make_divisible(22.4) == 24 and make_divisible(3) == 8 and make_divisible(100) == 104
    g = width_grid(64, dsnet_ratios())
    assert g == (24, 32, 40, 48, 56, 64)
    assert all(c % 8 == 0 for c in width_grid(1152, dsnet_ratios()))
    assert len(dsnet_ratios()) == 14 and dsnet_ratios()[0] == 0.35 and dsnet_ratios()[-1] == 1.0


def test_largest_smallest_uniform(space):
    assert space.largest() == Arch(a=32, b=64, k=7)
    assert space.smallest() == Arch(a=8, b=16, k=3)
    # nearest grid value; kernel stays at max
    assert space.uniform(0.5) == Arch(a=16, b=48, k=7)
    assert space.uniform(1.0) == space.largest()
    with pytest.raises(ValueError, match="ratio"):
        space.uniform(0)


def test_sample_is_seeded_and_in_space(space):
    a = [space.sample(random.Random(3)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [space.sample(g1) for _ in range(10)] == [space.sample(g2) for _ in range(10)]
    rng = random.Random(0)
    seen = {space.sample(rng) for _ in range(500)}
    assert all(s in space for s in seen)
    assert len(seen) == len(space) == 4 * 3 * 3  # uniform sampling reaches every arch


def test_enumeration_is_complete_and_distinct(space):
    archs = list(space)
    assert len(archs) == len(set(archs)) == len(space)


def test_json_round_trip(space):
    a = space.sample(1)
    assert Arch.from_json(a.to_json()) == a and hash(Arch.from_json(a.to_json())) == hash(a)
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_arch_is_immutable_hashable_mapping():
    a = Arch(x=1, y=2)
    assert a == {"x": 1, "y": 2} and {a: 1}[Arch(y=2, x=1)] == 1
    assert a.replace(x=5)["x"] == 5 and a["x"] == 1
    with pytest.raises(ValueError, match="integer"):
        Arch(x=1.5)
    with pytest.raises(KeyError):
        a.replace(z=1)


def test_bad_arch_errors_name_the_problem(space):
    with pytest.raises(ValueError, match=r"a=12 is not allowed; allowed values are \[8, 16, 24, 32\]"):
        space.validate({"a": 12, "b": 16, "k": 3})
    with pytest.raises(ValueError, match=r"missing \['k'\]"):
        space.validate({"a": 8, "b": 16})
    with pytest.raises(ValueError, match=r"unexpected \['zz'\]"):
        space.validate({"a": 8, "b": 16, "k": 3, "zz": 1})
    with pytest.raises(TypeError):
        space.validate([8, 16, 3])


def test_tied_dims_share_index():
    sp = SearchSpace((Dim("s3", (224, 256, 288)), Dim("s4", (736, 768, 800))), tied=(("s3", "s4"),))
    assert len(sp) == 3
    assert {(a["s3"], a["s4"]) for a in sp} == {(224, 736), (256, 768), (288, 800)}
    assert sp.uniform(0.85)["s4"] == 768  # follows s3's index
    with pytest.raises(ValueError, match="same grid index"):
        sp.validate({"s3": 224, "s4": 800})
    with pytest.raises(ValueError, match="equally many"):
        SearchSpace((Dim("a", (1, 2)), Dim("b", (1, 2, 3))), tied=(("a", "b"),))
