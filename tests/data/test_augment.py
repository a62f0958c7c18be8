"""Specification of textdiff/data/augment.py: crops keep text and px scale, flips spare text, resizes."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from textdiff.config import AugmentConfig
from textdiff.data.augment import (
    augment_sample, choose_crop, clamp_box, covered_pixels, crop_resize, downsample, draft_for_crop, draw_crop_box,
    fit_box, largest_square, low_res_mode, min_crop_side, pad_offset, pad_to_hold, random_safebox, sample_rng,
)

EPS = 1e-6


@st.composite
def image_with_safebox(draw):
    width = draw(st.integers(16, 1200))
    height = draw(st.integers(16, 1200))
    short = min(width, height)
    box_w = draw(st.floats(0.0, short))
    box_h = draw(st.floats(0.0, short))
    left = draw(st.floats(0.0, width - box_w))
    top = draw(st.floats(0.0, height - box_h))
    return width, height, (left, top, left + box_w, top + box_h)


def contains(outer, inner):
    return (outer[0] <= inner[0] + EPS and outer[1] <= inner[1] + EPS
            and outer[2] >= inner[2] - EPS and outer[3] >= inner[3] - EPS)


# 500 geometries x 10 draws = 5000 random crops
@settings(max_examples=500, deadline=None)
@given(image_with_safebox(), st.integers(8, 256), st.floats(0.25, 6.0), st.floats(0.25, 6.0),
       st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.integers(0, 2 ** 32 - 1))
def test_crop_is_a_square_inside_the_image_that_keeps_the_safebox_and_px_scale(
        geometry, image_size, sx, sy, scale_a, scale_b, seed):
    width, height, safebox = geometry
    min_scale, max_scale = sorted((scale_a, scale_b))
    rng = np.random.default_rng(seed)
    for _ in range(10):
        box = draw_crop_box(width, height, safebox, (sx, sy), image_size, min_scale, max_scale, rng)
        side = box[2] - box[0]
        assert abs((box[3] - box[1]) - side) < 1e-6
        assert contains((0, 0, width, height), box)
        assert contains(box, safebox)
        # never below image_size stored px nor image_size * max(px_scale), unless the image is smaller
        assert side >= min(min(width, height), image_size * max(1.0, sx, sy)) - EPS


# 200 image sizes x 10 draws = 2000 random crops
@settings(max_examples=200, deadline=None)
@given(st.integers(16, 1200), st.integers(16, 1200), st.integers(0, 2 ** 32 - 1))
def test_text_free_crop_area_lies_between_min_and_max_scale_of_the_largest_square(width, height, seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        box = draw_crop_box(width, height, None, (1.0, 1.0), 8, 0.3, 0.6, rng)
        frac = ((box[2] - box[0]) / min(width, height)) ** 2
        assert 0.3 - EPS <= frac <= 0.6 + EPS
        assert contains((0, 0, width, height), box)


def test_min_crop_side_is_image_size_times_the_largest_px_scale_capped_by_the_short_side():
    assert min_crop_side(500, 400, 64, (1.0, 1.0)) == 64
    assert min_crop_side(500, 400, 64, (2.0, 3.0)) == 192
    assert min_crop_side(500, 400, 64, (0.5, 0.5)) == 64  # shrunk originals still need 64 stored px
    assert min_crop_side(500, 100, 64, (3.0, 3.0)) == 100  # no square larger than the image exists


def test_largest_square_is_centred_without_safebox_and_shifts_to_hold_it():
    assert largest_square(300, 100) == (100.0, 0.0, 200.0, 100.0)
    assert largest_square(300, 100, (250.0, 10.0, 290.0, 20.0)) == (190.0, 0.0, 290.0, 100.0)  # least shift
    assert largest_square(300, 100, (5.0, 10.0, 50.0, 20.0)) == (5.0, 0.0, 105.0, 100.0)


def test_safebox_wider_than_the_image_is_tall_is_padded_not_cut():
    image = Image.new("RGB", (200, 50), (10, 20, 30))
    padded, box = pad_to_hold(image, (10.0, 5.0, 190.0, 45.0))
    assert padded.size == (200, 180)
    assert box == (10.0, 70.0, 190.0, 110.0)
    assert padded.getpixel((0, 0)) == (10, 20, 30)  # border-median fill
    square = largest_square(*padded.size, box)
    assert contains(square, box)


def test_clamp_box_rejects_an_inverted_safebox_naming_the_fix():
    with pytest.raises(ValueError, match="make_shards.py --safeboxes"):
        clamp_box((50, 10, 20, 30), 100, 100)
    assert clamp_box((-5, -5, 120, 40), 100, 100) == (0.0, 0.0, 100.0, 40.0)


def test_random_safebox_lies_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(500):
        box = random_safebox(120, 80, rng)
        assert contains((0, 0, 120, 80), box)
        assert 8 - EPS <= box[2] - box[0] <= 72 + EPS


def test_crop_prob_zero_gives_the_centred_largest_square_and_one_always_crops():
    cfg = AugmentConfig(crop_prob=0.0)
    rng = np.random.default_rng(1)
    assert choose_crop(300, 200, True, None, (1, 1), 32, cfg, rng) == (50.0, 0.0, 250.0, 200.0)
    cfg = AugmentConfig(crop_prob=1.0, crop_min_scale=0.25, crop_max_scale=0.5)
    boxes = [choose_crop(300, 200, True, None, (1, 1), 32, cfg, rng) for _ in range(200)]
    assert max(b[2] - b[0] for b in boxes) <= 200 * 0.5 ** 0.5 + EPS  # 141.4 px
    assert min(b[2] - b[0] for b in boxes) >= 200 * 0.25 ** 0.5 - EPS  # 100 px


def test_special_crop_for_empty_string_uses_its_own_probability_and_min_scale():
    cfg = AugmentConfig(crop_prob=0.0, crop_prob_es=1.0, crop_min_scale_es=0.04, crop_max_scale=0.04,
                        crop_min_scale=0.75, use_special_crop_for_empty_string=True)
    rng = np.random.default_rng(2)
    es = choose_crop(400, 400, False, None, (1, 1), 16, cfg, rng)
    txt = choose_crop(400, 400, True, (0, 0, 10, 10), (1, 1), 16, cfg, rng)
    assert es[2] - es[0] == pytest.approx(80.0)  # sqrt(0.04) * 400
    assert txt == (0.0, 0.0, 400.0, 400.0)  # crop_prob 0 for images with text


def asymmetric_image(width=96, height=64):
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 3] = (255, 0, 0)
    arr[:, width // 3:] = np.linspace(0, 255, width - width // 3, dtype=np.uint8)[None, :, None]
    return Image.fromarray(arr)


def test_flips_never_happen_to_images_with_text():
    cfg_flip = AugmentConfig(flip_lr_prob_es=1.0, crop_prob=0.5)
    cfg_none = AugmentConfig(flip_lr_prob_es=0.0, crop_prob=0.5)
    image = asymmetric_image()
    for seed in range(200):
        flipped = augment_sample(image, "abc", None, (1, 1), cfg_flip, 16, 0, sample_rng(0, seed))
        plain = augment_sample(image, "abc", None, (1, 1), cfg_none, 16, 0, sample_rng(0, seed))
        assert torch.equal(flipped["image"], plain["image"])


def test_text_free_images_flip_with_flip_lr_prob_es():
    image = asymmetric_image()
    plain = augment_sample(image, "", None, (1, 1), AugmentConfig(), 16, 0, sample_rng(0, 7))["image"]
    always = augment_sample(image, "", None, (1, 1), AugmentConfig(flip_lr_prob_es=1.0), 16, 0,
                            sample_rng(0, 7))["image"]
    assert torch.equal(always, plain.flip(-1))
    flips = sum(
        not torch.equal(augment_sample(image, "", None, (1, 1), AugmentConfig(flip_lr_prob_es=0.3), 16, 0,
                                       sample_rng(0, s))["image"], plain) for s in range(400))
    assert 80 <= flips <= 160  # 0.3 * 400 = 120


def test_output_is_channels_first_in_minus_one_one_with_exact_extremes():
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, 20:] = 255
    out = augment_sample(Image.fromarray(arr), "", None, (1, 1), AugmentConfig(), 40, 20, sample_rng(0, 0))
    assert out["image"].shape == (3, 40, 40) and out["low_res"].shape == (3, 20, 20)
    assert out["image"].dtype == torch.float32
    assert out["image"].min().item() == -1.0 and out["image"].max().item() == 1.0
    assert out["low_res"].min().item() >= -1.0 and out["low_res"].max().item() <= 1.0


def test_low_res_is_the_antialiased_bicubic_downsample_of_the_same_crop():
    rng_image = np.random.default_rng(3)
    image = Image.fromarray(rng_image.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    cfg = AugmentConfig(crop_prob=1.0, antialias=True, bicubic_down=True)
    out = augment_sample(image, "x", (30, 20, 60, 40), (1, 1), cfg, 32, 8, sample_rng(5, 1))
    expected = F.interpolate(out["image"][None], size=(8, 8), mode="bicubic", antialias=True)[0]
    assert torch.allclose(out["low_res"], expected, atol=1e-6)


def test_low_res_mode_is_area_for_powers_of_two_bilinear_otherwise_as_the_research_code():
    assert [low_res_mode(256, 64, False, False), low_res_mode(128, 64, False, False)] == ["area", "area"]
    assert [low_res_mode(96, 64, False, False), low_res_mode(192, 64, False, False)] == ["bilinear", "bilinear"]
    assert low_res_mode(256, 64, True, False) == "bilinear" and low_res_mode(256, 64, False, True) == "bicubic"
    image = torch.linspace(-1, 1, 3 * 96 * 96).reshape(3, 96, 96)
    assert torch.equal(downsample(image, 64), F.interpolate(image[None], size=(64, 64), mode="bilinear")[0])
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(downsample(image, 64), image.reshape(3, 64, 4, 64, 4).mean(dim=(2, 4)), atol=1e-6)


def test_bicubic_low_res_is_clamped_only_when_asked():
    image = torch.full((3, 64, 64), -1.0)
    image[:, :, 31:] = 1.0  # a full-contrast edge: the antialiased bicubic kernel's negative lobes ring past it
    raw = downsample(image, 24, antialias=True, bicubic_down=True)
    assert raw.max().item() > 1.05  # 1.083 measured
    assert downsample(image, 24, antialias=True, bicubic_down=True, clamp=True).abs().max().item() <= 1.0


def test_antialiased_downsample_removes_a_pixel_checkerboard_that_plain_sampling_aliases():
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1.0
    image = checker.expand(3, 64, 64).float()
    smooth = downsample(image, 16, antialias=True, bicubic_down=True)
    aliased = F.interpolate(image[None], size=(16, 16), mode="nearest")[0]
    assert smooth.abs().max().item() < 0.05  # averages to grey
    assert aliased.abs().min().item() == 1.0  # keeps full-contrast pixels


def test_blur_prob_one_smooths_the_low_res_image():
    rng_image = np.random.default_rng(4)
    image = Image.fromarray(rng_image.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    sharp = augment_sample(image, "", None, (1, 1), AugmentConfig(), 64, 32, sample_rng(0, 0))["low_res"]
    blurred = augment_sample(image, "", None, (1, 1), AugmentConfig(blur_prob=1.0, blur_sigma_min=1.0,
                                                                   blur_sigma_max=1.0), 64, 32,
                             sample_rng(0, 0))["low_res"]
    tv = lambda x: (x[:, 1:] - x[:, :-1]).abs().mean().item()
    assert tv(blurred) < 0.6 * tv(sharp)


def test_sample_rng_depends_only_on_seed_and_ids():
    a = sample_rng(3, 1, "shard-000000/abc").random(4)
    b = sample_rng(3, 1, "shard-000000/abc").random(4)
    c = sample_rng(3, 2, "shard-000000/abc").random(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_text_crop_with_safebox_never_cuts_the_drawn_text():
    # a black bar marks the text; after any crop the bar's full width must still be in the output
    arr = np.full((100, 300, 3), 255, np.uint8)
    arr[40:60, 200:280] = 0
    cfg = AugmentConfig(crop_prob=1.0, crop_min_scale=0.05, crop_max_scale=0.2)
    for seed in range(50):
        out = augment_sample(Image.fromarray(arr), "hi", (200, 40, 280, 60), (1, 1), cfg, 16, 0,
                             sample_rng(0, seed))["image"]
        dark = (out.mean(0) < 0).float()
        assert dark.sum().item() >= 16 * 16 * (80 * 20) / 100 ** 2 * 0.5


def encoded(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95)
    return Image.open(io.BytesIO(buf.getvalue()))


def smooth_photo(width=512, height=384):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 0.5) % 256, (y * 0.6) % 256, ((x + y) * 0.3) % 256], -1).astype(np.uint8)


def test_large_jpeg_crops_decode_at_reduced_scale_and_match_the_full_decode():
    box = (64.0, 0.0, 448.0, 384.0)
    small, small_box = draft_for_crop(encoded(smooth_photo(), "JPEG"), box, 32)
    assert small.size == (128, 96)  # 1/4: the 384 px crop keeps 96 >= 2 * 32 px
    assert small_box == (16.0, 0.0, 112.0, 96.0)
    full = encoded(smooth_photo(), "JPEG")
    full.load()
    diff = np.abs(crop_resize(small, small_box, 32).astype(float) - crop_resize(full, box, 32).astype(float))
    assert diff.mean() < 1.0  # grey levels of 255


def test_png_and_already_decoded_jpeg_are_not_drafted():
    png = encoded(smooth_photo(), "PNG")
    assert draft_for_crop(png, (0.0, 0.0, 384.0, 384.0), 32) == (png, (0.0, 0.0, 384.0, 384.0))
    jpeg = encoded(smooth_photo(), "JPEG")
    jpeg.load()
    assert draft_for_crop(jpeg, (0.0, 0.0, 384.0, 384.0), 32)[0].size == (512, 384)


def test_random_safebox_for_empty_string_crops_around_a_random_box_as_if_it_held_text():
    cfg = AugmentConfig(use_special_crop_for_empty_string=True, use_random_safebox_for_empty_string=True,
                        es_safebox="random", crop_prob=1.0, crop_min_scale=0.01, crop_max_scale=0.01)
    for seed in range(300):
        crop = choose_crop(400, 300, False, None, (1, 1), 16, cfg, np.random.default_rng(seed))
        box = random_safebox(400, 300, np.random.default_rng(seed))  # the box the crop drew first
        assert contains(crop, box)
        assert crop[2] - crop[0] >= box[2] - box[0] - EPS  # scale 0.01 (30 px) raised to hold the box


def test_without_special_crop_text_free_images_use_crop_prob_and_crop_min_scale():
    cfg = AugmentConfig(crop_prob=1.0, crop_min_scale=0.25, crop_max_scale=0.25, crop_prob_es=0.0,
                        crop_min_scale_es=0.04)
    crop = choose_crop(400, 400, False, None, (1, 1), 16, cfg, np.random.default_rng(0))
    assert crop[2] - crop[0] == pytest.approx(200.0)  # sqrt(0.25) * 400, not crop_min_scale_es


SEED_ES = dict(crop_prob=0.95, crop_prob_es=0.1, crop_min_scale=0.44445, crop_min_scale_es=0.25,
               use_special_crop_for_empty_string=True, use_random_safebox_for_empty_string=True)


def test_text_free_crops_borrow_a_real_safebox_and_use_the_main_crop_prob_and_min_scale():
    cfg = AugmentConfig(**SEED_ES)  # base64.json's flags
    borrowed = [(50.0, 60.0, 60.0, 70.0), (300.0, 20.0, 390.0, 50.0)]
    crops = [choose_crop(400, 400, False, None, (1, 1), 16, cfg, np.random.default_rng(seed), borrowed)
             for seed in range(1000)]
    cropped = [c for c in crops if c != (0.0, 0.0, 400.0, 400.0)]
    # crop_prob 0.95 (not crop_prob_es 0.1): 950 expected, sd sqrt(1000 * 0.95 * 0.05) = 6.9; +-30 is 4.3 sd
    assert 920 <= len(cropped) <= 980
    sides = [c[2] - c[0] for c in cropped]
    assert min(sides) >= 400 * 0.44445 ** 0.5 - EPS  # 266.7 px: crop_min_scale, not crop_min_scale_es (200 px)
    assert sum(side < 280 for side in sides) > 30  # area fraction < 0.49: P = 0.083 of a uniform [0.444, 1]
    held = [[contains(c, box) for box in borrowed] for c in cropped]
    assert all(any(h) for h in held)  # every crop holds one of the borrowed boxes ...
    assert 400 < sum(h[1] for h in held) and 400 < sum(h[0] for h in held)  # ... each drawn about half the time


def test_a_borrowed_safebox_is_moved_into_the_image_keeping_its_size():
    assert fit_box((500.0, 10.0, 560.0, 40.0), 400, 300) == (340.0, 10.0, 400.0, 40.0)
    assert fit_box((-20.0, 280.0, 40.0, 330.0), 400, 300) == (0.0, 250.0, 60.0, 300.0)
    assert fit_box((0.0, 0.0, 900.0, 100.0), 400, 300) == (0.0, 0.0, 400.0, 100.0)


def test_a_borrowed_safebox_longer_than_the_short_side_leaves_the_image_uncropped_and_centred():
    cfg = AugmentConfig(**{**SEED_ES, "crop_prob": 1.0})
    crop = choose_crop(400, 300, False, None, (1, 1), 16, cfg, np.random.default_rng(0), [(0.0, 0.0, 350.0, 20.0)])
    assert crop == (50.0, 0.0, 350.0, 300.0)


def test_without_a_box_to_borrow_text_free_crops_fall_back_to_a_random_box():
    cfg = AugmentConfig(**{**SEED_ES, "crop_prob": 1.0, "crop_min_scale": 0.01, "crop_max_scale": 0.01})
    crop = choose_crop(400, 300, False, None, (1, 1), 16, cfg, np.random.default_rng(5), [])
    assert contains(crop, random_safebox(400, 300, np.random.default_rng(5)))


def test_a_text_image_without_safebox_is_centre_cropped_as_the_research_code():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :, 0] = np.arange(300, dtype=np.uint8)[None, :] // 2 * 2  # a left-to-right ramp shows the crop's place
    image = Image.fromarray(arr)
    for seed in range(5):  # crop_prob 1 is ignored: no random crop without a safebox
        out = augment_sample(image, "hi", None, (1, 1), AugmentConfig(crop_prob=1.0), 20, 0, sample_rng(0, seed))
        expected = crop_resize(image, (100.0, 0.0, 200.0, 100.0), 20)
        assert torch.equal(out["image"], torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_no_safebox_pad_keeps_the_whole_text_image_on_a_padded_square():
    arr = np.full((100, 300, 3), 200, np.uint8)
    arr[:, :10] = 0  # dark text at the left edge, cut by a centre crop
    cfg = AugmentConfig(crop_prob=0.0, no_safebox="pad")
    out = augment_sample(Image.fromarray(arr), "hi", None, (1, 1), cfg, 30, 0, sample_rng(0, 0))["image"]
    assert out.shape == (3, 30, 30)
    assert out[0, :9, 15].tolist() == pytest.approx([200 / 127.5 - 1] * 9, abs=0.02)  # padding: border median
    assert out[0, 15, 0].item() < -0.5  # the left-edge text survives
    centre = augment_sample(Image.fromarray(arr), "hi", None, (1, 1), AugmentConfig(), 30, 0, sample_rng(0, 0))
    assert centre["image"][0, :, 0].min().item() > 0.5  # the centre crop cut it


# --- unreadable text boxes -> loss mask (data.mask_unreadable) ---------------------------------------------------


def masked_set(out) -> set[tuple[int, int]]:
    """(row, column) of every pixel the sample's loss_mask [1, S, S] leaves out (0)."""
    assert out["loss_mask"].dtype == torch.float32 and set(out["loss_mask"].unique().tolist()) <= {0.0, 1.0}
    return {(int(r), int(c)) for r, c in (out["loss_mask"][0] == 0).nonzero().tolist()}


