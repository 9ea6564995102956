"""The 1-bit kernel (issue 30 item 3): its integer counts equal the simulated binary conv's exactly,
on every path this CPU has; the fused epilogue, the shortcut, and a whole network match torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynaslice.binary import kernel
from dynaslice.binary.layers import PlainBinaryConv2d, ReCUConv2d, SiManConv2d, binarize, center_per_sample

torch.set_num_threads(1)
PATHS = kernel.supported_paths()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def random_signs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)


# (batch, cin, cout, side, kernel, stride, padding): channels off 64's multiples, across a word
# boundary and over two words, outputs not multiples of 16, odd sides, strides 1/2, padding 0/1
CASES = [
    (1, 3, 5, 7, 3, 1, 1),
    (2, 16, 16, 9, 3, 2, 1),
    (3, 63, 17, 6, 3, 1, 0),
    (1, 64, 32, 5, 3, 2, 0),
    (2, 65, 33, 8, 3, 2, 1),
    (1, 130, 7, 4, 3, 1, 1),
    (2, 20, 40, 5, 1, 2, 0),
    (1, 32, 16, 6, 5, 1, 2),  # a 5x5 kernel, two rows of padding
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}o{}s{}k{}st{}p{}".format(*c))
def test_counts_equal_the_simulated_conv(path, case):
    n, cin, cout, side, k, stride, pad = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, cin, side, side + 1, generator=gen)  # H != W
    w = random_signs(gen, cout, cin, k, k)
    expected = F.conv2d(binarize(x), w, stride=stride, padding=pad)  # zeros in the padding
    conv = kernel.pack_weights(w.to(torch.int8).numpy(), stride, pad)
    counts = kernel.conv_counts(nhwc(x), conv, path=path)
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, nhwc(expected).astype(np.int32))


def test_every_supported_path_is_tested_and_forcing_works(monkeypatch):
    assert "portable" in PATHS
    monkeypatch.setenv(kernel.PATH_ENV, "portable")
    assert kernel.resolve_path() == "portable"
    monkeypatch.setenv(kernel.PATH_ENV, "sse9")
    with pytest.raises(ValueError, match="unknown 1-bit kernel path 'sse9'"):
        kernel.resolve_path()
    monkeypatch.delenv(kernel.PATH_ENV)
    assert kernel.resolve_path() == PATHS[0]


@pytest.mark.parametrize("path", PATHS)
def test_pack_signs_matches_binarize_and_centring(path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 3, 4, generator=gen) + 0.5
    x[0, 0, 0, 0] = 0.0  # sign(0) is +1 in the contract
    x[0, 1, 0, 0] = -0.0
    for center, ref in ((False, x), (True, center_per_sample(x))):
        packed = kernel.pack_signs(nhwc(x), center=center, path=path)
        assert packed.shape == (2, 3, 4, 2)
        bits = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")[..., :70]
        np.testing.assert_array_equal(bits.astype(np.int8) * 2 - 1, nhwc(binarize(ref)))
        assert not np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")[..., 70:].any()


def test_weights_round_trip():
    gen = torch.Generator().manual_seed(2)
    w = random_signs(gen, 19, 67, 3, 3).to(torch.int8).numpy()
    np.testing.assert_array_equal(kernel.unpack_weights(kernel.pack_weights(w, 1, 1)), w)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        kernel.pack_weights(np.zeros((2, 2, 3, 3)), 1, 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", [None, "hardtanh", "prelu"])
@pytest.mark.parametrize("shortcut", [None, "identity", "pool"])
def test_binary_layer_fuses_affine_shortcut_activation(path, act, shortcut):
    from dynaslice.binary.models import PoolPadShortcut

    gen = torch.Generator().manual_seed(3)
    cin, cout, stride = (24, 24, 1) if shortcut == "identity" else (24, 40, 2)
    x = torch.randn(2, cin, 7, 7, generator=gen)
    w = random_signs(gen, cout, cin, 3, 3)
    a, b, slope = (torch.randn(cout, generator=gen) * 0.1 for _ in range(3))
    y = F.conv2d(binarize(x), w, stride=stride, padding=1) * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    if shortcut == "identity":
        y = y + x
    elif shortcut == "pool":
        y = y + PoolPadShortcut(cin, cout, stride)(x)
    y = {None: y, "hardtanh": F.hardtanh(y), "prelu": F.prelu(y, slope)}[act]
    conv = kernel.pack_weights(w.numpy(), stride, 1)
    got = kernel.binary_layer(nhwc(x), conv, a.numpy(), b.numpy(), act, slope.numpy(), shortcut, path=path)
    np.testing.assert_allclose(got, nhwc(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", [None, "hardtanh", "prelu"])
def test_float_conv_matches_torch(path, act):
    gen = torch.Generator().manual_seed(7)
    cout = 20 if path == "portable" else 32  # the vector stem takes blocks of 16; others fall back to portable
    x, w, bias, slope = torch.randn(2, 3, 9, 8, generator=gen), torch.randn(cout, 3, 3, 3, generator=gen), \
        torch.randn(cout, generator=gen), torch.rand(cout, generator=gen)  # fmt: skip
    y = F.conv2d(x, w, bias, stride=1, padding=1)
    y = {None: y, "hardtanh": F.hardtanh(y), "prelu": F.prelu(y, slope)}[act]
    conv = kernel.prepare_float_conv(w.numpy(), bias.numpy(), 1, 1)
    np.testing.assert_allclose(kernel.float_conv(nhwc(x), conv, act, slope.numpy(), path), nhwc(y), rtol=1e-5, atol=1e-5)


def test_refuses_mismatched_inputs():
    conv = kernel.pack_weights(np.ones((4, 70, 3, 3), dtype=np.int8), 1, 1)
    with pytest.raises(ValueError, match="NHWC with 70 channels"):
        kernel.conv_counts(np.zeros((1, 5, 5, 10), np.float32), conv)
    with pytest.raises(ValueError, match="identity shortcut needs"):
        kernel.binary_layer(np.zeros((1, 5, 5, 70), np.float32), conv, np.ones(4), np.ones(4), shortcut="identity")
    # the C side checks buffer lengths itself, so a caller that skips the wrapper cannot overrun
    from dynaslice.binary import _bitconv

    with pytest.raises(ValueError, match="bytes, the shape needs"):
        _bitconv.conv(np.zeros(3, np.float32), conv.bits, conv.tap_ones, np.zeros(100, np.int32), 1, 5, 5, 70, 4, 3, 1, 1, 0, False)


def test_binary_layer_spec_runs_on_the_kernel():
    """A trained layer's deploy_spec through the kernel: counts * scale equals the layer's eval output."""
    torch.manual_seed(4)
    layer = PlainBinaryConv2d(12, 9, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 12, 9, 9)
    spec = layer.deploy_spec()
    conv = kernel.pack_weights(spec.weight.numpy(), spec.stride, spec.padding)
    got = kernel.binary_layer(nhwc(x), conv, spec.scale.numpy(), np.zeros(9, np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(got, nhwc(layer(x)), rtol=1e-5, atol=1e-6)


class CenteredPlain(PlainBinaryConv2d):
    """The plain layer with SiMaN's per-sample centring, to run the kernel's centring path."""

    center = True


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and PReLU slopes, as a trained network has, then eval."""
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conv, act", [(PlainBinaryConv2d, "hardtanh"), (PlainBinaryConv2d, "prelu"),
                                       (CenteredPlain, "prelu"), (ReCUConv2d, "hardtanh"), (SiManConv2d, "prelu")])  # fmt: skip
