"""Quantization: int8 QDQ artifacts match their float originals and account MACs exactly; FDDA's
BN centres and losses equal hand-computed values; fake quantization rounds as specified and
passes gradients straight through; bad inputs fail with one clear error."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaslice as ds
from dynaslice.data import InMemoryDataset
from dynaslice.gate import GatedSupernet
from dynaslice.modelfile import CheckpointError
from dynaslice.onnx_export import export_gated, export_onnx
from dynaslice.onnx_package import BUDGET_FORMAT, BudgetOnnxRunner, GatedOnnxRunner, OnnxModel, read_manifest
from dynaslice.quant import (
    GeneratorImages,
    NoiseImages,
    RealImages,
    artifact_kind,
    calibration_images,
    calibration_source,
    compare_artifacts,
    graph_accounting,
    quantize_artifact,
)
from dynaslice.quant.calibration import UNLABELLED, SourceBatches, random_resized_crop_flip
from dynaslice.quant.fakequant import (
    ActQuant,
    DistillConfig,
    DistillTrainer,
    QuantConv2d,
    QuantLinear,
    distill_config,
    fake_quant,
    kd_loss,
    observe_ranges,
    quantize_model,
)
from dynaslice.quant.fdda import (
    BNCentres,
    BNStat,
    FDDAConfig,
    GeneratorTrainer,
    bn_centres,
    bns_centre_loss,
    bns_distorted_loss,
    bns_loss,
    deep_start,
    forward_with_bn_stats,
    generator_step,
    one_per_class,
    train_generator,
)

# QDQ tolerance: every logit within 10 % of the largest float logit on fresh random input. The
# test networks have random weights and random BN statistics, and int8 rounding compounds over
# their ~20 layers to 1-5 % here; a wrong scale, a dropped layer or a lost requantization is
# off by the order of 100 %. (Trained networks do better: see docs/QUANT.md.)
QDQ_RTOL = 0.1


def make_net(seed: int = 0) -> ds.Supernet:
    """resnet_small with non-trivial BN statistics, so a wrong fold or slice shows."""
    torch.manual_seed(seed)
    net = ds.create_supernet("resnet_small", in_chans=1, num_classes=10, input_size=28)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.2)
            elif name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.uniform_(0.5, 2.0)
    return net.eval()


def noise(n: int, seed: int, shape=(1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def within(q: np.ndarray, f: np.ndarray) -> bool:
    return bool(np.abs(q - f).max() <= QDQ_RTOL * np.abs(f).max())


# --------------------------------------------------------------------------- int8 on onnxruntime


@pytest.fixture(scope="module")
def subnet(tmp_path_factory):
    net = make_net()
    arch = net.space.smallest()
    path = export_onnx(net, arch, tmp_path_factory.mktemp("sub") / "float.onnx")
    quant = quantize_artifact(path, path.with_name("int8.onnx"), noise(64, 0), calibration={"kind": "noise"})
    return net, arch, path, quant


def test_qdq_subnet_matches_float_and_loads_like_it(subnet):
    net, arch, path, quant = subnet
    f, q = OnnxModel(path), OnnxModel(quant)
    assert q.arch == f.arch == arch.to_dict() and q.input_shape == f.input_shape
    x = noise(16, 1)
    yf, yq = f(x), q(x)
    assert within(yq, yf) and not np.array_equal(yq, yf)  # close, and really quantized
    import onnx

    model = onnx.load(str(quant))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    conv_weights = [
        t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    assert conv_weights  # weights stored as int8
    meta = json.loads({p.key: p.value for p in model.metadata_props}["dynaslice.quantization"])
    assert meta["calibration"] == {"kind": "noise", "images": 64}
    assert meta["weights"] == "int8 per-channel symmetric" and meta["activation_bits"] == 8


def test_accounting_is_exact_and_records_bit_widths(subnet):
    net, arch, path, quant = subnet
    plain = ds.extract_subnet(net, arch)
    with FlopCounterMode(display=False) as counter:  # torch's own count, as count_macs is checked
        plain(torch.zeros(1, 1, 28, 28))
    want = counter.get_total_flops() // 2
    fa, qa = graph_accounting(path), graph_accounting(quant)
    assert fa["macs"] == qa["macs"] == want
    assert fa["macs_by_bits"] == {"float": want} and qa["macs_by_bits"] == {"w8a8": want}
    assert all(layer["weight_bits"] == layer["activation_bits"] == 8 for layer in qa["layers"])
    meta = json.loads(OnnxModel(quant).session.get_modelmeta().custom_metadata_map["dynaslice.quantization"])
    assert meta["accounting"]["macs"] == want


def test_compare_reports_both_accuracies(subnet):
    _, _, path, quant = subnet
    x = noise(40, 2)
    labels = OnnxModel(path)(x).argmax(1)  # float predictions as labels: float top-1 is 100
    r = compare_artifacts(path, quant, x, labels)
    assert r["float"]["top1"] == 100.0
    assert r["drop"] == pytest.approx(100.0 - r["int8"]["top1"])
    assert r["agreement"] == pytest.approx(r["int8"]["top1"])


@pytest.fixture(scope="module")
def gated_package(tmp_path_factory):
    gated = GatedSupernet(make_net(1), routes=2).eval()
    directory = export_gated(gated, tmp_path_factory.mktemp("pkg") / "gated", mean=[0.286], std=[0.353])
    quant = quantize_artifact(directory, directory.with_name("gated_int8"), noise(48, 3))
    return directory, quant


def test_quantized_gated_package_keeps_its_manifest_and_runner(gated_package):
    directory, quant = gated_package
    before, after = read_manifest(directory), read_manifest(quant)  # the runtime's own check passes
    assert {k: v for k, v in after.items() if k != "quantization"} == before
    assert sorted(p.name for p in quant.iterdir()) == sorted(p.name for p in directory.iterdir())
    routes = after["quantization"]["routes"]
    assert [r["macs"] for r in routes] == [r["macs"] for r in before["routes"]]  # exact, from the graphs
    assert all(r["macs_by_bits"] == {"w8a8": r["macs"]} for r in routes)
    f, q = GatedOnnxRunner(directory), GatedOnnxRunner(quant)
    x = noise(8, 4)
    for r in range(2):
        forced = np.full(len(x), r)
        assert within(q.forward_with_routes(x, forced)[0], f.forward_with_routes(x, forced)[0])
    assert artifact_kind(quant) == "package"


def budget_package(directory, net):
    """A budget-table package in :class:`BudgetOnnxRunner`'s format: two entries, one file each."""
    directory.mkdir()
    entries = []
    for i, arch in enumerate((net.space.smallest(), net.space.largest())):
        export_onnx(net, arch, directory / f"entry_{i}.onnx")
        entries.append({"bucket": i, "file": f"entry_{i}.onnx", "arch": arch.to_dict(),
                        "macs": ds.count_macs(net, arch), "val_accuracy": 50.0 + i})  # fmt: skip
    manifest = {
        "format": BUDGET_FORMAT, "format_version": 1, "num_classes": 10, "entries": entries,
        "input": {"name": "input", "shape": [None, 1, 28, 28], "dtype": "float32"},
    }  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_quantized_budget_package_keeps_its_manifest_and_runner(tmp_path):
    net = make_net(2)
    directory = budget_package(tmp_path / "budget", net)
    quant = quantize_artifact(directory, tmp_path / "budget_int8", noise(32, 5), {"kind": "noise"})
    before, after = read_manifest(directory), read_manifest(quant)
    assert {k: v for k, v in after.items() if k != "quantization"} == before
    entries = after["quantization"]["entries"]
    assert [e["macs"] for e in entries] == [e["macs"] for e in before["entries"]]  # exact, from the graphs
    assert all(e["macs_by_bits"] == {"w8a8": e["macs"]} for e in entries)
    f, q = BudgetOnnxRunner(directory), BudgetOnnxRunner(quant)
    x = noise(8, 6)
    for budget in (entries[0]["macs"], None):  # the cheap entry, then the most accurate one
        assert q.entry(budget) == f.entry(budget)
        assert within(q(x, max_macs=budget), f(x, max_macs=budget))
    labels = f(x).argmax(1)
    r = compare_artifacts(directory, quant, x, labels)
    assert r["float"]["entry_top1"][1] == 100.0 and len(r["entry_drop"]) == 2
    assert r["entry_drop"][1] == pytest.approx(100.0 - r["int8"]["entry_top1"][1])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_artifact(quant, tmp_path / "again", noise(4, 0))
    quantize_artifact(directory, quant, noise(32, 7))  # an earlier package is replaced, nothing left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget", "budget_int8"]
    assert read_manifest(quant)["quantization"]["calibration"] == {"images": 32}


