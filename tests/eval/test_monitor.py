"""The training monitor: spelling evaluation during training (eval/* scalars and the JSONL, the Tesseract
check at start, off at 0) and the sample grid, through the trainer's seam."""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from textdiff.config import ConfigError
from textdiff.eval.monitor import TrainingMonitor
from textdiff.eval.prompts import eval_prompts
from textdiff.train.loop import Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # DeepSpeed engines in this process

EVAL = ("eval.every=2", "eval.num_prompts=5", "eval.steps=2")  # 4 text prompts and 1 text-free (every 5th)


def _trainer(cfg, run_dir) -> Trainer:
    return Trainer(cfg, run_dir, monitor=TrainingMonitor(cfg, run_dir))


def _look(trainer) -> dict:
    """Hand the monitor the EMA at this step, as the loop does at its last step; the eval record it wrote."""
    trainer.look(last=True, stopping=False)
    return json.loads((trainer.run_dir / "eval.jsonl").read_text().splitlines()[-1])


def _run(cfg, run_dir):
    trainer = _trainer(cfg, run_dir)
    summary = trainer.run()
    trainer.close()
    return summary


def _tags(run_dir):
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    return events, events.Tags()


def test_every_two_steps_logs_spelling_scalars_grid_and_jsonl(tiny, tmp_path):
    _run(tiny("train.max_steps=4", *EVAL), tmp_path / "run")
    events, tags = _tags(tmp_path / "run")
    lines = (tmp_path / "run" / "eval.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for name in ("cer", "exact_match", "word_accuracy", "false_text_rate"):
        points = events.Scalars(f"eval/{name}")
        assert [p.step for p in points] == [2, 4], name
        assert [p.value for p in points] == pytest.approx([r[name] for r in records], rel=1e-6), name
    grids = events.Images("eval/samples")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[0].width, grids[0].height) == (5 * 18 + 2, 18 + 2)  # 5 images of 16 px, one row, 2 px gaps
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["n"] == 5 and r["n_text"] == 4 and r["n_empty"] == 1 for r in records)
    # every record names its engine and carries that engine's ceiling on 16 px renders of the same prompts
    assert all(r["engine"] == "tesseract" and r["engine_version"].startswith("tesseract 5") for r in records)
    assert records[0]["ceiling"] == records[1]["ceiling"] and records[0]["ceiling"]["n"] == 5
    ceiling = events.Scalars("eval/ceiling/cer")
    assert [p.step for p in ceiling] == [2, 4]
    assert [p.value for p in ceiling] == pytest.approx([records[0]["ceiling"]["cer"]] * 2, rel=1e-6)
    for name in ("ned", "sentence_accuracy", "mario_word_accuracy", "mario_f_measure"):
        assert [p.value for p in events.Scalars(f"eval/{name}")] == pytest.approx([r[name] for r in records]), name
    # a 16 px model after 4 steps draws no legible text: OCR reads (almost) nothing of the 4 transcriptions
    assert all(r["exact_match"] == 0.0 and r["cer"] >= 0.5 for r in records), records


KNOWN = ["hello", "textdiff", "ocr", "spelling", ""]  # 4 transcriptions and one text-free prompt


def _known_prompts(path):
    path.write_text("".join(json.dumps({"txt": t, "capt": "", "seed": 10 * i, "count": 1}) + "\n"
                            for i, t in enumerate(KNOWN)))
    return path


def _evaluate_with(trainer, show):
    """The monitor's evaluation with the sampler replaced by 64 px synthetic renders of ``show(txt)`` (what OCR reads
    best: the renderer the demo set is drawn with), so the scores are known in advance."""
    from textdiff.data.augment import to_tensor
    from textdiff.data.synthetic import render_sample
    from textdiff.eval.prompts import render_rng

    def renders(model, txt, capt, seeds, steps, low_res, *settings):
        return torch.stack([to_tensor(np.asarray(render_sample(show(t), render_rng(s, 0), 64).image.convert("RGB")))
                            for t, s in zip(txt, seeds)])

    trainer.monitor._sample = renders
    return _look(trainer)


