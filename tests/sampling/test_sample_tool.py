"""tools/sample.py end to end: outputs, records that regenerate an image exactly, and errors before work."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textdiff.sampling.prompts import read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("sample_tool", Path(__file__).parents[2] / "tools" / "sample.py")
sample_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_tool)


def _run(*argv) -> int:
    return sample_tool.main([str(a) for a in argv] + ["--quiet"])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def cascade_out(runs, tmp_path_factory):
    """A two-stage run of two prompts x 2 images, batch size 3 (so one batch is partial)."""
    out = tmp_path_factory.mktemp("cascade_out")
    assert _run("--run-dir", runs.base, "--raw", "--txt", "ab", "--txt", "", "--capt", "", "--count", 2,
                "--seed", 10, "--steps", 3, "--upsampler", runs.up, "--up-steps", 2, "--up-guidance-txt", 2.0,
                "--batch-size", 3, "--save-intermediate", "--out", out) == 0
    return out


def test_a_run_writes_one_png_per_sample_a_grid_and_a_record_each(cascade_out):
    records = [json.loads(line) for line in (cascade_out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [(r["txt"], r["seed"]) for r in records] == [("ab", 10), ("ab", 11), ("", 10), ("", 11)]
    assert [r["batch"] for r in records] == [[0, 1, 2]] * 3 + [[3]]
    assert _pixels(cascade_out / records[0]["image"]).shape == (32, 32, 3)
    assert _pixels(cascade_out / records[0]["stages"][0]["image"]).shape == (16, 16, 3)
    up = records[0]["stages"][1]
    assert (up["sampler"], up["steps"], up["guidance_txt"], up["weights"]) == ("unipc", "pow1.75_2", 2.0, "raw")
    assert up["source"].endswith("up/checkpoints/step_00000003") and up["given"].endswith("up")
    grid = Image.open(cascade_out / "grid.png")
    assert grid.width >= 4 * 128


def test_the_records_read_as_an_evaluation_prompt_file(cascade_out):
    prompts = read_prompts(cascade_out / "samples.jsonl")
    assert [(p.txt, p.seed, p.count, p.image) for p in prompts][:2] == [("ab", 10, 1, "samples/000000.png"),
                                                                      ("ab", 11, 1, "samples/000001.png")]


@pytest.mark.slow
def test_the_jsonl_regenerates_an_image_exactly(cascade_out, tmp_path):
    assert _run("--from-jsonl", cascade_out / "samples.jsonl", "--index", 1, "--out", tmp_path) == 0
    again = _pixels(tmp_path / "samples" / "000001.png")
    assert np.array_equal(again, _pixels(cascade_out / "samples" / "000001.png"))
    assert not (tmp_path / "samples" / "000000.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags, named", [
    (["--steps", "50"], "--steps would be ignored; drop it"),  # the default, given explicitly, is still refused
    (["--guidance-txt", "3", "--raw", "--up-steps", "2"], "--guidance-txt, --ema/--raw, --up-steps would be ignored; "
                                                          "drop them"),
    (["--txt", "hello", "--seed", "4"], "--txt, --seed would be ignored"),
    (["--precision", "bf16", "--batch-size", "2"], "--precision, --batch-size would be ignored"),  # argv order
])
def test_sampling_flags_given_with_from_jsonl_are_refused_before_any_work(cascade_out, tmp_path, capsys, flags,
                                                                           named):
    assert _run("--from-jsonl", cascade_out / "samples.jsonl", "--index", 1, "--out", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert "--from-jsonl regenerates a sample with the model, prompt and settings its record holds" in err
    assert named in err and "or sample afresh without --from-jsonl" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_from_jsonl_takes_out_device_and_quiet(cascade_out, tmp_path):
    assert _run("--from-jsonl", cascade_out / "samples.jsonl", "--index", 0, "--device", "cpu",
                "--out", tmp_path) == 0
    assert (tmp_path / "samples" / "000000.png").is_file()


@pytest.mark.slow
def test_batch_size_does_not_change_the_images(runs, tmp_path):
    for bs in (1, 3):
        assert _run("--run-dir", runs.base, "--txt", "ab", "--txt", "cd", "--txt", "", "--steps", 3,
                    "--batch-size", bs, "--out", tmp_path / f"bs{bs}") == 0
    for i in range(3):
        a = _pixels(tmp_path / "bs1" / "samples" / f"{i:06d}.png").astype(int)
        b = _pixels(tmp_path / "bs3" / "samples" / f"{i:06d}.png").astype(int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_an_empty_prompt_file_is_an_error_before_work(runs, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert _run("--run-dir", runs.base, "--prompts", tmp_path / "empty.jsonl", "--out", tmp_path / "o") == 2
    assert "empty.jsonl holds no prompts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_an_unknown_sampler_is_an_error_before_work(runs, tmp_path, capsys):
    assert _run("--run-dir", runs.base, "--txt", "ab", "--sampler", "euler", "--out", tmp_path / "o") == 2
    assert "sampler 'euler' is unknown; choose one of ddpm, ddim, prk, plms" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_an_upsampler_that_does_not_fit_the_base_size_is_an_error_before_work(runs, tmp_path, capsys):
    assert _run("--run-dir", runs.base, "--txt", "ab", "--upsampler", runs.up_from8, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "upsamples 8 px images (model.low_res_size) but stage 0" in err and "makes 16 px images" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_too_long_transcription_is_cut_with_a_warning(runs, tmp_path, capsys):
    assert _run("--run-dir", runs.base, "--txt", "abcdefghijk", "--steps", 2, "--out", tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert "warning: transcription 'abcdefghijk' (11 characters) is longer than" in err
    assert "model.max_seq_len=8" in err and "cut to 'abcdef'" in err


@pytest.mark.slow
def test_upsampler_flags_without_an_upsampler_are_an_error(runs, tmp_path, capsys):
    assert _run("--run-dir", runs.base, "--txt", "ab", "--up-steps", 3, "--out", tmp_path / "o") == 2
    assert "--up-steps sets an upsampler stage, but no --upsampler is given" in capsys.readouterr().err


@pytest.mark.slow
def test_null_txt_samples_the_null_transcription_unlike_no_text(runs, tmp_path):
    """--null-txt is the dropped condition (the NULL token), --txt "" an image without text (START alone):
    two different inputs to the model, recorded as JSON null and "" and replayed from the records."""
    assert _run("--run-dir", runs.base, "--raw", "--txt", "", "--null-txt", "--steps", 3, "--out", tmp_path) == 0
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["txt"] for r in records] == ["", None]
    empty, null = (_pixels(tmp_path / "samples" / f"{i:06d}.png").astype(int) for i in (0, 1))
    assert np.abs(empty - null).max() > 10
    assert [p.txt for p in read_prompts(tmp_path / "samples.jsonl")] == ["", None]
