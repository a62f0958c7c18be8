"""tools/prove_spelling.py at a tiny budget: the plumbing of the spelling experiment (not its result, which is a
40-minute benchmark recorded in docs/spelling.md).

One run (module fixture, about two minutes, marked slow): a tiny U-net trained for the half minute the budget
leaves, evaluated on all 110 held-out strings with 4 sampling steps. The rescoring of a finished run's saved
images with one OCR engine or several is specified on a small run written by hand (no training).
"""

import json
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from textdiff.config import EvalConfig
from textdiff.eval.spelling import installed_engines
from textdiff.experiments.spelling import RESULT_KEYS, Design
from textdiff.experiments.spelling_set import all_strings, render_rng, render_string, split_strings
from textdiff.ocr import OcrLine, base, reading_of_lines, register_engine

from .conftest import MINUTES, prove

REPO = Path(__file__).resolve().parents[2]

@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_the_experiment_ends_within_its_budget_and_prints_every_figure(experiment, capfd):
    code, out = experiment
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(result)
    assert result["minutes"] <= MINUTES * 1.1
    assert result["n_eval"] == 110 and result["heldout_strings"] == 110 and result["train_strings"] == 990
    batch = json.loads((REPO / "ds_configs" / "spell_cpu.json").read_text())["train_micro_batch_size_per_gpu"]
    assert result["steps"] >= 1 and result["samples_seen"] == batch * result["steps"]
    # the OCR ceiling on real renders of the held-out strings (measured 0.015-0.02) and chance for 2-3 digits
    assert 0.0 <= result["cer_ceiling"] <= 0.05
    assert 0.85 <= result["cer_chance"] <= 0.95
    assert result["cer_txt"] >= 0 and result["cer_null"] >= 0 and 0 <= result["exact_txt"] <= 1
    assert result["curve"] and all({"step", "samples_seen", "cer", "cer_null", "minutes"} <= set(p)
                                   for p in result["curve"])
    # the figures name their engine, which the training-time curve used too, beside its ceiling
    assert result["engine"] == "tesseract" and list(result["engines"]) == ["tesseract"]
    assert result["engines"]["tesseract"]["cer_ceiling"] == result["cer_ceiling"]


