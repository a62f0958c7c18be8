"""Checkpoints during training: retention, resume compatibility, remote copies, atomic saves, failures (the
layout and its readers: tests/formats/test_checkpoint.py)."""

import errno
import json
import os
import re
import uuid
from pathlib import Path

import fsspec
import pytest

from textdiff.config import CheckpointConfig, ConfigError, TextdiffConfig
from textdiff.formats.checkpoint import COMPLETE, PARTIAL_PREFIX, UnsafeCheckpointError, latest_checkpoint
from textdiff.train.checkpoint import (CheckpointManager, RunDirError, check_resume_compatible, copy_to_remote,
                                       steps_to_delete)

from ..formats.test_checkpoint import _fake_checkpoint, _poison


def test_retention_keeps_the_last_two_and_every_thousandth():
    steps = [500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert steps_to_delete(steps, keep_last=2, keep_every=1000) == [500, 1500, 2500]
    assert steps_to_delete(steps, keep_last=2, keep_every=0) == [500, 1000, 1500, 2000, 2500]
    assert steps_to_delete([10], keep_last=3, keep_every=0) == []


def test_changed_model_width_is_an_error_naming_the_key():
    saved = TextdiffConfig().to_dict()
    current = TextdiffConfig().to_dict()
    current["textdiff"]["model"]["num_channels"] = 128
    with pytest.raises(ConfigError, match=r"model.num_channels \(saved 256, now 128\)"):
        check_resume_compatible(saved, current, "ckpt")


def test_changed_lr_and_batch_are_warnings():
    saved = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
             **{"textdiff": TextdiffConfig().to_dict()["textdiff"]}}
    current = json.loads(json.dumps(saved))
    current["train_micro_batch_size_per_gpu"] = 8
    current["optimizer"]["params"]["lr"] = 3e-4
    current["textdiff"]["model"]["txt_pdrop"] = 0.0
    warnings = check_resume_compatible(saved, current, "ckpt")
    assert len(warnings) == 2
    assert any("train_micro_batch_size_per_gpu" in w and "4 -> 8" in w for w in warnings)
    assert any("optimizer" in w for w in warnings)


def test_copy_to_local_filesystem_keeps_every_file(tmp_path):
    d = _fake_checkpoint(tmp_path / "ck", 3)
    url = copy_to_remote(d, f"file://{tmp_path}/mirror")
    assert url == f"{tmp_path}/mirror/step_00000003"
    assert (tmp_path / "mirror" / "step_00000003" / "sub" / "model.pt").read_bytes() == b"y" * 20
    assert (tmp_path / "mirror" / "step_00000003" / COMPLETE).read_text() == "3\n"


