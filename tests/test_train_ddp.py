"""Two CPU processes under torchrun (gloo): same subnets per step, disjoint data, identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from dynaslice.train import load_model_file

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
from pathlib import Path
import torch
from dynaslice.train import SupernetTrainer, load_config, save_model_file

cfg = load_config(sys.argv[1])
out = Path(sys.argv[2])
trainer = SupernetTrainer(cfg, out / "run")
rank = trainer.env.rank
record = {"world_size": trainer.env.world_size, "archs": [], "labels": [], "shard": {}}

draw = trainer.sampler.sample
def sample(step):
    archs = draw(step)
    record["archs"].append([a.to_dict() for a in archs])
    return archs
trainer.sampler.sample = sample

batches = trainer.train_loader.epoch_batches
def epoch_batches(epoch, start=0):
    record["shard"][epoch] = trainer.train_loader.indices(epoch).tolist()
    for x, y in batches(epoch, start):
        record["labels"].append(y.tolist())
        yield x, y
trainer.train_loader.epoch_batches = epoch_batches

initial = {k: v.clone() for k, v in trainer.net.named_parameters()}
trainer.fit()
params = {f"model.{k}": v for k, v in trainer.net.named_parameters()}
params.update({f"init.{k}": v for k, v in initial.items()})
params.update({f"ema.{k}": v for k, v in trainer.ema.module.named_parameters()})
save_model_file(out / f"rank{rank}.safetensors", params, {})
(out / f"rank{rank}.json").write_text(json.dumps(record))
"""


def test_two_process_ddp_agrees_on_archs_shards_data_and_ends_identical(tmp_path):
    cfg = {
        "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
        "data": {
            "name": "synthetic",
            "image_size": 8,
            "batch_size": 8,
            "val_size": 16,
            "synthetic_train": 80,
        },
        "optim": {"lr": 0.05},
        "train": {
            "epochs": 2,
            "threads": 1,
            "target": "ieb",
            "eval_every_epochs": 0,
            "eval_widths": [1.0],
            "recal_images": 16,
            "recal_batch_size": 16,
            "ema_half_life_epochs": 0.5,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(tmp_path / "worker.py"),
        str(tmp_path / "cfg.yaml"),
        str(tmp_path),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]

    rec = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rec[0]["world_size"] == rec[1]["world_size"] == 2
    # 64 training images, 2 ranks, batch 8: 4 steps per epoch, 8 steps
    assert len(rec[0]["archs"]) == 8 and rec[0]["archs"] == rec[1]["archs"]
    assert len({json.dumps(a[2:]) for a in rec[0]["archs"]}) > 1  # random subnets vary by step
    for epoch in ("0", "1"):
        s0, s1 = set(rec[0]["shard"][epoch]), set(rec[1]["shard"][epoch])
        assert len(s0) == len(s1) == 32 and not s0 & s1  # disjoint halves of the 64 images
    assert rec[0]["shard"]["0"] != rec[0]["shard"]["1"]  # reshuffled each epoch
    assert rec[0]["labels"] != rec[1]["labels"]  # so the ranks really trained on different data

    w0 = load_model_file(tmp_path / "rank0.safetensors")[0]
    w1 = load_model_file(tmp_path / "rank1.safetensors")[0]
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # gradients were all-reduced: identical weights
    moved = [k for k in w0 if k.startswith("model.") and not torch.equal(w0[k], w0["init." + k[6:]])]
    assert len(moved) > 10  # and they trained
    # rank 0 alone wrote the checkpoints
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
