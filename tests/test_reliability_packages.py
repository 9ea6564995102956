"""Reliability and security of ONNX packages, ``quantize`` and serving (issue 34, round two).

One rule for every file dynaslice reads from a package or writes into one
(:func:`dynaslice.onnx_package.package_file`): a plain name inside the package folder, never through a
link, size-capped before anything is read or allocated; the files of a package are the ones its
checked manifest names (trunk, ``routes[]``, ``entries[]``), at most ``MAX_ITEMS``, one session per
file. The cases run ``dynaslice`` in this process (``cli``: an exception escaping ``main`` fails the
test) on tiny packages exported from a synthetic supernet; ``test_package_manifest_fuzz`` draws
hostile manifests, links, sizes and files from a seeded generator (``DYNASLICE_FUZZ_CASES`` scales it).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_reliability import cli, deadline, listing, one_line_error

import dynaslice as ds
from dynaslice import serve
from dynaslice.budget import BudgetEntry
from dynaslice.modelfile import model_spec, prefixed, save_model_file
from dynaslice.onnx_export import export_budget, export_gated, export_onnx
from dynaslice.onnx_package import (
    MAX_ITEMS,
    BudgetOnnxRunner,
    GatedOnnxRunner,
    package_file,
    read_manifest,
)
from dynaslice.train.bn import bn_statistics
from dynaslice.train.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
pytest.importorskip("onnxruntime")

LEGACY = Path(__file__).parent / "data" / "legacy_v010"
SIZE = 8
CPU_RUNTIMES = [r for r in ("eager", "frozen", "onnxruntime") if r in serve.available_runtimes("cpu")]


def tiny_net(seed: int = 0) -> ds.Supernet:
    torch.manual_seed(seed)
    net = ds.create_supernet(
        "resnet_small", in_chans=1, num_classes=10, input_size=SIZE, ratios=[0.5, 0.75, 1.0]
    )
    with torch.no_grad():  # BN statistics that are not the identity
        for m in net.modules():
            if isinstance(m, ds.nn.SlicedBatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_budget(net: ds.Supernet) -> ds.BudgetNet:
    net = copy.deepcopy(net)
    archs = [net.space.smallest(), net.space.largest()]
    entries = [
        BudgetEntry(bucket=i, arch=a, macs=int(ds.count_macs(net, a)), val_accuracy=50.0 + 10 * i)
        for i, a in enumerate(archs)
    ]
    stats = [bn_statistics(net), bn_statistics(net)]
    return ds.BudgetNet(net, ds.BudgetTable(entries), stats).eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """A float gated package (trunk + 2 routes), a float budget package (2 entries), and the
    networks they came from."""
    root = tmp_path_factory.mktemp("packages")
    net = tiny_net()
    gated = ds.GatedSupernet(copy.deepcopy(net), cut=1, routes=2).eval()
    return {
        "gated": export_gated(gated, root / "gated"),
        "budget": export_budget(tiny_budget(net), root / "budget"),
        "net": net,  # type: ignore[dict-item]
        "gated_net": gated,  # type: ignore[dict-item]
    }


def copy_package(packages: dict, kind: str, dest: Path) -> Path:
    shutil.copytree(packages[kind], dest)
    return dest


def edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def quantize(package: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(
        "quantize", package, "--out", out, "--calibration", "noise", "--images", "2", *extra, seconds=120
    )


def x_batch(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, SIZE, SIZE)).astype(np.float32)


# --------------------------------------------------------------------------- the package rule


def test_package_file_takes_plain_regular_files_of_the_folder_only(tmp_path):
    pkg, outside = tmp_path / "pkg", tmp_path / "outside"
    pkg.mkdir()
    outside.mkdir()
    (pkg / "a.onnx").write_bytes(b"x" * 10)
    (outside / "secret").write_text("secret")
    (pkg / "link.onnx").symlink_to(outside / "secret")
    (pkg / "inner_link.onnx").symlink_to(pkg / "a.onnx")
    (pkg / "dir.onnx").mkdir()
    os.mkfifo(pkg / "fifo.onnx")
    assert package_file(pkg, "a.onnx") == pkg / "a.onnx"
    for name in (
        "../outside/secret",
        str(outside / "secret"),
        "sub/a.onnx",
        "..",
        ".",
        "",
        "a\\b",
        "a\0b",
        3,
        None,
    ):
        with pytest.raises(ValueError, match="not a plain file name"):
            package_file(pkg, name)
    for name in ("link.onnx", "inner_link.onnx"):
        with pytest.raises(ValueError, match="symbolic link"):
            package_file(pkg, name)
        with pytest.raises(ValueError, match="symbolic link"):
            package_file(pkg, name, exists=False)  # not even to write over it
    for name in ("dir.onnx", "fifo.onnx"):
        with deadline(5), pytest.raises(ValueError, match="not a regular file"):
            package_file(pkg, name)
    with pytest.raises(ValueError, match="10 bytes, more than the 9"):
        package_file(pkg, "a.onnx", max_bytes=9)
    with pytest.raises(FileNotFoundError, match="missing"):
        package_file(pkg, "b.onnx")
    assert package_file(pkg, "b.onnx", exists=False) == pkg / "b.onnx"


# --------------------------------------------------------------------------- quantize: nothing outside --out


def test_quantize_reads_and_writes_only_what_the_manifest_names(packages, tmp_path):
    """Nested ``file`` entries pointing outside the package are not graphs of it (the victim was
    overwritten by its int8 version, and ``../payload.onnx`` created beside --out); an extra file
    that is a link to a secret is not copied (it was, as a regular file)."""
    outside, src, dst = tmp_path / "outside", tmp_path / "src", tmp_path / "dst"
    for d in (outside, src, dst):
        d.mkdir()
    victim = outside / "victim.onnx"
    shutil.copy(packages["budget"] / "entry_0.onnx", victim)
    shutil.copy(packages["budget"] / "entry_0.onnx", src / "payload.onnx")
    (outside / "secret.txt").write_text("the secret")
    before = victim.read_bytes()
    for kind in ("gated", "budget"):
        pkg = copy_package(packages, kind, src / kind)
        edit_manifest(
            pkg, lambda m: m.update(extra={"file": str(victim)}, notes=[{"file": "../payload.onnx"}])
        )
        (pkg / "README.txt").symlink_to(outside / "secret.txt")
        out = dst / f"{kind}_int8"
        rc, _, err = quantize(pkg, out)
        assert rc == 0, err
        assert victim.read_bytes() == before and sorted(p.name for p in outside.iterdir()) == [
            "secret.txt",
            "victim.onnx",
        ]
        assert not (dst / "payload.onnx").exists()
        manifest = read_manifest(out)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [
                "manifest.json",
                *{
                    f["file"]
                    for f in [
                        manifest.get("trunk", {}),
                        *manifest.get("routes", []),
                        *manifest.get("entries", []),
                    ]
                    if f
                },
            ]  # fmt: skip
        )
        assert all(not p.is_symlink() and b"the secret" not in p.read_bytes() for p in out.iterdir())


def test_package_members_that_are_links_are_refused_everywhere(packages, tmp_path):
    """A member linked to a valid graph outside the package was read through the link by every loader."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for kind, member, runner in (
        ("gated", "route_1.onnx", GatedOnnxRunner),
        ("budget", "entry_1.onnx", BudgetOnnxRunner),
    ):
        pkg = copy_package(packages, kind, tmp_path / kind)
        shutil.move(pkg / member, outside / member)
        (pkg / member).symlink_to(outside / member)
        one_line_error(quantize(pkg, tmp_path / f"{kind}_int8"), "symbolic link")
        assert not (tmp_path / f"{kind}_int8").exists()
        for load in (runner, serve.load):
            with pytest.raises(ValueError, match="symbolic link"):
                load(pkg)
        (pkg / "manifest.json").rename(outside / "manifest.json")
        (pkg / "manifest.json").symlink_to(outside / "manifest.json")
        with pytest.raises(ValueError, match="symbolic link"):
            runner(pkg)


