"""tools/model_summary.py counts the full base64 model per part without weights or memory."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from textdiff.config import load_config
from textdiff.models import build_model

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("model_summary", ROOT / "tools/model_summary.py")
model_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_summary)

# CLIP ViT-L/14 text tower: 49408 x 768 tokens + 77 x 768 positions + 12 layers of 7,087,872 + final
# LayerNorm 1,536 + projection 768 x 768 = 123,650,304
VIT_L_14_TEXT_TOWER = 49408 * 768 + 77 * 768 + 12 * (4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768
                                                    + 4 * 768) + 2 * 768 + 768 * 768
# the research code's base64 (improved-diffusion with the seed's flags), per block; its frozen CLIP also holds
# CLIP's logit_scale, one scalar that textdiff does not build (docs/seed_flags.md, deliberate differences)
RESEARCH_BASE64 = {"unet": 538_707_206, "txt_encoder": 14_177_544, "weave_attn": 33_086_994,
                   "cross_attn": 23_626_761, "pos_tables": 131_072, "capt_adapters": 21_261_312, "capt_norm": 1_536,
                   "capt_encoder_trainable": 0, "capt_encoder_frozen": 123_650_305 - 1,
                   "total_trainable": 630_992_425}


@pytest.fixture(scope="module")
def base64_model():
    cfg = load_config(str(ROOT / "ds_configs/base64.json")).model
    with torch.device("meta"):
        return build_model(cfg, load_capt_weights=False)


def test_base64_json_counts_every_part_and_the_frozen_clip_tower(capsys):
    assert model_summary.main([str(ROOT / "ds_configs/base64.json"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert VIT_L_14_TEXT_TOWER == 123_650_304
    assert counts["total_trainable"] == counts["total"] - VIT_L_14_TEXT_TOWER
    parts = [k for k in counts if k not in ("total", "total_trainable")]
    assert sum(counts[k] for k in parts) == counts["total"]
    assert {k: counts[k] for k in RESEARCH_BASE64} == RESEARCH_BASE64


def test_base64_pos_tables_are_two_axes_of_2c_per_text_resolution():
    """32 px (512 ch), 16 px (512 ch), 8 px (1024 ch): 2 x 2C x res each = 65,536 + 32,768 + 32,768 = 131,072."""
    assert 2 * 2 * 512 * 32 + 2 * 2 * 512 * 16 + 2 * 2 * 1024 * 8 == RESEARCH_BASE64["pos_tables"]


def test_base64_text_encoder_holds_the_research_codes_pieces(base64_model):
    """14,177,544 = 105 x 512 tokens + 384 x 512 positions + 32 x 512 lines + 262,656 timestep projection
    + 4 layers of 3,411,970 (attention 1,048,576, GEGLU x3 MLP 2,362,880, two ScaleNorm scalars) + T5 table 32 x 8."""
    enc = base64_model.text_encoder
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(enc.time_proj) == 262_656 and count(enc.line_emb) == 16_384
    assert enc.token_emb.weight.shape == (105, 512) and enc.pos_emb.shape == (384, 512)
    assert [count(layer) for layer in enc.layers] == [3_411_970] * 4 and count(enc.rel_bias) == 256
    assert 105 * 512 + 384 * 512 + 16_384 + 262_656 + 4 * 3_411_970 + 256 == RESEARCH_BASE64["txt_encoder"]


def test_table_output_and_set_overrides(capsys):
    assert model_summary.main([str(ROOT / "ds_configs/base64.json"), "--set", "model.using_capt=false",
                               "--set", "model.capt_pdrop=0"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["capt_encoder_frozen"].split()[0] == "0" and int(lines["total"].split()[0].replace(",", "")) > 0


def test_bad_override_is_a_clear_error_and_exit_code_2(capsys):
    assert model_summary.main([str(ROOT / "ds_configs/base64.json"), "--set", "model.num_channel=64"]) == 2
    assert "did you mean model.num_channels" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"]])
def test_help_exits_cleanly(argv):
    with pytest.raises(SystemExit) as exit_info:
        model_summary.main(argv)
    assert exit_info.value.code == 0
