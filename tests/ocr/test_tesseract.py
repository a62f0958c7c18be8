"""The Tesseract engine: preprocessing of small images, batched reading in order, the missing-program error,
line boxes in the given image's pixels, and the photograph mode."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.ocr import OcrError, OcrMissingError, make_engine, to_pil
from textdiff.ocr.tesseract import (Page, TesseractEngine, TesseractError, TesseractMissingError, glyph_upscale_factor,
                                    ink_height, parse_tsv, prepare, preprocess, upscale_factor)


def render(text: str, size: int = 64, font_px: int = 12, bg=(230, 225, 200), fg=(20, 30, 60)) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(image).text((3, size // 2 - font_px // 2), text, fill=fg, font=ImageFont.load_default(size=font_px))
    return image


def ocr_image(image, **settings):
    """What the engine with ``settings`` reads in one image."""
    return TesseractEngine(**settings).read([image], progress=False)[0]


def ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """[left, top, right, bottom) of the pixels darker than mid-gray."""
    ys, xs = np.nonzero(np.asarray(image.convert("L")) < 128)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_upscale_factor_is_the_whole_factor_nearest_ocr_height():
    assert [upscale_factor(h, 192) for h in (32, 64, 100, 128, 256, 1024)] == [6, 3, 2, 2, 1, 1]


def test_preprocess_upscales_to_about_ocr_height_and_adds_a_margin():
    out = preprocess(render("abc"), TesseractEngine(ocr_height=256))
    # 64 * 4 = 256 px, plus a margin of 256 // 8 = 32 px on each side
    assert out.mode == "L" and out.size == (320, 320)


def test_preprocess_turns_light_text_on_dark_into_dark_on_light():
    engine = TesseractEngine(ocr_height=64, ocr_binarize=False)
    out = np.asarray(preprocess(render("abc", bg=(10, 10, 30), fg=(250, 250, 250)), engine))
    assert np.median(out) == 255
    assert out.min() < 64


def test_preprocess_binarize_leaves_two_levels():
    out = np.asarray(preprocess(render("abc"), TesseractEngine(ocr_height=128, ocr_binarize=True)))
    assert set(np.unique(out).tolist()) == {0, 255}


def test_to_pil_rejects_float_and_channels_first_arrays():
    with pytest.raises(TypeError, match="uint8"):
        to_pil(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"transpose\(1, 2, 0\)"):
        to_pil(np.zeros((3, 8, 8), np.uint8))


def test_reads_a_word_rendered_at_64px():
    assert ocr_image(render("lantern")).text == "lantern"


def test_reads_light_text_on_a_dark_background():
    assert ocr_image(render("copper", bg=(20, 20, 40), fg=(240, 230, 90))).text == "copper"


def test_reads_a_uint8_array_like_a_pil_image():
    assert ocr_image(np.asarray(render("summit"))).text == "summit"


def test_many_images_over_several_workers_keep_their_order():
    # 40 images make two Tesseract chunks (32 + 8) that run side by side
    words = ["ember", "falcon", "violet", "ripple"] * 10
    readings = TesseractEngine().read([render(w) for w in words], workers=2, progress=False)
    assert [r.text for r in readings] == words


def test_blank_image_reads_as_no_letters():
    reading = ocr_image(Image.new("RGB", (64, 64), (128, 140, 160)))
    assert not any(ch.isalnum() for ch in reading.text)


def test_missing_tesseract_named_in_config_says_to_install_tesseract_ocr():
    with pytest.raises(TesseractMissingError, match="install the tesseract-ocr package") as err:
        ocr_image(render("x"), tesseract_cmd="no-such-tesseract-binary")
    assert "eval.tesseract_cmd" in str(err.value)


def test_tesseract_absent_from_path_gives_the_same_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TesseractMissingError, match="tesseract-ocr"):
        ocr_image(render("x"))


def test_psm_6_reads_two_lines_that_psm_7_cannot():
    image = render("river")
    ImageDraw.Draw(image).text((3, 44), "otter", fill=(20, 30, 60), font=ImageFont.load_default(size=12))
    assert ocr_image(image, psm=6).text == "river\notter"
    assert ocr_image(image, psm=7).text != "river\notter"


def test_ink_height_spans_the_inked_rows_and_ignores_a_speck():
    gray = np.full((32, 32), 255, np.uint8)
    gray[10:20, 4:28] = 0  # a 10-row bar of 24 px per row
    gray[2, 3] = 0  # one dark pixel: under 5% of the fullest row
    assert ink_height(gray) == 10
    assert ink_height(np.full((8, 8), 255, np.uint8)) == 0


def test_glyph_upscale_brings_the_ink_to_the_glyph_height_capped_by_ocr_height():
    gray = np.full((32, 32), 255, np.uint8)
    gray[11:21, 4:28] = 0  # 10 px ink
    assert glyph_upscale_factor(gray, ocr_height=192, ocr_glyph_height=40) == 4  # 40 / 10
    assert glyph_upscale_factor(gray, ocr_height=96, ocr_glyph_height=40) == 3  # 96 / 32 caps it
    assert glyph_upscale_factor(gray, ocr_height=192, ocr_glyph_height=0) == 6  # off: 192 / 32
    noise = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.uint8)  # ink in every row
    assert glyph_upscale_factor(noise, ocr_height=192, ocr_glyph_height=40) == 6


def test_the_whitelist_keeps_tesseract_to_the_listed_characters():
    image = render("4711", size=64, font_px=20)
    assert ocr_image(image, whitelist="0123456789", ocr_glyph_height=40).text == "4711"
    restricted = ocr_image(image, whitelist="abc", ocr_glyph_height=40).text
    assert not any(c.isdigit() for c in restricted)


def test_an_empty_one_line_reading_is_read_again_in_the_retry_mode():
    """Tesseract 5's one-line mode (psm 7) returns nothing for some clean 32 px digit renders (8 of 220 held-out
    renders of the spelling experiment); word mode (psm 8) reads them. This render of "544" is one of them."""
    from textdiff.experiments.spelling_set import render_rng, render_string

    image = render_string("544", render_rng(7919, "544", 118), 32)[0]
    assert ocr_image(image, whitelist="0123456789", ocr_glyph_height=40).text == ""
    assert ocr_image(image, whitelist="0123456789", ocr_glyph_height=40, ocr_retry_psm=8).text == "544"


# --- the engine's interface -------------------------------------------------------------------------------


def test_the_engine_is_registered_as_tesseract_and_names_its_version():
    engine = make_engine("tesseract", psm=6)
    assert isinstance(engine, TesseractEngine) and (engine.name, engine.psm) == ("tesseract", 6)
    version = engine.version()
    assert version.startswith("tesseract ") and version.endswith("(eng)")
    assert version.split()[1][0].isdigit()  # "tesseract 5.3.0 (eng)"


def test_its_errors_are_the_errors_of_any_engine():
    assert issubclass(TesseractMissingError, OcrMissingError) and issubclass(TesseractError, OcrError)
    with pytest.raises(OcrMissingError):
        TesseractEngine(tesseract_cmd="no-such-tesseract-binary").version()


def test_word_and_line_confidences_agree():
    reading = ocr_image(render("lantern"))
    (word, conf), = reading.words
    (line,) = reading.lines
    assert (word, line.text) == ("lantern", "lantern")
    assert 0.5 <= line.confidence <= 1.0 and line.confidence == pytest.approx(conf / 100)


# --- line boxes -------------------------------------------------------------------------------------------


def test_a_line_box_is_the_ink_box_in_the_given_images_pixels():
    """The render is enlarged 3x with a 24 px margin before Tesseract reads it; the box comes back in the
    64 px image's pixels, within 1.5 px of the ink (the ink box of "lantern" is [4, 29, 41, 38))."""
    image = render("lantern")
    (line,) = ocr_image(image).lines
    assert ink_box(image) == (4, 29, 41, 38)
    assert line.box == pytest.approx((4, 29, 41, 38), abs=1.5)
    left, top, right, bottom = line.box
    assert line.polygon == ((left, top), (right, top), (right, bottom), (left, bottom))