def test_quantizing_twice_is_refused(subnet, gated_package, tmp_path):
    with pytest.raises(ValueError, match="already quantized; quantize its float original"):
        quantize_artifact(subnet[3], tmp_path / "again.onnx", noise(4, 0))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_artifact(gated_package[1], tmp_path / "again", noise(4, 0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter, on purpose
def test_artifacts_that_are_not_dynaslices_get_one_clear_error(tmp_path):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(
        nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), (torch.zeros(1, 1, 8, 8),), str(foreign), dynamo=False
    )
    (tmp_path / "not_onnx.onnx").write_text("hello")
    (tmp_path / "dir").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "someone-else"}))
    for path in (foreign, tmp_path / "not_onnx.onnx", tmp_path / "dir", tmp_path / "other"):
        with pytest.raises(ValueError, match="is not a dynaslice ONNX artifact"):
            quantize_artifact(path, tmp_path / "out.onnx", noise(4, 0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        artifact_kind(tmp_path / "missing.onnx")


def test_bad_calibration_input_gets_one_clear_error(subnet, tmp_path):
    path = subnet[2]
    for bad in (
        np.zeros((4, 1, 28, 28), np.uint8),
        np.zeros((1, 28, 28), np.float32),
        np.zeros((0, 1, 28, 28)),
    ):
        with pytest.raises(ValueError, match="calibration images must be a non-empty normalised float batch"):
            quantize_artifact(path, tmp_path / "q.onnx", bad)
    with pytest.raises(ValueError, match="unknown calibrate_method 'best'"):
        quantize_artifact(path, tmp_path / "q.onnx", noise(4, 0), calibrate_method="best")  # type: ignore[arg-type]
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ValueError, match="is the float original"):
        quantize_artifact(path, path, noise(4, 0))


# --------------------------------------------------------------------------- calibration sources


def tiny_dataset(n: int = 40, classes: int = 3, size: int = 8) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return InMemoryDataset(images, labels, classes, (0.5,), (0.25,), "tiny")


class Tiny(nn.Module):
    """conv-BN-ReLU twice (the ReLU module called twice), pool, linear: 2 BN layers."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu, self.fc = nn.ReLU(), nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def test_sources_sample_what_they_promise():
    ds_ = tiny_dataset()
    rng = torch.Generator().manual_seed(0)
    with pytest.raises(
        ValueError, match="unknown calibration source 'imagenet': choose one of real, fdda, gdfq, noise"
    ):
        calibration_source("imagenet", ds_)
    with pytest.raises(ValueError, match="needs the dataset"):
        calibration_source("real")
    with pytest.raises(ValueError, match="pass the full-precision model"):
        calibration_source("fdda", ds_)
    real = calibration_source("real", ds_, num_real=12)
    x, y = real.sample(12, rng)
    assert x.shape == (12, 1, 8, 8) and len({tuple(v.flatten().tolist()) for v in x}) == 12  # all distinct
    assert x.dtype == torch.float32 and y is not None
    x, _ = real.sample(30, rng)  # more than the set: it repeats
    assert x.shape[0] == 30
    per_class = RealImages.from_dataset(ds_, 0, per_class=True)
    assert per_class.labels.tolist() == [0, 1, 2]
    x, y = NoiseImages((1, 8, 8)).sample(5, rng)
    assert x.shape == (5, 1, 8, 8) and y is None
    arr = calibration_images(real, 7, seed=1)
    assert arr.shape == (7, 1, 8, 8) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, calibration_images(real, 7, seed=1))  # seeded


def test_fdda_source_trains_a_generator_and_samples_labelled_images():
    torch.manual_seed(0)
    ds_ = tiny_dataset()
    teacher = Tiny().eval()
    src = calibration_source("fdda", ds_, teacher, fdda=FDDAConfig(epochs=1, steps_per_epoch=2, batch_size=4))
    assert isinstance(src, GeneratorImages) and src.describe()["kind"] == "fdda"
    x, y = src.sample(9, torch.Generator().manual_seed(0))
    assert x.shape == (9, 1, 8, 8) and y.shape == (9,) and int(y.max()) < 3
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is handed back as it came


# --------------------------------------------------------------------------- FDDA pieces


def test_bn_centres_equal_hand_computed_statistics():
    """A 1x1 conv with weight 2 before the only BN: the BN input is 2x, so mean 2m and var 4v."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[3].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))  # class 0 iff sum > 0
        net[3].bias.zero_()
    images = torch.tensor([[1.0, 2, 3, 4], [-1, -1, -1, 5]]).view(2, 1, 2, 2)
    net.train()
    c = bn_centres(net, images, torch.tensor([0, 1]), 2)
    # class 0: [1, 2, 3, 4] -> [2, 4, 6, 8]: mean 5, biased var (9 + 1 + 1 + 9) / 4 = 5
    # class 1: [-1, -1, -1, 5] -> [-2, -2, -2, 10]: mean 1, var (9 + 9 + 9 + 81) / 4 = 27
    assert len(c.means) == len(c.vars) == 1
    torch.testing.assert_close(c.means[0], torch.tensor([[5.0], [1.0]]))
    torch.testing.assert_close(c.vars[0], torch.tensor([[5.0], [27.0]]))
    # eval inside (running stats 0/1): class 1's image has a positive sum, so it is predicted 0
    assert c.correct.tolist() == [True, False]
    assert net.training  # mode restored


def test_bn_centres_need_every_class():
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        bn_centres(Tiny(), torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="has no BatchNorm2d layers"):
        forward_with_bn_stats(nn.Linear(2, 2), torch.zeros(1, 2))


def test_one_per_class_picks_one_of_each():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    idx = one_per_class(labels, 3, torch.Generator().manual_seed(0))
    assert labels[idx].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no sample of class 3"):
        one_per_class(labels, 4, torch.Generator())


def test_forward_with_bn_stats_records_inputs_in_call_order_and_leaves_no_hooks():
    net = Tiny().eval()
    x = torch.randn(3, 1, 8, 8)
    out, stats = forward_with_bn_stats(net, x)
    h1 = net.conv1(x)
    h2 = net.conv2(net.relu(net.bn1(h1)))
    for s, h, bn in zip(stats, (h1, h2), (net.bn1, net.bn2), strict=True):
        assert s.module is bn
        torch.testing.assert_close(s.mean, h.mean((0, 2, 3)))
        torch.testing.assert_close(s.var, h.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(out, net(x))
    assert not net.bn1._forward_pre_hooks and not net.bn2._forward_pre_hooks


def stats_and_centres():
    """Two BN layers of 2 channels with known statistics, running stats and class centres."""
    bn_a, bn_b = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    bn_a.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn_a.running_var.copy_(torch.tensor([1.0, 2.0]))
    bn_b.running_mean.copy_(torch.tensor([1.0, 1.0]))
    bn_b.running_var.copy_(torch.tensor([3.0, 1.0]))
    stats = [
        BNStat(torch.tensor([1.0, 1.0], requires_grad=True), torch.tensor([1.0, 4.0]), bn_a),
        BNStat(torch.tensor([0.0, 3.0]), torch.tensor([2.0, 2.0]), bn_b),
    ]
    centres = BNCentres(
        means=[torch.tensor([[9.0, 9.0], [1.0, 2.0]]), torch.tensor([[9.0, 9.0], [2.0, 3.0]])],
        vars=[torch.tensor([[9.0, 9.0], [1.0, 1.0]]), torch.tensor([[9.0, 9.0], [0.0, 4.0]])],
        correct=torch.tensor([True, True]),
    )
    return stats, centres


def test_global_bns_loss_by_hand():
    stats, _ = stats_and_centres()
    # layer a: MSE([1,1],[0,1]) = 0.5, MSE([1,4],[1,2]) = 2   -> 2.5
    # layer b: MSE([0,3],[1,1]) = 2.5, MSE([2,2],[3,1]) = 1   -> 3.5;  mean 3.0
    loss = bns_loss(stats)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    # d/dmean_a of 0.5 * (sum (m - rm)^2 / 2) = (m - rm) / 2 = [0.5, 0]
    torch.testing.assert_close(stats[0].mean.grad, torch.tensor([0.5, 0.0]))


def test_centralised_loss_by_hand():
    stats, centres = stats_and_centres()
    # class 1, all layers: a: MSE([1,1],[1,2]) = 0.5, MSE([1,4],[1,1]) = 4.5 -> 5
    #                      b: MSE([0,3],[2,3]) = 2,   MSE([2,2],[0,4]) = 4   -> 6; mean 5.5
    assert bns_centre_loss(stats, centres, 1, start=0).item() == pytest.approx(5.5)
    assert bns_centre_loss(stats, centres, 1, start=1).item() == pytest.approx(6.0)  # deep layers only
    with pytest.raises(ValueError, match="the centres have 2"):
        bns_centre_loss(stats[:1], centres, 1, 0)


def test_distorted_loss_by_hand():
    stats, centres = stats_and_centres()
    # without noise it is the centralised loss
    assert bns_distorted_loss(stats, centres, 1, 0, 0.0, 0.0).item() == pytest.approx(5.5)
    g = torch.Generator().manual_seed(7)
    got = bns_distorted_loss(stats, centres, 1, 1, 0.5, 1.0, generator=g)
    g = torch.Generator().manual_seed(7)  # same draws, in the documented order: mean noise, var noise
    target_m = torch.tensor([2.0, 3.0]) + torch.randn(2, generator=g) * 0.5
    target_v = torch.tensor([0.0, 4.0]) + torch.randn(2, generator=g) * 1.0
    m, v = torch.tensor([0.0, 3.0]), torch.tensor([2.0, 2.0])
    want = ((m - target_m) ** 2).mean() + ((v - target_v) ** 2).mean()
    assert got.item() == pytest.approx(want.item())


def test_deep_start_is_the_official_rule():
    assert deep_start(20) == 8  # ResNet-18's 20 BN layers
    assert deep_start(52) == 24  # MobileNetV2
    assert deep_start(1) == 0


def test_generator_step_combines_the_losses_and_reaches_the_generator():
    torch.manual_seed(0)
    teacher = Tiny().eval().requires_grad_(False)
    x, y = torch.randn(3, 1, 8, 8), torch.arange(3)
    centres = bn_centres(teacher, x, y, 3)
    centres = BNCentres(centres.means, centres.vars, torch.tensor([True, False, True]))
    from dynaslice.quant.fdda import ConditionalGenerator

    gen = ConditionalGenerator(3, 8, 1, latent_dim=6).train()
    cfg = FDDAConfig(batch_size=4, latent_dim=6)
    z, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    out = generator_step(gen, teacher, cfg, 0, centres, z, labels, torch.Generator().manual_seed(0))
    assert set(out) == {"ce", "bns", "ce_class", "c_bns", "d_bns", "total"}
    assert out["total"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k != "total"))
    out["total"].backward()
    assert all(p.grad is not None for p in gen.conv3.parameters())
    gdfq = generator_step(gen, teacher, FDDAConfig(batch_size=4, latent_dim=6, fdda=False), 0, None, z, labels)
    assert set(gdfq) == {"ce", "bns", "total"}
    with pytest.raises(ValueError, match="FDDA needs BN centres"):
        generator_step(gen, teacher, cfg, 0, None, z, labels)
    wrong = BNCentres(centres.means, centres.vars, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="misclassifies every class"):
        generator_step(gen, teacher, cfg, 0, wrong, z, labels)


def test_train_generator_is_seeded_and_leaves_the_teacher_alone(tmp_path):
    teacher = Tiny().eval()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = FDDAConfig(epochs=1, steps_per_epoch=2, batch_size=4, fdda=False)
    a = train_generator(teacher, 3, 8, 1, tmp_path / "a", cfg, seed=3)
    b = train_generator(teacher, 3, 8, 1, tmp_path / "b", cfg, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, state[k])  # BN running statistics untouched
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert json.loads((tmp_path / "a" / "final_eval.json").read_text())["method"] == "gdfq"
    with pytest.raises(ValueError, match="multiple of 4"):
        train_generator(teacher, 3, 10, 1, tmp_path / "c", cfg)


class Interrupt(Exception):
    pass


def interrupted(cls):
    """``cls`` with an ``after_step`` that raises once the step counter reaches ``stop_at``."""

    class Stopping(cls):
        stop_at = None

        def after_step(self, losses, info):
            super().after_step(losses, info)
            if self.step + 1 == self.stop_at:
                raise Interrupt

    return Stopping


def engine_config(seed: int = 0, *sets: str):
    from dynaslice.train.config import load_config

    return load_config(None, [f"train.seed={seed}", "train.threads=1", "train.device=cpu", *sets])


def test_generator_training_resumed_mid_epoch_ends_identical(tmp_path):
    """Killed at step 5 of 3 x 3 (a checkpoint every 2 steps), resumed: bitwise the same generator."""
    torch.manual_seed(0)
    teacher = Tiny().eval()
    x, y = torch.randn(3, 1, 8, 8), torch.arange(3)
    centres = bn_centres(teacher, x, y, 3)
    centres = BNCentres(centres.means, centres.vars, torch.ones(3, dtype=torch.bool))
    fdda = FDDAConfig(epochs=3, steps_per_epoch=3, batch_size=4, latent_dim=6)
    cfg = engine_config(1, "train.ckpt_every_steps=2")

    def run(directory, cls=GeneratorTrainer, stop_at=None):
        trainer = cls(teacher, 3, 8, 1, cfg, directory, fdda, centres)
        trainer.stop_at = stop_at
        trainer.resume()
        trainer.fit()
        return trainer

    whole = run(tmp_path / "whole")
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", interrupted(GeneratorTrainer), stop_at=6)
    resumed = GeneratorTrainer(teacher, 3, 8, 1, cfg, tmp_path / "cut", fdda, centres)
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    for (k, a), b in zip(whole.generator.state_dict().items(), resumed.generator.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = GeneratorTrainer(teacher, 3, 8, 1, cfg, tmp_path / "cut", FDDAConfig(**{**fdda.__dict__, "lr": 0.1}), centres)
    with pytest.raises(CheckpointError, match="other FDDA settings"):
        other.resume()


# --------------------------------------------------------------------------- fake quantization


def test_fake_quant_rounds_to_the_grid_and_passes_gradients_straight_through():
    x = torch.tensor([-0.2, 0.0, 0.1, 0.5, 0.9, 1.3], requires_grad=True)
    # 2 bits on [0, 1]: 3 steps of 1/3; clamp outside; 0.5 * 3 = 1.5 rounds half to even -> 2
    y = fake_quant(x, 2, torch.tensor(0.0), torch.tensor(1.0))
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.0, 2 / 3, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(6))
    # an asymmetric range: [-1, 2] in 4 bits: step 0.2, zero point -5
    y = fake_quant(torch.tensor([-1.0, 0.0, 0.31, 2.0]), 4, torch.tensor(-1.0), torch.tensor(2.0))
    torch.testing.assert_close(y, torch.tensor([-1.0, 0.0, 0.4, 2.0]))
    with pytest.raises(ValueError, match="bit width"):
        fake_quant(x, 0, torch.tensor(0.0), torch.tensor(1.0))


def test_quantized_layers_use_per_channel_weight_grids():
    conv = QuantConv2d(2, 2, 1, bias=False, weight_bits=1)
    with torch.no_grad():  # 1 bit: each output channel's grid is just its own {min, max}
        conv.weight.copy_(torch.tensor([[0.0, 0.4], [1.0, 2.0]]).view(2, 2, 1, 1))
    torch.testing.assert_close(conv(torch.ones(1, 2, 1, 1)).flatten(), torch.tensor([0.4, 3.0]))
    lin = QuantLinear(3, 1, bias=False, weight_bits=1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.4, 1.0]]))  # grid {0, 1}: 0.4 -> 0
    torch.testing.assert_close(lin(torch.ones(1, 3)), torch.tensor([[1.0]]))


