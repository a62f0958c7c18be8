"""Atomic writes: whole file or nothing, with ordinary permissions."""

import os
import stat

import pytest

from textdiff.files import atomic_write_bytes


def test_writes_the_bytes_with_umask_permissions_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_bytes() == b"{}\n"
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
