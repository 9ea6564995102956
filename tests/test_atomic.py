"""Atomic writes: all-or-nothing, and files readable like any ``open(path, "w")`` would make them."""

import json
import os
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
