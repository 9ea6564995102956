"""``dynaslice run CONFIG``: the main job, from a YAML config to a report, in one run directory.

Steps (each reuses the library's own function for it; nothing here trains or evaluates by itself):

1. ``stage1``     gated supernet training (:func:`dynaslice.train.train`) into ``RUN/stage1``;
                  it also writes ``stage1/recalibrated.safetensors`` (BN for the uniform widths);
2. ``recalibrate`` BN statistics for the gate's routes -> ``RUN/routes-recalibrated.safetensors``;
3. ``gate-tX``    Stage II (:func:`~dynaslice.train.stage2.train_gate`) once per target in
                  ``run.gate_targets`` -> ``RUN/gate-tX``;
4. ``eval``       test split: the supernet's uniform subnets (static subnets of the supernet) and
                  each gated model (accuracy, average MACs, routes per class, each route as a
                  static subnet) -> ``RUN/eval/*.json``;
5. ``export``     the best gated model (highest *validation* accuracy; the test split never
                  chooses) as an ONNX package (:func:`~dynaslice.onnx_export.export_gated`), the
                  widest and narrowest routes as plain PyTorch (``.pt``) and ONNX -> ``RUN/export``;
6. ``latency``    latency per image of the routes, the uniform subnets and the gated models on this
                  machine at batch 1 and ``run.latency_batch``, every model timed the same way
                  (:func:`~dynaslice.latency.measure_latency`) -> ``RUN/latency.json``;
7. ``report``     ``RUN/report.md`` with plots, and ``RUN/report.json`` (:mod:`dynaslice.report`).

A step is finished when its marker ``RUN/done/<step>.json`` exists (written last, atomically); a
re-run skips finished steps. An interrupted Stage I resumes from its latest checkpoint; an
interrupted Stage II (minutes) starts that target over. ``RUN/pipeline.yaml`` records the
resolved settings: re-running a run directory with different settings is refused, since the
finished steps would silently mix two experiments.

The YAML file is an ordinary training config (:class:`~dynaslice.train.config.Config`) plus an
optional ``run:`` section (:class:`RunConfig`) for the pipeline's own settings; ``--set run.X=...``
overrides those like any other key.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import runs, safejson
from .archspec import uniform_archs
from .atomic import atomic_write_bytes, atomic_write_json
from .config_base import ConfigError
from .counting import count_macs
from .data import InMemoryDataset
from .dynamic import DynamicNet
from .latency import measure_latency
from .modelfile import load_supernet, prefixed, resolve_model_file, save_model_file
from .onnx_export import export_gated, export_onnx
from .progress import Progress, heartbeat
from .report import write_report
from .serve import resolve_runtime, serve_gated, serve_subnet
from .torch_export import extract_subnet, save_torch_model
from .train import evaluate, evaluate_gated, train, train_gate
from .train.config import Config, flatten, from_dict, load_config_with_section, read_config_file
from .train.data import eval_loader, load_split
from .train.stage2 import recalibrate_routes
from .train.stage2_settings import Stage2Config


@dataclass
class RunConfig:
    """The pipeline's own settings (the ``run:`` section of the YAML file).

    ``gate_targets``: Stage-II MAC targets, fractions (<= 1) of the widest route or MACs.
    ``test_images``: evaluate on the first N test images (0: all). ``latency_repeats``: interleaved
    rounds per model for the latency plot; ``latency_images``: test images every model runs one
    at a time in each round, for its batch-1 latency (a gated model's cost depends on the input;
    the static ones run the same calls, so rows compare); ``latency_batch``: the large batch size
    timed next to batch 1. ``export``: write the
    ONNX package and the plain PyTorch routes.
    """

    gate_targets: list[float] = field(default_factory=lambda: [0.5, 0.8])
    test_images: int = 0
    latency_repeats: int = 10
    latency_images: int = 16
    latency_batch: int = 64
    export: bool = True


# --------------------------------------------------------------------------- config


def load_run_config(path: str | Path, overrides: list[str]) -> tuple[Config, RunConfig]:
    """The training config and the ``run`` section of ``path``, both with ``--set`` overrides applied."""
    cfg, run = load_config_with_section(path, overrides, "run", RunConfig)
    if not cfg.model.gate.enabled:
        raise ConfigError("dynaslice run trains a gated supernet: set model.gate.enabled: true in the config")
    if cfg.train.static_widths:
        raise ConfigError(
            "train.static_widths trains static networks instead of a supernet; leave it empty here"
        )
    if cfg.data.name == "folder":
        raise ConfigError("dynaslice run needs an in-memory dataset (fashion_mnist, cifar10/100, synthetic)")
    if not run.gate_targets or any(not (0 < t <= 1 or t >= 1000) for t in run.gate_targets):
        raise ConfigError(f"run.gate_targets must be a non-empty list of fractions in (0, 1] or MACs, got {run.gate_targets}")
    if run.test_images < 0 or min(run.latency_repeats, run.latency_images, run.latency_batch) < 1:
        raise ConfigError(
            "run.test_images must be >= 0, run.latency_repeats, run.latency_images and run.latency_batch >= 1"
        )
    return cfg, run


def stage1_config(cfg: Config) -> Config:
    """Stage I's config: Stage-II knobs at their defaults, so changing them never blocks a resume."""
    return dataclasses.replace(cfg, stage2=Stage2Config())