def pixels(rows, cols) -> set[tuple[int, int]]:
    return {(r, c) for r in rows for c in cols}


def ink_image(width, height, boxes, fmt=None):
    """Light grey (230) with dark (10) ink filling each box [l, t, r, b) (whole pixels)."""
    arr = np.full((height, width, 3), 230, np.uint8)
    for l, t, r, b in boxes:
        arr[t:b, l:r] = 10
    return encoded(arr, fmt) if fmt else Image.fromarray(arr)


def test_a_box_covers_every_output_pixel_whose_footprint_it_touches():
    crop = (0.0, 0.0, 8.0, 8.0)  # to 4 px: each output pixel is 2 x 2 input pixels
    assert {tuple(p) for p in np.argwhere(covered_pixels([(2, 2, 4, 6)], crop, 4))} == pixels((1, 2), (1,))
    # [3, 5) straddles the pixels [2, 4) and [4, 6); [0, 1) touches the first row only
    assert {tuple(p) for p in np.argwhere(covered_pixels([(3, 0, 5, 1)], crop, 4))} == {(0, 1), (0, 2)}
    # a box that ends where a pixel starts does not touch it: [4, 6) is column 2 alone
    assert {tuple(p) for p in np.argwhere(covered_pixels([(4, 4, 6, 6)], crop, 4))} == {(2, 2)}
    # boxes outside the crop cover nothing; none at all: nothing
    assert not covered_pixels([(8, 0, 9, 8), (0, -3, 8, 0)], crop, 4).any()
    assert not covered_pixels([], crop, 4).any()


