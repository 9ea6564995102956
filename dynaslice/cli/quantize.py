"""``dynaslice quantize ARTIFACT --out OUT --calibration real|fdda|gdfq|noise``: int8 post-training
quantization of an exported subnet ``.onnx``, gated package or budget-table package.

The int8 artifact (onnxruntime static QDQ: per-channel symmetric int8 weights, uint8
activations; see :func:`dynaslice.quant.quantize_artifact`) loads with the same runner as its
float original and records its settings, calibration source and exact MACs per bit width.

Calibration images (``--images N``, default 256):

- ``real``: N images of the training split of the dataset the run trained on;
- ``fdda`` / ``gdfq``: N images of a conditional generator trained against the run's
  full-precision network at the artifact's widest subnet (FDDA: from one real image per class;
  GDFQ: the global BN-statistics loss only) for ``--generator-steps``, in ``--work DIR``
  (checkpointed every 100 steps and resumed if interrupted; default: a temporary directory);
- ``noise``: N standard-normal images (a baseline; needs no run).

``--run`` (a run directory, checkpoint or model file, whose config names the dataset) is needed
for ``real``, ``fdda`` and ``gdfq``; with it the command also prints float vs int8 top-1 on the
test split. The data is read from ``--data-dir`` or the dataset's standard place, never from a
path stored in the model file. With ``fdda``/``gdfq`` the artifact's graphs must hold the weights
of the subnet it records, extracted from ``--run`` (:func:`dynaslice.quant.check_subnet`).

An existing ``--out`` is refused unless ``--force``; with it, a file is replaced, and a folder
only when it holds a dynaslice package and nothing else. A package is written under its
``--out``'s lock: a second ``quantize`` into the same package at the same time is refused; a
model file is created only if still absent (without ``--force``), so of two runs into one new
file the one that finishes second is refused. Of a
package only the manifest and the graphs it names are read (no links, size-capped; see
:func:`dynaslice.onnx_package.package_file`) and written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..counting import count_macs
from ..data import EvalTransform, InMemoryDataset
from ..quant import (
    FDDAConfig,
    NoiseImages,
    RealImages,
    artifact_archs,
    artifact_input_shape,
    artifact_kind,
    calibration_images,
    calibration_source,
    check_calibration_size,
    check_subnet,
    compare_artifacts,
    quantize_artifact,
)
from ..torch_export import extract_subnet
from ..train.data import load_split
from .common import (
    UserError,
    load_run_model,
    positive_int,
    refuse_existing,
    refuse_existing_package,
    trusted_data,
)


def _datasets(run: str, data_dir: str | None) -> tuple[Any, InMemoryDataset, InMemoryDataset]:
    """``(net, train split, test split)`` of the run (split as the run split it: its own seed); the
    data from ``data_dir`` or its standard place."""
    net, _, cfg, _ = load_run_model(run)
    cfg = trusted_data(cfg, data_dir)
    return net, load_split(cfg.data, "train", cfg.train.seed), load_split(cfg.data, "test", cfg.train.seed)


def _source(args: argparse.Namespace, artifact: Path, shape: list[int], run: tuple | None):
    if args.calibration == "noise":
        return NoiseImages(tuple(shape))
    if run is None:
        raise UserError(
            f"--calibration {args.calibration} needs --run: the run directory or model file the artifact "
            "was exported from (its config names the dataset)"
        )
    net, train, _ = run
    if args.calibration == "real":
        return RealImages.from_dataset(train, args.images, args.seed)
    archs = artifact_archs(artifact)
    widest = max(range(len(archs)), key=lambda i: _macs(net, archs[i]))
    teacher = extract_subnet(net.eval(), archs[widest]).eval()
    check_subnet(artifact, widest, teacher)  # the generator learns from this network: the artifact's own
    fdda = FDDAConfig(epochs=1, steps_per_epoch=args.generator_steps)
    return calibration_source(args.calibration, train, teacher, seed=args.seed, fdda=fdda, run_dir=args.work)


def _macs(net: Any, arch: dict[str, int]) -> int:
    return count_macs(net, net.space.validate(arch))


def _report(result: dict[str, Any]) -> list[str]:
    """Float vs int8 top-1 lines of :func:`compare_artifacts`'s result."""
    f, q = result["float"], result["int8"]
    if "entry_top1" in f:
        return [
            f"entry {i}: float top-1 {a:.2f}%, int8 {b:.2f}% (drop {a - b:+.2f} points)"
            for i, (a, b) in enumerate(zip(f["entry_top1"], q["entry_top1"], strict=True))
        ]
    lines = [
        f"float top-1 {f['top1']:.2f}%, int8 {q['top1']:.2f}% "
        f"(drop {result['drop']:+.2f} points, same class for {result['agreement']:.2f}% of images)"
    ]
    for i, (a, b) in enumerate(zip(f.get("route_top1", []), q.get("route_top1", []), strict=True)):
        lines.append(f"route {i} (all images): float top-1 {a:.2f}%, int8 {b:.2f}%")
    return lines


def _quantize(args: argparse.Namespace) -> int:
    artifact, out = Path(args.artifact), Path(args.out)
    kind = artifact_kind(artifact)
    if kind == "package":
        refuse_existing_package(out, "int8 package", args.force)
    else:
        refuse_existing(out, "int8 model", args.force)
    shape = artifact_input_shape(artifact)
    check_calibration_size(args.images, shape)  # before any image of that size is made
    run = _datasets(args.run, args.data_dir) if args.run else None
    if run is not None and list(run[1].images.shape[1:]) != shape:
        raise UserError(
            f"{artifact} takes images of shape {shape}, the run's dataset has {list(run[1].images.shape[1:])}: "
            "pass the run the artifact was exported from"
        )
    source = _source(args, artifact, shape, run)
    images = calibration_images(source, args.images, args.seed)
    try:
        quantize_artifact(artifact, out, images, source.describe(), replace=args.force)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    what = "package" if kind == "package" else "model"
    print(f"wrote the int8 {what} {out} (calibrated on {len(images)} {args.calibration} images)")
    if run is None:
        print("note: no --run given, so no dataset to report accuracy on", file=sys.stderr)
        return 0
    test = run[2]
    x = EvalTransform(test.mean, test.std)(test.images).numpy().astype(np.float32)
    for line in _report(compare_artifacts(artifact, out, x, test.labels.numpy())):
        print(f"{line} on {len(test)} test images")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="int8 post-training quantization of an exported ONNX model or package",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="a subnet .onnx, a gated package or a budget-table package")
    p.add_argument("--out", required=True, metavar="OUT", help="the int8 artifact (a file or a package directory)")
    p.add_argument("--calibration", required=True, choices=("real", "fdda", "gdfq", "noise"),
                   help="where the calibration images come from")  # fmt: skip
    p.add_argument("--images", type=positive_int, default=256, metavar="N", help="calibration images (default 256)")
    p.add_argument("--run", default=None, metavar="RUN", help="run directory or model file the artifact came from")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the run's dataset is (default: its standard place)")
    p.add_argument("--seed", type=int, default=0, help="which real images / generator seed (default 0)")
    steps = FDDAConfig().steps
    p.add_argument("--generator-steps", type=positive_int, default=steps, metavar="N",
                   help=f"fdda/gdfq: generator training steps (default {steps})")  # fmt: skip
    p.add_argument("--work", default=None, metavar="DIR", help="fdda/gdfq: the generator's run directory (resumable)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (a file, or a folder holding a dynaslice package and nothing else)")  # fmt: skip
    p.set_defaults(func=_quantize)