# --------------------------------------------------------------------------- caps and shared sessions


def test_budget_entries_are_capped_and_one_file_has_one_session(packages, tmp_path, monkeypatch):
    import onnxruntime

    pkg = copy_package(packages, "budget", tmp_path / "many")
    one = json.loads((pkg / "manifest.json").read_text())["entries"][0]
    edit_manifest(pkg, lambda m: m.update(entries=[one] * (MAX_ITEMS + 1)))
    with deadline(10):
        with pytest.raises(ValueError, match=f"lists {MAX_ITEMS + 1} entries, not 1 to {MAX_ITEMS}"):
            BudgetOnnxRunner(pkg)
        one_line_error(quantize(pkg, tmp_path / "q"), f"not 1 to {MAX_ITEMS}")

    made = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: made.append(1) or real(*a, **k))
    edit_manifest(pkg, lambda m: m.update(entries=[one] * 50))
    runner, served = BudgetOnnxRunner(pkg), serve.load(pkg)
    assert len(made) == 2 and len(runner.models) == len(served.pieces) == 50  # one session per file, each


def test_a_huge_declared_input_is_refused_before_allocation(packages, tmp_path):
    """A graph declaring a 600000 x 600000 image made calibration allocate terabytes (a traceback)."""
    pkg = copy_package(packages, "budget", tmp_path / "big")
    edit_manifest(pkg, lambda m: m["input"].update(shape=[None, 1, 600000, 600000]))
    with deadline(10):
        one_line_error(quantize(pkg, tmp_path / "q"), "more than")
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, 600000, 600000])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 1, 1, 1])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("GlobalMaxPool", ["input"], ["logits"])], "big", [x], [y]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.metadata_props.add(key="dynaslice.version", value=ds.__version__)
    onnx.save(model, tmp_path / "big.onnx")
    with deadline(10):
        one_line_error(quantize(tmp_path / "big.onnx", tmp_path / "q.onnx"), "more than")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.onnx").exists()


