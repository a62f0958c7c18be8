"""Specification of tools/annotate.py (textdiff/data/annotate.py, annotate_sources.py): every input kind and
its keys, the output files, resuming, rereading under other filters, clear errors, and the shards made of it.

Most tests read with ``test-ink``, an engine that reads each dark blob as the line "ink" (the parts around
the engine are under test); the last ones read with PP-OCR and Tesseract.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.data.annotate import AnnotateError, annotate, load_progress
from textdiff.data.annotate_filters import make_filters
from textdiff.data.annotate_sources import SourceSpec
from textdiff.data.sources import SourceError
from textdiff.ocr import OcrLine, Reading, reading_of_lines, register_engine, to_pil

REPO = Path(__file__).resolve().parents[2]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # fonts-dejavu-core (tools/setup_env.sh)
_spec = importlib.util.spec_from_file_location("annotate_tool", REPO / "tools" / "annotate.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


class InkEngine:
    """Reads the pixels darker than 100 as one line "ink" at confidence 0.95 (none: no line)."""

    name = "test-ink"

    def version(self) -> str:
        return "test-ink 1"

    def read(self, images, workers=1, progress=True) -> list[Reading]:
        readings = []
        for image in images:
            dark = np.argwhere(np.asarray(to_pil(image).convert("L")) < 100)
            if not len(dark):
                readings.append(Reading(""))
                continue
            (t, l), (b, r) = dark.min(axis=0), dark.max(axis=0) + 1
            polygon = ((l - 2.0, t - 2.0), (r + 2.0, t - 2.0), (r + 2.0, b + 2.0), (l - 2.0, b + 2.0))
            readings.append(reading_of_lines([OcrLine("ink", polygon, 0.95)]))
        return readings


register_engine("test-ink", lambda **settings: InkEngine())


def image_bytes(fmt="PNG", size=(48, 32), ink=True, mode="RGB") -> bytes:
    """A light image with a dark 20 x 10 block at (10, 8) (``ink``), as ``fmt`` bytes."""
    image = Image.new("RGB", size, (230, 230, 230))
    if ink:
        ImageDraw.Draw(image).rectangle([10, 8, 29, 17], fill=(10, 10, 10))
    buf = io.BytesIO()
    image.convert(mode).save(buf, fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def run_ink(source, out, **kwargs) -> dict:
    spec = source if isinstance(source, SourceSpec) else SourceSpec(str(source))
    return annotate(spec, out, "test-ink", progress=False, **kwargs)


# --- folders ---------------------------------------------------------------------------------------------------


def test_folder_keys_are_the_keys_make_shards_reads(tmp_path):
    src = tmp_path / "src"
    for rel in ("signs/street/0001.png", "x.jpg", "x.png", "v1.2.final.png"):
        write(src / rel, image_bytes("JPEG" if rel.endswith(".jpg") else "PNG"))
    summary = run_ink(src, tmp_path / "out")
    assert sorted(read_json(tmp_path / "out" / "transcriptions.json")) == ["signs/street/0001", "v1.2.final", "x.jpg",
                                                                         "x.png"]
    assert summary["source"]["kind"] == "folder" and summary["annotated"] == 4


def test_text_free_images_get_an_empty_transcription_and_no_safebox(tmp_path):
    src = tmp_path / "src"
    write(src / "text.png", image_bytes())
    write(src / "plain.png", image_bytes(ink=False))
    summary = run_ink(src, tmp_path / "out")
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"plain": "", "text": "ink"}
    assert read_json(tmp_path / "out" / "safeboxes.json") == {"text": [10, 8, 30, 18]}
    assert (summary["with_text"], summary["text_free"], summary["text_free_share"]) == (1, 1, 0.5)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def test_bad_images_are_skipped_and_counted_as_make_shards_skips_them(tmp_path):
    src = tmp_path / "src"
    write(src / "good.png", image_bytes())
    write(src / "truncated.png", image_bytes(size=(64, 64))[:60])
    write(src / "garbage.jpg", b"this is not an image at all")
    write(src / "bomb.png", png_header_only(100_000, 100_000))
    write(src / "cmyk.jpg", image_bytes("JPEG", mode="CMYK"))
    write(src / "deep.png", image_bytes(mode="I;16"))
    frames = [Image.new("P", (40, 30), c) for c in (3, 9)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    write(src / "animated.gif", buf.getvalue())
    summary = run_ink(src, tmp_path / "out")
    assert summary["skipped_by_kind"] == {"bad_image": 2, "too_many_pixels": 1}
    assert summary["annotated"] == 4 and summary["inputs"] == 7
    transcriptions = read_json(tmp_path / "out" / "transcriptions.json")
    assert transcriptions["cmyk"] == "ink" and set(transcriptions) == {"good", "cmyk", "deep", "animated"}
    reasons = {r["key"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "ocr.jsonl").open())}
    assert "truncated" in reasons["truncated"] and "decompression bomb" in reasons["bomb"]


# --- shards ------------------------------------------------------------------------------------------------------


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shard(path: Path, first: int, count: int) -> Path:
    """An img2dataset-style shard: KEY.jpg, KEY.txt (the caption) and KEY.json per sample."""
    members = {}
    for i in range(first, first + count):
        key = f"{i:09d}"
        members[f"{key}.jpg"] = image_bytes("JPEG", ink=i % 2 == 0)
        members[f"{key}.txt"] = f"a photo number {i}".encode()
        members[f"{key}.json"] = json.dumps({"url": f"http://example.invalid/{i}.jpg"}).encode()
    return write_tar(path, members)


def test_img2dataset_shards_give_their_keys_captions_and_transcriptions(tmp_path):
    img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, 3)
    img2dataset_shard(tmp_path / "shards" / "00001.tar", 3, 2)
    summary = run_ink(tmp_path / "shards", tmp_path / "out")
    assert summary["source"]["kind"] == "shards" and summary["source"]["caption_key"] == "txt"
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"000000000": "ink", "000000001": "",
                                                                  "000000002": "ink", "000000003": "",
                                                                  "000000004": "ink"}
    assert read_json(tmp_path / "out" / "captions.json")["000000003"] == ["a photo number 3"]


def test_a_key_repeated_across_shards_is_prefixed_by_its_shard_and_a_sample_without_image_is_counted(tmp_path):
    write_tar(tmp_path / "s" / "a.tar", {"x.png": image_bytes(), "y.txt": b"only a caption"})
    write_tar(tmp_path / "s" / "b.tar", {"x.png": image_bytes(ink=False)})
    summary = run_ink(tmp_path / "s", tmp_path / "out")
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"a/x": "ink", "b/x": ""}
    assert summary["skipped_by_kind"] == {"no_image": 1}
    assert "sample 'y' has no member jpg or jpeg or png or webp" in summary["listing_problems"][0]["reason"]


def test_image_key_picks_the_member_to_read(tmp_path):
    write_tar(tmp_path / "s.tar", {"k.jpg": image_bytes("JPEG", ink=False), "k.seg.png": image_bytes()})
    run_ink(SourceSpec(str(tmp_path / "s.tar"), image_key="seg.png"), tmp_path / "out")
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"k": "ink"}


# --- Hugging Face data sets --------------------------------------------------------------------------------------


def hf_dataset(n=3):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(io.BytesIO(image_bytes(ink=i != 1))) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i}" for i in range(n)], "uid": [f"id-{i}" for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "uid": datasets.Value("string")}))


def test_parquet_rows_are_keyed_by_number_with_the_text_column_as_caption(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    summary = run_ink(tmp_path / "data", tmp_path / "out")
    assert (summary["source"]["kind"], summary["source"]["image_key"], summary["source"]["caption_key"]) == \
        ("parquet", "image", "text")
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"00000000": "ink", "00000001": "", "00000002": "ink"}
    assert read_json(tmp_path / "out" / "captions.json") == {f"0000000{i}": [f"caption {i}"] for i in range(3)}


def test_id_key_names_the_column_of_keys(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "d.parquet"))
    run_ink(SourceSpec(str(tmp_path / "d.parquet"), id_key="uid", caption_key="uid"), tmp_path / "out")
    assert read_json(tmp_path / "out" / "captions.json") == {f"id-{i}": [f"id-{i}"] for i in range(3)}


def test_save_to_disk_folders_and_a_split_of_a_dataset_dict_are_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    hf_dataset().save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": hf_dataset(2), "test": hf_dataset(1)}).save_to_disk(str(tmp_path / "dict"))
    assert run_ink(tmp_path / "one", tmp_path / "out1")["annotated"] == 3
    with pytest.raises(SourceError, match="is a DatasetDict of splits train, test; pick one with --split"):
        run_ink(tmp_path / "dict", tmp_path / "out2")
    summary = run_ink(SourceSpec(str(tmp_path / "dict"), split="test"), tmp_path / "out3")
    assert summary["annotated"] == 1 and summary["source"]["kind"] == "arrow"


def test_a_column_that_is_not_there_is_refused_naming_the_columns(tmp_path):
    hf_dataset().to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(SourceError, match="--caption-key 'alt' is not a column of .*; its columns: image, text, uid"):
        run_ink(SourceSpec(str(tmp_path / "d.parquet"), caption_key="alt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- outputs, mirror, shards -------------------------------------------------------------------------------------


def test_ocr_jsonl_holds_every_images_lines_and_the_summary_counts_and_names_the_engine(tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", image_bytes())
    write(src / "b.png", b"garbage")
    summary = run_ink(src, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "ocr.jsonl").open()]
    assert [(r["key"], r["outcome"], r["engine"]) for r in rows] == [("a", "text", "test-ink"),
                                                                    ("b", "bad_image", "test-ink")]
    (line,) = rows[0]["lines"]
    assert (line["text"], line["confidence"], line["box"]) == ("ink", 0.95, [10, 8, 30, 18])
    assert line["polygon"] == [[8.0, 6.0], [32.0, 6.0], [32.0, 20.0], [8.0, 20.0]]
    assert (summary["engine"], summary["engine_version"], summary["skipped_count"]) == ("test-ink", "test-ink 1", 1)
    assert summary["outputs"] == ["transcriptions.json", "safeboxes.json", "ocr.jsonl", "summary.json"]


def test_write_txt_mirrors_a_shard_source_that_make_shards_then_reads_with_captions(tmp_path):
    img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, 3)
    out, mirror = tmp_path / "out", tmp_path / "mirror"
    code = tool.main([str(tmp_path / "shards"), str(out), "--engine", "test-ink", "--workers", "0", "--no-progress",
                      "--write-txt", str(mirror), "--shards", str(tmp_path / "train")])
    assert code == 0
    assert sorted(p.name for p in mirror.iterdir()) == ["000000000.jpg", "000000000.txt", "000000001.jpg",
                                                        "000000001.txt", "000000002.jpg", "000000002.txt"]
    assert (mirror / "000000000.txt").read_text() == "ink" and (mirror / "000000001.txt").read_text() == ""
    manifest = read_json(tmp_path / "train" / "manifest.json")
    assert (manifest["samples"], manifest["with_text"], manifest["text_free"]) == (3, 2, 1)
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["captions"] == ["a photo number 0"] and meta["safebox"] == [10.0, 8.0, 30.0, 18.0]


def test_make_shards_reads_a_folder_with_the_transcriptions_and_safeboxes_written(tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", image_bytes())
    write(src / "b.png", image_bytes(ink=False))
    write(src / "c.png", b"garbage")
    write(src / "a.txt", b"a stale transcription the side file replaces")
    run_ink(src, tmp_path / "out")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src), str(tmp_path / "train"),
                           "--transcriptions", str(tmp_path / "out" / "transcriptions.json"), "--safeboxes",
                           str(tmp_path / "out" / "safeboxes.json"), "--workers", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = read_json(tmp_path / "train" / "manifest.json")
    assert (manifest["with_text"], manifest["text_free"], manifest["skipped_by_kind"]) == (1, 1, {"missing_txt": 1})
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        assert tar.extractfile("a.txt").read() == b"ink"


def test_a_rerun_with_other_filters_reuses_the_ocr_and_only_merges_again(tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", image_bytes())
    write(src / "b.png", image_bytes(ink=False))
    run_ink(src, tmp_path / "out")
    again = run_ink(src, tmp_path / "out", filters=make_filters(text_free="drop"), preset="default")
    assert (again["read_this_run"], again["resumed_records"]) == (0, 2)
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"a": "ink"}
    assert again["skipped_by_kind"] == {"text_free_dropped": 1} and again["filters"]["text_free"] == "drop"


def test_a_rerun_with_other_ocr_settings_is_refused_naming_the_setting(tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", image_bytes())
    run_ink(src, tmp_path / "out")
    with pytest.raises(AnnotateError, match=r"holds a run with other settings \(max_pixels: 64000000, now 1000\); "
                                            "pass --overwrite"):
        run_ink(src, tmp_path / "out", max_pixels=1000)
    assert run_ink(src, tmp_path / "out", max_pixels=1000, overwrite=True)["skipped_by_kind"] == \
        {"too_many_pixels": 1}


# --- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, code, message", [
    (["{tmp}/nowhere", "{tmp}/out"], 1, "source {tmp}/nowhere does not exist"),
    (["{tmp}/src", "{tmp}/src/out"], 1, "OUT_DIR {tmp}/src/out lies inside the source folder"),
    (["{tmp}/src", "{tmp}/out", "--min-confidence", "2"], 2, "--min-confidence 2.0 must lie in 0..1"),
    (["{tmp}/src", "{tmp}/out", "--engine", "abbyy"], 1, "OCR engine 'abbyy' is unknown; choose one of"),
    (["{tmp}/src", "{tmp}/out", "--engine-setting", "det_side=3"], 1, "ppocr has no setting 'det_side'"),
    (["{tmp}/s.tar", "{tmp}/out", "--shards", "{tmp}/train"], 2, "--shards needs a folder of images: give --write-txt "
     "DIR for a shards source"),
    (["{tmp}/src", "{tmp}/out", "--shards", "{tmp}/src/train"], 2, "--shards {tmp}/src/train lies inside the folder"),
])
def test_bad_flags_and_paths_stop_before_any_image_is_read(tmp_path, capsys, args, code, message):
    write(tmp_path / "src" / "a.png", image_bytes())
    write_tar(tmp_path / "s.tar", {"k.png": image_bytes()})
    argv = [a.format(tmp=tmp_path) for a in args] + ["--no-progress"]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        assert e.value.code == 2
    else:
        assert tool.main(argv) == 1
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out" / "progress.jsonl").exists()


# --- resuming after a kill --------------------------------------------------------------------------------------

SLOW_TOOL = """
import hashlib, importlib.util, os, sys, time
import numpy as np
from textdiff.ocr import OcrLine, reading_of_lines, register_engine, to_pil

