"""Specification of the sharder (textdiff/data/shards.py, tools/make_shards.py)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from braceexpand import braceexpand
from PIL import Image

from textdiff.data.shards import (ShardingError, main, make_source_shards, run, sample_keys, shuffled,
                                  write_shards)
from textdiff.data.sources import ShardSample, SourceOptions

REPO = Path(__file__).resolve().parents[2]


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def save_image(path: Path, size=(32, 24), mode="RGB", colour=(200, 40, 40), fmt=None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt or {".jpg": "JPEG", ".gif": "GIF"}.get(path.suffix, path.suffix[1:].upper()))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def add(src: Path, rel: str, txt: str | bytes | None = "hello", **image) -> bytes:
    data = save_image(src / rel, **image)
    if txt is not None:
        txt_path = (src / rel).with_suffix(".txt")
        txt_path.write_bytes(txt if isinstance(txt, bytes) else txt.encode("utf-8"))
    return data


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture()
def good_source(tmp_path) -> Path:
    """Six good images: nested, each format, an RGBA one, a text-free one, a dotted file name."""
    src = tmp_path / "src"
    add(src, "signs/street/0001.jpg", "OPEN 24h")
    add(src, "signs/0002.png", "two\nlines\n", size=(40, 40))
    add(src, "logo.png", "logo", mode="RGBA", colour=(0, 0, 255, 0))
    add(src, "anim.gif", "gif", mode="P", colour=3)
    add(src, "plain.webp", "")
    add(src, "v1.2.final.jpg", "dots")
    return src


# --- synthetic shards ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fixture_shards_open_with_tar_and_hold_48_samples_in_3_shards(synthetic_shards):
    shards = sorted(synthetic_shards.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for shard in shards:
        listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
        assert len(listing) == 16 * 3 and {n.rsplit(".", 1)[1] for n in listing} == {"png", "txt", "json"}


def test_fixture_shards_stream_through_webdataset_with_the_documented_fields(synthetic_shards):
    import webdataset as wds

    manifest = manifest_of(synthetic_shards)
    urls = list(braceexpand(manifest["pattern"]))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == manifest["samples"] == 48
    for s in samples:
        assert set(s["json"]) == {"captions", "safebox", "px_scale", "width", "height", "source"}
        assert s["png"].size == (64, 64) and s["png"].mode == "RGB"
        # one schema: a text-free image's safebox is the whole image, never null (see sample_meta)
        assert all(isinstance(v, float) for v in s["json"]["safebox"]) and s["json"]["captions"]
        if s["txt"] == "":
            assert s["json"]["safebox"] == [0.0, 0.0, 64.0, 64.0]


def test_manifest_counts_bytes_and_text_free_share_agree_with_the_shards(synthetic_shards):
    m = manifest_of(synthetic_shards)
    assert m["samples"] == sum(s["samples"] for s in m["shards"]) == m["with_text"] + m["text_free"] == 48
    assert m["bytes"] == sum((synthetic_shards / s["name"]).stat().st_size for s in m["shards"])
    assert m["text_free_share"] == pytest.approx(m["text_free"] / 48)
    assert m["skipped"] == [] and m["command"]
    assert [Path(u).name for u in braceexpand(m["pattern"])] == [s["name"] for s in m["shards"]]


def test_synthetic_shards_are_byte_identical_under_the_same_seed_for_any_worker_count(tmp_path):
    for name, workers, seed in (("a", "0", "5"), ("b", "2", "5"), ("c", "0", "6")):
        run(["--synthetic", "12", str(tmp_path / name), "--seed", seed, "--maxcount", "5", "--workers", workers])
    shard = "shard-000001.tar"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()


def test_refuses_a_non_empty_output_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    run(["--synthetic", "6", str(out), "--maxcount", "2", "--workers", "0"])
    assert main(["--synthetic", "2", str(out), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "is not empty (4 entries" in err and "pass --overwrite" in err
    run(["--synthetic", "2", str(out), "--workers", "0", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]


def test_cli_rejects_wrong_path_counts_and_source_flags_with_synthetic(tmp_path):
    for argv in (["--synthetic", "3", "a", "b"], ["only_one"], ["--synthetic", "3", "o", "--captions", "c.json"],
                 ["--synthetic", "3", "o", "--maxcount", "0"]):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2


@pytest.mark.slow
def test_tool_script_wraps_the_library_command_line():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--synthetic N OUT_DIR" in done.stdout and "--max-side" in done.stdout


# --- atomic shards ---------------------------------------------------------------------------------------


def fake_samples(n: int, fail_after: int | None = None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("simulated crash")
        yield ShardSample(f"{i:04d}", "txt2", b"x" * 100, str(i), {"i": i})


def test_a_crash_mid_shard_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(fake_samples(10, fail_after=6), tmp_path, maxcount=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 4 * 3


def _write_slowly(out_dir: str, progress) -> None:
    def slow():
        for i in range(1000):
            progress.value = i
            if i >= 6:
                time.sleep(0.05)
            yield ShardSample(f"{i:04d}", "bin", bytes(5000), "t", {})
    write_shards(slow(), Path(out_dir), maxcount=4)


def test_a_killed_process_leaves_no_incomplete_file_named_shard_tar(tmp_path):
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Value("i", 0)
    proc = ctx.Process(target=_write_slowly, args=(str(tmp_path), progress))
    proc.start()
    deadline = time.monotonic() + 30
    while progress.value < 10 and time.monotonic() < deadline:  # shards 0 and 1 done, shard 2 half written
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar.partial"]
    for name in names[:2]:
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getnames()) == 4 * 3


# --- source folders --------------------------------------------------------------------------------------


def test_source_folder_becomes_samples_with_documented_json(tmp_path, good_source):
    m = make_source_shards(good_source, tmp_path / "out", workers=0, progress=False)
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["anim", "logo", "plain", "signs/0002", "signs/street/0001", "v1_2_final"]
    assert m["samples"] == 6 and m["text_free"] == 1 and m["with_text"] == 5
    meta = json.loads(samples["signs/street/0001"]["json"])
    # one schema (sources.sample_meta): no caption -> [""], no safebox -> the whole image, floats
    assert meta == {"captions": [""], "safebox": [0.0, 0.0, 32.0, 24.0], "px_scale": [1.0, 1.0], "width": 32,
                    "height": 24,
                    "source": "signs/street/0001.jpg"}
    assert samples["signs/0002"]["txt"] == b"two\nlines\n" and samples["plain"]["txt"] == b""


def test_transcriptions_keep_their_trailing_newlines_unless_strip_txt(tmp_path):
    """The research code reads a .txt as it is (its trailing newline is a token with a line index);
    --strip-txt keeps textdiff's old reading. Line ends are \\n either way; a BOM is dropped."""
    src = tmp_path / "src"
    add(src, "a.png", "STOP\n")
    add(src, "b.png", "\n")
    add(src, "c.png", b"\xef\xbb\xbfup\r\ndown\r\n")
    add(src, "d.png", "")
    make_source_shards(src, tmp_path / "kept", workers=0, progress=False)
    kept = read_shards(tmp_path / "kept")
    assert {k: v["txt"] for k, v in kept.items()} == {"a": b"STOP\n", "b": b"\n", "c": b"up\ndown\n", "d": b""}
    m = make_source_shards(src, tmp_path / "stripped", options=SourceOptions(strip_txt=True), workers=0,
                           progress=False)
    stripped = read_shards(tmp_path / "stripped")
    assert {k: v["txt"] for k, v in stripped.items()} == {"a": b"STOP", "b": b"", "c": b"up\ndown", "d": b""}
    assert m["text_free"] == 2
    run([str(src), str(tmp_path / "cli"), "--strip-txt", "--workers", "0"])
    assert read_shards(tmp_path / "cli")["b"]["txt"] == b""


