"""The README's commands and code blocks that read the demo's run directory, *executed* (issue 33:
"every README command works as written on the demo's run directory").

tests/test_docs_commands.py parses every block of README.md and docs/; this module runs the ones
that read ``runs/demo`` (``export``, ``quantize``, ``eval``), the ``profile`` commands, and the
Python "In Python" and "Serving" blocks, all taken from README.md with the same block extractor
(never copied here), against a run directory made by the README's own
``dynaslice run configs/demo.yaml --out runs/demo``, made tiny only by ``--set`` overrides.

Everything runs in a folder holding ``runs/demo`` and a link to ``configs/`` (a clone's layout),
so relative paths resolve as written. The demo's command runs as ``python -m dynaslice ...``; the
others call :func:`dynaslice.cli.main` (what ``python -m dynaslice`` calls) in this process, which
saves a torch import per command (the module must add under a minute to the suite on 2 cores). A
Python block runs statement by statement. A command must exit 0 (a traceback fails the test) and
write its ``--out``; where it is cheap, what it prints is checked against what the README says,
and so is the Serving block's claim that the eager reference is the exported gated model.

Substitutions (:func:`as_run`) only where a command evaluates or times for minutes; what is not run
at all (a command that trains, or reads a run the demo does not write) is chosen by a rule in
:func:`executed`, and a Python statement by :data:`NOT_RUN`, each with its reason.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_docs_commands import ROOT, blocks, dynaslice_args, shell_commands

from dynaslice.cli import main
from dynaslice.data.datasets import FASHION_MNIST_ROOT, read_idx

FMNIST = Path(FASHION_MNIST_ROOT)

DEMO = "runs/demo"
# The demo made tiny: 256 training images (quantize's real calibration takes 256 of them), every
# other count at its floor. Stage I keeps the demo's phases, epochs and recipe.
TINY = [
    "data.train_size=256", "data.val_size=64", "data.batch_size=64", "train.recal_images=64",
    "run.test_images=64", "run.latency_repeats=1", "run.latency_images=1", "run.latency_batch=2",
]  # fmt: skip
TINY_TEST_IMAGES = 64  # the copy of Fashion-MNIST that `eval` and `quantize` read (see as_run)
TINY_TRAIN_IMAGES = 1000  # >= val_size + train_size: the run's split of it, for BN recalibration

# Python statements not run, with the reason (the rest of their block runs).
NOT_RUN = {
    "runs/pss": "reads a PSS run: the README trains it (train.sampler=pss) for minutes; "
    "tests/test_pss.py runs BudgetNet and the budget package on a tiny one",
}


def readme_commands() -> list[list[str]]:
    """Every ``dynaslice`` command line of README.md's ```bash blocks, in order."""
    return [
        args
        for where, code in blocks("bash")
        if where.startswith("README.md:")
        for args in map(dynaslice_args, shell_commands(code))
        if args
    ]


def demo_command() -> list[str]:
    """The README's command that writes the demo's run directory."""
    (args,) = [a for a in readme_commands() if a[0] == "run" and a[-2:] == ["--out", DEMO]]
    return args


def executed(args: list[str]) -> bool:
    """Whether this module runs ``dynaslice ARGS``: a command that reads the demo's run, or a
    ``profile`` (it reads no run). Not run: ``run``/``train``/``prune`` (they train: the demo's
    own command is the fixture, re-running it with other gate targets trains new gates, and
    train -> eval -> recalibrate is tests/test_cli.py::test_recalibrate_works_right_after_train),
    and commands reading a run the demo does not write (``runs/pss``, ``runs/fmnist_quick``)."""
    if args[0] in ("run", "train", "prune", "demo"):
        return False
    return args[0] == "profile" or any(w.startswith(DEMO) for w in args)


def as_run(args: list[str]) -> tuple[list[str], str]:
    """The command as run here, and why it differs from the README's (empty: it does not)."""
    if args[0] == "profile" and "--latency-table" in args:
        return [*args, "--grid-values", "2", "--check", "2"], "builds and checks a latency table: minutes"
    if args[0] == "profile" and "--no-latency" not in args:
        return [*args, "--no-latency"], "times every width on every runtime at 224 px: minutes"
    if args[0] in ("eval", "quantize"):  # the run's dataset, from a folder holding its first images
        return [*args, "--data-dir", "tiny-data"], "evaluates the 10,000 test images per subnet: minutes"
    return args, ""


COMMANDS = [a for a in readme_commands() if executed(a)]


def python_blocks() -> list[tuple[str, str]]:
    """README.md's ```python blocks that read the demo's run directory."""
    return [(w, code) for w, code in blocks("python") if w.startswith("README.md:") and f'"{DEMO}' in code]


# --------------------------------------------------------------------------- the run directory


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of uint8 ``array`` (the format of the Fashion-MNIST files)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_fashion_mnist(folder: Path) -> None:
    """The first images of each split of Fashion-MNIST, in its own layout (file names as Debian's)."""
    folder.mkdir()
    for stem, count in (("train", TINY_TRAIN_IMAGES), ("t10k", TINY_TEST_IMAGES)):
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            name = f"{stem}-{kind}-ubyte"
            write_idx(folder / name, read_idx(FMNIST / f"{name}.gz", ndim=ndim)[:count])


