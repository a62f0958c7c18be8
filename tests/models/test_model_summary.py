"""tools/model_summary.py counts the full base64 model per part without weights or memory."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("model_summary", ROOT / "tools/model_summary.py")
model_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_summary)

# CLIP ViT-L/14 text tower: 49408 x 768 tokens + 77 x 768 positions + 12 layers of 7,087,872 + final
# LayerNorm 1,536 + projection 768 x 768 = 123,650,304
VIT_L_14_TEXT_TOWER = 49408 * 768 + 77 * 768 + 12 * (4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768
                                                    + 4 * 768) + 2 * 768 + 768 * 768


def test_base64_json_counts_every_part_and_the_frozen_clip_tower(capsys):
    assert model_summary.main([str(ROOT / "ds_configs/base64.json"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert VIT_L_14_TEXT_TOWER == 123_650_304
    assert counts["capt_encoder_frozen"] == VIT_L_14_TEXT_TOWER and counts["capt_encoder_trainable"] == 0
    assert counts["total_trainable"] == counts["total"] - VIT_L_14_TEXT_TOWER
    parts = [k for k in counts if k not in ("total", "total_trainable")]
    assert sum(counts[k] for k in parts) == counts["total"]
    assert all(counts[k] > 1_000_000 for k in ("unet", "txt_encoder", "cross_attn", "weave_attn", "capt_adapters"))


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
