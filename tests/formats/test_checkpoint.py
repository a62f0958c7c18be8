"""The checkpoint layout: only complete checkpoints count, which one --resume picks, and files read without
running their pickles."""

import logging
import random

import numpy as np
import pytest
import torch

from textdiff.config import ConfigError
from textdiff.formats.checkpoint import (COMPLETE, PARTIAL_PREFIX, UnsafeCheckpointError, atomic_torch_save,
                                         checkpoint_name, latest_checkpoint, load_untrusted, resolve_resume)
from textdiff.train.control import rng_state, set_rng_state


def _fake_checkpoint(root, step, complete=True, prefix=""):
    d = root / (prefix + checkpoint_name(step))
    d.mkdir(parents=True)
    (d / "rank_00000.pt").write_bytes(b"x" * 10)
    (d / "sub").mkdir()
    (d / "sub" / "model.pt").write_bytes(b"y" * 20)
    if complete:
        (d / COMPLETE).write_text(f"{step}\n")
    return d


class _RunsCodeWhenUnpickled:
    """What a hostile checkpoint holds: unpickling it calls exec, which here writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _poison(path, marker):
    torch.save({"step": 1, "payload": _RunsCodeWhenUnpickled(marker)}, path)


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


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(tmp_path):
    marker, bad = tmp_path / "marker", tmp_path / "rank_00000.pt"
    _poison(bad, marker)
    torch.load(bad, weights_only=False)  # the file really runs code when trusted ...
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=rf"{bad} is refused: its pickle calls exec, "):
        load_untrusted(bad)  # ... and load_untrusted does not let it
    assert not marker.exists()


def test_the_rank_state_round_trips_through_a_weights_only_load(tmp_path):
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    atomic_torch_save({"rng": rng_state()}, tmp_path / "rank.pt")
    expected = (np.random.randn(4), random.random(), torch.rand(3))
    set_rng_state(load_untrusted(tmp_path / "rank.pt")["rng"])
    again = (np.random.randn(4), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_a_partial_checkpoint_ignored_at_resume_is_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("textdiff"), "propagate", True)  # training's setup_logging turns it off
    _fake_checkpoint(tmp_path, 10)
    partial = _fake_checkpoint(tmp_path, 20, prefix=PARTIAL_PREFIX, complete=False)
    with caplog.at_level(logging.WARNING, logger="textdiff.formats.checkpoint"):
        assert resolve_resume("auto", tmp_path).name == "step_00000010"
    assert f"ignored the partial checkpoint {partial} (no COMPLETE file" in caplog.text
    assert "resuming from " + str(tmp_path / "step_00000010") in caplog.text