def test_whole_network_logits_equal_torch(tmp_path, path, conv, act):
    from dynaslice.binary.models import binary_resnet_small
    from dynaslice.binary.packed import BinaryRunner, export_binary

    torch.manual_seed(6)
    model = trained_like(binary_resnet_small(conv, width_mult=0.5, act=act))
    manifest = export_binary(model, tmp_path / "pkg", input_size=(1, 28, 28))
    runner = BinaryRunner(tmp_path / "pkg", path=path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(runner(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runner.run_by_layer(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    sizes = manifest["sizes"]
    assert sizes["binary_bytes"] == (tmp_path / "pkg" / "weights.safetensors").stat().st_size
    assert sizes["float32_bytes"] > sizes["int8_bytes"] > sizes["binary_bytes"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from dynaslice.binary.models import binary_resnet_small
    from dynaslice.binary.packed import export_binary

    torch.manual_seed(8)
    model = trained_like(binary_resnet_small(PlainBinaryConv2d, width_mult=0.25))
    directory = tmp_path_factory.mktemp("binary") / "pkg"
    export_binary(model, directory)
    return model, directory


def test_serve_load_runs_a_binary_package(package):
    import dynaslice.serve as serve

    model, directory = package
    served = serve.load(directory)
    assert served.runtime == "binary"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(served(x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(served(x.numpy()), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1-bit kernel"):
        serve.load(directory, runtime="onnxruntime")


def test_damaged_packages_are_one_error(package, tmp_path):
    import json
    import shutil

    from dynaslice.binary.packed import BinaryRunner, export_binary

    model, directory = package
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["layers"][3]["cin"] = 7
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="damaged: layer 3 takes 7 channels"):
        BinaryRunner(bad)
    manifest["layers"][3]["cin"] = 4
    del manifest["layers"][3]["bits"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="damaged"):
        BinaryRunner(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        BinaryRunner(bad)
    shutil.copytree(directory, tmp_path / "short")
    (tmp_path / "short" / "weights.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        BinaryRunner(tmp_path / "short")
    # a folder holding anything but a binary package is not replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a binary package"):
        export_binary(model, tmp_path / "other")
    # the full-precision arm has no 1-bit form
    from dynaslice.binary.models import binary_resnet_small

    with pytest.raises(ValueError, match="no 1-bit form"):
        export_binary(binary_resnet_small(None), tmp_path / "fp")


def test_export_cli_writes_a_binary_package(package, tmp_path, capsys):
    from dynaslice.binary.packed import BinaryRunner
    from dynaslice.binary.train import MODEL_FILE, save_binary_model
    from dynaslice.cli import main

    model, _ = package
    run = tmp_path / "run"
    run.mkdir()
    spec = {"method": "bnn", "width_mult": 0.25, "in_chans": 1, "num_classes": 10}
    save_binary_model(model, spec, run / MODEL_FILE)
    assert main(["export", str(run), "--binary", "--out", str(tmp_path / "pkg")]) == 0
    assert "smaller than float32" in capsys.readouterr().out
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(BinaryRunner(tmp_path / "pkg")(x), model(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert main(["export", str(run), "--binary", "--out", str(tmp_path / "pkg")]) == 2  # exists, no --force
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--binary", "--out", str(tmp_path / "p2")]) == 2
    assert "holds no model.pt" in capsys.readouterr().err