def test_a_truncated_or_swapped_member_is_one_line_under_quantize(packages, tmp_path):
    pkg = copy_package(packages, "gated", tmp_path / "truncated")
    data = (pkg / "route_0.onnx").read_bytes()
    (pkg / "route_0.onnx").write_bytes(data[: len(data) // 2])
    one_line_error(quantize(pkg, tmp_path / "q1"), "route_0.onnx")
    pkg = copy_package(packages, "gated", tmp_path / "swapped")
    edit_manifest(pkg, lambda m: m["routes"][0].update(file="trunk.onnx"))
    one_line_error(quantize(pkg, tmp_path / "q2"), "trunk")
    pkg = copy_package(packages, "gated", tmp_path / "foreign")
    shutil.copy(packages["budget"] / "entry_0.onnx", pkg / "route_1.onnx")  # takes the image, not features
    one_line_error(quantize(pkg, tmp_path / "q3"), "route_1.onnx does not fit its manifest")
    with pytest.raises(ValueError, match="does not fit its manifest"):
        serve.load(pkg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "swapped", "truncated"]


def test_only_the_fields_of_the_manifests_own_format_name_files(packages, tmp_path):
    """A budget manifest's ``routes``/``trunk`` (the gated format's keys) name nothing; fields a
    loader reads are checked: a dtype no float graph takes, ``candidates`` that are no count."""
    pkg = copy_package(packages, "budget", tmp_path / "budget")
    edit_manifest(pkg, lambda m: m.update(routes=[{"file": "../x.onnx"}, 3], trunk={"file": "/etc/passwd"}))
    assert len(BudgetOnnxRunner(pkg).models) == 2 and len(serve.load(pkg).pieces) == 2
    assert quantize(pkg, tmp_path / "q")[0] == 0
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "entry_0.onnx",
        "entry_1.onnx",
        "manifest.json",
    ]
    for edit, needle in (
        (lambda m: m["input"].update(dtype="object"), "not a numpy dtype of a float graph"),
        (lambda m: m["input"].update(dtype="float64"), "the manifest's input is float64"),
        (lambda m: m["entries"][0].update(candidates=[]), "'candidates' is missing or not a finite int"),
    ):
        edit_manifest(pkg, edit)
        with pytest.raises(ValueError, match=needle):
            serve.load(pkg)
        one_line_error(quantize(pkg, tmp_path / "q2"), needle)
        copy_package(packages, "budget", tmp_path / "fresh")
        shutil.copy(tmp_path / "fresh" / "manifest.json", pkg / "manifest.json")
        shutil.rmtree(tmp_path / "fresh")


def test_a_second_quantize_into_the_same_package_is_refused(packages, tmp_path):
    """Two runs into one --out both reported success. The first runs in another process, held in
    its calibration; the second, started then, is refused in one line and writes nothing."""
    out = tmp_path / "int8"
    first = (
        "import sys, time\n"
        "from dynaslice.cli import main\n"
        "from dynaslice.quant import ptq\n"
        "ptq._quantize_graph = lambda *a, **k: time.sleep(600)\n"  # held until killed
        "main(['quantize', sys.argv[1], '--out', sys.argv[2], '--calibration', 'noise', '--images', '2'])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", first, str(packages["budget"]), str(out)], env=env)
    try:
        with deadline(120):
            while not any(p.name.startswith((".int8.", "int8")) for p in tmp_path.iterdir()):
                time.sleep(0.1)  # the first has started writing
        one_line_error(quantize(packages["budget"], out), "in use by pid")
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_of_two_quantize_runs_into_one_new_model_file_the_later_is_refused(packages, tmp_path):
    """Both reported success, the later silently replacing the earlier's file."""
    out, go = tmp_path / "q.onnx", tmp_path / "go"
    first = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dynaslice.cli import main\n"
        "from dynaslice.quant import ptq\n"
        "real = ptq._quantize_graph\n"
        "def held(*a, **k):\n"
        "    print('held', flush=True)\n"
        "    while not Path(sys.argv[3]).exists():\n"
        "        time.sleep(0.05)\n"
        "    return real(*a, **k)\n"
        "ptq._quantize_graph = held\n"
        "sys.exit(main(['quantize', sys.argv[1], '--out', sys.argv[2], '--calibration', 'noise', '--images', '2']))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    model = packages["budget"] / "entry_0.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-c", first, str(model), str(out), str(go)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        assert quantize(model, out)[0] == 0  # the second run finishes first
        written = out.read_bytes()
        go.touch()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "written by another process" in err, err
        assert out.read_bytes() == written
        assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "q.onnx"]
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- overwriting