def test_rgb_images_keep_their_original_bytes(tmp_path):
    src = tmp_path / "src"
    original = add(src, "photo.jpg")
    make_source_shards(src, tmp_path / "out", workers=0, progress=False)
    assert read_shards(tmp_path / "out")["photo"]["jpg"] == original


def test_alpha_is_flattened_on_white_and_gif_becomes_png(tmp_path, good_source):
    make_source_shards(good_source, tmp_path / "out", workers=0, progress=False)
    samples = read_shards(tmp_path / "out")
    logo = Image.open(io.BytesIO(samples["logo"]["png"]))
    assert logo.mode == "RGB" and logo.getpixel((0, 0)) == (255, 255, 255)
    assert set(samples["anim"]) == {"png", "txt", "json"}
    assert Image.open(io.BytesIO(samples["anim"]["png"])).mode == "RGB"


def test_workers_give_the_same_shards_as_the_main_process(tmp_path, good_source):
    make_source_shards(good_source, tmp_path / "w0", workers=0, progress=False)
    make_source_shards(good_source, tmp_path / "w2", workers=2, progress=False)
    assert (tmp_path / "w0" / "shard-000000.tar").read_bytes() == (tmp_path / "w2" / "shard-000000.tar").read_bytes()


def test_side_files_fill_captions_safebox_and_px_scale_by_any_key_syntax(tmp_path, good_source):
    (tmp_path / "c.json").write_text(json.dumps({"signs/street/0001": "a shop sign", "logo.png": ["a", "b"]}))
    (tmp_path / "s.jsonl").write_text('{"key": "signs_street_0001", "value": [2, 3, 30.5, 20]}\n')
    (tmp_path / "p.json").write_text(json.dumps({"signs/street/0001.jpg": [2, 2.5]}))
    make_source_shards(good_source, tmp_path / "out", tmp_path / "c.json", tmp_path / "s.jsonl", tmp_path / "p.json",
                       workers=0, progress=False)
    samples = read_shards(tmp_path / "out")
    meta = json.loads(samples["signs/street/0001"]["json"])
    assert meta["captions"] == ["a shop sign"] and meta["safebox"] == [2, 3, 31, 20] and meta["px_scale"] == [2.0, 2.5]
    assert json.loads(samples["logo"]["json"])["captions"] == ["a", "b"]