@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_held_out_strings_are_never_in_the_shards(experiment):
    _, out = experiment
    train, heldout = split_strings(all_strings(), 0.1, 0)
    written = set()
    for shard in sorted((out / "data" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    written.add(tar.extractfile(member).read().decode())
    assert written == set(train) and not written & set(heldout)


@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_the_control_samples_the_null_transcription_and_both_are_scored_against_the_prompt(experiment):
    _, out = experiment
    records = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    txt = [r for r in records if r["condition"] == "txt"]
    null = [r for r in records if r["condition"] == "null"]
    assert len(txt) == len(null) == 110
    assert all(r["txt"] == r["target"] for r in txt) and all(r["txt"] is None for r in null)
    assert [r["seed"] for r in txt] == [r["seed"] for r in null]  # same weights and noise, condition dropped
    assert all((out / "eval" / r["image"]).is_file() for r in records) and (out / "eval" / "grids.png").is_file()


def test_a_budget_too_small_for_training_is_refused_before_any_work(tmp_path, capsys):
    assert prove.main(["--minutes", "1", "--out", str(tmp_path / "x"), "--renders", "1"]) == 2
    assert "give more minutes" in capsys.readouterr().err


def test_an_unknown_engine_is_refused_before_any_work(tmp_path, capsys):
    assert prove.main(["--minutes", "40", "--out", str(tmp_path / "x"), "--engine", "easyocr"]) == 2
    assert "eval.ocr_engine (--engine) is 'easyocr'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- rescoring a finished run, written by hand --------------------------------------------------------------

TARGETS = ["12", "345"]


class ReadsTwelve:
    """An engine that reads every image as "12"."""

    name = "twelve"

    def version(self):
        return "twelve 1"

    def read(self, images, workers=1, progress=True):
        return [reading_of_lines([OcrLine("12", ((0, 0), (1, 0), (1, 1), (0, 1)), 0.9)]) for _ in images]


@pytest.fixture
def twelve(monkeypatch):
    """The engine "twelve" registered for the test."""
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    register_engine("twelve", ReadsTwelve)


@pytest.fixture
def finished_run(tmp_path):
    """A run as the experiment leaves it, with one image per held-out string "12" and "345": the samples with
    the transcription are the very renders the ceiling is read from, the null control's are flat gray."""
    out = tmp_path / "run"
    design = Design(eval_per_string=1)
    records = []
    for i, target in enumerate(TARGETS):
        for kind in ("txt", "null"):
            image = render_string(target, render_rng(design.seed + 7919, target, i), design.size)[0] if kind == "txt" \
                else Image.new("RGB", (design.size, design.size), (128, 128, 128))
            (out / "eval" / kind).mkdir(parents=True, exist_ok=True)
            image.save(out / "eval" / kind / f"{i:04d}.png")
            records.append({"image": f"{kind}/{i:04d}.png", "condition": kind, "txt": target if kind == "txt" else None,
                            "target": target, "seed": i, "reading": "", "cer": 1.0})
    (out / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {"cer_txt": 0.5, "exact_txt": 0.5, "steps": 7, "samples_seen": 224, "minutes": 1.0, "n_eval": 2,
              "curve": [{"step": 7, "cer": 0.5}], "cer_chance": 0.9, "cer_null": 0.9, "cer_ceiling": 0.1,
              "design": {**asdict(design), "lengths": list(design.lengths), "overrides": []}}
    (out / "result.json").write_text(json.dumps(result))
    return out


def test_rescore_with_one_engine_gives_its_figures_and_ceiling_and_keeps_training(finished_run, twelve, capsys):
    assert prove.main(["--rescore", str(finished_run), "--engine", "twelve", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((finished_run / "result.json").read_text())
    assert printed == {k: result[k] for k in RESULT_KEYS}
    # "12" read for "12" and "345": 0 + 3 edits over 5 characters, the same for samples, control and renders
    assert (result["engine"], result["cer_txt"], result["exact_txt"]) == ("twelve", 0.6, 0.5)
    assert (result["cer_null"], result["cer_ceiling"]) == (0.6, 0.6)
    assert list(result["engines"]) == ["twelve"] and result["engines"]["twelve"]["version"] == "twelve 1"
    assert result["engines"]["twelve"]["metrics"]["txt"]["mario_word_accuracy"] == 0.5
    assert (result["steps"], result["samples_seen"], result["curve"]) == (7, 224, [{"step": 7, "cer": 0.5}])
    assert result["before_rescore"]["cer_txt"] == 0.5 and result["rescored_with"]["ocr_retry_psm"] == 8
    records = [json.loads(line) for line in (finished_run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [(r["condition"], r["engine"], r["reading"]) for r in records[:2]] == [("txt", "twelve", "12"),
                                                                                 ("txt", "twelve", "12")]


def test_rescore_with_two_engines_puts_the_first_at_the_top_and_each_beside_its_ceiling(finished_run, twelve, capsys):
    assert prove.main(["--rescore", str(finished_run), "--engine", "twelve", "--engine", "tesseract"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((finished_run / "result.json").read_text())
    assert result["engine"] == "twelve" and list(result["engines"]) == ["twelve", "tesseract"]
    tesseract = result["engines"]["tesseract"]
    # the samples with the transcription are the ceiling's renders: the same figure; flat gray reads as nothing
    assert tesseract["cer_txt"] == tesseract["cer_ceiling"] and tesseract["cer_null"] == 1.0
    assert tesseract["version"].startswith("tesseract 5")
    records = [json.loads(line) for line in (finished_run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(set(r["by_engine"]) == {"twelve", "tesseract"} for r in records)
    assert printed.startswith("twelve: held-out CER 0.600") and "\ntesseract: held-out CER" in printed


@pytest.mark.skipif(len(installed_engines(EvalConfig())) < 2, reason="PP-OCR's packages are not installed here")
def test_rescore_reads_with_both_engines_by_default_where_both_exist(finished_run, monkeypatch):
    # only the built-in engines: other test modules register test engines for the whole session
    monkeypatch.setattr(base, "_ENGINES", {k: v for k, v in base._ENGINES.items() if k in ("tesseract", "ppocr")})
    assert prove.main(["--rescore", str(finished_run)]) == 0
    result = json.loads((finished_run / "result.json").read_text())
    assert result["engine"] == "tesseract" and list(result["engines"]) == ["tesseract", "ppocr"]
    assert all(f"cer_{kind}" in result["engines"]["ppocr"] for kind in ("txt", "null", "ceiling"))


def test_rescore_of_a_folder_without_a_run_says_what_it_needs(tmp_path, capsys):
    assert prove.main(["--rescore", str(tmp_path)]) == 2
    assert "--rescore needs a finished run (result.json, eval/samples.jsonl)" in capsys.readouterr().err


@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_rescore_reads_the_saved_images_again_and_keeps_the_training_figures(experiment):
    _, out = experiment
    before = json.loads((out / "result.json").read_text())
    assert prove.main(["--rescore", str(out), "--engine", "tesseract", "--json"]) == 0
    after = json.loads((out / "result.json").read_text())
    assert (after["steps"], after["samples_seen"], after["curve"]) == (before["steps"], before["samples_seen"],
                                                                      before["curve"])
    assert after["before_rescore"]["cer_txt"] == before["cer_txt"] and after["n_eval"] == 110
    assert after["rescored_with"]["ocr_retry_psm"] == 8


@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_the_ema_sweep_scores_every_kept_average_and_rebuilt_widths_at_the_runs_last_step(experiment, capfd):
    """Every average the run kept (the rate, the tracked start, both power EMAs, the raw weights) and each
    rebuilt width is scored on the held-out strings; a rebuilt width that was snapshotted fits exactly."""
    code, out = experiment
    assert code == 0
    assert prove.main(["--ema-sweep", str(out), "--sigma-rels", "0.05,0.08", "--engine", "tesseract", "--json"]) == 0
    result = json.loads(capfd.readouterr().out.splitlines()[-1])
    names = [r["average"] for r in result["rows"]]
    assert names == ["0.999", "plain:0.999", "power:0.05", "power:0.1", "raw", "posthoc:0.05", "posthoc:0.08"]
    assert all(0.0 <= r["cer"] and r["exact"] <= 1.0 for r in result["rows"])
    rebuilt = {r["sigma_rel"]: r for r in result["rows"] if r["kind"] == "rebuilt"}
    assert rebuilt[0.05]["fit"] < 1e-6 and rebuilt[0.08]["fit"] < 0.05
    assert result["best_rebuilt"]["kind"] == "rebuilt" and result["n_eval"] == 110
    assert (out / "ema_sweep.json").is_file() and Image.open(out / "ema_sweep.png").size == (560, 300)


# --- noisy labels: --wrong-labels (the data step, its record and the mask; training and sampling faked) ----------

WRONG_SHARE = 0.3


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """``--wrong-labels 0.3 --set data.mask_unreadable=true`` at one render per string, through the real data step
    (render, make_shards), with training, sampling and the checkpoint listing faked (about 10 s): (out, what
    the training was given, the printed summary)."""
    import contextlib
    import io
    import subprocess

    from textdiff.experiments import spelling

    out = tmp_path_factory.mktemp("noisy") / "run"
    trained = {}

    def train_model(out_dir, design, manifest, minutes, engine="tesseract"):
        trained.update(design=design, manifest=manifest)
        return subprocess.CompletedProcess([], 0)

    def evaluate(out_dir, design, heldout, cfg, engines):
        return {"engine": engines[0], "cer_txt": 0.5, "exact_txt": 0.5, "cer_null": 0.9, "exact_null": 0.0,
                "cer_ceiling": 0.02, "exact_ceiling": 1.0, "cer_chance": 0.9, "n_eval": len(heldout), "engines": {},
                "weights": "ema"}

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(spelling, "train_model", train_model)
        mp.setattr(spelling, "evaluate", evaluate)
        mp.setattr(spelling, "complete_checkpoints", lambda path: [(7, path / "step_7")])
        code = prove.main(["--minutes", "3", "--out", str(out), "--renders", "1", "--steps", "4", "--engine",
                           "tesseract", "--wrong-labels", str(WRONG_SHARE), "--set", "data.mask_unreadable=true"])
    assert code == 0
    return out, trained, printed.getvalue()


def shard_samples(shards: Path) -> dict[str, dict]:
    """Every sample of the shards by key: its .txt and .json."""
    samples = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: {"txt": s["txt"].decode(), "meta": json.loads(s["json"])} for key, s in samples.items()}


def test_wrong_labels_mislabel_a_seeded_share_with_other_training_strings_and_flag_their_boxes(noisy_run):
    out, _, _ = noisy_run
    train, heldout = split_strings(all_strings(), 0.1, 0)
    samples = shard_samples(out / "data" / "shards").values()
    wrong = [s for s in samples if "unreadable" in s["meta"]]
    assert len(samples) == 990 and len(wrong) == 297  # round(0.3 x 990)
    for s in samples:
        truth = s["meta"]["source"].split("_")[0]  # images are <text>_<k>.png; the ink is always the truth
        flagged = "unreadable" in s["meta"]
        assert (s["txt"] != truth) == flagged and s["txt"] in train and s["txt"] not in heldout
        if flagged:  # the box of the string: the render's safebox
            assert s["meta"]["unreadable"] == [s["meta"]["safebox"]]
    manifest = json.loads((out / "data" / "shards" / "manifest.json").read_text())
    assert manifest["with_unreadable"] == 297 and manifest["skipped_count"] == 0


def test_wrong_labels_are_recorded_in_result_json_and_the_mask_setting_reaches_training(noisy_run):
    out, trained, printed = noisy_run
    result = json.loads((out / "result.json").read_text())
    assert result["design"]["wrong_labels"] == WRONG_SHARE and result["design"]["seed"] == 0
    assert result["wrong_labels"] == {"share": 0.3, "seed": 0, "images": 297, "of": 990, "masked": True}
    assert "data.mask_unreadable=true" in trained["design"].overrides
    assert "wrong labels: 297 of 990 training images (0.3, seed 0), masked out of the loss" in printed
    assert json.loads((out / "data" / "design.json").read_text())["wrong_labels"] == WRONG_SHARE


def test_the_stream_masks_exactly_the_string_of_each_mislabelled_image(noisy_run):
    from itertools import islice

    import torch

    from textdiff.config import load_config
    from textdiff.data.stream import build_train_stream

    out, trained, _ = noisy_run
    cfg = load_config(REPO / "ds_configs" / "spell_cpu.json",
                      [f"data.shards={trained['manifest']}", "data.num_workers=0", "data.mask_unreadable=true"])
    stream = build_train_stream(cfg.data, cfg.augment, 32, 0, 32, 0, 1)
    samples = shard_samples(out / "data" / "shards")
    flagged = 0
    for batch in islice(stream, 3):
        for key, mask in zip(batch["key"], batch["loss_mask"]):
            want = torch.ones(1, 32, 32)
            if "unreadable" in samples[key]["meta"]:  # no crop in the recipe: the 32 px render is kept whole
                l, t, r, b = (int(v) for v in samples[key]["meta"]["unreadable"][0])
                want[:, t:b, l:r] = 0
                flagged += 1
            assert torch.equal(mask, want), key
    assert 10 <= flagged <= 50  # 96 samples, 30% flagged: 29 expected


def test_a_rerun_into_the_same_out_with_another_share_is_refused_naming_the_flag(noisy_run):
    from textdiff.experiments.spelling import ExperimentError, prepare_data

    with pytest.raises(ExperimentError, match="another data design.*--wrong-labels"):
        prepare_data(noisy_run[0], Design(renders=1, wrong_labels=0.2), progress=False)


def test_wrong_labels_are_a_seeded_share_of_the_renders_each_another_string():
    from textdiff.experiments.spelling_set import wrong_labels

    strings = ["12", "34", "567"]
    jobs = [(s, k) for s in strings for k in range(10)]  # 30 renders
    first = wrong_labels(jobs, strings, 0.3, seed=0)
    assert len(first) == 9 and all(label != text and label in strings for (text, _), label in first.items())
    assert wrong_labels(jobs, strings, 0.3, seed=0) == first and wrong_labels(jobs, strings, 0.3, seed=1) != first
    assert wrong_labels(jobs, strings, 0.0, seed=0) == {} and len(wrong_labels(jobs, strings, 0.5, seed=0)) == 15
    with pytest.raises(ValueError, match="the share of wrong labels is 1.0; give a fraction in \\[0, 1\\)"):
        wrong_labels(jobs, strings, 1.0, seed=0)


def test_a_wrong_label_share_outside_0_to_1_is_refused_before_any_work(tmp_path, capsys):
    assert prove.main(["--minutes", "40", "--out", str(tmp_path / "x"), "--wrong-labels", "1.5"]) == 2
    assert "--wrong-labels 1.5: give the share of training images to mislabel, in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the whole experiment: data, training, evaluation
def test_the_ema_curve_scores_every_average_of_every_kept_checkpoint(experiment, capfd):
    code, out = experiment
    assert code == 0
    assert prove.main(["--ema-curve", str(out), "--engine", "tesseract", "--json"]) == 0
    result = json.loads(capfd.readouterr().out.splitlines()[-1])
    steps = sorted({r["step"] for r in result["rows"]})
    assert steps and all(r["samples_seen"] == r["step"] * 32 for r in result["rows"])
    for step in steps:
        assert [r["average"] for r in result["rows"] if r["step"] == step] == \
            ["0.999", "plain:0.999", "power:0.05", "power:0.1", "raw"]
    assert result["n_eval"] == 110 and (out / "ema_curve.json").is_file()
    # only the last checkpoint (no other is at a multiple of 10**6 steps), only the named averages
    assert prove.main(["--ema-curve", str(out), "--engine", "tesseract", "--curve-every", str(10 ** 6),
                       "--averages", "plain:0.999,raw", "--json"]) == 0
    rows = json.loads(capfd.readouterr().out.splitlines()[-1])["rows"]
    assert [(r["step"], r["average"]) for r in rows] == [(steps[-1], "plain:0.999"), (steps[-1], "raw")]
    assert prove.main(["--ema-curve", str(out), "--averages", "arithmetic:0.5"]) == 2
    assert "keeps no average arithmetic:0.5" in capfd.readouterr().err


def compared_run(path, readings, seeds=(0, 1)):
    """A finished run whose held-out samples of TARGETS were read (by "tesseract") as ``readings``."""
    design = Design(eval_per_string=1)
    records = [{"image": f"txt/{i:04d}.png", "condition": "txt", "txt": t, "target": t, "seed": seed,
                "engine": "tesseract", "reading": got, "cer": 0.0, "by_engine": {"tesseract": {"reading": got, "cer": 0.0}}}
               for i, (t, got, seed) in enumerate(zip(TARGETS, readings, seeds))]
    (path / "eval").mkdir(parents=True)
    (path / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "result.json").write_text(json.dumps({"design": {**asdict(design), "lengths": list(design.lengths),
                                                             "overrides": []}}))
    return path


def test_compare_rescores_both_runs_readings_and_reports_b_minus_a(tmp_path, capsys):
    a = compared_run(tmp_path / "a", ["12", "3"])      # 2 errors in 5 characters
    b = compared_run(tmp_path / "b", ["12", "345"])    # none
    assert prove.main(["--compare", str(a), str(b), "--rounds", "200", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cer_a"] == pytest.approx(0.4) and r["cer_b"] == 0.0 and r["difference"] == pytest.approx(-0.4)
    assert (r["engine"], r["strings"], r["samples"], r["rounds"]) == ("tesseract", 2, 2, 200)
    # rounds draw "12" twice (difference 0), "345" twice (-2/3) or each once (-0.4)
    assert r["ci95"][0] == pytest.approx(-2 / 3) and r["ci95"][1] == 0.0


def test_compare_refuses_runs_sampled_with_other_seeds_naming_both_files(tmp_path, capsys):
    a = compared_run(tmp_path / "a", ["12", "3"])
    b = compared_run(tmp_path / "b", ["12", "345"], seeds=(0, 5))
    assert prove.main(["--compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert str(a / "eval" / "samples.jsonl") in err and str(b / "eval" / "samples.jsonl") in err and "--seed" in err


def test_compare_asks_for_a_rescore_when_a_run_lacks_the_engines_readings(tmp_path, capsys):
    a = compared_run(tmp_path / "a", ["12", "3"])
    b = compared_run(tmp_path / "b", ["12", "345"])
    assert prove.main(["--compare", str(a), str(b), "--engine", "ppocr"]) == 2
    assert f"--rescore {a} --engine ppocr" in capsys.readouterr().err
