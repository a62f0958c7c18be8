"""A sampling job: prompts x a cascade of models -> one PNG per sample, a labelled grid, a JSONL of records.

Output layout under ``OUT_DIR``::

    samples/000000.png ...        the last stage's image of each sample
    stages/stage0/000000.png ...  earlier stages' images (only with ``save_intermediate``)
    grid.png                      the first 64 samples labelled with their transcription and caption
    samples.jsonl                 one record per sample: prompt, seed, batch, and every stage's settings

A record holds all that made its image, so :func:`replay` regenerates it bit for bit on the same kind of
device with the same torch: it re-runs the record's whole batch (its ``batch`` members), because a batch's
numerics depend on which samples share it, with the CPU thread count the record was made with. The records
also read as an evaluation prompt file (``txt``, ``capt``, ``seed``, ``count`` and ``image``), so
``tools/eval_text.py`` can score a sampling run directly.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from textdiff.config import ModelConfig
from textdiff.data.preview import batch_grid, png_bytes, to_uint8
from textdiff.diffusion import build_diffusion
from textdiff.sampling.prompts import Prompt, read_jsonl
from textdiff.files import atomic_write_bytes
from textdiff.malloc import keep_freed_memory
from textdiff.models.text_encoder import max_characters
from textdiff.sampling.cascade import CascadeError, PRECISIONS, StageSettings, check_cascade, run_cascade
from textdiff.formats.weights import read_source_config
from textdiff.sampling.loading import LoadedModel, load_for_sampling

RECORDS_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
GRID_MAX = 64  # samples shown in grid.png; every sample still gets its own PNG


@dataclass(frozen=True)
class StageSpec:
    """One stage of a job: where its weights come from (a source of textdiff/sampling/loading.py, ``ema`` or
    ``raw``, an EMA rate or None) and how it samples."""

    source: str
    settings: StageSettings = field(default_factory=StageSettings)
    weights: str = "ema"
    ema_rate: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-able form, as stored in each record's ``stages``."""
        return {"source": self.source, "weights": self.weights, "ema_rate": self.ema_rate, **self.settings.to_dict()}

    @staticmethod
    def from_dict(d: dict) -> "StageSpec":
        """Inverse of :meth:`to_dict` (extra keys such as ``image`` are ignored)."""
        names = StageSettings.__dataclass_fields__
        return StageSpec(source=d["source"], weights=d["weights"], ema_rate=d.get("ema_rate"),
                         settings=StageSettings(**{k: d[k] for k in names if k in d}))


@dataclass(frozen=True)
class SampleRequest:
    """One image to make: sample ``index`` of the job, from prompt ``prompt_index``, with its own ``seed``."""

    index: int
    txt: Optional[str]  # None: the null transcription
    capt: str
    seed: int
    prompt_index: int


def expand_prompts(prompts: Sequence[Prompt]) -> list[SampleRequest]:
    """One request per image: prompt p's j-th image (of ``p.count``) gets seed ``p.seed + j``."""
    requests = []
    for p_index, p in enumerate(prompts):
        for j in range(p.count):
            requests.append(SampleRequest(len(requests), p.txt, p.capt, p.seed + j, p_index))
    return requests


def fit_transcription(txt: str, cfg: ModelConfig) -> str:
    """``txt`` as the model reads it: NFC-normalised and cut to ``model.max_seq_len - 2`` characters (the
    start and end tokens take two places)."""
    return unicodedata.normalize("NFC", txt)[: max_characters(cfg.max_seq_len)]


def prompt_warnings(requests: Sequence[SampleRequest], cfgs: Sequence[ModelConfig], names: Sequence[str]) -> list[str]:
    """Human-readable warnings about prompts the models will not read whole: too-long transcriptions (they
    are cut), transcriptions or captions given to a model that ignores them."""
    out = []
    for cfg, name in zip(cfgs, names):
        long = sorted({r.txt for r in requests if cfg.txt and r.txt is not None
                       and fit_transcription(r.txt, cfg) != unicodedata.normalize("NFC", r.txt)})
        for txt in long:
            out.append(f"transcription {txt!r} ({len(txt)} characters) is longer than {name} reads "
                       f"(model.max_seq_len={cfg.max_seq_len} tokens, start and end tokens included); it was cut to "
                       f"{fit_transcription(txt, cfg)!r}")
        if not cfg.txt and any(r.txt for r in requests):
            out.append(f"{name} has no transcription conditioning (model.txt=false): transcriptions are ignored")
        if not cfg.using_capt and any(r.capt for r in requests):
            out.append(f"{name} has no caption conditioning (model.using_capt=false): captions are ignored")
    return out


def check_job(stages: Sequence[StageSpec], names: Sequence[str], requests: Sequence[SampleRequest],
              device: str, precision: str) -> tuple[list[ModelConfig], list[str]]:
    """Check everything that can be checked before loading weights; returns (each stage's model config,
    warnings). Raises CascadeError (or the loader's LoadError) naming the flag."""
    if not requests:
        raise CascadeError("no prompts: give --txt/--capt or a --prompts file with at least one line")
    if precision not in PRECISIONS:
        raise CascadeError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CascadeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    configs = [read_source_config(s.source) for s in stages]
    for spec, cfg, name in zip(stages, configs, names):
        diffusion = build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        spec.settings.check(name, diffusion.alphas_cumprod)
    cfgs = [c.model for c in configs]
    check_cascade(cfgs, names, [s.settings for s in stages])
    return cfgs, prompt_warnings(requests, cfgs, names)


def _load_stages(stages: Sequence[StageSpec], device: str) -> list[LoadedModel]:
    if device == "cpu":
        keep_freed_memory()  # each sampler step frees what the next allocates again
    return [load_for_sampling(s.source, s.weights, s.ema_rate, device) for s in stages]


