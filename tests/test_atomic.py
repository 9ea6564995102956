"""Atomic writes: all-or-nothing, and files readable like any ``open(path, "w")`` would make them."""

import json
import os
import shutil
import stat

import pytest

from dynaslice.atomic import atomic_path, atomic_write_json, cached_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_usual_permissions(tmp_path, umask_022):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0o600
    os.umask(0o077)
    atomic_write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_cached_json_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"acc": 81.0}

    path = tmp_path / "rows.json"
    assert cached_json(path, compute) == {"acc": 81.0}
    assert cached_json(path, compute) == {"acc": 81.0}
    assert len(calls) == 1


def _killed_between_renames(path):
    """What a SIGKILL between atomic_dir's two renames leaves: ``path`` gone, its old version
    aside (``.NAME.old-*``) and the complete new one still under its temporary name."""
    path.mkdir()
    (path / "f").write_text("old")
    os.replace(path, path.with_name(f".{path.name}.old-0123abcd"))
    new = path.with_name(f".{path.name}.k3j4h5g6.tmp")
    new.mkdir()
    (new / "f").write_text("new")


def test_a_directory_killed_between_renames_is_put_back(tmp_path):
    from dynaslice.atomic import atomic_dir, sweep_stale

    path = tmp_path / "step-3"
    _killed_between_renames(path)
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(path):  # the next writer fails ...
        raise RuntimeError("disk full")
    assert (path / "f").read_text() == "old"  # ... and the old version is there again, not lost
    with atomic_dir(path) as tmp:
        (tmp / "f").write_text("newer")
    assert (path / "f").read_text() == "newer"
    assert not list(tmp_path.glob(".step-3.old-*"))

    # where no writer can be active (a run's lock held), the leftovers are swept too
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    _killed_between_renames(path)
    (tmp_path / ".notes.tmp").write_text("a user's file")  # not a name atomic.py makes
    sweep_stale(tmp_path)
    assert (path / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "step-3"]


def test_a_symbolic_link_replaced_by_atomic_dir_leaves_nothing_behind(tmp_path):
    from dynaslice.atomic import atomic_dir

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "f").write_text("theirs")
    path = tmp_path / "package"
    path.symlink_to(target)
    with atomic_dir(path) as tmp:
        (tmp / "f").write_text("ours")
    assert not path.is_symlink() and (path / "f").read_text() == "ours"
    assert (target / "f").read_text() == "theirs"  # the link went, not what it pointed to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "package"]  # no .package.old-* link