def test_two_lines_have_their_boxes_top_to_bottom():
    image = render("river")
    ImageDraw.Draw(image).text((3, 44), "otter", fill=(20, 30, 60), font=ImageFont.load_default(size=12))
    top_line, bottom_line = ocr_image(image, psm=6).lines
    assert (top_line.text, bottom_line.text) == ("river", "otter")
    upper = image.crop((0, 0, 64, 42))
    lower = Image.new("RGB", (64, 64), (230, 225, 200))
    lower.paste(image.crop((0, 42, 64, 64)), (0, 42))
    assert top_line.box == pytest.approx(ink_box(upper), abs=1.5)
    assert bottom_line.box == pytest.approx(ink_box(lower), abs=1.5)


def test_page_maps_prepared_pixels_back_and_clips_to_the_image():
    page = Page(Image.new("L", (1, 1)), factor=3, margin=24, size=(64, 64))
    assert page.to_given((33, 111, 147, 138)) == (3.0, 29.0, 41.0, 38.0)
    assert page.to_given((0, 0, 500, 500)) == (0.0, 0.0, 64.0, 64.0)


def test_parse_tsv_groups_words_by_block_paragraph_and_line_on_each_page():
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
    rows = ["1\t1\t0\t0\t0\t0\t0\t0\t100\t100\t-1\t", "5\t1\t1\t1\t1\t1\t10\t20\t30\t12\t91.5\tbig",
            "5\t1\t1\t1\t1\t2\t45\t21\t25\t11\t88\tcat", "5\t1\t1\t1\t2\t1\t10\t40\t20\t12\t70\tsat",
            "1\t2\t0\t0\t0\t0\t0\t0\t100\t100\t-1\t"]
    first, second = parse_tsv(header + "\n".join(rows) + "\n", 2)
    assert [[w.text for w in line] for line in first] == [["big", "cat"], ["sat"]]
    assert first[0][1].box == (45, 21, 70, 32) and first[0][0].conf == 91.5
    assert second == []
    with pytest.raises(TesseractError, match="for 3 images"):
        parse_tsv(header + "\n".join(rows) + "\n", 3)


