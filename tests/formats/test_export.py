"""Export: a checkpoint's EMA or raw weights + config -> safetensors that load back for sampling."""

import pytest
import torch
from safetensors import safe_open

from textdiff.config import ConfigError
from textdiff.eval.monitor import TrainingMonitor
from textdiff.formats.export import read_export
from textdiff.formats.weights import export_checkpoint, fit_shapes
from textdiff.sampling.loading import load_for_sampling
from textdiff.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_shapes_restores_zero_dim_gains_and_leaves_the_rest():
    state = {"gain": torch.tensor([0.5]), "w": torch.ones(2, 3), "other": torch.ones(4)}
    out = fit_shapes(state, {"gain": torch.Size([]), "w": torch.Size([2, 3]), "other": torch.Size([2])})
    assert out["gain"].shape == () and out["gain"].item() == 0.5
    assert out["w"].shape == (2, 3) and out["other"].shape == (4,)


@pytest.mark.slow
def test_ema_and_raw_exports_of_a_zero2_run_load_back(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = tiny("deepspeed.zero_optimization.stage=2", "train.max_steps=2", "train.sample_every=2",
               "train.sample_steps=2", 'train.sample_prompts=["ab", ""]')
    trainer = Trainer(cfg, run, monitor=TrainingMonitor(cfg, run))
    trainer.run()
    trainer.close()
    assert (run / "samples" / "step_00000002.png").is_file()

    ema_file = export_checkpoint(run, tmp_path / "ema.safetensors", "ema", ema_rate=0.9)
    cfg, state = read_export(ema_file)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2 and cfg.train.max_steps == 2
    for name, avg in trainer.ema_weights(0.9).items():
        assert torch.equal(state[name], avg), name
    with safe_open(str(ema_file), framework="pt") as f:
        assert f.metadata()["weights"] == "ema:0.9" and f.metadata()["step"] == "2"

    raw_file = export_checkpoint(run / "checkpoints", tmp_path / "raw.safetensors", "raw")
    _, raw = read_export(raw_file)
    for name, p in trainer.engine.module.named_parameters():
        assert torch.equal(raw[name], p.detach().reshape(raw[name].shape)), name
    loaded = load_for_sampling(raw_file)
    assert loaded.weights == "export"
    assert torch.equal(loaded.model.out_conv.weight, trainer.engine.module.out_conv.weight)


def test_export_needs_a_safetensors_name(tmp_path):
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        export_checkpoint(tmp_path, tmp_path / "x.pt")
