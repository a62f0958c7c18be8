"""Checkpoint bookkeeping: retention, which checkpoint --resume picks, resume compatibility, remote copies."""

import json
import uuid

import fsspec
import pytest

from textdiff.config import ConfigError, TextdiffConfig
from textdiff.train.checkpoint import (COMPLETE, PARTIAL_PREFIX, check_resume_compatible, checkpoint_name,
                                       copy_to_remote, latest_checkpoint, resolve_resume, steps_to_delete)


def _fake_checkpoint(root, step, complete=True, prefix=""):
    d = root / (prefix + checkpoint_name(step))
    d.mkdir(parents=True)
    (d / "rank_00000.pt").write_bytes(b"x" * 10)
    (d / "sub").mkdir()
    (d / "sub" / "model.pt").write_bytes(b"y" * 20)
    if complete:
        (d / COMPLETE).write_text(f"{step}\n")
    return d


def test_retention_keeps_the_last_two_and_every_thousandth():
    steps = [500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert steps_to_delete(steps, keep_last=2, keep_every=1000) == [500, 1500, 2500]
    assert steps_to_delete(steps, keep_last=2, keep_every=0) == [500, 1000, 1500, 2000, 2500]
    assert steps_to_delete([10], keep_last=3, keep_every=0) == []


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, complete=False)
    _fake_checkpoint(tmp_path, 30, prefix=PARTIAL_PREFIX)
    assert latest_checkpoint(tmp_path).name == "step_00000010"


def test_resume_auto_starts_fresh_without_checkpoints_and_takes_the_latest_otherwise(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert resolve_resume("auto", root) is None
    assert resolve_resume(None, root) is None
    _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 12)
    assert resolve_resume("auto", root).name == "step_00000012"
    assert resolve_resume(str(tmp_path / "run"), root).name == "step_00000012"
    assert resolve_resume(str(root / "step_00000004"), root).name == "step_00000004"


def test_resume_from_an_incomplete_directory_names_the_flag(tmp_path):
    d = _fake_checkpoint(tmp_path, 7, complete=False)
    with pytest.raises(ConfigError, match="--resume .*COMPLETE"):
        resolve_resume(str(d), tmp_path)


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