def test_the_mask_is_in_the_crops_pixels_and_a_box_cut_by_the_crop_keeps_its_inside_part():
    crop = (4.0, 4.0, 12.0, 12.0)  # 8 px to 4: 2 input px per output px, from (4, 4)
    # (5, 5, 7, 9) is (1, 1, 3, 5) in the crop: columns [0.5, 1.5) -> 0, 1; rows [0.5, 2.5) -> 0, 1, 2
    assert {tuple(p) for p in np.argwhere(covered_pixels([(5, 5, 7, 9)], crop, 4))} == pixels((0, 1, 2), (0, 1))
    # (0, 0, 5, 5) reaches 1 px into the crop's top left pixel only
    assert {tuple(p) for p in np.argwhere(covered_pixels([(0, 0, 5, 5)], crop, 4))} == {(0, 0)}


def test_augment_resizes_the_boxes_with_the_image_and_the_mask_covers_the_ink():
    image = ink_image(8, 8, [(2, 2, 4, 6)])
    out = augment_sample(image, "ab", (2, 2, 4, 6), (1, 1), AugmentConfig(), 4, 0, sample_rng(0, 1),
                         unreadable=[(2, 2, 4, 6)])
    assert out["loss_mask"].shape == (1, 4, 4)
    assert masked_set(out) == pixels((1, 2), (1,))  # 2 of 16 pixels
    assert {tuple(p) for p in (out["image"][0] < 0).nonzero().tolist()} == masked_set(out)  # the ink is there


