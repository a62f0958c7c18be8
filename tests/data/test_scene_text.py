"""Specification of the scene-text test set (textdiff/data/scene_text.py, tools/make_scene_text.py).

Needs the Debian packages tools/setup_env.sh installs (fonts, wallpaper photographs, wamerican).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textdiff.data import scene_text
from textdiff.data.scene_text import (MIN_CONTRAST, SceneTextError, find_backgrounds, find_fonts, line_masks,
                                      load_assets, load_words, paint_text, render_scene, scene_rng)
from textdiff.data.scene_text_set import make_scene_text_set
from textdiff.data.shards import ORDER_SORTED, make_source_shards
from textdiff.data.synthetic import luma

REPO = Path(__file__).resolve().parents[2]
SIZE = 256
SET_SIZE = 50
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(scope="module")
def assets():
    return load_assets()


@pytest.fixture(scope="module")
def scenes(assets):
    """40 scenes with text (seed 7) at 256 px."""
    return [render_scene(scene_rng(7, i), SIZE, assets) for i in range(40)]


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    """A written set of 50 scenes at 256 px, 20% text-free by default, seed 0."""
    out = tmp_path_factory.mktemp("scene_set")
    make_scene_text_set(out, SET_SIZE, size=SIZE, seed=0, progress=False, command="test")
    return out


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def line_alone(sample, i: int) -> np.ndarray:
    """[H, W] bool: the pixels that line ``i`` of ``sample`` changes, drawn black alone on white."""
    layout = dataclasses.replace(sample.layout, lines=(sample.layout.lines[i],))
    image, _ = paint_text(Image.new("RGB", (SIZE, SIZE), WHITE), layout, BLACK)
    return (np.asarray(image) != 255).any(axis=2)


# --- assets -----------------------------------------------------------------------------------------------


def test_fonts_span_at_least_10_families_with_serif_sans_bold_and_condensed_faces():
    fonts = find_fonts()
    families = {f.family for f in fonts}
    assert len(families) >= 10 and len(fonts) >= 100
    assert len({f.family for f in fonts if f.kind == "serif"}) >= 5
    assert len({f.family for f in fonts if f.kind == "sans"}) >= 5
    assert sum(f.bold for f in fonts) >= 20 and len({f.family for f in fonts if f.condensed}) >= 3
    assert not families & {"D050000L", "Standard Symbols PS", "DejaVu Math TeX Gyre"}  # symbols, not letters


def test_default_backgrounds_are_the_27_photographs_of_two_wallpaper_packages():
    backgrounds = find_backgrounds()
    assert len(backgrounds) == 27 and list(backgrounds) == sorted(backgrounds)
    assert sum("/mate/nature/" in b for b in backgrounds) == 12


def test_word_list_keeps_words_of_2_to_12_plain_ascii_letters(tmp_path):
    (tmp_path / "words").write_text("cat\ncat's\ncafé\nA\nHello\nx-ray\nincomprehensibly\nzebra\n", encoding="utf-8")
    assert load_words(tmp_path / "words") == ("Hello", "cat", "zebra")
    assert len(load_words()) >= 50_000  # wamerican: 71,243 of its 104,334 lines


def test_missing_word_list_is_refused_naming_it_and_wamerican(tmp_path):
    with pytest.raises(SceneTextError, match=r"word list .*nowords not found: install wamerican"):
        load_words(tmp_path / "nowords")


def test_missing_font_packages_are_named_with_the_setup_script(tmp_path):
    with pytest.raises(SceneTextError, match=r"install fonts-dejavu-core fonts-dejavu-extra .*tools/setup_env.sh"):
        find_fonts(tmp_path)


def test_missing_photograph_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(scene_text, "PHOTO_ROOT", tmp_path)
    with pytest.raises(SceneTextError, match=r"install lomiri-wallpapers-16.04 mate-backgrounds .*--backgrounds DIR"):
        find_backgrounds()


def test_empty_backgrounds_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(SceneTextError, match=r"backgrounds folder .*photos holds no images"):
        make_scene_text_set(tmp_path / "out", 5, backgrounds=tmp_path / "photos", progress=False)
    assert not (tmp_path / "out").exists()


def test_backgrounds_folder_given_is_used_for_every_scene(tmp_path, assets):
    Image.new("RGB", (400, 300), (30, 90, 200)).save(tmp_path / "blue.png")
    mine = dataclasses.replace(assets, backgrounds=find_backgrounds(tmp_path))
    sample = render_scene(scene_rng(0, 0), SIZE, mine, text_free=True)
    assert sample.background_name == str(tmp_path / "blue.png")
    assert np.array_equal(np.unique(np.asarray(sample.image).reshape(-1, 3), axis=0), [[30, 90, 200]])


# --- scenes -----------------------------------------------------------------------------------------------


def test_scenes_hold_1_to_3_lines_of_listed_words_in_at_least_15_families(scenes, assets):
    words = {w.lower() for w in assets.words}
    assert {len(s.lines) for s in scenes} == {1, 2, 3}
    assert all(w.lower() in words for s in scenes for line in s.lines for w in line.text.split(" "))
    assert all(s.transcription == "\n".join(line.text for line in s.lines) for s in scenes)
    assert len({s.layout.face.family for s in scenes}) >= 15


def test_line_boxes_lie_inside_the_image_and_the_safebox_is_their_union(scenes):
    for s in scenes:
        boxes = np.array([line.box for line in s.lines])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= SIZE).all() and (boxes[:, :2] < boxes[:, 2:]).all()
        assert s.safebox == [*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)]


def test_line_box_is_the_extent_of_the_line_ink_drawn_alone_within_1px(scenes):
    for s in scenes:
        for i, line in enumerate(s.lines):
            ys, xs = np.nonzero(line_alone(s, i))
            extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert max(abs(a - b) for a, b in zip(extent, line.box)) <= 1, (line.text, line.box, extent)


def test_polygon_is_the_turned_ink_box_enclosing_the_visible_ink_and_touching_it_within_2_5px(scenes):
    for s in scenes:
        masks = line_masks(s.layout, SIZE)
        for line, (mask, _) in zip(s.lines, masks):
            ys, xs = np.nonzero(np.asarray(mask) >= 128)
            points = np.stack([xs + 0.5, ys + 0.5], axis=1)
            corners = np.array(line.polygon)
            for p, q in zip(corners, np.roll(corners, -1, axis=0)):
                edge = q - p
                inside = (edge[0] * (points[:, 1] - p[1]) - edge[1] * (points[:, 0] - p[0])) / np.hypot(*edge)
                # visible ink (coverage >= 50%) lies inside, and reaches within 2.5 px of every side
                assert -0.5 <= inside.min() <= 2.5, (line.text, line.polygon)
            turn = math.degrees(math.atan2(-(corners[1, 1] - corners[0, 1]), corners[1, 0] - corners[0, 0]))
            assert abs(turn - s.layout.angle_deg) < 0.05  # corners are rounded to 0.01 px


def test_text_colour_differs_by_64_in_luminance_from_90_percent_of_the_photograph_under_each_line(scenes):
    for s in scenes:
        background = grey(s.background)
        for line in s.lines:
            l, t, r, b = line.box
            far = np.abs(background[t:b, l:r] - luma(s.colour)) >= MIN_CONTRAST
            assert far.mean() >= 0.89, (line.text, far.mean())


def test_text_free_scenes_are_the_photograph_crop_alone(assets):
    sample = render_scene(scene_rng(0, 1), SIZE, assets, text_free=True)
    assert sample.lines == () and sample.safebox is None and sample.transcription == ""
    assert sample.image.size == (SIZE, SIZE) and np.asarray(sample.image).std() > 5  # a photograph, not a flat field


# --- the written set --------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_with_any_worker_count(tmp_path):
    make_scene_text_set(tmp_path / "a", 6, seed=5, progress=False)
    make_scene_text_set(tmp_path / "b", 6, seed=5, workers=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 * 3 + 1 + 4  # png, txt, record per image; settings; 3 JSON files and lines.jsonl
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    make_scene_text_set(tmp_path / "c", 6, seed=6, progress=False)
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "c/images/000000.png").read_bytes()


def test_text_free_share_of_50_images_is_within_the_binomial_bound(scene_set):
    summary = read_json(scene_set / "summary.json")
    # Binomial(50, 0.2): mean 10, sd 2.8; 3 sd either side
    assert 2 <= summary["text_free"] <= 18 and summary["with_text"] + summary["text_free"] == SET_SIZE


def test_text_free_share_0_and_1_give_no_and_only_text_free_images(tmp_path):
    assert make_scene_text_set(tmp_path / "none", 4, text_free_share=0.0, progress=False)["text_free"] == 0
    assert make_scene_text_set(tmp_path / "all", 4, text_free_share=1.0, progress=False)["text_free"] == 4


def test_side_files_agree_with_each_other_and_with_the_txt_beside_each_image(scene_set):
    transcriptions = read_json(scene_set / "transcriptions.json")
    safeboxes = read_json(scene_set / "safeboxes.json")
    records = [json.loads(line) for line in (scene_set / "lines.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["key"] for r in records] == list(transcriptions) == [f"{i:06d}" for i in range(SET_SIZE)]
    for r in records:
        assert set(r) == {"key", "lines", "safebox", "text_free"}
        assert set().union(*(x.keys() for x in r["lines"])) <= {"text", "box", "polygon", "font", "size_px"}
        text = "\n".join(x["text"] for x in r["lines"])
        beside = (scene_set / "images" / f"{r['key']}.txt").read_text(encoding="utf-8")
        assert transcriptions[r["key"]] == text == beside
        assert r["text_free"] == (text == "") == (r["key"] not in safeboxes) == (r["safebox"] is None)
        if r["lines"]:
            boxes = np.array([x["box"] for x in r["lines"]])
            assert safeboxes[r["key"]] == r["safebox"] == [*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)]
        assert Image.open(scene_set / "images" / f"{r['key']}.png").size == (SIZE, SIZE)
    summary = read_json(scene_set / "summary.json")
    assert summary["images"] == SET_SIZE and summary["lines"] == sum(len(r["lines"]) for r in records)
    assert summary["font_families_found"] >= 10 and sum(summary["backgrounds_used"].values()) == SET_SIZE


def test_make_shards_of_the_images_folder_carries_its_transcriptions_and_safeboxes(scene_set, tmp_path):
    manifest = make_source_shards(scene_set / "images", tmp_path / "shards", safeboxes=scene_set / "safeboxes.json",
                                  order=ORDER_SORTED, progress=False)
    assert manifest["samples"] == SET_SIZE and manifest["skipped_count"] == 0
    transcriptions, safeboxes = read_json(scene_set / "transcriptions.json"), read_json(scene_set / "safeboxes.json")
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert sorted(samples) == sorted(transcriptions)
    for key, sample in samples.items():
        assert sample["txt"].decode("utf-8") == transcriptions[key]
        assert json.loads(sample["json"])["safebox"] == safeboxes.get(key, [0, 0, SIZE, SIZE])
        assert sample["png"] == (scene_set / "images" / f"{key}.png").read_bytes()


def test_a_rerun_renders_only_missing_scenes_and_refuses_other_settings(tmp_path):
    make_scene_text_set(tmp_path, 3, progress=False)
    first, second = (tmp_path / "images/000000.png").stat().st_mtime_ns, (tmp_path / "images/000001.png").read_bytes()
    (tmp_path / "records/000001.json").unlink()
    make_scene_text_set(tmp_path, 3, progress=False)
    assert (tmp_path / "images/000000.png").stat().st_mtime_ns == first
    assert (tmp_path / "images/000001.png").read_bytes() == second
    with pytest.raises(SceneTextError, match=r"other settings \(seed: 0, now 1\); pass --overwrite"):
        make_scene_text_set(tmp_path, 3, seed=1, progress=False)
    with pytest.raises(SceneTextError, match=r"holds 1 images beyond --n 2 \(000002.png"):
        make_scene_text_set(tmp_path, 2, progress=False)
    assert make_scene_text_set(tmp_path, 2, seed=1, overwrite=True, progress=False)["images"] == 2


@pytest.mark.slow
def test_tool_writes_a_set_and_reports_a_clear_error_as_exit_status_2(tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "make_scene_text.py")]
    done = subprocess.run(tool + [str(tmp_path / "out"), "--n", "2", "--size", "64"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "2 images in" in done.stdout, done.stderr
    command = read_json(tmp_path / "out" / "summary.json")["command"]
    assert command == f"make_scene_text.py {tmp_path / 'out'} --n 2 --size 64"
    shutil.rmtree(tmp_path / "out")
    done = subprocess.run(tool + [str(tmp_path / "out"), "--words", str(tmp_path / "nowords")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "install wamerican" in done.stderr and not (tmp_path / "out").exists()