# --------------------------------------------------------------------------- helpers


def read_json(path: Path) -> Any:
    return safejson.loads(path.read_text())


DERIVED = ("eval", "export", "latency", "report")  # steps whose output depends on the run: section


def check_settings(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    """Record the settings in ``RUN/pipeline.yaml``; refuse a run directory trained with others.

    A different training config (model, data, Stage I or Stage II recipe) is refused once anything
    was trained (a finished step, a Stage-I checkpoint): finished steps would mix two experiments.
    Before that (e.g. a config error found when Stage I started) the new settings replace the old. A different ``run:`` section (e.g. one more gate target) is
    fine: new targets get trained, and the evaluation, export, latency and report steps run again.
    """
    settings = {"config": cfg.to_dict(), "run": dataclasses.asdict(run)}
    path = run_dir / runs.PIPELINE
    if not path.is_file() and any((run_dir / runs.DONE).glob("*.json")):
        raise ConfigError(
            f"{run_dir} has finished steps but no {runs.PIPELINE}: the settings they ran with are "
            "unknown; use another --out directory (or restore the file)"
        )
    if path.is_file():
        old = read_config_file(path)  # a damaged file: one line naming it
        # resolve through today's defaults, as Stage I's resume does
        a, b = flatten(from_dict(old.get("config", {})).to_dict()), flatten(settings["config"])
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff and (any((run_dir / runs.DONE).glob("*.json")) or runs.checkpoint_steps(run_dir / runs.STAGE1)):
            raise ConfigError(
                f"{run_dir} was trained with other settings ({', '.join(diff[:4])}); "
                "use another --out directory, or the same config and --set options"
            )
        old_run = dataclasses.asdict(from_dict(old.get("run") or {}, RunConfig, "run."))  # today's defaults
        if not diff and old_run == settings["run"]:
            return
        if old.get("run") != settings["run"]:  # (a changed config reaches here only before any training)
            print("the run: settings changed: evaluation, export, latency and report will run again", flush=True)
            for name in DERIVED:
                runs.done_marker(run_dir, name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(settings, sort_keys=False).encode())


_LOADED: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def _own_model(cfg: Config) -> tuple[str]:
    """The model names a run's steps trust to rebuild its nets: the one its config names (the user
    chose it; a ``package.module:factory`` is then imported, as ``dynaslice train`` does). A file in
    the run naming any other is refused, as everywhere (:func:`dynaslice.modelfile.build_model`)."""
    return (cfg.model.name,)


def _read_only(path: Path, cfg: Config) -> tuple[Any, dict[str, Any]]:
    """``load_supernet(path)``, once per file and process, for steps that only read the model.

    Building a gated net derives its MAC model (a few seconds per instance), so the evaluation,
    export and latency steps of one run share their nets instead of rebuilding each.
    """
    file = resolve_model_file(path)
    key = (str(file.resolve()), file.stat().st_mtime_ns)
    if key not in _LOADED:
        net, meta = load_supernet(file, trust=_own_model(cfg))
        _LOADED[key] = (net.eval(), meta)
    return _LOADED[key]


def test_split(cfg: Config, images: int = 0) -> InMemoryDataset:
    """The test split a config names, its first ``images`` images (0: all of it): what the
    evaluation and latency steps report on, and the benchmarks too (bench/common.py)."""
    test = load_split(cfg.data, "test", cfg.train.seed)
    if images and images < len(test):
        test = test.subset(range(images))
    return test


# --------------------------------------------------------------------------- the steps


def step_stage1(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    train(stage1_config(cfg), run_dir / runs.STAGE1, resume=True)


def step_recalibrate(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    net, meta = load_supernet(run_dir / runs.STAGE1, trust=_own_model(cfg))
    recalibrate_routes(net, from_dict(meta["config"]))
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    meta["recalibrated"] = {k: a.to_dict() for k, a in net.named_routes().items()}
    save_model_file(run_dir / runs.ROUTES_RECALIBRATED, prefixed("model", net), meta)


def step_gate(target: float) -> Callable[[Path, Config, RunConfig], None]:
    def run_gate(run_dir: Path, cfg: Config, run: RunConfig) -> None:
        net, meta = load_supernet(run_dir / runs.ROUTES_RECALIBRATED, trust=_own_model(cfg))
        cfg2 = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, target_macs=target))
        # an interrupted Stage II resumes from its latest checkpoint, like Stage I
        train_gate(net, cfg2, run_dir / runs.gate_name(target), meta, recalibrate=False, resume=True)

    return run_gate


def step_eval(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    test = test_split(cfg, run.test_images)
    # the supernet's uniform subnets, with the BN statistics Stage I recalibrated for them
    net, _ = _read_only(run_dir / runs.STAGE1 / runs.RECALIBRATED, cfg)
    rows = evaluate(net, uniform_archs(net, cfg.train.eval_widths), eval_loader(test), net.input_size,
                    desc="eval: uniform subnets")  # fmt: skip
    atomic_write_json(run_dir / runs.EVAL / "supernet.json", {"split": "test", "images": len(test), "rows": rows})
    for target in run.gate_targets:
        gated, _ = _read_only(run_dir / runs.gate_name(target), cfg)
        result = evaluate_gated(gated, eval_loader(test), test.num_classes, gated.input_size,
                                desc=f"eval: {runs.gate_name(target)}")  # fmt: skip
        val = read_json(run_dir / runs.gate_name(target) / runs.FINAL_EVAL)
        result = {
            "target": target,
            "cut": gated.cut_spec,  # a stage number, or a converted network's module path
            "val_accuracy": val.get("accuracy"),
            "split": "test",
            **result,
        }
        atomic_write_json(run_dir / runs.EVAL / f"{runs.gate_name(target)}.json", result)
        print(
            f"{runs.gate_name(target)}: test top-1 {result['accuracy']:.2f}% at {result['avg_macs'] / 1e6:.2f} MMACs, "
            f"routes {result['histogram']}",
            flush=True,
        )


def best_target(run_dir: Path, run: RunConfig) -> float:
    """The gate target whose model has the highest validation accuracy (ties: fewer MACs).

    Validation, not test: the test split only reports. Without a validation split (``data.val_size``
    0) the last target is taken.
    """
    scored = []
    for target in run.gate_targets:
        val = read_json(run_dir / runs.gate_name(target) / runs.FINAL_EVAL)
        if val:
            scored.append((val["accuracy"], -val["avg_macs"], target))
    return max(scored)[2] if scored else run.gate_targets[-1]


def step_export(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    out = run_dir / runs.EXPORT
    out.mkdir(parents=True, exist_ok=True)
    target = best_target(run_dir, run)
    gated, _ = _read_only(run_dir / runs.gate_name(target), cfg)
    test = test_split(cfg, 1)
    bar = Progress(3, "export", unit="model")  # an ONNX export takes seconds
    export_gated(gated.eval(), out / "gated", mean=test.mean, std=test.std)
    bar.update()
    routes, _ = _read_only(run_dir / runs.ROUTES_RECALIBRATED, cfg)
    files = {"gated": {"dir": "gated", "target": target, "stage2_run": runs.gate_name(target)}}
    for name, arch in (("largest", routes.routes[-1]), ("smallest", routes.routes[0])):
        save_torch_model(extract_subnet(routes, arch).eval(), out / f"{name}.pt")
        export_onnx(routes, arch, out / f"{name}.onnx")
        files[name] = {"torch": f"{name}.pt", "onnx": f"{name}.onnx", "arch": arch.to_dict()}
        bar.update()
    bar.close()
    files["normalisation"] = {"mean": list(test.mean), "std": list(test.std)}
    atomic_write_json(out / "exports.json", files)


def step_latency(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    """Milliseconds per image on this machine, in eager PyTorch and in the deployment runtime
    (:func:`dynaslice.serve.resolve_runtime` ``auto``), at batch 1 and ``run.latency_batch``.

    Every model is timed the same way, so rows compare: in each of ``run.latency_repeats``
    interleaved rounds it runs the same ``run.latency_images`` test images one at a time (batch 1:
    a gated model's cost depends on the image, and a static one's is timed on the same calls) and
    one batch of ``run.latency_batch``; a row's ``ms`` is the median over rounds of the round's
    time per image, and ``ms_all`` keeps every round's, from which the report shows the spread
    (:func:`dynaslice.report.spread`). Once the same statistic was not used for every row: a gated
    model (the mean of 16 consecutive calls) looked faster than its own narrowest route (the
    median of single calls) that it runs plus a gate.
    """
    deploy = resolve_runtime("auto")
    runtimes = list(dict.fromkeys(["eager", deploy]))
    test = test_split(cfg, max(run.latency_images, run.latency_batch))
    x, _ = next(iter(eval_loader(test, len(test))))
    images, batch = x[: run.latency_images], x[: run.latency_batch]
    per_call = {1: len(images), run.latency_batch: len(batch)}  # images per timed call
    models, macs, kinds = _latency_models(run_dir, cfg, run, runtimes, images)
    fns: dict[str, Callable[[], object]] = {}
    for (name, rt), model in models.items():
        fns[f"{name}|{rt}|1"] = lambda m=model: [m(images[i : i + 1]) for i in range(len(images))]
        fns[f"{name}|{rt}|{run.latency_batch}"] = lambda m=model: m(batch)
    with torch.inference_mode():
        times = measure_latency(fns, repeats=run.latency_repeats, warmup=2, desc="latency")
    rows = []
    for key, ts in times.items():
        name, rt, b = key.split("|")
        ms = [1e3 * t / per_call[int(b)] for t in ts]
        rows.append({"name": name, "kind": kinds[name], "runtime": rt, "batch": int(b), "macs": float(macs[name]),
                     "ms": statistics.median(ms), "ms_all": ms})  # fmt: skip
    atomic_write_json(run_dir / runs.LATENCY, {
        "batch_sizes": sorted(per_call), "runtimes": runtimes, "deployment": deploy,
        "threads": torch.get_num_threads(), "repeats": run.latency_repeats, "images": len(images),
        "rows": rows,
    })  # fmt: skip


def _latency_models(
    run_dir: Path, cfg: Config, run: RunConfig, runtimes: list[str], images: torch.Tensor
) -> tuple[dict[tuple[str, str], Any], dict[str, float], dict[str, str]]:
    """Every timed model on every runtime, with its MACs per image and kind (built with progress:
    an ONNX export per model takes seconds)."""
    models: dict[tuple[str, str], Any] = {}
    macs: dict[str, float] = {}
    kinds: dict[str, str] = {}
    sup, _ = _read_only(run_dir / runs.STAGE1 / runs.RECALIBRATED, cfg)
    routes, _ = _read_only(run_dir / runs.ROUTES_RECALIBRATED, cfg)
    subnets = [(n, a, sup, "uniform") for n, a in uniform_archs(sup, cfg.train.eval_widths).items()]
    subnets += [(n, a, routes, "route") for n, a in routes.named_routes().items()]
    bar = Progress((len(subnets) + len(run.gate_targets)) * len(runtimes), "latency: preparing", unit="model")
    for name, arch, net, kind in subnets:
        for rt in runtimes:
            models[name, rt] = serve_subnet(net, arch, rt)
            bar.update()
        macs[name], kinds[name] = count_macs(net, arch), kind
    for target in run.gate_targets:
        gated, _ = _read_only(run_dir / runs.gate_name(target), cfg)
        name = runs.gate_name(target)
        for rt in runtimes:
            models[name, rt] = serve_gated(gated, rt)
            bar.update()
        with torch.no_grad():
            macs[name], kinds[name] = DynamicNet(gated).avg_macs(DynamicNet(gated).route(images)), "gated"
    bar.close()
    return models, macs, kinds


def step_report(run_dir: Path, cfg: Config, run: RunConfig) -> None:
    write_report(run_dir)


def steps(run: RunConfig) -> list[tuple[str, Callable[[Path, Config, RunConfig], None]]]:
    out: list[tuple[str, Callable[[Path, Config, RunConfig], None]]] = [
        ("stage1", step_stage1),
        ("recalibrate", step_recalibrate),
    ]
    out += [(runs.gate_name(t), step_gate(t)) for t in run.gate_targets]
    out += [("eval", step_eval)]
    if run.export:
        out += [("export", step_export)]
    out += [("latency", step_latency), ("report", step_report)]
    return out


def run_pipeline(cfg: Config, run: RunConfig, run_dir: str | Path, until: str | None = None) -> Path:
    """Run the unfinished steps into ``run_dir`` (``until``: stop after that step); returns report.md's path."""
    run_dir = Path(run_dir)
    names = [name for name, _ in steps(run)]
    if until is not None and until not in names:
        raise ConfigError(f"--until {until!r} is not a step of this run: {', '.join(names)}")
    test_split(cfg, 1)  # a missing dataset fails here, before anything is written
    with runs.exclusive(run_dir):
        check_settings(run_dir, cfg, run)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _run_steps(run_dir, cfg, run, until)
    return run_dir / "report.md"


def _run_steps(run_dir: Path, cfg: Config, run: RunConfig, until: str | None) -> None:
    for name, fn in steps(run):
        marker = runs.done_marker(run_dir, name)
        if marker.is_file():
            print(f"[{name}] done already, skipped", flush=True)
        else:
            print(f"[{name}] running", flush=True)
            t0 = time.perf_counter()
            with heartbeat(f"[{name}]"):  # a step of several short parts is not silent in a log
                fn(run_dir, cfg, run)
            secs = time.perf_counter() - t0
            atomic_write_json(marker, {"step": name, "seconds": secs, "finished": time.time()})
            print(f"[{name}] finished in {secs:.1f} s", flush=True)
        if name == until:
            break