def test_augment_carries_the_boxes_through_the_padding_of_a_wide_text_image():
    # 16 x 4 with text across its width: padded to 16 x 16 (6 rows above), 16 -> 8 px
    assert pad_offset(16, 4, (0, 0, 16, 4)) == (16, 16, 0, 6)
    image = ink_image(16, 4, [(2, 1, 4, 3)])
    out = augment_sample(image, "wide", (0, 0, 16, 4), (1, 1), AugmentConfig(), 8, 0, sample_rng(0, 2),
                         unreadable=[(2, 1, 4, 3)])
    # (2, 1, 4, 3) + 6 rows = (2, 7, 4, 9): columns [1, 2) -> 1; rows [3.5, 4.5) -> 3, 4
    assert masked_set(out) == {(3, 1), (4, 1)}
    assert {tuple(p) for p in (out["image"][0] < 0).nonzero().tolist()} <= masked_set(out)


def test_augment_carries_the_boxes_through_a_random_crop():
    # crop_prob 1 at scale 0.25 of 16 x 16 is an 8 px square, and holding the 8 px safebox (4, 4, 12, 12) it can
    # only be (4, 4, 12, 12): resized to 4 px, two input pixels each
    cfg = AugmentConfig(crop_prob=1.0, crop_min_scale=0.25, crop_max_scale=0.25)
    image = ink_image(16, 16, [(5, 5, 7, 9)])
    out = augment_sample(image, "t", (4, 4, 12, 12), (1, 1), cfg, 4, 0, sample_rng(0, 3),
                         unreadable=[(5, 5, 7, 9), (0, 13, 3, 16)])
    assert choose_crop(16, 16, True, (4, 4, 12, 12), (1, 1), 4, cfg, sample_rng(0, 3)) == (4.0, 4.0, 12.0, 12.0)
    # (5, 5, 7, 9): rows 0-2, columns 0-1; (0, 13, 3, 16) lies outside the crop: nothing
    assert masked_set(out) == pixels((0, 1, 2), (0, 1))
    assert {tuple(p) for p in (out["image"][0] < 0).nonzero().tolist()} <= masked_set(out)


