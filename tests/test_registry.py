"""Methods plug in one way: a pruning method, a sampler or a target is one registration in its
own module, and ``dynaslice prune`` / the config pick it up without any other file changing."""

from __future__ import annotations

import json

import pytest

import dynaslice as ds
from dynaslice.cli import build_parser, main
from dynaslice.config_base import ConfigError
from dynaslice.prune import (
    PruneContext,
    PruneResult,
    prune_run,
    pruner,
    pruner_names,
    register_pruner,
    registry,
)
from dynaslice.prune.common import finish, keep_first, model_channel_groups, prune_channels, resolve_widths
from dynaslice.train import samplers, targets
from dynaslice.train.config import Config, load_config

TINY = [
    "data.name=synthetic", "data.image_size=8", "data.batch_size=16", "data.val_size=16",
    "data.synthetic_train=80", "data.synthetic_test=32", "train.epochs=1", "train.threads=1",
    "train.eval_every_epochs=0", "optim.lr=0.05", "prune.finetune_epochs=0.5",
]  # fmt: skip


@pytest.fixture
def own_registry(monkeypatch):
    """The pruning registry as a copy for one test: a toy method registered here is gone after it."""
    monkeypatch.setattr(registry, "_PRUNERS", registry._PRUNERS.copy())


def _register_toy(seen: list[PruneContext], **declared) -> None:
    """A toy channel method, no training: keep the first channels of each group to the budget."""

    @register_pruner("toy", **declared)
    def toy(ctx: PruneContext) -> PruneResult:
        seen.append(ctx)
        gm, groups = model_channel_groups(ctx.model, ctx.input_size)
        widths = resolve_widths(gm, groups, ctx.input_size, ctx.include, None, ctx.target_macs, ctx.target_params)
        compact = prune_channels(gm, groups, keep_first(widths))
        return finish("toy", compact, ctx.input_size, widths, None, {"include": ctx.include})


def test_a_method_registered_in_its_own_module_runs_through_prune_run_and_the_cli(own_registry, tmp_path, capsys):
    seen: list[PruneContext] = []
    _register_toy(seen, budget="channels", trains_base=False, include="all")
    assert "toy" in pruner_names() and pruner("toy").budget == "channels"

    cfg = load_config(None, [*TINY, "prune.method=toy", "prune.target_macs=0.5"])  # the config accepts it
    result = prune_run(cfg, tmp_path / "lib")
    (ctx,) = seen
    assert ctx.include == "all" and ctx.target_params is None and ctx.resume is False
    assert ctx.target_macs == result["full_macs"] // 2  # the share resolved against the full network
    assert result["name"] == "toy" and result["macs"] <= ctx.target_macs
    assert json.loads((tmp_path / "lib" / "final_eval.json").read_text())["method"] == "toy"

    # the CLI's METHOD choices come from the registry
    out = tmp_path / "cli"
    argv = ["prune", "toy", "--target-params", "0.5", "--out", str(out), *(a for o in TINY for a in ("--set", o))]
    assert build_parser().parse_args(argv).method == "toy"
    assert main(argv) == 0, capsys.readouterr().err
    assert "toy: val top-1 -" in capsys.readouterr().out and (out / "model.onnx").is_file()
    assert seen[-1].target_params is not None and seen[-1].target_macs is None


def test_the_declared_budget_decides_the_budget_rules(own_registry, tmp_path, capsys):
    seen: list[PruneContext] = []
    _register_toy(seen, budget="channels", trains_base=True, targets=("params",))
    tiny = [a for o in TINY for a in ("--set", o)]
    for argv, message in [
        (["--target-macs", "0.5"], "toy prunes to a parameters target: use --target-params"),
        ([], "toy needs exactly one budget"),
        (["--target-params", "0.001"], "below"),  # unreachable: refused before the base trains
    ]:
        out = tmp_path / str(len(argv))
        assert main(["prune", "toy", *argv, "--out", str(out), *tiny]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "base").exists()
    assert seen == []


def test_a_sparsity_method_takes_no_channel_target_and_gets_the_trained_base(own_registry, tmp_path):
    @register_pruner("toy_sparse", budget="sparsity", trains_base=True)
    def toy(ctx: PruneContext) -> PruneResult:
        assert ctx.target_macs is None and ctx.target_params is None
        return finish("toy_sparse", ctx.model, ctx.input_size)

    with pytest.raises(ConfigError, match="toy_sparse prunes prune.sparsity"):
        prune_run(load_config(None, [*TINY, "prune.method=toy_sparse", "prune.target_macs=0.5"]), tmp_path / "a")
    result = prune_run(load_config(None, [*TINY, "prune.method=toy_sparse"]), tmp_path / "b")
    assert result["name"] == "toy_sparse" and (tmp_path / "b" / "base" / "final_eval.json").is_file()


