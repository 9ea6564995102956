"""Small subcommands that drive the library end to end (``dynaslice demo``)."""

from __future__ import annotations

import argparse
import time

import torch

from .data import EvalTransform, load_dataset
from .export import extract_subnet
from .models import create_supernet
from .profile import count_macs, count_params


def demo(args: argparse.Namespace) -> int:
    """Load Fashion-MNIST, build a supernet, and show its subnets as real, exact, smaller models.

    (Until the training pipeline lands this is the smallest real end-to-end job: every subnet is
    run sliced inside the supernet and as its extracted plain-PyTorch model, on real images.)
    """
    data = load_dataset("fashion_mnist", args.data_dir, split="test")
    x = EvalTransform(data.mean, data.std)(data.images[: args.batch_size])
    net = create_supernet("resnet_small", in_chans=1, input_size=28, num_classes=10).eval()
    print(f"Fashion-MNIST test images: {len(data)}; supernet resnet_small, {len(net.space)} subnets")
    print(f"{'width':>6} {'MMACs':>8} {'params':>8} {'max|diff|':>10} {'ms sliced':>10} {'ms static':>10}")
    for ratio in (0.25, 0.5, 0.75, 1.0):
        arch = net.space.uniform(ratio)
        static = extract_subnet(net, arch).eval()
        with torch.inference_mode():
            diff = (net(x, arch) - static(x)).abs().max().item()
            t0 = time.perf_counter()
            net(x, arch)
            t1 = time.perf_counter()
            static(x)
            t2 = time.perf_counter()
        print(
            f"{ratio:>6} {count_macs(net, arch) / 1e6:>8.2f} {count_params(net, arch):>8} {diff:>10.1e} "
            f"{1e3 * (t1 - t0):>10.1f} {1e3 * (t2 - t1):>10.1f}"
        )
    return 0


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the quick end-to-end job on Fashion-MNIST")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=demo)
