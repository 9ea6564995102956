"""Stage-I cost: one sandwich step vs the same subnets' standalone training steps.

A sandwich step runs n subnets forward+backward and then one optimizer step; the question is
whether weight sharing costs anything beyond the subnets' own work. We time, interleaved round
by round (so load bursts on a shared machine hit every candidate alike), on the same batch:

- the sandwich step of the real training loop (``SupernetTrainer.train_step``) with fixed subnets
  (largest, smallest, two random ones drawn once), per target (labels, in-place, IB);
- each of those subnets trained alone as an *extracted* ordinary network (``extract_subnet``:
  plain ``nn.Conv2d``..., its own SGD), forward + backward + step.

ratio = median(sandwich step) / sum of medians(standalone steps). Goal: <= 1.1 for the
``labels``/``inplace`` targets (IB additionally runs the EMA teacher's forward and update, which
no standalone network does; its ratio is reported for information).

    python bench/bench_stage1_cost.py            # batch 128, 28x28, 20 rounds
    python bench/bench_stage1_cost.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import output_args, set_threads, write_results

from dynaslice.counting import count_macs
from dynaslice.torch_export import extract_subnet
from dynaslice.train import FixedSampler, SandwichSampler, SupernetTrainer, load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=28, help="image side (Fashion-MNIST: 28)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    output_args(ap, out="bench/out/stage1_cost.json")
    ap.add_argument("--targets", nargs="+", default=["labels", "inplace", "ib"])
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.size, args.rounds, args.warmup = 16, 16, 3, 1
    set_threads(args.threads)

    sets = [
        "data.name=synthetic",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        "data.val_size=0",
        f"data.synthetic_train={args.batch_size * 2}",
        "train.epochs=1000",
        "optim.weight_decay=5e-5",
    ]
    tmp = tempfile.mkdtemp(prefix="bench_cost_")
    trainers = {t: SupernetTrainer(load_config(None, sets + [f"train.target={t}"]), tmp) for t in args.targets}
    first = next(iter(trainers.values()))
    net, space = first.net, first.space
    archs = SandwichSampler(space, 4, seed=0).sample(0)
    for tr in trainers.values():
        tr.sampler = FixedSampler(*archs)
    x, y = next(first.train_loader.epoch_batches(0))

    def standalone(arch):
        model = extract_subnet(net, arch).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5)

        def step():
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {f"sandwich[{t}]": (lambda tr=tr: tr.train_step(x, y)) for t, tr in trainers.items()}
    fns.update({f"alone[{i}]": standalone(a) for i, a in enumerate(archs)})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.warmup + args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    alone = sum(med[f"alone[{i}]"] for i in range(len(archs)))
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "input": [1, args.size, args.size],
        "rounds": args.rounds,
        "archs": [a.to_dict() for a in archs],
        "mmacs": [count_macs(net, a) / 1e6 for a in archs],
        "median_s": med,
        "standalone_sum_s": alone,
        "ratio": {t: med[f"sandwich[{t}]"] / alone for t in args.targets},
        "goal": "ratio <= 1.1 for labels/inplace",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, result)
    print("| step | median ms | ratio to standalone sum |\n| --- | ---: | ---: |")
    for i in range(len(archs)):
        print(f"| alone[{i}] ({result['mmacs'][i]:.1f} MMACs) | {1e3 * med[f'alone[{i}]']:.1f} | |")
    print(f"| sum of standalone | {1e3 * alone:.1f} | 1.00 |")
    for t in args.targets:
        print(f"| sandwich[{t}] | {1e3 * med[f'sandwich[{t}]']:.1f} | {result['ratio'][t]:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