@pytest.fixture()
def bad_source(tmp_path) -> tuple[Path, Path, Path]:
    """A folder where every image but ``good`` has one problem, with its caption and safebox files."""
    src = tmp_path / "src"
    add(src, "good.png")
    add(src, "missing_txt.png", txt=None)
    add(src, "bad_utf8.png", txt=b"caf\xe9")
    add(src, "box_outside.png")
    add(src, "box_inverted.png")
    add(src, "truncated.png", size=(64, 64))
    (src / "truncated.png").write_bytes((src / "truncated.png").read_bytes()[:60])
    add(src, "garbage.jpg")
    (src / "garbage.jpg").write_bytes(b"this is not an image at all")
    add(src, "bomb.png")
    (src / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"key": "good", "value": "ok"}\n{"key": "good2", "value": "no such image"}\n'
                        '{"key": "box_outside" "value": "x"}\n')
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"box_outside": [0, 0, 40, 10], "box_inverted": [20, 5, 10, 15]}))
    return src, captions, boxes


def test_every_bad_input_is_skipped_counted_and_listed_with_its_reason(tmp_path, bad_source):
    src, captions, boxes = bad_source
    m = make_source_shards(src, tmp_path / "out", captions, boxes, workers=0, progress=False)
    assert m["samples"] == 1 and m["inputs"] == 8
    reasons = {(Path(s["source"]).name, s["kind"]): s["reason"] for s in m["skipped"]}
    assert m["skipped_by_kind"] == {"bad_image": 2, "bad_json_line": 1, "bad_safebox": 2, "bad_txt": 1,
                                    "missing_txt": 1, "too_many_pixels": 1, "unknown_key": 1}
    assert "not UTF-8 (invalid byte 0xe9 at offset 3)" in reasons[("bad_utf8.png", "bad_txt")]
    assert "lies outside the 32x24 image" in reasons[("box_outside.png", "bad_safebox")]
    assert "inverted" in reasons[("boxes.json", "bad_safebox")]
    assert "truncated" in reasons[("truncated.png", "bad_image")]
    assert "unreadable image" in reasons[("garbage.jpg", "bad_image")]
    assert "decompression bomb" in reasons[("bomb.png", "too_many_pixels")]
    assert "line 3 is not valid JSON" in reasons[("captions.jsonl:3", "bad_json_line")]
    assert "'good2' matches no image" in reasons[("captions.jsonl:2", "unknown_key")]
    assert "transcription unknown" in reasons[("missing_txt.png", "missing_txt")]


