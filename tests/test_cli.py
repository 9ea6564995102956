"""The command line as a user runs it: one line on stderr and exit code 2 for mistakes."""

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "/nonexistent/run"], "/nonexistent/run"),
        (["profile", "resnet5O"], "Did you mean 'resnet50'"),
        (["demo", "--data-dir", "/nonexistent"], "apt-get install"),
    ],
)
def test_module_entry_point_reports_user_errors_in_one_line(args, needle):
    out = subprocess.run(
        [sys.executable, "-m", "dynaslice.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    from dynaslice.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {
        "train",
        "eval",
        "recalibrate",
        "profile",
        "train-gate",
        "select",
        "run",
        "export",
        "demo",
    } <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: dynaslice {name}" in capsys.readouterr().out


# --------------------------------------------------------------------------- issue 33: a new user's first hour
# Tiny synthetic runs through main(argv) in this process; each mistake is one line and exit code 2.

TINY = {
    "model": {"kwargs": {"ratios": [0.5, 0.75, 1.0]}},
    "data": {"name": "synthetic", "image_size": 8, "batch_size": 8, "val_size": 8, "synthetic_train": 40,
             "synthetic_test": 16},
    "optim": {"lr": 0.05, "warmup_epochs": 0.5},
    "train": {"epochs": 1, "threads": 1, "target": "labels", "eval_every_epochs": 0, "eval_widths": [0.5, 1.0],
              "recal_images": 8, "recal_batch_size": 8, "log_every_steps": 1},
}  # fmt: skip


def run_cli(*argv: object) -> tuple[int, str, str]:
    """``dynaslice ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    from dynaslice.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_line(result: tuple[int, str, str], *needles: str) -> str:
    """Exit code 2 and one error line on stderr (notes aside) holding every needle; the line."""
    rc, _, err = result
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny_run(folder, gated: bool) -> object:
    """``dynaslice train`` of a tiny (gated: 3 routes, Stage I) supernet into ``folder/run``."""
    import yaml

    data = {k: dict(v) for k, v in TINY.items()}
    if gated:
        data["model"]["gate"] = {"enabled": True, "routes": 3}
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    run = folder / "run"
    rc, _, err = run_cli("train", config, "--out", run)
    assert rc == 0, err
    return run


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("plain"), gated=False)


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("gated"), gated=True)


def test_eval_archs_on_a_gated_checkpoint_are_the_backbone_subnets(gated_run, tmp_path):
    """README: `dynaslice eval runs/demo/stage1 --archs x0.35 x0.5 largest` was refused on a gated
    checkpoint, `--archs routes` too."""
    report = tmp_path / "eval.json"
    rc, out, err = run_cli("eval", gated_run, "--archs", "x0.5", "largest", "routes", "--json", report)
    assert rc == 0, err
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"] for r in rows] == ["x0.5", "largest", "route0", "route1", "route2"]
    assert rows[1]["macs"] == rows[-1]["macs"]  # the widest route is the gated net's largest subnet
    assert "SGS agreement" not in out


def test_eval_of_a_stage1_gate_says_it_is_untrained(gated_run, tmp_path):
    """Plain `eval` of a Stage-I checkpoint reported the untrained gate (every image on one route,
    SGS agreement 0 %) as if it meant something."""
    report = tmp_path / "eval.json"
    rc, out, err = run_cli("eval", gated_run, "--json", report)
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "Stage I" in notes[0] and "not been trained" in notes[0]
    assert "SGS agreement" not in out and "gate (argmax)" not in out
    assert [r["name"] for r in json.loads(report.read_text())["rows"]] == ["route0", "route1", "route2"]


def test_recalibrate_works_right_after_train(plain_run, gated_run, tmp_path):
    """The README's Workflow block: `train` wrote RUN/recalibrated.safetensors, so `recalibrate RUN`
    always failed ("exists: pass --force")."""
    from dynaslice.modelfile import load_model_file

    run = tmp_path / "plain"
    shutil.copytree(plain_run, run)
    before = load_model_file(run / "recalibrated.safetensors")[1]["recalibrated"]
    rc, out, err = run_cli("recalibrate", run)
    assert rc == 0, err
    assert "(replaced)" in out and load_model_file(run / "recalibrated.safetensors")[1]["recalibrated"] == before
    # other subnets must not silently replace the statistics eval and export read
    line = one_line(run_cli("recalibrate", run, "--archs", "x0.75"), "other subnets", "--out", "--force")
    assert "x0.5, x1" in line
    # a gated checkpoint defaults to its routes (as --help says), next to the run's other files
    run = tmp_path / "gated"
    shutil.copytree(gated_run, run)
    rc, out, err = run_cli("recalibrate", run)
    assert rc == 0, err
    held = load_model_file(run / "routes-recalibrated.safetensors")[1]["recalibrated"]
    assert list(held) == ["route0", "route1", "route2"]
    assert list(load_model_file(run / "recalibrated.safetensors")[1]["recalibrated"]) == ["x0.5", "x1"]  # train's


@pytest.mark.parametrize(
    "archs,needles,absent",
    [
        (["--arch", "x05"], ["x0.5", "0.5", "largest", "smallest", "outside 0.45..1", "0.50 of the widest"], "()"),
        (["--arch", "half"], ["--arch 'half'", "x0.5", "largest", "smallest"], "--archs"),
        (["--arch", "uniform"], ["several subnets"], "names 0"),
    ],
)
def test_arch_mistakes_name_the_accepted_forms(plain_run, tmp_path, archs, needles, absent):
    """`--arch x05` answered with Python (`use smallest()`) and a grid the docs name otherwise;
    `--arch half` named `--archs`. (The tiny net's narrowest widths are 0.5 of the widest.)"""
    line = one_line(run_cli("export", plain_run, *archs, "--out", tmp_path / "s.pt"), *needles)
    assert absent not in line


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["select", "RUN", "--max-macs", "0.5"], ["did you mean a fraction", "12M"]),
        (["select", "RUN", "--max-macs", "50%"], ["MACs per image", "not a share"]),
        (["export", "RUN", "--budget-macs", "0.5", "--out", "x.pt"], ["did you mean a fraction"]),
        (["select", "RUN", "--max-latency-ms", "50%"], ["percentage"]),
        (["prune", "l1", "--target-macs", "150%"], ["more than the full network"]),
        (["prune", "l1", "--target-params", "5"], ["neither a fraction", "50%", "12M"]),
        (["train-gate", "RUN", "--target-macs", "12"], ["neither a fraction"]),
    ],
)
def test_amount_mistakes_say_what_each_form_means(argv, needles):
    """`select --max-macs 0.5` meant 0.5 MACs, while `prune --target-macs 0.5` means half the network."""
    one_line(run_cli(*argv), *needles)


def test_a_percentage_is_a_share_of_the_full_network():
    from dynaslice.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["prune", "dcff", "--target-macs", "50%"]).target_macs == 0.5
    assert parse(["prune", "dcff", "--target-macs", "0.5"]).target_macs == 0.5
    assert parse(["prune", "l1", "--target-params", "200k"]).target_params == 200e3
    assert parse(["train-gate", "RUN", "--target-macs", "60%"]).target_macs == 0.6
    assert parse(["select", "RUN", "--max-macs", "12M"]).max_macs == 12e6
