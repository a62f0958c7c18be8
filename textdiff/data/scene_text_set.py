"""Write a scene-text test set (textdiff/data/scene_text.py renders each scene) into a folder, resumably.

OUT_DIR/``images/KEY.png`` and ``KEY.txt`` beside it (the transcription, lines joined by "\\n", "" if
text-free: what make_shards reads), ``transcriptions.json`` {key: text}, ``safeboxes.json`` {key: [l, t, r, b]}
(images with text), ``lines.jsonl`` (per image: key, lines [{text, box, polygon, font, size_px}], safebox,
text_free), ``summary.json`` and ``records/`` (one JSON per finished scene, for resuming). KEY, the index in
six digits, is the key ``make_shards OUT_DIR/images`` gives the image. The JSON files are the formats
``tools/annotate.py`` writes, so its output can be scored against this ground truth.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Optional

from textdiff.data.pool import pool_map
from textdiff.data.scene_text import (MIN_SIZE, WORDS_PATH, SceneAssets, SceneTextError, load_assets, load_photo,
                                      render_scene, scene_record, scene_rng)
from textdiff.files import atomic_write_bytes, atomic_write_json

KEY_FORMAT = "{:06d}"
PNG_COMPRESS_LEVEL = 1  # photographs barely compress: level 6 is 12% smaller but takes 4x as long (24 vs 6.5 ms)


def _write_scene(index: int, out: Path, assets: SceneAssets, size: int, seed: int, text_free_share: float) -> None:
    """Render scene ``index`` and write its image, .txt and record (the record last: it marks the scene done)."""
    rng, key = scene_rng(seed, index), KEY_FORMAT.format(index)
    sample = render_scene(rng, size, assets, text_free=rng.random() < text_free_share)
    png = io.BytesIO()
    sample.image.save(png, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    atomic_write_bytes(out / "images" / f"{key}.png", png.getvalue())
    atomic_write_bytes(out / "images" / f"{key}.txt", sample.transcription.encode("utf-8"))
    record = {**scene_record(key, sample), "background": sample.background_name}
    atomic_write_json(out / "records" / f"{key}.json", record, indent=None)


def _prepare_out_dir(out: Path, settings: dict, n: int, overwrite: bool) -> None:
    """Create ``out``/images and ``out``/records; unless ``overwrite``, refuse a folder made with other
    settings or holding more than ``n`` images (make_shards would shard them all)."""
    stored = out / "records" / "settings.json"
    if overwrite:
        for name in ("images", "records"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif stored.is_file():
        old = json.loads(stored.read_text(encoding="utf-8"))
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise SceneTextError(f"{out} was made with other settings ({changed[0]}: {old.get(changed[0])!r}, now "
                                 f"{settings[changed[0]]!r}); pass --overwrite to replace it, or choose another folder")
        beyond = sorted(p.name for p in (out / "images").glob("*.png") if not p.stem.isdigit() or int(p.stem) >= n)
        if beyond:
            raise SceneTextError(f"{out / 'images'} holds {len(beyond)} images beyond --n {n} ({beyond[0]} ...); pass "
                                 "the earlier --n or more, --overwrite, or choose another folder")
    elif (out / "images").is_dir() and any((out / "images").iterdir()):
        raise SceneTextError(f"{out / 'images'} holds files this tool did not write; pass --overwrite to replace "
                             "them, or choose another folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    atomic_write_json(stored, settings)


def make_scene_text_set(out_dir: str | Path, n: int, size: int = 256, text_free_share: float = 0.2, seed: int = 0,
                        backgrounds: Optional[str | Path] = None, words: Optional[str | Path] = None,
                        workers: int = 0, overwrite: bool = False, progress: bool = True, command: str = "") -> dict:
    """Render scenes 0..n-1 into ``out_dir`` (files in the module docstring); returns the summary.

    Scenes finished there earlier under the same settings are kept (a rerun resumes). Arguments and assets
    are checked (SceneTextError) before anything is written.
    """
    if n < 1:
        raise SceneTextError(f"--n {n}: give a positive number of images")
    if size < MIN_SIZE:
        raise SceneTextError(f"--size {size}: scene images need at least {MIN_SIZE} px")
    if not 0.0 <= text_free_share <= 1.0:
        raise SceneTextError(f"--text-free-share {text_free_share}: give a share between 0 and 1")
    assets = load_assets(backgrounds, words)
    for path in assets.backgrounds:  # a bad file fails now, and forked workers inherit the decoded photographs
        load_photo(path, size)
    out = Path(out_dir)
    settings = {"seed": seed, "size": size, "text_free_share": text_free_share, "words": str(words or WORDS_PATH),
                "word_count": len(assets.words), "backgrounds": list(assets.backgrounds),
                "fonts": [f.name for f in assets.fonts]}
    _prepare_out_dir(out, settings, n, overwrite)
    keys = [KEY_FORMAT.format(i) for i in range(n)]
    done = {k for k in keys if (out / "records" / f"{k}.json").is_file() and (out / "images" / f"{k}.png").is_file()}
    job = partial(_write_scene, out=out, assets=assets, size=size, seed=seed, text_free_share=text_free_share)
    for _ in pool_map(job, [i for i, k in enumerate(keys) if k not in done], workers, "scene text", progress,
                      ordered=False):
        pass
    records = [json.loads((out / "records" / f"{k}.json").read_text(encoding="utf-8")) for k in keys]
    atomic_write_json(out / "transcriptions.json",
                      {r["key"]: "\n".join(x["text"] for x in r["lines"]) for r in records})
    atomic_write_json(out / "safeboxes.json", {r["key"]: r["safebox"] for r in records if r["safebox"] is not None})
    lines = "".join(json.dumps({k: v for k, v in r.items() if k != "background"}) + "\n" for r in records)
    atomic_write_bytes(out / "lines.jsonl", lines.encode("utf-8"))
    text_free = sum(r["text_free"] for r in records)
    summary = {"images": n, "with_text": n - text_free, "text_free": text_free,
               "lines": sum(len(r["lines"]) for r in records),
               "fonts_used": dict(sorted(Counter(x["font"] for r in records for x in r["lines"]).items())),
               "font_families_found": len({f.family for f in assets.fonts}), "font_faces_found": len(assets.fonts),
               "backgrounds_used": dict(sorted(Counter(r["background"] for r in records).items())),
               **{k: settings[k] for k in ("seed", "size", "text_free_share", "words", "word_count")},
               "command": command}
    atomic_write_json(out / "summary.json", summary)
    return summary