@pytest.mark.parametrize("only", ["bad_utf8.png", "box_outside.png", "truncated.png", "garbage.jpg", "bomb.png"])
def test_strict_makes_each_bad_image_fatal_naming_the_file(tmp_path, bad_source, only):
    src, _, _ = bad_source
    for p in src.iterdir():
        if p.stem not in ("good", Path(only).stem):
            p.unlink()
    boxes = tmp_path / "one_box.json"
    boxes.write_text(json.dumps({"box_outside": [0, 0, 40, 10]} if only == "box_outside.png" else {}))
    with pytest.raises(ShardingError, match=rf"{only}: .*--strict"):
        make_source_shards(src, tmp_path / "out", safeboxes=boxes, strict=True, workers=0, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_strict_makes_a_malformed_side_file_line_fatal_before_writing(tmp_path, bad_source):
    src, captions, _ = bad_source
    with pytest.raises(ShardingError, match=r"captions.jsonl:3: line 3 is not valid JSON"):
        make_source_shards(src, tmp_path / "out", captions, strict=True, workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_strict_makes_an_unknown_key_fatal(tmp_path, bad_source):
    src, _, _ = bad_source
    (tmp_path / "c.json").write_text(json.dumps({"good": "ok", "good2": "no such image"}))
    with pytest.raises(ShardingError, match=r"c.json: key 'good2' matches no image"):
        make_source_shards(src, tmp_path / "out", tmp_path / "c.json", strict=True, workers=0, progress=False)


def test_strict_does_not_stop_at_a_missing_txt_which_is_a_choice_not_an_error(tmp_path):
    src = tmp_path / "src"
    add(src, "a.png")
    add(src, "b.png", txt=None)
    m = make_source_shards(src, tmp_path / "out", strict=True, workers=0, progress=False)
    assert m["samples"] == 1 and m["skipped_by_kind"] == {"missing_txt": 1}


def test_missing_and_empty_txt_are_counted_apart_and_missing_can_be_kept(tmp_path):
    src = tmp_path / "src"
    add(src, "empty.png", "")
    add(src, "unknown.png", None)
    add(src, "text.png", "hi")
    skip = make_source_shards(src, tmp_path / "skip", workers=0, progress=False)
    assert (skip["text_free"], skip["unknown_text"], skip["skipped_by_kind"]) == (1, 0, {"missing_txt": 1})
    keep = make_source_shards(src, tmp_path / "keep", options=SourceOptions(missing_txt="keep"), workers=0,
                              progress=False)
    assert (keep["text_free"], keep["unknown_text"], keep["with_text"], keep["skipped_count"]) == (1, 1, 1, 0)
    samples = read_shards(tmp_path / "keep")
    assert set(samples["unknown"]) == {"png", "json"} and samples["empty"]["txt"] == b""


def test_max_pixels_caps_even_ordinary_images(tmp_path):
    src = tmp_path / "src"
    add(src, "a.png", size=(64, 64))
    m = make_source_shards(src, tmp_path / "out", options=SourceOptions(max_pixels=1000), workers=0, progress=False)
    assert m["samples"] == 0 and "4096 pixels exceeds --max-pixels 1000" in m["skipped"][0]["reason"]


def test_max_side_resizes_and_rescales_safebox_and_px_scale(tmp_path):
    src = tmp_path / "src"
    add(src, "wide.jpg", size=(200, 100))
    (tmp_path / "s.json").write_text(json.dumps({"wide": [21, 10, 121, 61]}))
    (tmp_path / "p.json").write_text(json.dumps({"wide": [2.0, 2.0]}))
    make_source_shards(src, tmp_path / "out", safeboxes=tmp_path / "s.json", px_scales=tmp_path / "p.json",
                       options=SourceOptions(max_side=100), workers=0, progress=False)
    sample = read_shards(tmp_path / "out")["wide"]
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (100, 50) == Image.open(io.BytesIO(sample["jpg"])).size
    assert meta["safebox"] == [10, 5, 61, 31] and meta["px_scale"] == [1.0, 1.0]


def test_min_side_and_require_captions_filter(tmp_path):
    src = tmp_path / "src"
    add(src, "big.png", size=(64, 64))
    add(src, "small.png", size=(20, 64))
    add(src, "upscaled.png", size=(64, 64))
    (tmp_path / "p.json").write_text(json.dumps({"upscaled": [4, 4]}))
    (tmp_path / "c.json").write_text(json.dumps({"small": "tiny"}))
    m = make_source_shards(src, tmp_path / "a", px_scales=tmp_path / "p.json", options=SourceOptions(min_side=32),
                           workers=0, progress=False)
    assert sorted(read_shards(tmp_path / "a")) == ["big"] and m["skipped_by_kind"] == {"too_small": 2}
    m = make_source_shards(src, tmp_path / "b", captions=tmp_path / "c.json",
                           options=SourceOptions(require_captions=True), workers=0, progress=False)
    assert sorted(read_shards(tmp_path / "b")) == ["small"] and m["skipped_by_kind"] == {"no_captions": 2}


def test_sample_keys_replace_dots_and_resolve_clashes():
    assert sample_keys(["a/b.c.png", "x.jpg", "x.png", "x_2.png", "é t.png"]) == ["a/b_c", "x", "x_2", "x_2_2", "__t"]


def test_image_format_stores_every_image_in_one_format(tmp_path, good_source):
    make_source_shards(good_source, tmp_path / "out", options=SourceOptions(image_format="png"), workers=0,
                       progress=False)
    samples = read_shards(tmp_path / "out")
    assert all(set(s) == {"png", "txt", "json"} for s in samples.values()) and len(samples) == 6
    assert Image.open(io.BytesIO(samples["signs/street/0001"]["png"])).format == "PNG"


def load_with_datasets(datasets, urls: list[str], cache: Path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(cache))


def test_synthetic_shards_load_with_huggingface_datasets(tmp_path, synthetic_shards):
    datasets = pytest.importorskip("datasets")
    ds = load_with_datasets(datasets, [str(p) for p in sorted(synthetic_shards.glob("shard-*.tar"))], tmp_path)
    assert ds.num_rows == 48 and ds[0]["png"].size == (64, 64)
    assert set(ds[0]["json"]) == {"captions", "safebox", "px_scale", "width", "height", "source"}


def test_one_format_source_shards_load_with_huggingface_datasets(tmp_path, good_source):
    datasets = pytest.importorskip("datasets")
    make_source_shards(good_source, tmp_path / "out", options=SourceOptions(image_format="jpg"), workers=0,
                       progress=False)
    ds = load_with_datasets(datasets, [str(tmp_path / "out" / "shard-000000.tar")], tmp_path / "cache")
    assert ds.num_rows == 6
    row = next(r for r in ds if r["__key__"] == "signs/street/0001")
    assert row["txt"] == "OPEN 24h" and row["json"]["source"] == "signs/street/0001.jpg"
    assert row["jpg"].size == (32, 24)


def test_command_fails_when_every_input_was_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    add(src, "a.png", txt=b"\xff")
    assert main([str(src), str(tmp_path / "out"), "--workers", "0"]) == 1
    captured = capsys.readouterr()
    assert "a.png: a.txt is not UTF-8" in captured.out and "no sample was written" in captured.err


def test_synthetic_size_below_16_px_is_refused_naming_the_flag(tmp_path, capsys):
    assert main(["--synthetic", "2", str(tmp_path / "out"), "--size", "8", "--workers", "0"]) == 1
    assert "--size 8: synthetic images need at least 16 px" in capsys.readouterr().err


# --- sample order, EXIF, one JSON schema, flags that a mode would ignore ----------------------------------


def shard_keys(out: Path) -> list[str]:
    """Sample keys in the order they are stored, shard after shard."""
    keys = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")]
    return keys


def two_source_folder(src: Path, per_source: int) -> None:
    for source in ("a_source", "b_source"):
        for i in range(per_source):
            add(src, f"{source}/{i:03d}.png", f"{source[0]}{i}", size=(8, 8))


def test_folder_samples_are_written_in_the_seeded_permutation_and_the_manifest_records_it(tmp_path):
    src = tmp_path / "src"
    two_source_folder(src, 20)
    m = make_source_shards(src, tmp_path / "out", maxcount=10, workers=0, progress=False, seed=3)
    paths = sorted(f"{s}/{i:03d}" for s in ("a_source", "b_source") for i in range(20))
    assert shard_keys(tmp_path / "out") == shuffled(paths, 3)
    assert (m["order"], m["seed"]) == ("random", 3)
    other = make_source_shards(src, tmp_path / "other", maxcount=10, workers=0, progress=False, seed=4)
    assert shard_keys(tmp_path / "other") != shard_keys(tmp_path / "out") and other["seed"] == 4
    # every shard of 10 holds both sources: P(one source only) = 2 * C(20,10) / C(40,10) = 3e-4 per shard
    for shard in range(4):
        assert len({k[0] for k in shard_keys(tmp_path / "out")[10 * shard:10 * shard + 10]}) == 2
    make_source_shards(src, tmp_path / "sorted", maxcount=10, workers=0, progress=False, order="sorted")
    assert shard_keys(tmp_path / "sorted") == paths
    assert manifest_of(tmp_path / "sorted")["order"] == "sorted"


def test_a_jpeg_with_an_exif_rotation_is_stored_upright_with_the_upright_size_and_safebox(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = Image.new("RGB", (40, 20), (0, 0, 255))
    raw.paste((255, 0, 0), (0, 0, 20, 20))  # left half red in the sensor's pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the left edge is the top of the upright image
    raw.save(src / "cam.jpg", "JPEG", quality=95, exif=exif)
    (src / "cam.txt").write_text("UP")
    (tmp_path / "boxes.json").write_text(json.dumps({"cam": [2, 3, 18, 37]}))  # fits 20x40 only, not 40x20
    m = make_source_shards(src, tmp_path / "out", safeboxes=tmp_path / "boxes.json", workers=0, progress=False)
    assert m["samples"] == 1, m["skipped"]
    sample = read_shards(tmp_path / "out")["cam"]
    meta = json.loads(sample["json"])
    stored = Image.open(io.BytesIO(sample["jpg"]))
    assert stored.size == (20, 40) and (meta["width"], meta["height"]) == (20, 40)
    assert meta["safebox"] == [2.0, 3.0, 18.0, 37.0]
    assert stored.getexif().get(0x0112, 1) == 1  # no rotation left for a reader to apply twice
    top, bottom = stored.convert("RGB").getpixel((10, 5)), stored.convert("RGB").getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("lacking", ["safebox", "captions"])
def test_shards_whose_first_samples_lack_an_optional_field_load_with_huggingface_datasets(tmp_path, lacking):
    """HF ``datasets`` types each JSON field from the first 5 samples; a null safebox or an empty caption
    list there typed the field "null" and every later value failed with "Couldn't cast ... to null"."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    boxes, captions = {}, {}
    for i in range(8):
        add(src, f"{i:02d}.png", f"w{i}", size=(16, 12))
        if i >= 6 or lacking != "safebox":
            boxes[f"{i:02d}"] = [1, 1, 9, 9]
        if i >= 6 or lacking != "captions":
            captions[f"{i:02d}"] = [f"caption {i}"]
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    (tmp_path / "c.json").write_text(json.dumps(captions))
    make_source_shards(src, tmp_path / "out", captions=tmp_path / "c.json", safeboxes=tmp_path / "b.json",
                       workers=0, progress=False, order="sorted")
    ds = load_with_datasets(datasets, [str(tmp_path / "out" / "shard-000000.tar")], tmp_path / "cache")
    rows = {r["__key__"]: r["json"] for r in ds}
    assert len(rows) == 8
    assert rows["07"]["safebox"] == [1.0, 1.0, 9.0, 9.0] and rows["07"]["captions"] == ["caption 7"]
    if lacking == "safebox":
        assert rows["00"]["safebox"] == [0.0, 0.0, 16.0, 12.0]  # the whole image: what the stream protects
    else:
        assert rows["00"]["captions"] == [""]  # the stream's "no caption"


def test_the_old_schema_with_null_safeboxes_first_fails_in_huggingface_datasets(tmp_path):
    """The counterfactual of the test above: the JSON written before one schema breaks the reader."""
    datasets = pytest.importorskip("datasets")
    png = save_image(tmp_path / "x.png", size=(16, 12))
    samples = [ShardSample(f"{i:02d}", "png", png, "w", {"captions": [], "safebox": None if i < 6 else [1, 1, 9, 9],
                                                            "px_scale": [1.0, 1.0], "width": 16, "height": 12,
                                                            "source": "x.png"}) for i in range(8)]
    (tmp_path / "old").mkdir()
    write_shards(samples, tmp_path / "old")
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as e:
        load_with_datasets(datasets, [str(tmp_path / "old" / "shard-000000.tar")], tmp_path / "cache")
    assert "Couldn't cast" in str(e.value.__cause__) and "to null" in str(e.value.__cause__)


@pytest.mark.parametrize("flag", [["--image-format", "jpg"], ["--max-side", "32"], ["--min-side", "8"],
                                  ["--require-captions"], ["--strict"], ["--missing-txt", "keep"],
                                  ["--max-pixels", "100"], ["--order", "sorted"], ["--unreadable", "u.json"]])
def test_synthetic_mode_honours_or_refuses_each_folder_flag_with_status_2(tmp_path, flag, capsys):
    argv = ["--synthetic", "3", str(tmp_path / "out"), "--workers", "0", *flag]
    if flag[0] == "--image-format":  # honoured: every image stored as JPEG
        run(argv)
        samples = read_shards(tmp_path / "out")
        assert all(set(s) == {"jpg", "txt", "json"} for s in samples.values()) and len(samples) == 3
        assert Image.open(io.BytesIO(next(iter(samples.values()))["jpg"])).format == "JPEG"
        return
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert f"{flag[0]} applies to a source folder, not to --synthetic" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_mode_refuses_size_which_only_synthetic_reads(tmp_path, good_source, capsys):
    with pytest.raises(SystemExit) as e:
        run([str(good_source), str(tmp_path / "out"), "--size", "32", "--workers", "0"])
    assert e.value.code == 2 and "--size applies to --synthetic only" in capsys.readouterr().err


def test_skip_reasons_name_the_file_not_a_memory_address(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "broken.png").write_bytes(b"not an image at all")
    (src / "sub" / "broken.txt").write_text("x")
    m = make_source_shards(src, tmp_path / "out", workers=0, progress=False)
    reason = m["skipped"][0]["reason"]
    assert "cannot identify image file sub/broken.png" in reason and "BytesIO" not in reason and "0x" not in reason


# --- transcriptions from a side file (tools/annotate.py's transcriptions.json) -------------------------------------


def test_transcriptions_side_file_replaces_the_txt_beside_each_image(tmp_path):
    src = tmp_path / "src"
    add(src, "a/one.png", "stale text")
    add(src, "two.png", txt=None)
    add(src, "three.png", txt=None)
    side = tmp_path / "transcriptions.json"
    side.write_text(json.dumps({"a/one": "OPEN\nDAILY", "two": ""}))
    m = run([str(src), str(tmp_path / "out"), "--transcriptions", str(side), "--workers", "0"])
    samples = read_shards(tmp_path / "out")
    assert samples["a/one"]["txt"] == b"OPEN\nDAILY" and samples["two"]["txt"] == b""
    assert (m["with_text"], m["text_free"], m["skipped_by_kind"]) == (1, 1, {"missing_txt": 1})
    (skipped,) = m["skipped"]
    assert skipped["source"] == "three.png" and f"not in --transcriptions {side}" in skipped["reason"]


def test_an_image_the_transcriptions_file_leaves_out_can_be_kept_with_unknown_text(tmp_path):
    src = tmp_path / "src"
    add(src, "listed.png", txt=None)
    add(src, "unlisted.png", txt=None)
    side = tmp_path / "t.json"
    side.write_text(json.dumps({"listed": "hi"}))
    m = run([str(src), str(tmp_path / "out"), "--transcriptions", str(side), "--missing-txt", "keep", "--workers", "0"])
    assert (m["with_text"], m["unknown_text"]) == (1, 1) and "txt" not in read_shards(tmp_path / "out")["unlisted"]


def test_a_transcription_that_is_not_a_string_is_a_bad_value_naming_the_key(tmp_path):
    src = tmp_path / "src"
    add(src, "a.png", txt=None)
    add(src, "b.png", txt=None)
    side = tmp_path / "t.json"
    side.write_text(json.dumps({"a": ["not", "a", "string"], "b": "fine"}))
    m = run([str(src), str(tmp_path / "out"), "--transcriptions", str(side), "--workers", "0"])
    assert m["samples"] == 1 and m["skipped_by_kind"] == {"bad_value": 1}
    assert "is not a string" in m["skipped"][0]["reason"] and "(key 'a')" in m["skipped"][0]["reason"]


def test_transcriptions_is_refused_with_synthetic(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(["--synthetic", "2", str(tmp_path / "o"), "--transcriptions", "t.json"])
    assert e.value.code == 2 and "--transcriptions applies to a source folder" in capsys.readouterr().err


# --- boxes of unreadable text from a side file (tools/annotate.py --unreadable mask) ------------------------------


def meta_of(out: Path) -> dict[str, dict]:
    return {key: json.loads(sample["json"]) for key, sample in read_shards(out).items()}


def test_unreadable_boxes_travel_into_the_samples_json_and_back_out_of_the_stream(tmp_path, good_source):
    from textdiff.data.stream import decode_sample

    side = tmp_path / "unreadable.json"
    # canonical, legacy and extension key syntax, as every side file takes them; one image with two boxes
    side.write_text(json.dumps({"signs/street/0001": [[1, 2, 10, 8]], "signs_0002": [[0, 0, 4, 4], [5.5, 5, 40, 9]],
                                "logo.png": []}))
    m = run([str(good_source), str(tmp_path / "out"), "--unreadable", str(side), "--workers", "0"])
    metas = meta_of(tmp_path / "out")
    assert metas["signs/street/0001"]["unreadable"] == [[1.0, 2.0, 10.0, 8.0]]
    # whole pixels, rounded outward as the safebox is: 5.5 -> 5
    assert metas["signs/0002"]["unreadable"] == [[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 40.0, 9.0]]
    assert "unreadable" not in metas["logo"] and "unreadable" not in metas["plain"]  # none listed, or []
    assert (m["samples"], m["with_unreadable"], m["skipped_count"]) == (6, 2, 0)
    raw = {"__key__": "signs/0002", **read_shards(tmp_path / "out")["signs/0002"]}
    assert decode_sample(raw)["unreadable"] == [[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 40.0, 9.0]]
    assert decode_sample({"__key__": "plain", **read_shards(tmp_path / "out")["plain"]})["unreadable"] == []


def test_shards_without_an_unreadable_file_are_byte_identical_to_before(tmp_path, good_source):
    run([str(good_source), str(tmp_path / "a"), "--workers", "0"])
    (tmp_path / "empty.json").write_text("{}")
    m = run([str(good_source), str(tmp_path / "b"), "--unreadable", str(tmp_path / "empty.json"), "--workers", "0"])
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    assert m["with_unreadable"] == 0 and all("unreadable" not in meta for meta in meta_of(tmp_path / "b").values())


def test_unreadable_boxes_are_rescaled_with_an_image_that_max_side_shrinks(tmp_path):
    src = tmp_path / "src"
    add(src, "wide.png", "w", size=(40, 20))
    (tmp_path / "s.json").write_text(json.dumps({"wide": [10, 5, 21, 11]}))
    (tmp_path / "u.json").write_text(json.dumps({"wide": [[10, 5, 21, 11], [0, 0, 40, 20]]}))
    run([str(src), str(tmp_path / "out"), "--safeboxes", str(tmp_path / "s.json"), "--unreadable",
         str(tmp_path / "u.json"), "--max-side", "20", "--workers", "0"])
    meta = meta_of(tmp_path / "out")["wide"]
    # x 0.5, rounded outward to whole pixels: [5, 2.5, 10.5, 5.5] -> [5, 2, 11, 6], exactly as the safebox
    assert (meta["width"], meta["height"]) == (20, 10)
    assert meta["unreadable"] == [[5.0, 2.0, 11.0, 6.0], [0.0, 0.0, 20.0, 10.0]]
    assert meta["safebox"] == [5.0, 2.0, 11.0, 6.0]


def test_an_unreadable_box_outside_the_image_skips_it_naming_the_file_and_key(tmp_path):
    src = tmp_path / "src"
    add(src, "a.png", "a", size=(32, 24))
    add(src, "b.png", "b", size=(32, 24))
    side = tmp_path / "u.json"
    side.write_text(json.dumps({"a": [[0, 0, 4, 4], [30, 20, 33, 24]], "b": [[1, 1, 2, 2]]}))
    m = make_source_shards(src, tmp_path / "out", unreadable=side, workers=0, progress=False)
    assert (m["samples"], m["skipped_by_kind"]) == (1, {"bad_unreadable": 1})
    (skipped,) = m["skipped"]
    assert skipped["source"] == "a.png" and skipped["key"] == "a"
    assert skipped["reason"] == (f"unreadable box [30, 20, 33, 24] of key 'a' lies outside the 32x24 image; fix it "
                                 f"in --unreadable {side}")
    with pytest.raises(ShardingError, match=r"a.png: unreadable box \[30, 20, 33, 24\] of key 'a' lies outside"):
        make_source_shards(src, tmp_path / "strict", unreadable=side, strict=True, workers=0, progress=False)


@pytest.mark.parametrize("value, message", [
    ([[4, 4, 2, 8]],
     "unreadable box [4, 4, 2, 8] is inverted or empty (needs left < right and top < bottom) (key 'a')"),
    ([[1, 2, 3]], "unreadable box [1, 2, 3] is not a list of 4 finite numbers (key 'a')"),
    ([1, 2, 3, 4], "unreadable box 1 is not a list of 4 finite numbers (key 'a')"),
    ("box", "unreadable value 'box' is not a list of boxes [[left, top, right, bottom], ...] (key 'a')"),
])
def test_a_malformed_unreadable_value_skips_its_image_naming_the_key(tmp_path, value, message):
    src = tmp_path / "src"
    add(src, "a.png", "a")
    add(src, "b.png", "b")
    side = tmp_path / "u.json"
    side.write_text(json.dumps({"a": value, "nowhere": [[0, 0, 1, 1]]}))
    m = make_source_shards(src, tmp_path / "out", unreadable=side, workers=0, progress=False)
    assert m["samples"] == 1 and m["skipped_by_kind"] == {"bad_unreadable": 1, "unknown_key": 1}
    reasons = {p["kind"]: (p["source"], p["reason"]) for p in m["skipped"]}
    assert reasons["bad_unreadable"] == (str(side), message)
    assert reasons["unknown_key"][0] == str(side) and "key 'nowhere' matches no image" in reasons["unknown_key"][1]
