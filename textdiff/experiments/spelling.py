"""The spelling experiment of tools/prove_spelling.py: does transcription conditioning teach a model to write?

One call of :func:`run_experiment` does it end to end inside a wall-clock budget:

1. data: every string of the task (:mod:`textdiff.experiments.spelling_set`) is split into training and
   held-out strings; the training strings are rendered into a folder and packed by ``tools/make_shards.py``,
   so the held-out strings are never in a shard. With ``wrong_labels`` (``--wrong-labels``) that share of the
   training images is labelled with another training string and its string box listed as unreadable text
   (:func:`textdiff.experiments.spelling_set.wrong_labels`): ``--set data.mask_unreadable=true`` masks those
   boxes out of the loss, without it the model trains on the wrong labels;
2. training: ``deepspeed --num_gpus 1 launch.sh`` with the recipe (``ds_configs/spell_cpu.json``) and
   ``train.max_minutes`` set to what the budget leaves after the reserve for evaluation; the training-time
   spelling evaluation (``eval.every``) draws the curve into ``RUN/eval.jsonl`` and TensorBoard. A rerun
   with the same ``--out`` resumes from the last checkpoint;
3. evaluation: the EMA weights sample every held-out string with transcription guidance (the model's
   answer) and with the null transcription (the control: same weights and seeds, condition dropped), and
   each OCR engine asked (``--engine``; by default every one installed, ``eval.ocr_engine`` first) reads
   both under the recipe's ``eval`` settings (for Tesseract: alphabet whitelist, upscale from the glyph
   size). Beside them, per engine: its OCR ceiling (the same engine on real renders of the held-out strings);
   and chance (each held-out label scored against the others', shuffled, with the same CER). The headline
   figures are the first engine's, named by ``engine``; ``engines`` holds every engine's.

Everything it writes lies under ``--out``: ``data/``, ``run/`` (checkpoints, TensorBoard, eval.jsonl),
``eval/`` (every image it scored, ``samples.jsonl`` with reading and CER, ``grids.png``) and
``result.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from textdiff.config import EvalConfig, TextdiffConfig, load_config
from textdiff.data.preview import png_bytes, to_uint8
from textdiff.eval.metrics import aggregate, score
from textdiff.eval.paired import paired_cer_difference
from textdiff.eval.spelling import check_ocr_engine, installed_engines, ocr_engine
from textdiff.experiments import spelling_set
from textdiff.files import atomic_write_bytes
from textdiff.formats.checkpoint import complete_checkpoints
from textdiff.sampling.cascade import StageSettings, sample_stage
from textdiff.sampling.loading import load_for_sampling
from textdiff.sampling.samplers import default_grid
from textdiff.train.engine import free_port

REPO = Path(__file__).resolve().parents[2]
RESULT_KEYS = ("engine", "cer_txt", "exact_txt", "cer_null", "cer_ceiling", "cer_chance", "steps", "samples_seen",
               "minutes", "n_eval", "engines")
# the figures of one engine: CER and exact match of the samples with the transcription, the null control and
# the ceiling (fresh renders)
ENGINE_FIGURES = ("cer_txt", "exact_txt", "cer_null", "exact_null", "cer_ceiling", "exact_ceiling")
STARTUP_MINUTES = 0.75  # DeepSpeed start, model and engine build before train.max_minutes starts counting


class ExperimentError(ValueError):
    """The experiment cannot run as asked; the message names the flag or file."""


@dataclass(frozen=True)
class Design:
    """The task and how it is scored (recorded in result.json; a rerun into the same --out must match)."""

    alphabet: str = spelling_set.DIGITS
    lengths: tuple[int, ...] = (2, 3)
    heldout_frac: float = 0.1
    renders: int = 16  # training images per training string
    size: int = 32
    seed: int = 0
    guidance: float = 3.0  # transcription guidance of the headline figure
    sampler: str = "ipndm"  # the default at 20 steps (docs/samplers.md), on its default grid for the count
    steps: int = 20
    eval_per_string: int = 2  # samples per held-out string in the final evaluation
    curve_prompts: int = 40  # held-out strings of the training-time evaluation
    recipe: str = "ds_configs/spell_cpu.json"
    overrides: tuple[str, ...] = field(default_factory=tuple)
    engines: tuple[str, ...] = ()  # OCR engines of the final evaluation; (): every one installed, eval.ocr_engine first
    # share of the training images labelled with another training string (seeded by ``seed``), their string
    # box listed as unreadable (make_shards --unreadable): noisy OCR labels, for data.mask_unreadable to mask
    wrong_labels: float = 0.0


# seconds per 32 px image of OCR with 2 workers on the 2-core machine, models loaded (220 renders: Tesseract
# 0.8 s, PP-OCR 7.7 s); an engine not listed is given the slowest
OCR_SECONDS = {"tesseract": 0.02, "ppocr": 0.04}


def eval_minutes(design: Design, n_heldout: int, engines: Sequence[str] = ("tesseract",)) -> float:
    """Minutes reserved for the final evaluation: sampling (guided and null), OCR of samples and renders by
    each of ``engines``.

    Measured on the 2-core machine with the spell_cpu.json model (busy with other work): 0.35 s per guided
    sample and 0.4 s per null one at 25 steps, :data:`OCR_SECONDS` per image of OCR; 1.25x that for safety,
    plus half a minute to load the weights and write the images.
    """
    n = n_heldout * design.eval_per_string
    ocr = sum(OCR_SECONDS.get(name, max(OCR_SECONDS.values())) for name in engines)
    seconds = n * (0.35 + 0.4) * design.steps / 25 + 3 * n * ocr
    return 0.5 + 1.25 * seconds / 60


def data_minutes(design: Design) -> float:
    """Minutes to render and shard the training images (990 strings x 16 renders: 0.5 min on a busy machine)."""
    return 0.1 + 0.025 * design.renders


MIN_TRAIN_MINUTES = 0.25


def _check_budget(minutes: float, reserved: float) -> float:
    """The minutes left for training after ``reserved`` and the engine's start-up; ExperimentError when that
    is under MIN_TRAIN_MINUTES."""
    left = minutes - reserved - STARTUP_MINUTES
    if left < MIN_TRAIN_MINUTES:
        raise ExperimentError(f"--minutes {minutes:g} leaves {left:.2f} min for training after the data, the "
                              f"evaluation reserve and the engine's start ({reserved + STARTUP_MINUTES:.1f} min); "
                              "give more minutes")
    return left


def prepare_data(out: Path, design: Design, progress: bool = True) -> tuple[Path, list[str], list[str]]:
    """Render, shard and write the prompt files once (reused when ``out/data/design.json`` matches).

    Returns (manifest path, training strings, held-out strings).
    """
    data = out / "data"
    train, heldout = spelling_set.split_strings(spelling_set.all_strings(design.alphabet, design.lengths),
                                                design.heldout_frac, design.seed)
    stamp = {k: v for k, v in asdict(design).items()
             if k in ("alphabet", "lengths", "heldout_frac", "renders", "size", "seed")}
    stamp["lengths"] = list(design.lengths)
    if design.wrong_labels:  # only then, so data written before wrong labels existed still matches
        stamp["wrong_labels"] = design.wrong_labels
    manifest = data / "shards" / "manifest.json"
    stamp_file = data / "design.json"
    if stamp_file.exists():
        saved = json.loads(stamp_file.read_text())
        if saved != stamp:
            raise ExperimentError(f"{out} holds an experiment with another data design ({saved}); pass a new --out "
                                  "or the same --renders/--seed/--wrong-labels")
    if not (stamp_file.exists() and manifest.exists()):
        images = data / "images"
        if images.exists():
            shutil.rmtree(images)
        spelling_set.write_folder(images, train, design.renders, design.seed, design.size, progress=progress,
                                  wrong_share=design.wrong_labels)
        cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), str(images), str(data / "shards"),
               "--safeboxes", str(images / "safeboxes.json"), "--overwrite", "--seed", str(design.seed)]
        if design.wrong_labels:
            cmd += ["--unreadable", str(images / "unreadable.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExperimentError(f"make_shards failed ({proc.returncode}): {proc.stderr[-2000:]}")
        shutil.rmtree(images)  # the shards hold everything; the folder is three files per image
        atomic_write_bytes(stamp_file, json.dumps(stamp).encode())
    curve = heldout[:: max(1, len(heldout) // design.curve_prompts)][: design.curve_prompts]
    lines = "".join(json.dumps({"txt": s, "seed": 1000 + i}) + "\n" for i, s in enumerate(curve))
    atomic_write_bytes(data / "curve_prompts.jsonl", lines.encode())
    return manifest, train, heldout


def train_model(out: Path, design: Design, manifest: Path, minutes: float,
                engine: str = "tesseract") -> subprocess.CompletedProcess:
    """Train (or resume) ``out/run`` with the recipe through the DeepSpeed launcher for ``minutes``; OCR
    ``engine`` draws the training-time curve."""
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if deepspeed is None:
        raise ExperimentError("the deepspeed launcher is not installed beside this Python; run tools/setup_env.sh")
    sets = [f"data.shards={manifest}", f"train.max_minutes={minutes:.3f}",
            f"eval.prompts_file={out / 'data' / 'curve_prompts.jsonl'}", f"eval.sampler={design.sampler}",
            f"eval.steps={design.steps}", f"eval.guidance_scales=[{design.guidance}]", *design.overrides,
            f"eval.ocr_engine={engine}"]
    cmd = [deepspeed, "--num_gpus", "1", "--master_port", str(free_port()), str(REPO / "launch.sh"),
           "--config", str(REPO / design.recipe), "--run-dir", str(out / "run"), "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OMP_NUM_THREADS", None)  # the run owns the machine: textdiff gives the rank every core
    return subprocess.run(cmd, cwd=REPO, env=env)


def sample_strings(loaded, strings: Sequence[Optional[str]], seeds: Sequence[int], design: Design, guidance: float,
            desc: str, batch: int = 64) -> list[np.ndarray]:
    """uint8 [S, S, 3] images of ``strings`` (None: the null transcription), one per seed."""
    settings = StageSettings(sampler=design.sampler, steps=default_grid(design.sampler, str(design.steps)),
                             guidance_txt=guidance)
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(strings), batch), desc=desc, unit="batch"):
        with torch.no_grad():
            images = sample_stage(loaded, settings, list(strings[i:i + batch]), [""] * len(strings[i:i + batch]),
                                  list(seeds[i:i + batch]), progress=False)
        out.extend(to_uint8(images))
    return out


def heldout_strings(design: Design) -> list[str]:
    """The held-out strings of ``design`` (never in a training shard)."""
    return spelling_set.split_strings(spelling_set.all_strings(design.alphabet, design.lengths), design.heldout_frac,
                                      design.seed)[1]


def eval_targets(design: Design, heldout: Sequence[str]) -> tuple[list[str], list[int]]:
    """The final evaluation's targets (each held-out string ``eval_per_string`` times) and their seeds."""
    targets = [s for s in heldout for _ in range(design.eval_per_string)]
    return targets, [design.seed * 100_000 + i for i in range(len(targets))]