def dynaslice(cwd: Path, args: list[str]) -> str:
    """The standard output of ``python -m dynaslice ARGS`` run in ``cwd``, which must work (one
    thread: the suite shares 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dynaslice", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, (
        f"dynaslice {shlex.join(args)}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A folder holding ``runs/demo`` (the README's command, tiny), ``configs/`` and ``tiny-data/``."""
    if not FMNIST.is_dir():
        pytest.skip("the demo trains on Fashion-MNIST: 'apt-get install dataset-fashion-mnist'")
    cwd = tmp_path_factory.mktemp("clone")
    (cwd / "configs").symlink_to(ROOT / "configs")
    tiny_fashion_mnist(cwd / "tiny-data")
    overrides = [w for setting in TINY for w in ("--set", setting)]
    out = dynaslice(cwd, [*demo_command(), *overrides])
    assert f"report: {DEMO}/report.md" in out
    return cwd


# --------------------------------------------------------------------------- commands


def test_the_readme_holds_the_commands_this_module_runs():
    """The extractor finds the demo's command and every kind this module runs (none silently lost)."""
    assert demo_command()[:2] == ["run", "configs/demo.yaml"]
    assert {a[0] for a in COMMANDS} >= {"export", "quantize", "eval", "profile"}
    assert [w for w, _ in python_blocks()] and len(python_blocks()) >= 2


# What a command's output shows, as the README describes it (a regular expression per line).
PRINTS = {
    "export": [r"^exported .* to \S+"],
    "eval": [r"^\| x0\.5 \|", *(rf"^\| route{r} \|" for r in range(4))],  # "a gated run: static subnets"
    "profile": [r"^  largest .* MMACs .* M params"],  # "MACs, params"
    "profile --latency-table": [r"^median abs error .*; wrote \S+$"],
}


def kind(args: list[str]) -> str:
    return f"{args[0]} --latency-table" if "--latency-table" in args else args[0]


@pytest.mark.parametrize("args", COMMANDS, ids=[shlex.join(a) for a in COMMANDS])
def test_readme_command_runs_on_the_demo_run(demo, monkeypatch, capsys, args):
    monkeypatch.chdir(demo)
    run_args, why = as_run(args)
    code = main(run_args)  # what `python -m dynaslice` calls, in this process: no second torch import
    out, err = capsys.readouterr()
    assert code == 0, f"dynaslice {shlex.join(run_args)} ({why or 'as written'})\n{out}\n{err}"
    for pattern in PRINTS.get(kind(args), []):
        assert re.search(pattern, out, re.M), f"{shlex.join(args)} printed no line like {pattern!r}:\n{out}"
    for flag in ("--out", "--export", "--latency-table", "--json"):
        if flag in args:
            assert Path(args[args.index(flag) + 1]).exists(), f"{shlex.join(args)} wrote no {flag}"


# --------------------------------------------------------------------------- Python blocks


def run_block(code: str) -> dict:
    """Run a block statement by statement in a fresh namespace and return it.

    Not run: a statement naming a key of :data:`NOT_RUN`, and one reading a name only such a
    statement binds. An expression statement whose comment is a number
    (``ds.count_macs(net, arch)  # 1_052_311_552``) must give that number.
    """
    namespace: dict = {"__name__": "__readme__"}
    lines, unbound = code.splitlines(), set()
    for node in ast.parse(code).body:
        source = ast.get_source_segment(code, node)
        names = {n.id: type(n.ctx) for n in ast.walk(node) if isinstance(n, ast.Name)}
        if any(key in source for key in NOT_RUN) or any(names.get(u) is ast.Load for u in unbound):
            unbound |= {n for n, ctx in names.items() if ctx is ast.Store}
            continue
        unbound -= set(names)
        if not isinstance(node, ast.Expr):
            exec(compile(ast.Module([node], []), "<README.md>", "exec"), namespace)
            continue
        value = eval(compile(ast.Expression(node.value), "<README.md>", "eval"), namespace)
        comment = lines[node.end_lineno - 1].partition("#")[2].strip()
        shown = re.match(r"([\d_]+)\b", comment)
        if shown:
            assert value == int(shown.group(1)), f"{source}: {value}, the README shows {comment}"
    return namespace


PYTHON = python_blocks()


@pytest.mark.parametrize("where, code", PYTHON, ids=[w for w, _ in PYTHON])
def test_readme_python_block_runs_on_the_demo_run(demo, monkeypatch, where, code):
    monkeypatch.chdir(demo)
    namespace = run_block(code)
    if "forward_with_routes" in code:  # Serving: the eager reference is the exported gated model
        x, y, routes, ref = (namespace[k] for k in ("x", "y", "routes", "ref"))
        y_ref, routes_ref = ref.forward_with_routes(x)
        assert torch.equal(torch.as_tensor(routes), torch.as_tensor(routes_ref))
        torch.testing.assert_close(torch.as_tensor(y), torch.as_tensor(y_ref), rtol=1e-4, atol=1e-4)


def test_run_block_checks_numbers_and_skips_what_needs_a_pss_run():
    """The block runner itself: a wrong number in a comment fails; a statement reading a PSS run
    is not run, nor one using what it would bind."""
    with pytest.raises(AssertionError, match="the README shows 3"):
        run_block("1 + 1  # 3, say\n")
    namespace = run_block('a = 2\nb = open("runs/pss/x")\nc = b.read()\na * 3  # 6\n')
    assert namespace["a"] == 2 and "b" not in namespace and "c" not in namespace
    with pytest.raises(NameError, match="'x' is not defined"):  # the README's old Serving block
        run_block('from dynaslice import serve\nserve.load\ny = x + 1\n')
