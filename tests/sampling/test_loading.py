"""Loading models for sampling: which checkpoint a source means, EMA or raw weights, and clear errors."""

from pathlib import Path

import pytest
import torch

from textdiff.formats.checkpoint import COMPLETE
from textdiff.formats.weights import LoadError, export_checkpoint, read_source_config, resolve_checkpoint
from textdiff.sampling.loading import load_for_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

def _param(model, name="out_conv.weight"):
    return dict(model.named_parameters())[name].detach()


def test_a_run_directory_means_its_latest_complete_checkpoint(runs, tmp_path):
    assert resolve_checkpoint(runs.base).name == "step_00000003"
    assert resolve_checkpoint(runs.base / "checkpoints").name == "step_00000003"
    half = runs.base / "checkpoints" / "step_00000009"
    half.mkdir()
    try:
        assert resolve_checkpoint(runs.base).name == "step_00000003"  # no COMPLETE file: never picked
    finally:
        half.rmdir()


def test_raw_weights_equal_the_saved_module_and_ema_weights_the_average(runs):
    raw = load_for_sampling(runs.base, "raw")
    ema = load_for_sampling(runs.base, "ema")
    expected = _param(runs.base_model)
    assert torch.equal(_param(raw.model), expected)
    assert torch.equal(_param(ema.model), expected * runs.ema_scale)
    assert raw.weights == "raw" and ema.weights == "ema:0.9999"
    assert not raw.model.training
    assert raw.diffusion.num_timesteps == 100


def test_the_loaded_model_computes_what_the_saved_one_did(runs):
    loaded = load_for_sampling(runs.base, "raw")
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5.0, 80.0])
    cond = loaded.model.prepare_cond(["ab", ""], None)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, **cond), runs.base_model(x, t, **cond))


@pytest.mark.slow
def test_a_frozen_caption_encoder_is_not_needed_in_the_checkpoint(make_run, runs, tmp_path):
    clip = str(Path(__file__).parents[1] / "models" / "tiny_clip.json")
    model = make_run(tmp_path / "capt", using_capt=True, clipname=clip, clip_pretrained="")
    loaded = load_for_sampling(tmp_path / "capt", "ema")
    assert torch.equal(_param(loaded.model), _param(model) * runs.ema_scale)
    assert not any(p.requires_grad for p in loaded.model.capt_encoder.parameters())


def test_config_is_read_without_weights(runs):
    cfg = read_source_config(runs.up)
    assert (cfg.model.image_size, cfg.model.low_res_size) == (32, 16)


def test_a_missing_source_names_the_path_and_the_choices(tmp_path):
    with pytest.raises(LoadError, match=r"nothing_here does not exist; pass a run directory"):
        load_for_sampling(tmp_path / "nothing_here")


def test_a_run_without_a_complete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(LoadError, match=f"no complete checkpoint .*{COMPLETE}"):
        load_for_sampling(tmp_path)


def test_an_unknown_ema_rate_names_the_kept_ones(runs):
    with pytest.raises(LoadError, match=r"--ema-rate 0.5: .* keeps EMA rates 0.9999 only"):
        load_for_sampling(runs.base, "ema", ema_rate=0.5)


def test_an_exported_file_loads_the_weights_it_was_written_with(runs, tmp_path):
    path = export_checkpoint(runs.base, tmp_path / "base.safetensors", "ema")
    loaded = load_for_sampling(path)
    assert torch.equal(_param(loaded.model), _param(runs.base_model) * runs.ema_scale)
    assert read_source_config(path).model.image_size == 16
    assert loaded.weights == "export"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_raw_weights_of_a_real_zero_checkpoint_are_the_trained_fp32_weights(synthetic_shards, tmp_path, stage):
    from textdiff.config import config_from_dict
    from textdiff.train import engine as eng
    from textdiff.train.loop import Trainer

    recipe = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 1000000,
              "textdiff": {"model": {"image_size": 16, "num_channels": 32, "channel_mult": [1], "num_res_blocks": 1,
                                     "attention_resolutions": [], "num_heads": 1, "channels_per_head": 32},
                           "diffusion": {"diffusion_steps": 100},
                           "data": {"shards": str(synthetic_shards / "manifest.json"), "num_workers": 0,
                                    "shuffle_buffer": 4, "resampled": False, "save_first_batch": False},
                           "train": {"max_steps": 1, "log_every": 1, "sample_every": 0},
                           "ema": {"rates": [0.5]}}}
    trainer = Trainer(config_from_dict(recipe), tmp_path / "run")
    trainer.run()
    trained = dict(zip(trainer.param_names, eng.full_fp32_parameters(trainer.engine, trainer.params)))
    trainer.close()
    raw = load_for_sampling(tmp_path / "run", "raw")
    for name, p in raw.model.named_parameters():
        assert torch.equal(p.detach(), trained[name].reshape(p.shape)), name
    ema = load_for_sampling(tmp_path / "run", "ema")
    assert ema.weights == "ema:0.5"


class _RunsCodeWhenUnpickled:
    """A hostile checkpoint's payload: unpickling it calls exec, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.slow
@pytest.mark.parametrize("victim, weights", [("textdiff.pt", "ema"), ("mp_rank_00_model_states.pt", "raw")])
def test_a_downloaded_checkpoint_whose_pickle_runs_code_is_refused(make_run, tmp_path, victim, weights):
    make_run(tmp_path / "run")
    bad = resolve_checkpoint(tmp_path / "run") / victim
    marker = tmp_path / "marker"
    torch.save({"module": {}, "ema": _RunsCodeWhenUnpickled(marker)}, bad)
    with pytest.raises(LoadError, match=rf"{bad} is refused: its pickle calls exec"):
        load_for_sampling(tmp_path / "run", weights)
    assert not marker.exists()
