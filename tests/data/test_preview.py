"""Specification of textdiff/data/preview.py: a labelled PNG grid and JSON of one batch."""

import json

import numpy as np
import torch
from PIL import Image

from textdiff.data.preview import LABEL_LINES, LINE_HEIGHT, TILE_MIN, batch_record, save_batch_preview, to_uint8


def make_batch(n=3, size=16, low=8):
    gen = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
            "low_res": torch.rand(n, 3, low, low, generator=gen) * 2 - 1,
            "txt": ["hello", "", "multi\nline"], "capt": ["a sign", "", "x"], "key": ["k0", "k1", "k2"]}


def test_to_uint8_maps_minus_one_to_0_and_one_to_255():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert to_uint8(x).shape == (1, 1, 4, 3)  # monochrome repeated to RGB


def test_preview_writes_a_grid_with_image_and_low_res_tiles_and_a_json(tmp_path):
    batch = make_batch()
    png, js = save_batch_preview(batch, tmp_path / "preview", name="b0")
    grid = np.asarray(Image.open(png))
    cell_h = 2 * TILE_MIN + LABEL_LINES * LINE_HEIGHT + 4
    assert grid.shape == (cell_h, 3 * (TILE_MIN + 4), 3)
    # tiles are nearest-neighbour enlargements of the batch: 16 px -> 128 px is 8x8 blocks
    expected = to_uint8(batch["image"])[1]
    assert np.array_equal(grid[0:TILE_MIN:8, TILE_MIN + 4:2 * TILE_MIN + 4:8], expected)
    expected_low = to_uint8(batch["low_res"])[0]
    assert np.array_equal(grid[TILE_MIN:2 * TILE_MIN:16, 0:TILE_MIN:16], expected_low)
    record = json.loads(js.read_text())
    assert record["image_shape"] == [3, 3, 16, 16] and record["low_res_shape"] == [3, 3, 8, 8]
    assert [s["txt"] for s in record["samples"]] == ["hello", "", "multi\nline"]  # "" stays "", not null
    assert [p.name for p in sorted((tmp_path / "preview").iterdir())] == ["b0.json", "b0.png"]  # no temp files


def test_record_pixel_range_is_reported_per_sample():
    batch = make_batch()
    batch["image"][0] = 1.0
    assert batch_record(batch)["samples"][0]["image_min"] == 1.0
    assert "low_res_shape" not in batch_record({k: v for k, v in batch.items() if k != "low_res"})


def test_unknown_transcription_is_written_as_null(tmp_path):
    batch = make_batch()
    batch["txt"][0] = None
    _, js = save_batch_preview(batch, tmp_path)
    assert json.loads(js.read_text())["samples"][0]["txt"] is None


def test_preview_loader_tool_writes_grids_of_the_recipe_stream(synthetic_shards, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    tool = Path(__file__).parents[2] / "tools" / "preview_loader.py"
    spec = importlib.util.spec_from_file_location("preview_loader", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "textdiff": {"model": {"image_size": 32}}}))
    code = module.main(["--config", str(recipe), "--set", f"data.shards={synthetic_shards / 'manifest.json'}",
                        "--set", "data.num_workers=0", "--out", str(tmp_path / "out"), "--batches", "2"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "batch_000.json", "batch_000.png", "batch_001.json", "batch_001.png"]
    assert json.loads((tmp_path / "out" / "batch_001.json").read_text())["image_shape"] == [4, 3, 32, 32]
    assert '"batches": 2' in capsys.readouterr().out