class SlowEngine:
    name = "test-slow"
    def version(self):
        return "test-slow 1"
    def read(self, images, workers=1, progress=True):
        out = []
        for image in images:
            data = np.asarray(to_pil(image))
            with open(os.environ["READ_LOG"], "a") as log:
                log.write(hashlib.sha1(data.tobytes()).hexdigest() + "\\n")
            time.sleep(0.15)
            height, width = data.shape[:2]
            corners = ((1.0, 1.0), (width - 1.0, 1.0), (width - 1.0, height - 1.0), (1.0, height - 1.0))
            out.append(reading_of_lines([OcrLine(str(int(data[0, 0, 0])), corners, 0.95)]))
        return out

register_engine("test-slow", lambda **settings: SlowEngine())
spec = importlib.util.spec_from_file_location("annotate_tool", os.environ["TOOL"])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
sys.exit(tool.main(sys.argv[1:]))
"""


def slow_tool(tmp_path: Path, out: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, READ_LOG=str(log), TOOL=str(REPO / "tools" / "annotate.py"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", SLOW_TOOL, str(tmp_path / "src"), str(out), "--engine", "test-slow",
                             "--workers", "2", "--no-progress"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_a_killed_run_continues_where_it_stopped_and_ends_as_an_unbroken_run(tmp_path):
    for i in range(24):
        (tmp_path / "src").mkdir(exist_ok=True)
        Image.new("RGB", (16 + i, 16), (i * 10, 0, 0)).save(tmp_path / "src" / f"{i:02d}.png")
    out = tmp_path / "out"
    killed = slow_tool(tmp_path, out, tmp_path / "first.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = out / "progress.jsonl"
        if progress.is_file() and progress.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    recorded = load_progress(out / "progress.jsonl")
    assert 6 <= len(recorded) < 24 and not (out / "summary.json").exists()
    resumed = slow_tool(tmp_path, out, tmp_path / "second.log")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    summary = read_json(out / "summary.json")
    assert (summary["resumed_records"], summary["read_this_run"]) == (len(recorded), 24 - len(recorded))
    keys = [json.loads(line)["key"] for line in (out / "progress.jsonl").open()]
    assert len(keys) == len(set(keys)) == 24
    # no image recorded before the kill was read again
    recorded_images = {np.asarray(Image.open(tmp_path / "src" / f"{k}.png").convert("RGB")).tobytes() for k in recorded}
    second = set((tmp_path / "second.log").read_text().split())
    assert not {hashlib.sha1(b).hexdigest() for b in recorded_images} & second
    unbroken = slow_tool(tmp_path, tmp_path / "unbroken", tmp_path / "third.log")
    assert unbroken.wait(timeout=120) == 0
    for name in ("transcriptions.json", "safeboxes.json", "ocr.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "unbroken" / name).read_bytes()
    assert read_json(out / "transcriptions.json")["03"] == "30"


# --- real engines -------------------------------------------------------------------------------------------------


def test_ppocr_annotates_scene_text_photographs_within_the_goals(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime", reason="the annotate extra (pip install -e '.[annotate]')")
    from textdiff.data.scene_text_set import make_scene_text_set
    from textdiff.experiments.annotation import read_annotation, read_ground_truth, score

    make_scene_text_set(tmp_path / "gt", 8, size=256, text_free_share=0.25, seed=3, progress=False)
    summary = annotate(SourceSpec(str(tmp_path / "gt" / "images")), tmp_path / "out", "ppocr", progress=False)
    metrics = score(*read_ground_truth(tmp_path / "gt"), read_annotation(tmp_path / "out"))
    assert summary["engine_settings"] == {"drop_score": 0.0} and summary["annotated"] == 8
    assert metrics["cer"] <= 0.05 and metrics["iou_median"] >= 0.88 and metrics["false_text_rate"] == 0.0
    assert metrics["miss_rate"] == 0.0


def test_tesseract_annotates_clean_renders_line_by_line(tmp_path):
    from textdiff.ocr import check_engine

    try:
        check_engine("tesseract")
    except Exception as e:  # the Tesseract program is a Debian package (tools/setup_env.sh)
        pytest.skip(str(e))
    font = ImageFont.truetype(FONT, 28)
    for name, lines in (("sign", ["OPEN DAILY", "since 1984"]), ("blank", [])):
        image = Image.new("RGB", (320, 120), (245, 245, 240))
        for i, text in enumerate(lines):
            ImageDraw.Draw(image).text((16, 14 + 44 * i), text, fill=(15, 15, 15), font=font)
        write(tmp_path / "src" / f"{name}.png", b"")
        image.save(tmp_path / "src" / f"{name}.png")
    summary = annotate(SourceSpec(str(tmp_path / "src")), tmp_path / "out", "tesseract", progress=False)
    assert read_json(tmp_path / "out" / "transcriptions.json") == {"blank": "", "sign": "OPEN DAILY\nsince 1984"}
    assert summary["engine_settings"] == {"photo": True, "psm": 11}


# --- --unreadable mask: unreadable.json and the shards made of it ------------------------------------------------


class SignEngine:
    """Reads the image of :func:`sign_bytes`: "OPEN" at 0.95 over its top block, "Bakery" at 0.4 over its bottom
    one (each polygon 2 px around the block)."""

    name = "test-sign"

    def version(self) -> str:
        return "test-sign 1"

    def read(self, images, workers=1, progress=True) -> list[Reading]:
        def line(text, confidence, l, t, r, b):
            return OcrLine(text, ((l - 2.0, t - 2.0), (r + 2.0, t - 2.0), (r + 2.0, b + 2.0), (l - 2.0, b + 2.0)),
                           confidence)
        return [reading_of_lines([line("OPEN", 0.95, 10, 8, 30, 18), line("Bakery", 0.4, 10, 28, 40, 38)])
                for _ in images]


register_engine("test-sign", lambda **settings: SignEngine())


def sign_bytes() -> bytes:
    """64 x 48, light, dark blocks [10, 8, 30, 18) ("OPEN") and [10, 28, 40, 38) ("Bakery")."""
    image = Image.new("RGB", (64, 48), (230, 230, 230))
    ImageDraw.Draw(image).rectangle([10, 8, 29, 17], fill=(10, 10, 10))
    ImageDraw.Draw(image).rectangle([10, 28, 39, 37], fill=(10, 10, 10))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_unreadable_mask_writes_unreadable_json_and_the_shards_carry_its_boxes(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "sign.png", sign_bytes())
    code = tool.main([str(src), str(out), "--engine", "test-sign", "--workers", "0", "--no-progress",
                      "--unreadable", "mask", "--shards", str(tmp_path / "train")])
    assert code == 0
    assert read_json(out / "transcriptions.json") == {"sign": "OPEN"}
    assert read_json(out / "safeboxes.json") == {"sign": [10, 8, 40, 38]}  # both lines
    assert read_json(out / "unreadable.json") == {"sign": [[10, 28, 40, 38]]}
    summary = read_json(out / "summary.json")
    assert (summary["unreadable_masked"], summary["masked_lines"], summary["with_text"]) == (1, 1, 1)
    assert summary["outputs"] == ["transcriptions.json", "safeboxes.json", "unreadable.json", "ocr.jsonl",
                                  "summary.json"]
    assert f"--unreadable {out}/unreadable.json" in capsys.readouterr().out
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("sign.json").read())
        assert tar.extractfile("sign.txt").read() == b"OPEN"
    assert meta["unreadable"] == [[10.0, 28.0, 40.0, 38.0]] and meta["safebox"] == [10.0, 8.0, 40.0, 38.0]
    assert read_json(tmp_path / "train" / "manifest.json")["with_unreadable"] == 1


def test_a_rerun_without_mask_removes_unreadable_json_so_no_stale_boxes_reach_the_shards(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "sign.png", sign_bytes())
    annotate(SourceSpec(str(src)), out, "test-sign", filters=make_filters(unreadable="mask"), progress=False)
    assert (out / "unreadable.json").is_file()
    again = annotate(SourceSpec(str(src)), out, "test-sign", progress=False)  # the default: drop
    assert not (out / "unreadable.json").exists() and again["skipped_by_kind"] == {"unreadable_text": 1}
    assert read_json(out / "transcriptions.json") == {} and "unreadable.json" not in again["outputs"]
