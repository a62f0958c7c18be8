"""Atomic writes: whole file or nothing, with ordinary permissions."""

import os
import stat

import pytest

from textdiff.files import atomic_write, atomic_write_bytes, atomic_write_json, publish


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

    def half_then_fail(f):
        f.write(b"new but on")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    with pytest.raises(TypeError, match="takes bytes, not str"):
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_file_then_its_folder_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    """Without the file's fsync a power cut can leave the new name on empty blocks; without the folder's the
    rename itself can be lost."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    atomic_write_json(tmp_path / "m.json", {"k": "ü"})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".m.json.tmp")) and events[2][1] == str(tmp_path)
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == '{\n  "k": "ü"\n}\n'


def test_publish_moves_a_finished_file_into_place(tmp_path):
    (tmp_path / "x.tar.partial").write_bytes(b"tar")
    publish(tmp_path / "x.tar.partial", tmp_path / "x.tar")
    assert [p.name for p in tmp_path.iterdir()] == ["x.tar"] and (tmp_path / "x.tar").read_bytes() == b"tar"