def test_export_and_quantize_never_delete_a_users_files(packages, tmp_path):
    """A package folder holding a user's files was replaced whole; an existing package or .onnx was
    overwritten without --force; --gated/--budget-table to a name ending in .onnx made a folder of it."""
    pkg = tmp_path / "table"
    assert cli("export", LEGACY / "pss", "--budget-table", "--out", pkg)[0] == 0
    one_line_error(cli("export", LEGACY / "pss", "--budget-table", "--out", pkg), "pass --force")
    assert cli("export", LEGACY / "pss", "--budget-table", "--out", pkg, "--force")[0] == 0
    (pkg / "my_eval_results.json").write_text("{}")
    (pkg / "sub").mkdir()
    before = listing(pkg)
    one_line_error(
        cli("export", LEGACY / "pss", "--budget-table", "--out", pkg, "--force"), "my_eval_results.json, sub"
    )
    assert listing(pkg) == before

    int8 = tmp_path / "table_int8"
    assert quantize(packages["budget"], int8)[0] == 0
    one_line_error(quantize(packages["budget"], int8), "pass --force")
    assert quantize(packages["budget"], int8, "--force")[0] == 0
    (int8 / "notes.txt").write_text("mine")
    one_line_error(quantize(packages["budget"], int8, "--force"), "notes.txt")
    assert (int8 / "notes.txt").read_text() == "mine"

    one_line_error(
        cli("export", LEGACY / "pss", "--budget-table", "--out", tmp_path / "table.onnx"),
        "does not end in .onnx",
    )
    one_line_error(quantize(packages["budget"], tmp_path / "q.onnx"), "does not end in .onnx")
    one_line_error(
        cli("export", LEGACY / "run" / "gate-t0.9", "--gated", "--out", tmp_path / "g.onnx"),
        "does not end in .onnx",
    )
    assert not (tmp_path / "table.onnx").exists() and not (tmp_path / "g.onnx").exists()

    model = tmp_path / "one.onnx"
    assert cli("export", LEGACY / "pss", "--budget-macs", "1G", "--out", model)[0] == 0
    one_line_error(cli("export", LEGACY / "pss", "--budget-macs", "1G", "--out", model), "pass --force")
    assert cli("export", LEGACY / "pss", "--budget-macs", "1G", "--out", model, "--force")[0] == 0