def test_quantize_model_wraps_every_call_and_respects_first_last_bits():
    net = Tiny().eval()
    q = quantize_model(net, 4, 4, first_last_bits=8)
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    assert len(acts) == 2  # one per ReLU *call*: the module is called twice
    assert [a.bits for a in acts] == [8, 8]  # first and last activation
    assert q.conv1.weight_bits == 8 and q.conv2.weight_bits == 4 and q.fc.weight_bits == 8
    assert type(net.conv1) is nn.Conv2d  # the original is untouched
    plain = quantize_model(net, 3, 5)
    assert plain.conv1.weight_bits == plain.fc.weight_bits == 3
    assert {a.bits for a in plain.modules() if isinstance(a, ActQuant)} == {5}


def test_ranges_move_only_while_observed_and_16_bits_is_close_to_float():
    torch.manual_seed(0)
    net = Tiny().eval()
    q = quantize_model(net, 16, 16)
    x = torch.randn(8, 1, 8, 8)
    q(x)
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    assert all(a.hi.item() == 0 for a in acts)  # not observing: nothing moved
    with observe_ranges(q):
        for _ in range(200):
            q(x)
    assert all(not a.observing for a in acts)
    relu_max = net.relu(net.bn1(net.conv1(x))).max()
    assert acts[0].hi.item() == pytest.approx(relu_max.item(), rel=1e-6)  # EMA of a constant max
    torch.testing.assert_close(q(x), net(x), atol=1e-3, rtol=0)