def cer_of(readings: Sequence[str], targets: Sequence[str], cfg: EvalConfig) -> tuple[float, float, list]:
    """(CER, exact match, per-image scores) of readings against targets, with the eval section's
    normalisation (the one CER definition every figure of the experiment uses)."""
    scores = [score(r, t, cfg.normalize, drop_spaces=cfg.drop_spaces) for r, t in zip(readings, targets)]
    metrics = aggregate(scores)
    return metrics["cer"], metrics["exact_match"], scores


def chance_cer(targets: Sequence[str], cfg: EvalConfig, rounds: int = 50, seed: int = 0) -> float:
    """CER of each target read as another target (a random derangement), averaged over ``rounds``: what a
    model that writes well-formed strings of the task, unrelated to its prompt, scores."""
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        while True:
            order = list(range(len(targets)))
            rng.shuffle(order)
            if all(i != j for i, j in enumerate(order)) or len(targets) < 2:
                break
        values.append(cer_of([targets[j] for j in order], targets, cfg)[0])
    return float(np.mean(values))


def labelled_grid(images: Sequence[np.ndarray], labels: Sequence[str], title: str, columns: int = 8,
                  scale: int = 3) -> Image.Image:
    """A grid of images enlarged ``scale`` x (nearest), each with its label below, and a title on top."""
    size = images[0].shape[0] * scale
    rows = -(-len(images) // columns)
    line = 14
    grid = Image.new("RGB", (columns * (size + 4) + 4, 20 + rows * (size + line + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = 4 + (i % columns) * (size + 4), 20 + (i // columns) * (size + line + 4)
        grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x, y + size + 1), label, fill=(0, 0, 0), font=font)
    return grid


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 16) -> Image.Image:
    """Two images next to each other on white."""
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def evaluate(out: Path, design: Design, heldout: Sequence[str], cfg: TextdiffConfig, engines: Sequence[str]) -> dict:
    """Sample the EMA weights of ``out/run`` on the held-out strings (with the transcription and the null
    control, same seeds) and score them with each of ``engines`` (:func:`score_images`); returns
    result.json's figures."""
    loaded = load_for_sampling(out / "run", "ema")
    targets, seeds = eval_targets(design, heldout)
    with_txt = sample_strings(loaded, targets, seeds, design, design.guidance, "sample held-out")
    null = sample_strings(loaded, [None] * len(targets), seeds, design, 1.0, "sample null control")
    return {**score_images(out, design, targets, seeds, with_txt, null, cfg.eval, engines), "weights": loaded.weights}


def engine_figures(readings: Sequence[str], targets: Sequence[str], cfg: EvalConfig) -> tuple[dict, list, list]:
    """One engine's figures from its readings of the samples with the transcription, the null control and
    the renders, in that order (n each): :data:`ENGINE_FIGURES` and, under ``metrics``, every metric of
    :func:`textdiff.eval.metrics.aggregate` for each of ``txt``, ``null`` and ``ceiling``; with the
    per-image scores of the first two."""
    n = len(targets)
    figures: dict = {"metrics": {}}
    scores = {}
    for kind, part in (("txt", readings[:n]), ("null", readings[n:2 * n]), ("ceiling", readings[2 * n:])):
        cer, exact, scores[kind] = cer_of(part, targets, cfg)
        figures[f"cer_{kind}"], figures[f"exact_{kind}"] = cer, exact
        figures["metrics"][kind] = aggregate(scores[kind])
    return figures, scores["txt"], scores["null"]


def score_images(out: Path, design: Design, targets: Sequence[str], seeds: Sequence[int],
                 with_txt: Sequence[np.ndarray], null: Sequence[np.ndarray], ocr_cfg: EvalConfig,
                 engines: Sequence[str]) -> dict:
    """Read the samples (uint8 [S, S, 3] each) and fresh renders of the targets (the ceiling) with each OCR
    engine of ``engines`` and score all three against the targets; writes ``out/eval/`` (images,
    samples.jsonl with every engine's reading, grids.png labelled with the first engine's). Returns the
    first engine's figures at the top level, named by ``engine``, and every engine's under ``engines``."""
    renders = [np.asarray(spelling_set.render_string(t, spelling_set.render_rng(design.seed + 7919, t, i),
                                                     design.size)[0]) for i, t in enumerate(targets)]
    n = len(targets)
    by_engine, per_image = {}, {}
    for name in engines:
        engine = ocr_engine(ocr_cfg, name)
        readings = [r.text for r in engine.read(list(with_txt) + list(null) + renders, workers=2)]
        figures, s_txt, s_null = engine_figures(readings, targets, ocr_cfg)
        by_engine[name] = {**figures, "version": engine.version()}
        per_image[name] = {"txt": s_txt, "null": s_null}
    first = engines[0]

    ev = out / "eval"
    records = []
    for kind, images, asked in (("txt", with_txt, targets), ("null", null, [None] * n)):
        for i, image in enumerate(images):
            path = f"{kind}/{i:04d}.png"
            (ev / kind).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(ev / path, png_bytes(image))
            s = per_image[first][kind][i]
            records.append({"image": path, "condition": kind, "txt": asked[i], "target": targets[i],
                            "seed": seeds[i], "engine": first, "reading": s.pred, "cer": s.cer,
                            "by_engine": {name: {"reading": got[kind][i].pred, "cer": got[kind][i].cer}
                                          for name, got in per_image.items()}})
    atomic_write_bytes(ev / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    shown = min(32, n)
    s_txt, s_null = per_image[first]["txt"], per_image[first]["null"]
    figures = by_engine[first]
    grids = side_by_side(
        labelled_grid(with_txt[:shown], [f"{t}>{s.pred or '-'}" for t, s in zip(targets, s_txt)],
                      f"with the transcription (guidance {design.guidance:g}): CER {figures['cer_txt']:.2f} ({first})"),
        labelled_grid(null[:shown], [f"{t}>{s.pred or '-'}" for t, s in zip(targets, s_null)],
                      f"null transcription (control): CER {figures['cer_null']:.2f} ({first})"))
    atomic_write_bytes(ev / "grids.png", png_bytes(grids))
    return {"engine": first, **{k: figures[k] for k in ENGINE_FIGURES}, "cer_chance": chance_cer(targets, ocr_cfg),
            "n_eval": n, "engines": by_engine}


def experiment_engines(cfg: EvalConfig, asked: Sequence[str] = ()) -> list[str]:
    """The OCR engines to score with: ``asked``, each checked to be known and installed, or else every
    installed one with ``cfg.ocr_engine`` first (:func:`textdiff.eval.spelling.installed_engines`)."""
    for name in asked:
        check_ocr_engine(cfg, name)
    return list(dict.fromkeys(asked)) or installed_engines(cfg)


def rescore(out: str | Path, engines: Sequence[str] = ()) -> dict:
    """Score the images a finished experiment saved (``out/eval/samples.jsonl``) again with the recipe's
    current ``eval`` settings and the OCR ``engines`` (default: every one installed), and each engine's
    ceiling on fresh renders; no sampling, no training. result.json keeps its training figures and gets the
    new ones, with the old ones under ``"before_rescore"`` and the eval settings used under
    ``"rescored_with"``."""
    out = Path(out)
    result = json.loads((out / "result.json").read_text())
    saved = result["design"]
    design = Design(**{**saved, "lengths": tuple(saved["lengths"]), "overrides": tuple(saved["overrides"]),
                       "engines": tuple(saved.get("engines", ()))})
    cfg = load_config(REPO / design.recipe, list(design.overrides))
    names = experiment_engines(cfg.eval, engines)
    records = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    by_kind = {k: [r for r in records if r["condition"] == k] for k in ("txt", "null")}
    images = {k: [np.asarray(Image.open(out / "eval" / r["image"]).convert("RGB")) for r in v]
              for k, v in by_kind.items()}
    targets, seeds = [r["target"] for r in by_kind["txt"]], [r["seed"] for r in by_kind["txt"]]
    figures = score_images(out, design, targets, seeds, images["txt"], images["null"], cfg.eval, names)
    result["before_rescore"] = {k: result[k] for k in figures if k in result}
    result.update(figures)
    result["rescored_with"] = asdict(cfg.eval)
    atomic_write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def compare_runs(out_a: str | Path, out_b: str | Path, engine: Optional[str] = None, rounds: int = 10000) -> dict:
    """Run B's held-out CER against run A's on the same strings and seeds (two finished experiments' --out):
    :func:`textdiff.eval.paired.paired_cer_difference` on the readings of ``engine`` (default: A's first
    engine), each scored again with A's recipe's ``eval`` settings. Raises ExperimentError, naming the file,
    when the runs did not sample the same targets with the same seeds or lack the engine's readings."""
    out_a, out_b = Path(out_a), Path(out_b)
    records = {}
    for out in (out_a, out_b):
        path = out / "eval" / "samples.jsonl"
        if not path.exists():
            raise ExperimentError(f"{path}: no evaluation saved; give a finished prove_spelling.py --out")
        records[out] = [r for r in map(json.loads, path.read_text().splitlines()) if r["condition"] == "txt"]
    rec_a, rec_b = records[out_a], records[out_b]
    if [(r["target"], r["seed"]) for r in rec_a] != [(r["target"], r["seed"]) for r in rec_b]:
        raise ExperimentError(f"{out_a / 'eval/samples.jsonl'} and {out_b / 'eval/samples.jsonl'} sampled "
                              "different strings or seeds: compare runs made with the same --seed and "
                              "--eval-per-string")
    engine = engine or rec_a[0]["engine"]
    for out, recs in records.items():
        if any(engine not in r["by_engine"] for r in recs):
            raise ExperimentError(f"{out / 'eval/samples.jsonl'} has no {engine} readings; add them with "
                                  f"prove_spelling.py --rescore {out} --engine {engine}")
    design = json.loads((out_a / "result.json").read_text())["design"]
    cfg = load_config(REPO / design["recipe"], list(design["overrides"])).eval
    scored = {out: [score(r["by_engine"][engine]["reading"], r["target"], cfg.normalize,
                          drop_spaces=cfg.drop_spaces) for r in recs] for out, recs in records.items()}
    figures = paired_cer_difference([s.char_errors for s in scored[out_a]], [s.char_errors for s in scored[out_b]],
                                    [s.target_chars for s in scored[out_a]], [r["target"] for r in rec_a],
                                    rounds=rounds)
    return {"a": str(out_a), "b": str(out_b), "engine": engine, **figures}


def curve(out: Path, started_unix: Optional[float]) -> list[dict]:
    """The training-time evaluations of ``out/run/eval.jsonl``: step, samples seen, minutes since the
    run's first start (when known), CER with the transcription and of the null control."""
    path = out / "run" / "eval.jsonl"
    if not path.exists():
        return []
    points = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        point = {"step": r["step"], "samples_seen": r.get("samples_seen"), "cer": r.get("cer"),
                 "cer_null": r.get("cer_null"), "exact_match": r.get("exact_match")}
        if started_unix is not None and "time" in r:
            point["minutes"] = round((r["time"] - started_unix) / 60, 2)
        points.append(point)
    return points


def wrong_label_record(design: Design, n_train_strings: int, cfg: TextdiffConfig) -> dict:
    """result.json's record of the noisy labels: share, seed, how many training images were mislabelled, and
    whether the run masked them out of the loss (``data.mask_unreadable``)."""
    images = n_train_strings * design.renders
    return {"share": design.wrong_labels, "seed": design.seed, "images": round(design.wrong_labels * images),
            "of": images, "masked": cfg.data.mask_unreadable}


def run_experiment(out: str | Path, minutes: float, design: Design = Design(), progress: bool = True) -> dict:
    """The whole experiment within ``minutes`` of wall time from this call (see the module docstring);
    returns result.json's object (also written to ``out/result.json``)."""
    started, started_unix = time.monotonic(), time.time()
    out = Path(out)
    cfg = load_config(REPO / design.recipe, list(design.overrides))
    if design.eval_per_string < 1 or design.renders < 1:
        raise ExperimentError("--eval-per-string and --renders must be at least 1")
    if not 0.0 <= design.wrong_labels < 1.0:
        raise ExperimentError(f"--wrong-labels {design.wrong_labels:g}: give the share of training images to "
                              "mislabel, in [0, 1) (e.g. 0.3)")
    engines = experiment_engines(cfg.eval, design.engines)
    n_heldout = len(heldout_strings(design))
    prepared = (out / "data" / "shards" / "manifest.json").exists()
    _check_budget(minutes, (0.0 if prepared else data_minutes(design)) + eval_minutes(design, n_heldout, engines))
    manifest, train_strings, heldout = prepare_data(out, design, progress)
    first_start = out / "run" / "started_unix"
    if not first_start.exists():
        (out / "run").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(first_start, f"{started_unix}\n".encode())
    run_started = float(first_start.read_text())
    left = _check_budget(minutes, (time.monotonic() - started) / 60 + eval_minutes(design, len(heldout), engines))
    proc = train_model(out, design, manifest, left, engines[0])
    if proc.returncode != 0:
        raise ExperimentError(f"training exited with status {proc.returncode}; see its output above")
    figures = evaluate(out, design, heldout, cfg, engines)
    step = complete_checkpoints(out / "run" / "checkpoints")[-1][0]
    per_step = cfg.deepspeed.get("train_micro_batch_size_per_gpu", 1) * cfg.deepspeed.get(
        "gradient_accumulation_steps", 1)
    result = {**figures, "steps": step, "samples_seen": step * per_step,
              "minutes": round((time.monotonic() - started) / 60, 2),
              "heldout_strings": len(heldout), "train_strings": len(train_strings),
              "curve": curve(out, run_started),
              **({"wrong_labels": wrong_label_record(design, len(train_strings), cfg)} if design.wrong_labels else {}),
              "design": {**asdict(design), "lengths": list(design.lengths), "engines": list(design.engines)},
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    atomic_write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    return result