@pytest.mark.parametrize("show, cer, exact", [
    (lambda t: t, (0.0, 0.15), (0.75, 1.0)),  # the asked text: measured CER 0.0, all 4 read exactly
    # no text: each of the 24 characters is missing (CER 1), give or take what OCR makes of the background
    # shapes (measured 0.958: one stray character that matched)
    (lambda t: "", (0.75, 1.25), (0.0, 0.0)),
])
def test_the_hook_scores_images_of_known_text_with_the_cer_they_must_get(tiny, tmp_path, show, cer, exact):
    cfg = tiny("train.max_steps=1", "eval.every=1", f"eval.prompts_file={_known_prompts(tmp_path / 'p.jsonl')}")
    trainer = _trainer(cfg, tmp_path / "run")
    record = _evaluate_with(trainer, show)
    trainer.close()
    assert (record["n"], record["n_text"], record["n_empty"]) == (5, 4, 1)
    assert cer[0] <= record["cer"] <= cer[1], record
    assert exact[0] <= record["exact_match"] <= exact[1], record
    assert record["false_text_rate"] == 0.0  # the text-free prompt's blank render shows no text
    # the ceiling: Tesseract on 16 px renders of the prompts (the model's size) reads nothing (measured CER 1.0)
    assert record["ceiling"]["n"] == 5 and record["ceiling"]["cer"] >= 0.75
    events, _ = _tags(tmp_path / "run")
    assert events.Scalars("eval/cer")[0].value == pytest.approx(record["cer"], rel=1e-6)


def test_a_prompt_too_long_to_render_leaves_the_ceiling_empty_and_the_evaluation_whole(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"txt": "a rather long sentence"}\n{"txt": "ox"}\n')
    trainer = _trainer(tiny("train.max_steps=1", "eval.every=1", f"eval.prompts_file={prompts}"), tmp_path / "run")
    record = _evaluate_with(trainer, lambda t: t[:2])
    trainer.close()
    assert record["ceiling"] == {} and (record["n"], record["n_text"]) == (2, 2)


def test_the_same_seeds_give_the_same_eval_for_the_same_weights(tiny, tmp_path):
    trainer = _trainer(tiny("train.max_steps=1", *EVAL), tmp_path / "run")
    trainer.train_step()
    first, second = _look(trainer), _look(trainer)
    trainer.close()
    for record in (first, second):
        record.pop("seconds"), record.pop("time")
    assert first == second and first["step"] == 1


