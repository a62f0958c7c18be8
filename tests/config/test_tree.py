"""Loading the config tree: unknown keys, wrong types and impossible combinations name the key."""

import json
from pathlib import Path

import pytest

from textdiff.config import ConfigError, ModelConfig, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE64 = ROOT / "ds_configs/base64.json"


def model(**keys):
    return config_from_dict({"textdiff": {"model": keys}})


def test_base64_recipe_loads_the_seed_model_and_deepspeed_keys():
    cfg = load_config(BASE64)
    assert cfg.model.channel_mult == (1, 2, 2, 4, 4) and cfg.model.attention_resolutions == (4, 8, 16)
    assert cfg.model.txt_resolutions == (8, 16, 32) and cfg.model.max_seq_len == 384
    assert cfg.model.clipname == "ViT-L-14-336" and cfg.model.silu_impl == "fused"
    assert (cfg.diffusion.noise_schedule, cfg.diffusion.rescale_timesteps) == ("cosine", False)
    ds = cfg.deepspeed  # the seed's --microbatch 36, --lr 1e-4 and --fp16_scale_growth 2e-3
    assert ds["train_micro_batch_size_per_gpu"] == 36 and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["fp16"]["loss_scale_window"] == 500


def test_round_trip_through_to_dict_is_lossless():
    cfg = load_config(BASE64)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_key_names_it_and_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown key model.num_channel; did you mean model.num_channels"):
        model(num_channel=128)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown section textdiff.modle; did you mean textdiff.model"):
        config_from_dict({"textdiff": {"modle": {}}})


@pytest.mark.parametrize("key, value, message", [
    ("num_channels", "wide", "model.num_channels is 'wide'; expected an integer"),
    ("learn_sigma", 1, "model.learn_sigma is 1; expected true or false"),
    ("txt_pdrop", "0.1x", "model.txt_pdrop is '0.1x'; expected a number"),
    ("silu_impl", "cuda", "model.silu_impl is 'cuda'; choose one of 'torch', 'fused'"),
    ("channel_mult", 4, "model.channel_mult is 4; expected a list"),
])
def test_wrong_type_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(**{key: value})


@pytest.mark.parametrize("keys, message", [
    (dict(attention_resolutions=[6]), "model.attention_resolutions holds 6 px, which the U-net never reaches"),
    (dict(channels_per_head=48), "model.channels_per_head is 48, which does not divide the block width 256"),
    (dict(num_heads=3), "model.num_heads is 3, which does not divide the middle width 1024"),
    (dict(txt_resolutions=[8]), "model.txt_resolutions is set but model.txt is false"),
    (dict(txt=True), "model.txt_resolutions is empty but model.txt is true"),
    (dict(capt_pdrop=0.1), "model.capt_pdrop is set but model.using_capt is false"),
    (dict(noise_cond=True), "model.noise_cond needs an upsampler"),
    (dict(monochrome_adapter=True), "model.monochrome_adapter adapts a monochrome U-net to RGB"),
    (dict(num_channels=100), "model.num_channels is 100, so a level is 100 channels wide, which GroupNorm\\(32\\)"),
    (dict(num_channels=48, num_groups=32), "GroupNorm\\(32\\) cannot split; give a multiple of model.num_groups"),
    (dict(image_size=32, stem_patch=3), "model.stem_patch is 3; give a factor >= 1 that divides model.image_size=32"),
    (dict(txt=True, txt_resolutions=[8], weave_attn=True, txt_dim=384, cross_attn_channels_per_head=128),
     "model.cross_attn_channels_per_head gives 3 heads, which do not split the 1024 channels that the weave's "
     "image-to-text attention has at 8 px"),
    (dict(txt=True, txt_resolutions=[8], txt_dim=192, num_heads=256),
     "model.num_heads gives 256 text-attention heads, which do not split txt_dim=192"),
    (dict(txt=True, txt_resolutions=[8], cross_attn_channels_per_head=0),
     "model.cross_attn_channels_per_head is 0; give a positive width or -1"),
    (dict(max_seq_len=2), "model.max_seq_len is 2; it counts the start and end tokens"),
    (dict(channels_per_head=0, num_heads=3), "model.num_heads is 3, which does not divide the block width 256"),
    (dict(all_pdrop=1.5), "model.all_pdrop must lie in \\[0, 1\\]"),
])
def test_impossible_combination_names_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        model(**keys)


def test_set_overrides_parse_json_and_seed_style_lists():
    cfg = load_config(BASE64, ["model.num_channels=128", "model.txt_resolutions=16,32", "model.clipname=RN50",
                               "deepspeed.fp16.enabled=false", "diffusion.timestep_respacing=ddim50"])
    assert cfg.model.num_channels == 128 and cfg.model.txt_resolutions == (16, 32)
    assert cfg.model.clipname == "RN50" and cfg.diffusion.timestep_respacing == "ddim50"
    assert cfg.deepspeed["fp16"]["enabled"] is False and cfg.deepspeed["fp16"]["loss_scale_window"] == 500


def test_overrides_leave_the_original_dict_alone():
    raw = {"textdiff": {"model": {"num_channels": 64}}}
    assert apply_overrides(raw, ["model.num_channels=96"])["textdiff"]["model"]["num_channels"] == 96
    assert raw["textdiff"]["model"]["num_channels"] == 64


@pytest.mark.parametrize("override, message", [
    ("model.num_channels", "is not of the form SECTION.KEY=VALUE"),
    ("modle.num_channels=3", "unknown section modle; did you mean model"),
    ("model.image_size=0", "model.image_size must be positive"),
])
def test_bad_override_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE64, [override])


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"textdiff": {"model": {"image_size": 64,}}}')
    with pytest.raises(ConfigError, match="bad.json is not valid JSON: line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.json does not exist"):
        load_config(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"textdiff": {"model": {"txt_dim": "big"}}}')
    with pytest.raises(ConfigError, match="wrong.json: model.txt_dim is 'big'"):
        load_config(wrong)


def test_defaults_are_valid():
    ModelConfig().validate()


@pytest.mark.parametrize("keys, message", [
    (dict(image_size=33), r"model.image_size is 33, which the 4 downsamplings of channel_mult \[1, 2, 2, 4, 4\] "
                          "cannot halve evenly; give a multiple of 16"),
    (dict(image_size=30), "model.image_size is 30, which the 4 downsamplings"),
    (dict(image_size=20, channel_mult=[1, 2, 2, 4]), "model.image_size is 20, .* give a multiple of 8"),
    (dict(txt_depth=-1), "model.txt_depth must be >= 0"),
    (dict(in_channels=0), "model.in_channels must be at least 1"),
    (dict(cross_attn_init_gain=0.0), "model.cross_attn_init_gain is 0.0; it must be positive .*use model.cross_attn_rezero=true"),
    (dict(cross_attn_init_gain=-1.0), "model.cross_attn_init_gain is -1.0; it must be positive"),
    (dict(cross_attn_gain_scale=0.0), "model.cross_attn_gain_scale must not be 0: .*give e.g. 1"),
    (dict(txt_dim=0), "model.txt_dim must be positive"),
])
def test_sizes_depths_and_gains_that_cannot_build_a_model_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        model(**keys)


def test_sizes_the_downsamplings_halve_evenly_are_accepted():
    assert model(image_size=48, attention_resolutions=[3, 6, 12]).model.image_size == 48  # 48 / 2**4 = 3 px
    assert model(image_size=24, channel_mult=[1, 2, 2, 4], attention_resolutions=[3, 6, 12]).model.image_size == 24