# --------------------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_served_models_refuse_non_finite_inputs_on_every_runtime(packages, runtime):
    """The frozen runtime turned a NaN pixel into finite, confident logits (eager gives NaN)."""
    net = packages["net"]
    models = [
        serve.serve_subnet(net, net.space.largest(), runtime),
        serve.serve_gated(packages["gated_net"], runtime),
    ]
    for bad in (float("nan"), float("inf")):
        x = torch.from_numpy(x_batch())
        x[1, 0, 2, 3] = bad
        for model in models:
            for one in (x, x[1:2], x.numpy()):
                with pytest.raises(ValueError, match="NaN or infinite"):
                    model(one)


def test_fdda_refuses_an_artifact_whose_arch_metadata_lies(tmp_path):
    """The generator was trained against the subnet the metadata named, and the lie copied into int8."""
    kwargs = {"in_chans": 1, "num_classes": 10, "input_size": SIZE}
    net = tiny_net()
    cfg = load_config(None, ["data.name=synthetic", f"data.image_size={SIZE}", "data.val_size=16",
                             "data.synthetic_train=64", "data.synthetic_test=16", "train.threads=1"])  # fmt: skip
    run = tmp_path / "model.safetensors"
    spec = model_spec(net, {**kwargs, "ratios": [0.5, 0.75, 1.0]}, "resnet_small")
    save_model_file(run, prefixed("model", net), {"model": spec, "config": cfg.to_dict()})
    path = export_onnx(net, net.space.uniform(0.5), tmp_path / "half.onnx")
    model = onnx.load(path)
    for p in model.metadata_props:
        if p.key == "dynaslice.arch":
            p.value = net.space.largest().to_json()
    onnx.save(model, path)
    args = ["--out", tmp_path / "q.onnx", "--calibration", "fdda", "--images", "4", "--run", run,
            "--generator-steps", "2", "--work", tmp_path / "gen"]  # fmt: skip
    one_line_error(cli("quantize", path, *args), "does not run the subnet it records")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "gen").exists()


# --------------------------------------------------------------------------- the serving API


def test_served_models_take_numpy_and_numbers_and_refuse_what_they_cannot_run(packages):
    gated, budget = serve.load(packages["gated"]), serve.load(packages["budget"])
    x = x_batch(4)
    want = gated(torch.from_numpy(x)).numpy()
    got = gated(x)
    assert isinstance(got, np.ndarray) and np.allclose(got, want, atol=1e-5)
    logits, routes = gated.forward_with_routes(x[:1])
    assert isinstance(logits, np.ndarray) and isinstance(routes, np.ndarray)
    assert np.allclose(gated(x.astype(np.float64)), want, atol=1e-5)
    assert isinstance(budget(x, max_macs=1e12), np.ndarray)
    with pytest.raises(ValueError, match="float arrays"):
        gated(x.astype(np.int64))
    for bad in ("12M", [1], float("nan"), True):
        with pytest.raises(ValueError, match="max_macs must be a number"):
            budget(x, max_macs=bad)
    runner = GatedOnnxRunner(packages["gated"])
    for avg_macs in (gated.avg_macs, runner.avg_macs):
        with pytest.raises(ValueError, match="outside 0..1|indices 0..1"):
            avg_macs(np.array([-1]))
        with pytest.raises(ValueError, match="outside 0..1|indices 0..1"):
            avg_macs(np.array([2]))
        assert avg_macs(np.array([0, 1])) == pytest.approx(float(np.mean(runner.route_macs)))