def test_registering_one_name_twice_or_an_unknown_budget_is_refused(own_registry):
    with pytest.raises(ValueError, match="registered twice"):
        register_pruner("l1", budget="channels", trains_base=True)(lambda ctx: None)
    with pytest.raises(ValueError, match="budget must be"):
        register_pruner("new", budget="weights", trains_base=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="prune.method='nope' is not one of dcff"):
        load_config(None, ["prune.method=nope"])


# --------------------------------------------------------------------------- samplers and targets


@pytest.fixture
def own_train_registries(monkeypatch):
    monkeypatch.setattr(samplers, "_SAMPLERS", samplers._SAMPLERS.copy())
    monkeypatch.setattr(targets, "_TARGETS", targets._TARGETS.copy())


def test_a_sampler_brings_its_own_config_rules(own_train_registries):
    def one_subnet(cfg: Config) -> None:
        if cfg.train.num_subnets != 1:
            raise ConfigError(f"train.sampler=single runs one subnet: set train.num_subnets=1, not {cfg.train.num_subnets}")

    @samplers.register_sampler("single", check=one_subnet)
    def build(trainer):
        return samplers.FixedSampler(trainer.space.largest())

    with pytest.raises(ConfigError, match="train.sampler=single runs one subnet"):
        load_config(None, ["train.sampler=single"])
    assert load_config(None, ["train.sampler=single", "train.num_subnets=1"]).train.sampler == "single"
    with pytest.raises(ConfigError, match="train.sampler='other' is not one of sandwich, fixed, pss, single"):
        load_config(None, ["train.sampler=other"])
    # the built-in samplers' rules live with them too
    with pytest.raises(ConfigError, match="train.sampler=sandwich needs >= 2"):
        load_config(None, ["train.num_subnets=1"])


def test_a_target_registers_like_a_sampler(own_train_registries):
    def needs_smoothing(cfg: Config) -> None:
        if cfg.train.label_smoothing == 0:
            raise ConfigError("train.target=smooth needs train.label_smoothing > 0")

    @targets.register_target("smooth", check=needs_smoothing)
    class Smooth(targets.LabelsTarget):
        """The labels, smoothed (a toy)."""

    assert "smooth" in targets.target_names() and Smooth.name == "smooth"
    with pytest.raises(ConfigError, match="needs train.label_smoothing > 0"):
        load_config(None, ["train.target=smooth", "train.label_smoothing=0"])
    cfg = load_config(None, ["train.target=smooth"])
    target = targets.make_target(cfg.train.target, ds.create_supernet("resnet_small").space)
    assert isinstance(target, Smooth) and target.name == "smooth"
    with pytest.raises(ValueError, match="registered twice"):
        targets.register_target("ib")(Smooth)
    with pytest.raises(ConfigError, match="train.target=teacher needs a trained network"):
        load_config(None, ["train.target=teacher"])


# --------------------------------------------------------------------------- one --set parser


def test_a_commands_own_section_takes_set_like_the_config(tmp_path):
    """``dynaslice run``'s ``run:`` section is read, typed and refused by the config's own
    override parser: the same "did you mean", YAML values and type errors, the file named."""
    from dynaslice.pipeline import RunConfig, load_run_config
    from dynaslice.train.config import load_config_with_section

    path = tmp_path / "job.yaml"
    path.write_text("model: {gate: {enabled: true}}\ndata: {name: synthetic}\nrun: {latency_repeats: 3}\n")
    cfg, run = load_run_config(path, ["run.gate_targets=[0.5, 0.7]", "optim.lr=0.2", "run.export=false"])
    assert (run.latency_repeats, run.gate_targets, run.export, cfg.optim.lr) == (3, [0.5, 0.7], False, 0.2)
    with pytest.raises(ConfigError, match="unknown config key 'run.latency_repets'; did you mean 'run.latency_repeats'"):
        load_run_config(path, ["run.latency_repets=5"])
    with pytest.raises(ConfigError, match="config key 'run.latency_repeats' expects int, got 'many'"):
        load_run_config(path, ["run.latency_repeats=many"])
    path.write_text("run: {latency_repets: 3}\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'run.latency_repets'"):
        load_config_with_section(path, [], "run", RunConfig)


def test_a_section_brings_its_own_rules(monkeypatch):
    """Config.validate runs every section's ``check(cfg)``: Stage II's and pruning's rules live
    with their sections, and a section gains a rule without an edit to Config."""
    from dynaslice.train.config import OptimConfig

    def no_adamw_here(self, cfg):
        if self.name == "adamw":
            raise ConfigError("optim.name=adamw is refused by the section's own check")

    monkeypatch.setattr(OptimConfig, "check", no_adamw_here, raising=False)
    with pytest.raises(ConfigError, match="refused by the section's own check"):
        load_config(None, ["optim.name=adamw"])
    with pytest.raises(ConfigError, match="stage2 needs 0 < tau_end <= tau_start"):
        load_config(None, ["stage2.tau_end=5"])
    with pytest.raises(ConfigError, match=r"prune.finetune_epochs must lie between 0 and train.epochs \(10\)"):
        load_config(None, ["prune.finetune_epochs=20"])