def test_a_missing_tesseract_stops_before_step_one_naming_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.tesseract_cmd.*not found"):
        _trainer(tiny(*EVAL, f"eval.tesseract_cmd={tmp_path / 'no-such-tesseract'}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "tb").exists()


def test_an_unknown_ocr_engine_stops_before_step_one_naming_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.ocr_engine \(--engine\) is 'easyocr'; the OCR engines are"):
        _trainer(tiny(*EVAL, "eval.ocr_engine=easyocr"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_ppocr_package_stops_before_step_one_naming_what_to_install(tiny, tmp_path, monkeypatch):
    import textdiff.ocr

    monkeypatch.setattr(textdiff.ocr, "PPOCR_PACKAGES", ("rapidocr_onnxruntime_absent",))
    with pytest.raises(ConfigError, match=r"eval.every is 2 but the PP-OCR engine .* needs the Python package "
                                          r"rapidocr_onnxruntime_absent: pip install"):
        _trainer(tiny(*EVAL, "eval.ocr_engine=ppocr"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_every_zero_evaluates_nothing(tiny, tmp_path):
    _run(tiny("train.max_steps=2", "eval.every=0", "eval.tesseract_cmd=/no/such/tesseract"), tmp_path / "run")
    _, tags = _tags(tmp_path / "run")
    assert "train/loss" in tags["scalars"]
    assert not [t for t in tags["scalars"] + tags["images"] if t.startswith("eval/")]
    assert not (tmp_path / "run" / "eval.jsonl").exists()


def test_an_upsampler_is_evaluated_on_renders_of_the_prompts_at_its_low_res_size(tiny, tmp_path):
    cfg = tiny("model.image_size=32", "model.low_res_size=16", "model.noise_cond=true",
               "model.attention_resolutions=[16]", "model.txt_resolutions=[16]", "train.max_steps=1", *EVAL)
    trainer = _trainer(cfg, tmp_path / "run")
    assert trainer.monitor.eval_prompts == eval_prompts(cfg.eval, size=16)  # words drawn to fit the 16 px renders
    trainer.train_step()
    record = _look(trainer)
    trainer.close()
    assert record["n"] == 5 and record["n_text"] == 4
    assert record["exact_match"] == 0.0 and record["cer"] >= 0.5  # 1 step of training spells nothing
    events, _ = _tags(tmp_path / "run")
    grid = events.Images("eval/samples")[0]
    assert (grid.width, grid.height) == (5 * 34 + 2, 34 + 2)  # five 32 px upsampled images


def test_several_guidance_scales_and_the_null_control_are_logged_and_their_images_saved(tiny, tmp_path):
    import numpy as np
    from PIL import Image

    trainer = _trainer(tiny("train.max_steps=1", *EVAL, "eval.guidance_scales=[1, 3]", "eval.null_control=true"),
                       tmp_path / "run")
    trainer.train_step()
    asked = []
    sample = trainer.monitor._sample
    trainer.monitor._sample = lambda model, txt, *a, **kw: asked.append((list(txt), a[4])) or sample(model, txt, *a,
                                                                                                     **kw)
    record = _look(trainer)
    trainer.close()
    prompts = [p.txt for p in trainer.monitor.eval_prompts]
    # each condition samples every prompt once (one seed: one call); the null control gives None for each
    assert asked == [(prompts, 1.0), (prompts, 3.0), ([None] * 5, 1.0)]
    assert list(record["conditions"]) == ["g1", "g3", "null"]
    assert record["cer"] == record["conditions"]["g1"]["cer"] and record["cer_null"] == record["conditions"]["null"]["cer"]
    events, tags = _tags(tmp_path / "run")
    for tag in ("eval/cer", "eval/g1/cer", "eval/g3/cer", "eval/null/cer", "eval/cer_null"):
        assert [p.step for p in events.Scalars(tag)] == [1], tag
    grid = events.Images("eval/samples")[0]
    assert (grid.width, grid.height) == (5 * 18 + 2, 3 * 18 + 2)  # one row of 5 per condition
    out = tmp_path / "run" / "eval" / "step_00000001"
    pixels = {c: [np.asarray(Image.open(out / c / f"{i:03d}.png")).astype(int) for i in range(5)]
              for c in ("g1", "g3", "null")}
    assert (out / "grid.png").exists() and all(len(v) == 5 for v in pixels.values())
    assert all(a.shape == (16, 16, 3) for v in pixels.values() for a in v)


def test_other_averages_are_scored_on_the_same_prompts_and_logged_beside_the_sampled_ema(tiny, tmp_path):
    """eval.averages: the raw weights and a tracked start scored at each evaluation like the sampled EMA, each
    in eval.jsonl and TensorBoard under eval/avg/<name>/. The recipe's rate 0.5 starts plain, so plain:0.5 is
    the sampled average itself: same weights, prompts and seeds give the very same score."""
    cfg = tiny("train.max_steps=2", *EVAL, "ema.rates=[0.5]", 'ema.tracked=["plain:0.5"]',
               'eval.averages=["raw", "plain:0.5"]')
    _run(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert set(records[0]["averages"]) == {"raw", "plain:0.5"}
    for metrics in records[0]["averages"].values():
        assert metrics["n"] == 5 and 0.0 <= metrics["cer"]
    assert records[0]["averages"]["plain:0.5"]["cer"] == records[0]["cer"]
    events, tags = _tags(tmp_path / "run")
    assert {"eval/avg/raw/cer", "eval/avg/plain:0.5/cer"} <= set(tags["scalars"])
    assert events.Scalars("eval/avg/raw/cer")[0].value == pytest.approx(records[0]["averages"]["raw"]["cer"])


def test_an_average_the_run_does_not_keep_stops_before_step_one_naming_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.averages names power:0.05, which this run does not keep; choose "
                                          r"from raw, 0.9, 0.5"):
        _trainer(tiny(*EVAL, 'eval.averages=["power:0.05"]'), tmp_path / "run")