# --- photographs ------------------------------------------------------------------------------------------


def test_photograph_mode_scales_by_the_image_alone_and_keeps_the_gray_levels():
    # the 9 px ink of "abc" asks x1 for 10 px glyphs; 64 px to 256 px asks x4, which a photograph gets
    settings = dict(ocr_height=256, ocr_glyph_height=10)
    assert prepare(render("abc"), TesseractEngine(**settings)).factor == 1
    page = prepare(render("abc"), TesseractEngine(photo=True, psm=11, **settings))
    assert (page.factor, page.margin, page.image.size, page.image.mode) == (4, 32, (320, 320), "L")
    assert len(np.unique(np.asarray(page.image))) > 2  # not thresholded


def test_photograph_mode_needs_a_page_mode_and_no_whitelist():
    with pytest.raises(ValueError, match="psm=11"):
        TesseractEngine(photo=True)
    with pytest.raises(ValueError, match="whitelist"):
        TesseractEngine(photo=True, psm=11, whitelist="0123456789")
    with pytest.raises(ValueError, match="ocr_retry_psm 0"):
        TesseractEngine(photo=True, psm=11, ocr_retry_psm=8)
    assert TesseractEngine(photo=True, psm=11, ocr_retry_psm=3).ocr_retry_psm == 3


@pytest.mark.parametrize("psm", [11, 3])
def test_photograph_mode_reads_two_lines_of_a_scene_with_their_boxes(psm):
    """Scene 5 of seed 0 (textdiff.data.scene_text, 256 px: two lines over a photograph); its ground-truth
    line boxes are [14, 148, 247, 179) and [158, 182, 245, 205); Tesseract's come within 3 px."""
    from textdiff.data.scene_text import load_assets, render_scene, scene_rng

    scene = render_scene(scene_rng(0, 5), 256, load_assets())
    assert [line.box for line in scene.lines] == [(14, 148, 247, 179), (158, 182, 245, 205)]
    reading = ocr_image(scene.image, photo=True, psm=psm)
    found = {line.text: line.box for line in reading.lines}
    for truth in scene.lines:
        assert found[truth.text] == pytest.approx(truth.box, abs=3), (truth.text, reading.text)
