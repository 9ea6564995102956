"""A user's road (issue 28, item 5): the trained model of a converted timm network, extracted as
a plain model, can be L1-pruned at a supernet width's MACs, the baseline bench/bench_user_road.py
compares the supernet with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynaslice import count_macs, create_supernet
from dynaslice.prune import prune_l1
from dynaslice.prune.common import check_compact
from dynaslice.torch_export import extract_subnet

SIZE = (1, 32, 32)


@pytest.fixture(scope="module")
def converted():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    # timm's MobileNetV3: its classifier is timm's Linear (F.linear in its own forward), its
    # norms BatchNormAct2d (a BatchNorm2d subclass with the activation inside)
    net = create_supernet("timm:mobilenetv3_small_050", in_chans=1, num_classes=10, input_size=SIZE[-1])
    return net.eval()


def test_extracted_classifier_is_a_linear_layer(converted):
    largest = converted.space.largest()
    plain = extract_subnet(converted, largest, SIZE).eval()
    assert type(plain.classifier) is nn.Linear
    assert not [n for n in plain.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    x = torch.randn(3, *SIZE)
    torch.testing.assert_close(plain(x), converted(x, largest), rtol=1e-5, atol=1e-6)


def test_l1_prunes_a_converted_timm_model_to_a_width_macs(converted):
    plain = extract_subnet(converted, converted.space.largest(), SIZE).eval()
    target = count_macs(converted, converted.space.uniform(0.5), SIZE)
    result = prune_l1(plain, SIZE, target_macs=target, include="all")
    assert result.macs <= target
    assert result.macs > 0.9 * target  # the largest uniform ratio that fits, not far under it
    assert result.model(torch.randn(2, *SIZE)).shape == (2, 10)


def test_compact_check_refuses_dynaslice_layers_only(converted):
    check_compact(extract_subnet(converted, converted.space.largest(), SIZE))  # timm's norms stay
    with pytest.raises(TypeError, match="not a plain torch module"):
        check_compact(nn.Sequential(converted))