def test_the_mask_flips_with_a_text_free_image():
    image = ink_image(8, 8, [(0, 0, 2, 2)])
    cfg = AugmentConfig(flip_lr_prob_es=1.0)
    out = augment_sample(image, "", None, (1, 1), cfg, 4, 0, sample_rng(0, 4), unreadable=[(0, 0, 2, 2)])
    assert masked_set(out) == {(0, 3)}  # top left before the flip, top right after
    assert {tuple(p) for p in (out["image"][0] < 0).nonzero().tolist()} == {(0, 3)}
    kept = augment_sample(image, "", None, (1, 1), AugmentConfig(), 4, 0, sample_rng(0, 4), unreadable=[(0, 0, 2, 2)])
    assert masked_set(kept) == {(0, 0)}


def test_the_jpeg_draft_scales_image_and_crop_alike_so_the_mask_stays_on_the_ink():
    box = (100, 100, 200, 150)
    image = ink_image(512, 384, [box], "JPEG")
    out = augment_sample(image, "x", box, (1, 1), AugmentConfig(), 32, 0, sample_rng(0, 5), unreadable=[box])
    assert image.size == (128, 96)  # decoded at 1/4 (the crop (64, 0, 448, 384) keeps 96 >= 2 x 32 px)
    # 12 input px per output px from x = 64: columns [36 / 12, 136 / 12) -> 3..11, rows [100 / 12, 12.5) -> 8..12
    assert masked_set(out) == pixels(range(8, 13), range(3, 12))
    assert {tuple(p) for p in (out["image"][0] < 0).nonzero().tolist()} <= masked_set(out)


def test_the_mask_draws_nothing_and_changes_no_pixel_of_the_image():
    image = asymmetric_image()
    cfg = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5, blur_prob=0.5)
    for seed in range(20):
        for txt in ("abc", ""):
            plain = augment_sample(image, txt, (10, 10, 40, 30), (1, 1), cfg, 16, 8, sample_rng(0, seed))
            masked = augment_sample(image, txt, (10, 10, 40, 30), (1, 1), cfg, 16, 8, sample_rng(0, seed),
                                    unreadable=[(12, 12, 20, 20)])
            assert "loss_mask" not in plain and set(masked) == {"image", "low_res", "loss_mask"}
            assert torch.equal(plain["image"], masked["image"]) and torch.equal(plain["low_res"], masked["low_res"])


def test_a_sample_without_boxes_gets_a_mask_of_ones():
    out = augment_sample(asymmetric_image(), "abc", None, (1, 1), AugmentConfig(), 16, 0, sample_rng(0, 6),
                         unreadable=[])
    assert out["loss_mask"].shape == (1, 16, 16) and out["loss_mask"].min().item() == 1.0