def test_copy_to_memory_filesystem_writes_complete_last(tmp_path):
    d = _fake_checkpoint(tmp_path, 5)
    bucket = f"memory://bucket-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    written = []
    original = fs.put_file
    fs.put_file = lambda src, dst, **kw: (written.append(dst.rsplit("/", 1)[1]), original(src, dst, **kw))
    try:
        url = copy_to_remote(d, bucket)
    finally:
        del fs.put_file
    assert url.startswith("memory://") and url.endswith("/step_00000005")
    assert written[-1] == COMPLETE and len(written) == 3
    assert fs.cat(url + "/rank_00000.pt") == b"x" * 10


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank_00000.pt", "textdiff.pt", "mp_rank_00_model_states.pt"])
def test_resuming_from_a_hostile_checkpoint_is_refused_before_any_code_runs(tiny, tmp_path, victim):
    from textdiff.train.loop import Trainer

    trainer = Trainer(tiny("train.max_steps=1"), tmp_path / "run")
    trainer.run()
    trainer.close()
    bad = tmp_path / "run" / "checkpoints" / "step_00000001" / victim
    marker = tmp_path / "marker"
    _poison(bad, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{bad} is refused"):
        Trainer(tiny("train.max_steps=2"), tmp_path / "run", resume="auto")
    assert not marker.exists()


class _FakeEngine:
    """Stands in for DeepSpeed's engine: save_checkpoint writes one module file holding ``self.version``."""

    version = b"old"

    def save_checkpoint(self, root, tag, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(self.version)


def _manager(root):
    return CheckpointManager(root, CheckpointConfig(keep_last=2), rank=0, world_size=1, barrier=lambda: None)


def _save(manager, engine, step):
    return manager.save(engine, step, {"step": step}, {"step": step}, {"textdiff": {}})


def test_saving_a_step_again_keeps_a_complete_copy_of_it_at_every_instant(tmp_path, monkeypatch):
    manager, engine = _manager(tmp_path), _FakeEngine()
    _save(manager, engine, 5)
    seen = []
    real_replace = os.replace

    def replace_and_look(src, dst):
        real_replace(src, dst)
        found = latest_checkpoint(tmp_path)  # what a resume would pick right after this rename
        seen.append((found.name, (found / "mp_rank_00_model_states.pt").read_bytes()))

    monkeypatch.setattr(os, "replace", replace_and_look)
    engine.version = b"new"
    final = _save(manager, engine, 5)
    assert (".replaced-step_00000005", b"old") in seen  # the old copy, still found, while swapping
    assert seen[-1] == ("step_00000005", b"new")
    assert all(name.endswith("step_00000005") for name, _ in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"] and final == tmp_path / "step_00000005"


def test_a_crash_between_the_two_renames_of_a_resave_leaves_the_old_copy_found(tmp_path, monkeypatch):
    manager, engine = _manager(tmp_path), _FakeEngine()
    _save(manager, engine, 5)
    real_replace = os.replace

    def crash_on_the_folder_rename(src, dst):
        if Path(src).name.startswith(PARTIAL_PREFIX):
            raise KeyboardInterrupt  # kill -9 stand-in: nothing after this line runs
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_folder_rename)
    engine.version = b"new"
    with pytest.raises(KeyboardInterrupt):
        _save(manager, engine, 5)
    monkeypatch.setattr(os, "replace", real_replace)
    found = latest_checkpoint(tmp_path)
    assert found.name == ".replaced-step_00000005"
    assert (found / "mp_rank_00_model_states.pt").read_bytes() == b"old"
    _save(manager, engine, 5)  # the next save of the step tidies up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]
    assert (latest_checkpoint(tmp_path) / "mp_rank_00_model_states.pt").read_bytes() == b"new"


def test_every_file_of_a_checkpoint_and_its_folders_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    final = _save(_manager(tmp_path), _FakeEngine(), 3)
    names = {re.sub(r"^\.(.+)\.tmp\d+$", r"\1", Path(p).name) for p in synced}  # temporary names count as theirs
    # mp_rank_00_model_states.pt, rank_00000.pt, textdiff.pt, config.json, COMPLETE
    assert {p.name for p in final.iterdir()} <= names
    assert str(tmp_path) in synced  # the folder holding the rename


@pytest.mark.slow
def test_a_full_disk_during_a_save_names_the_folder_and_the_last_checkpoint_stays_usable(tiny, tmp_path,
                                                                                        monkeypatch):
    from textdiff.train import checkpoint
    from textdiff.train.loop import Trainer

    real_save = checkpoint.atomic_torch_save

    def full_at_step_two(obj, path):
        if "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", full_at_step_two)
    trainer = Trainer(tiny("train.max_steps=2", "checkpoint.save_every=1"), tmp_path / "run")
    with pytest.raises(RunDirError, match=r"cannot write checkpoint step_00000002 under .*run/checkpoints: "
                                          r".*\.partial-step_00000002/rank_00000.pt: No space left on device\. "
                                          r"The last complete checkpoint \(.*step_00000001\) is intact"):
        trainer.run()
    trainer.close()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000001"]  # the failed save's partial folder is gone
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real_save)
    resumed = Trainer(tiny("train.max_steps=2", "checkpoint.save_every=1"), tmp_path / "run", resume="auto")
    assert resumed.step == 1 and resumed.run()["step"] == 2
    resumed.close()


def test_a_read_only_run_dir_is_found_before_the_engine_is_built_and_exits_4(tiny, tmp_path, monkeypatch, capsys):
    from textdiff import launch
    from textdiff.train import engine as eng

    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps(tiny().to_dict()))
    real_write = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(eng, "build_engine", lambda *a, **k: pytest.fail("the engine was built"))
    assert launch.main(["--config", str(recipe), "--run-dir", str(tmp_path / "run")]) == 4
    assert f"launch.sh: --run-dir {tmp_path / 'run'} is not writable: {tmp_path / 'run'}/.write-test-rank0: " \
           "Read-only file system" in capsys.readouterr().err