def _write_records(out_dir: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(out_dir / RECORDS_FILE, text.encode("utf-8"))


def _sample_batch(models: Sequence[LoadedModel], stages: Sequence[StageSpec], batch: Sequence[SampleRequest],
                  precision: str, progress: bool) -> list[torch.Tensor]:
    return run_cascade(models, [s.settings for s in stages], [r.txt for r in batch], [r.capt for r in batch],
                       [r.seed for r in batch],
                       precision=precision, progress=progress)


def run_job(stages: Sequence[StageSpec], requests: Sequence[SampleRequest], out_dir: str | Path,
            batch_size: int = 8, device: str = "cpu", precision: str = "fp32", save_intermediate: bool = False,
            progress: bool = True, names: Optional[Sequence[str]] = None) -> list[dict]:
    """Sample every request through the cascade and write the outputs above; returns the records.

    ``names`` label the stages in error messages (default: their sources). All checks run before loading.
    """
    if batch_size < 1:
        raise CascadeError(f"--batch-size {batch_size} must be at least 1")
    names = list(names or [s.source for s in stages])
    check_job(stages, names, requests, device, precision)
    models = _load_stages(stages, device)
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    finals, firsts = [], []  # the first GRID_MAX samples' last and first stage, for the grid
    for start in tqdm(range(0, len(requests), batch_size), desc="batches", disable=not progress):
        batch = requests[start:start + batch_size]
        images = _sample_batch(models, stages, batch, precision, progress)
        records += write_batch(out_dir, stages, models, batch, images, save_intermediate, device, precision)
        _write_records(out_dir, records)
        finals.append(images[-1][:max(0, GRID_MAX - start)].cpu())
        firsts.append(images[0][:max(0, GRID_MAX - start)].cpu())
    shown = requests[:GRID_MAX]
    grid = {"image": torch.cat(finals), "txt": [r.txt for r in shown], "capt": [r.capt for r in shown],
            "key": [f"#{r.index} seed {r.seed}" for r in shown]}
    if len(stages) > 1:
        grid["low_res"] = torch.cat(firsts)
    atomic_write_bytes(out_dir / GRID_FILE, png_bytes(batch_grid(grid)))
    return records


def write_batch(out_dir: Path, stages: Sequence[StageSpec], models: Sequence[LoadedModel],
                batch: Sequence[SampleRequest], images: Sequence[torch.Tensor], save_intermediate: bool,
                device: str, precision: str) -> list[dict]:
    """Write one batch's PNGs (final stage; earlier ones with ``save_intermediate``) and return its records."""
    members = [r.index for r in batch]
    per_stage = [to_uint8(x) for x in images]
    records = []
    for row, r in enumerate(batch):
        stage_records = []
        for k, (spec, loaded) in enumerate(zip(stages, models)):
            path = None
            if k == len(stages) - 1:
                path = f"samples/{r.index:06d}.png"
            elif save_intermediate:
                path = f"stages/stage{k}/{r.index:06d}.png"
            if path is not None:
                (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out_dir / path, png_bytes(per_stage[k][row]))
            # the resolved checkpoint, not the run directory, whose latest checkpoint may change
            stage_records.append({**spec.to_dict(), "source": loaded.source, "given": spec.source,
                                  "loaded_weights": loaded.weights, "image_size": loaded.cfg.model.image_size,
                                  "image": path})
        records.append({"index": r.index, "image": stage_records[-1]["image"], "txt": r.txt, "capt": r.capt,
                        "seed": r.seed, "count": 1, "prompt_index": r.prompt_index, "batch": members,
                        "device": device, "precision": precision, "cpu_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "stages": stage_records})
    return records


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``samples.jsonl``; errors name the file and line."""
    try:
        return [record for _, record in read_jsonl(path)]
    except FileNotFoundError:
        raise CascadeError(f"--from-jsonl {path} does not exist; pass the samples.jsonl of a sampling run") from None
    except ValueError as e:
        raise CascadeError(str(e)) from None


def replay(jsonl: str | Path, index: int, out_dir: str | Path, device: Optional[str] = None,
           progress: bool = True) -> dict:
    """Regenerate sample ``index`` of a sampling run's JSONL into ``out_dir`` (same file layout, that one
    sample only); returns its new record. ``device`` None: the device the record was made on."""
    records = {r["index"]: r for r in read_records(jsonl)}
    if index not in records:
        raise CascadeError(f"--index {index}: {jsonl} has samples {min(records)}..{max(records)}" if records
                           else f"--from-jsonl {jsonl} holds no records")
    record = records[index]
    missing = [i for i in record["batch"] if i not in records]
    if missing:
        raise CascadeError(f"{jsonl}: sample {index} was made in a batch with samples {missing}, whose records are "
                           "missing; an exact replay needs the whole batch's records")
    batch = [SampleRequest(i, records[i]["txt"], records[i]["capt"], records[i]["seed"], records[i]["prompt_index"])
             for i in record["batch"]]
    stages = [StageSpec.from_dict(d) for d in record["stages"]]
    device = device or record["device"]
    check_job(stages, [s.source for s in stages], batch, device, record["precision"])
    models = _load_stages(stages, device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(record.get("cpu_threads", threads))  # CPU sums are split by thread
        images = _sample_batch(models, stages, batch, record["precision"], progress)
    finally:
        torch.set_num_threads(threads)
    row = record["batch"].index(index)
    out_dir = Path(out_dir)
    new = write_batch(out_dir, stages, models, batch[row:row + 1], [x[row:row + 1] for x in images],
                      save_intermediate=any(s["image"] for s in record["stages"][:-1]), device=device,
                      precision=record["precision"])[0]
    new["batch"] = record["batch"]
    _write_records(out_dir, [new])
    return new
