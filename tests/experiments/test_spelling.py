"""tools/prove_spelling.py at a tiny budget: the plumbing of the spelling experiment (not its result, which is a
40-minute benchmark recorded in docs/spelling.md).

One run (module fixture, about two minutes): a tiny U-net trained for the half minute the budget leaves,
evaluated on all 110 held-out strings with 4 sampling steps.
"""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

from textdiff.experiments.spelling_set import all_strings, split_strings
from textdiff.experiments.spelling import RESULT_KEYS

pytestmark = pytest.mark.slow  # the whole experiment: data, training, evaluation

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prove_spelling", REPO / "tools" / "prove_spelling.py")
prove = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prove)

MINUTES = 2.2
TINY = ("model.num_channels=32", "model.channel_mult=[1,2]", "model.txt_dim=32", "model.txt_depth=1",
        "model.channels_per_head=16", "model.cross_attn_channels_per_head=16", "model.num_heads=2",
        "eval.every=4", "checkpoint.save_every=1000")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("spell") / "run"
    argv = ["--minutes", str(MINUTES), "--out", str(out), "--renders", "1", "--steps", "4", "--json"]
    for s in TINY:
        argv += ["--set", s]
    code = prove.main(argv)
    return code, out


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


def test_rescore_reads_the_saved_images_again_and_keeps_the_training_figures(experiment):
    _, out = experiment
    before = json.loads((out / "result.json").read_text())
    assert prove.main(["--rescore", "--out", str(out), "--json"]) == 0
    after = json.loads((out / "result.json").read_text())
    assert (after["steps"], after["samples_seen"], after["curve"]) == (before["steps"], before["samples_seen"],
                                                                      before["curve"])
    assert after["before_rescore"]["cer_txt"] == before["cer_txt"] and after["n_eval"] == 110
    assert after["rescored_with"]["ocr_retry_psm"] == 8
