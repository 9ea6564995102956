"""The wheel carries what an installed dynaslice needs: its presets (package data) and entry points.

Built with ``pip wheel`` and installed (without dependencies, which this venv already has) into
a folder that is put first on ``PYTHONPATH`` and run from outside the source checkout, so
nothing of the checkout can be found instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(ROOT)], check=True)
    (wheel,) = tmp.glob("dynaslice-*.whl")
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def run_installed(target: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run(
        [sys.executable, *args], cwd=target.parent, env=env, capture_output=True, text=True, timeout=120
    )


def test_installed_wheel_finds_its_presets(installed):
    code = "import dynaslice, dynaslice.train.config as c; print(dynaslice.__file__); print(sorted(c.presets()))"
    result = run_installed(installed, "-c", code)
    assert result.returncode == 0, result.stderr
    where, names = result.stdout.splitlines()
    assert where.startswith(str(installed))  # the installed copy, not the checkout
    assert {"demo", "fmnist_quick", "fmnist_bench"} <= set(eval(names))


def test_installed_wheel_runs_the_demo_help_and_reads_a_preset_by_name(installed):
    result = run_installed(installed, "-m", "dynaslice", "demo", "--help")
    assert result.returncode == 0 and "--data-dir" in result.stdout
    code = "from dynaslice.train import load_config; print(load_config('fmnist_quick').model.name)"
    result = run_installed(installed, "-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "resnet_small", result.stderr