# --------------------------------------------------------------------------- fuzz

HOSTILE_VALUES = [
    None, -1, 0, True, 1e308, float("nan"), "", ".", "..", "../payload.onnx", "sub/x.onnx", "x" * 300,
    "trunk.onnx", "route_0.onnx", "entry_0.onnx", "manifest.json", "README.txt", [], {}, [1, 2], "float17",
    {"file": "../payload.onnx"}, [{"file": "../payload.onnx"}], [None, 1, 600000, 600000], [None, 3, 8, 8],
]  # fmt: skip


def _nodes(value, path=()):
    """Every (path, container) of a JSON value, for a mutation to pick from."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        yield path, value
        for i, v in enumerate(value[:4]):
            yield from _nodes(v, (*path, i))


def _mutate(rng: random.Random, case: Path, outside: Path) -> str:
    """One hostile change to the package ``case``: its manifest, its files, links, sizes."""
    members = sorted(
        p.name for p in case.iterdir() if p.suffix == ".onnx" and p.is_file() and not p.is_symlink()
    )
    how = rng.choice(["set", "set", "set", "delete", "nest", "nest", "nest", "many", "link", "link_manifest",
                      "truncate", "garbage", "dir", "fifo", "huge", "extra_link", "extra_link", "swap", "deep"])  # fmt: skip
    path = case / "manifest.json"
    if how in ("set", "delete", "nest", "many", "deep", "link_manifest") and path.is_symlink():
        return "the manifest is a link already"
    if how in ("set", "delete", "nest", "many"):
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, RecursionError):
            return "unparsable manifest left as is"
        nodes = [n for _, n in _nodes(manifest) if isinstance(n, dict) or (how != "nest" and n)]
        node = rng.choice(nodes)
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if how == "many":
            items = "routes" if "routes" in manifest else "entries"
            if isinstance(manifest.get(items), list) and manifest[items]:
                manifest[items] = manifest[items][:1] * rng.choice([MAX_ITEMS + 1, 100_000])
        elif how == "nest":  # the attack: a "file" of no checked field, outside the package
            target = rng.choice([str(outside / "victim.onnx"), "../payload.onnx"])
            node[f"extra{rng.randrange(9)}"] = rng.choice([{"file": target}, [{"file": target}]])
        elif keys and how == "delete":
            del node[rng.choice(keys)]
        elif keys:
            node[rng.choice(keys)] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        path.write_text(json.dumps(manifest))
        return f"{how} in manifest"
    if how == "deep":
        path.unlink()
        path.write_text("[" * 100_000)
        return how
    if how == "link_manifest":  # to a copy outside, or to a FIFO
        copied = outside / f"manifest{rng.randrange(10**6)}.json"
        shutil.copy(path, copied)
        path.unlink()
        path.symlink_to(rng.choice([outside / "trap", copied]))
        return how
    if how == "extra_link":
        (case / f"extra{rng.randrange(10**6)}.txt").symlink_to(outside / "secret.txt")
        return how
    if not members:
        return "no member left"
    member = case / rng.choice(members)
    if how == "swap" and len(members) > 1:
        other = case / rng.choice([m for m in members if m != member.name])
        data = member.read_bytes()
        member.write_bytes(other.read_bytes())
        other.write_bytes(data)
        return how
    data = member.read_bytes()
    member.unlink()
    if how == "link":  # to a valid graph outside (must not be read) or to a FIFO (reading it would hang)
        member.symlink_to(rng.choice([outside / "victim.onnx", outside / "trap", outside / "secret.txt"]))
    elif how == "truncate":
        member.write_bytes(data[: rng.randrange(len(data))])
    elif how == "garbage":
        member.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))))
    elif how == "dir":
        member.mkdir()
    elif how == "fifo":
        os.mkfifo(member)
    else:  # a sparse file larger than any package graph may be: refused before it is read
        with open(member, "wb") as f:
            f.truncate((2 << 30) + 1)
    return f"{how} {member.name}"


def _read_through_link(case: Path) -> bool:
    """Whether the manifest, or a file it names in its checked fields, is a link."""
    path = case / "manifest.json"
    if path.is_symlink():
        return True
    try:
        m = json.loads(path.read_text())
        items = [m.get("trunk"), *(m.get("routes") or []), *(m.get("entries") or [])]
        names = [i.get("file") for i in items if isinstance(i, dict)]
    except Exception:
        return False
    return any(isinstance(n, str) and "/" not in n and n and (case / n).is_symlink() for n in names)


FUZZ_CASES = int(os.environ.get("DYNASLICE_FUZZ_CASES", "30"))  # more: DYNASLICE_FUZZ_CASES=300
FUZZ_SEED = int(os.environ.get("DYNASLICE_FUZZ_SEED", "34"))


def test_package_manifest_fuzz(packages, tmp_path):
    """Seeded hostile packages (manifest keys and values, nested files, links, FIFOs, sizes, swapped
    and truncated graphs): ``quantize`` exits 0 or 2 with one line, ``serve.load`` and the runners
    load or raise ValueError/OSError, within the deadline; nothing outside the package folder is
    read through a link, written or created; an accepted package gives a complete int8 package."""
    outside, sandbox = tmp_path / "outside", tmp_path / "sandbox"
    outside.mkdir()
    sandbox.mkdir()
    shutil.copy(packages["budget"] / "entry_0.onnx", outside / "victim.onnx")
    (outside / "secret.txt").write_text("the secret")
    os.mkfifo(outside / "trap")
    rng = random.Random(FUZZ_SEED)
    outcomes = {0: 0, 2: 0}
    for i in range(FUZZ_CASES):
        kind = rng.choice(["gated", "budget"])
        case = copy_package(packages, kind, sandbox / f"case{i}")
        what = [_mutate(rng, case, outside) for _ in range(rng.choice([1, 1, 2, 3]))]
        before = {p.name: (p.read_bytes() if p.is_file() else None) for p in outside.iterdir()}
        linked = _read_through_link(case)
        out = sandbox / f"out{i}"
        rc, _, err = quantize(case, out)
        assert rc in (0, 2), (what, err)
        outcomes[rc] += 1
        if rc == 2:
            one_line_error((rc, "", err))
            assert not out.exists(), (what, err)
        else:
            assert not linked, ("read through a link", what)
            manifest = read_manifest(out)
            runner = GatedOnnxRunner if "routes" in manifest else BudgetOnnxRunner
            runner(out)(x_batch(2))
            assert all(p.is_file() and not p.is_symlink() for p in out.iterdir()), what
            assert all(b"the secret" not in p.read_bytes() for p in out.iterdir()), what
        for load in (serve.load, GatedOnnxRunner, BudgetOnnxRunner):
            try:
                with deadline(10):
                    load(case)
            except (ValueError, OSError):
                continue
            assert not linked, ("read through a link", what, load)
        assert {p.name: (p.read_bytes() if p.is_file() else None) for p in outside.iterdir()} == before, what
        assert sorted(p.name for p in sandbox.iterdir()) == sorted(
            [f"case{j}" for j in range(i + 1)]
            + [f"out{j}" for j in range(i + 1) if (sandbox / f"out{j}").exists()]
        ), what
        assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "sandbox"], what
    assert outcomes[2] > outcomes[0] > 0, outcomes  # the generator reaches both outcomes