def test_kd_loss_by_hand():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    T, a = 2.0, 3.0
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum()
    ce = -torch.log_softmax(s, 1)[0, 0]
    assert kd_loss(s, t, y, T, a).item() == pytest.approx((a * T * T * kl + ce).item())


def test_augmentation_keeps_shape_and_a_full_crop_is_the_image_or_its_mirror():
    x = torch.arange(4 * 16, dtype=torch.float32).view(4, 1, 4, 4)
    y = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    full = random_resized_crop_flip(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for a, b in zip(full, x, strict=True):
        assert torch.allclose(a, b, atol=1e-4) or torch.allclose(a, b.flip(-1), atol=1e-4)


def test_source_batches_are_seeded_per_batch_and_label_what_has_no_label():
    real = RealImages.from_dataset(tiny_dataset(), 6)
    batches = SourceBatches([real, NoiseImages((1, 8, 8))], 4, steps=3, seed=1, augment=True)
    assert len(batches) == 3
    epoch = list(batches.epoch_batches(1))
    x, y = epoch[0]
    assert x.shape == (8, 1, 8, 8) and (y[:4] >= 0).all() and (y[4:] == UNLABELLED).all()
    tail = list(batches.epoch_batches(1, start=2))  # a resume mid-epoch sees the same batches
    assert len(tail) == 1 and torch.equal(tail[0][0], epoch[2][0])
    assert not torch.equal(epoch[0][0], next(batches.epoch_batches(0))[0])  # epochs differ
    with pytest.raises(ValueError, match="at least one calibration source"):
        SourceBatches([], 4, 3)


def distill_run(tmp_path, name, teacher, sources, cls=DistillTrainer, stop_at=None, lr=1e-2):
    cfg = distill_config(engine_config(0, "train.ckpt_every_steps=2"), epochs=2, lr=lr)
    student = quantize_model(teacher, 4, 4)
    trainer = cls(student, teacher, sources, cfg, tmp_path / name, DistillConfig(range_steps=2, batch_size=4, steps_per_epoch=3))
    trainer.stop_at = stop_at
    trainer.resume()
    trainer.resumed_at = trainer.step
    trainer.fit()
    return trainer


def test_distillation_sets_ranges_then_trains_the_student_only_and_resumes_identically(tmp_path):
    torch.manual_seed(0)
    teacher = Tiny().eval()
    sources = [RealImages.from_dataset(tiny_dataset(), 6), NoiseImages((1, 8, 8))]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    whole = distill_run(tmp_path, "whole", teacher, sources)
    student = whole.model
    assert all(a.hi.item() > 0 for a in student.modules() if isinstance(a, ActQuant))  # ranges set
    untrained = quantize_model(teacher, 4, 4)
    assert not torch.equal(student.conv1.weight, untrained.conv1.weight)  # the student learned
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher did not
    assert not isinstance(teacher.conv1, QuantConv2d) and not teacher.training
    assert not student.bn1.training  # fine-tuned in eval mode: BN running statistics unchanged
    torch.testing.assert_close(student.bn1.running_mean, teacher.bn1.running_mean)
    with pytest.raises(Interrupt):
        distill_run(tmp_path, "cut", teacher, sources, interrupted(DistillTrainer), stop_at=5)
    resumed = distill_run(tmp_path, "cut", teacher, sources)  # ranges and weights from the checkpoint
    assert resumed.resumed_at == 4
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="other distillation settings"):
        distill_run(tmp_path, "cut", teacher, sources[:1])


def test_kd_loss_labels_unlabelled_images_with_the_teacher_class(tmp_path):
    torch.manual_seed(0)
    teacher = Tiny().eval()
    trainer = DistillTrainer(
        quantize_model(teacher, 8, 8), teacher, [NoiseImages((1, 8, 8))], distill_config(engine_config()), tmp_path
    )
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        t = teacher(x)
        got = trainer.loss(x, torch.full((5,), UNLABELLED))
        want = kd_loss(trainer.model(x), t, t.argmax(1))
    assert got.item() == pytest.approx(want.item())
