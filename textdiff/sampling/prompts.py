"""The prompt file: what to sample, one JSON object per line.

``{"txt": "hello", "capt": "a sign", "seed": 3, "count": 2}``: ``txt`` is required (``""`` asks for an image
without text, ``null`` for the null transcription); ``capt`` defaults to ``""``, ``seed`` to 0 and ``count``
(images per prompt) to 1. Other keys are ignored, so the JSONL written by ``tools/sample.py`` reads as a
prompt file too; in it an ``image`` (or ``path``/``file``) key names each sample's image file, which the
evaluation reads instead of sampling (textdiff/eval/prompts.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


IMAGE_KEYS = ("image", "path", "file")


class PromptFileError(ValueError):
    """A prompt file or image folder is invalid; the message names the file, line and key."""


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: ``count`` images of transcription ``txt`` and caption ``capt``.

    ``txt`` ``""`` asks for an image without text (a trained condition only where the data has text-free
    images); ``None`` (JSON ``null``) is the null transcription, the dropped condition that classifier-free
    guidance contrasts against (``model.txt_pdrop``): the model's unconditional image.
    """

    txt: Optional[str]
    capt: str = ""
    seed: int = 0
    count: int = 1
    image: Optional[str] = None  # an existing image file to evaluate instead of sampling


def expand(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Each prompt repeated ``count`` times, in order: one entry per image to make."""
    return [p for p in prompts for _ in range(p.count)]


def _field(obj: dict, key: str, kind: type, default, where: str):
    value = obj.get(key, default)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PromptFileError(f"{where}: key {key!r} is {value!r}; expected an integer")
    if kind is str and not isinstance(value, str):
        raise PromptFileError(f"{where}: key {key!r} is {value!r}; expected a string")
    return value


def parse_prompt(obj: object, where: str) -> Prompt:
    """One prompt from a decoded JSON object; ``where`` (file:line) names it in errors."""
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object like {{\"txt\": \"hello\"}}, got {obj!r}")
    if "txt" not in obj:
        raise PromptFileError(f"{where}: missing key 'txt' (the transcription; \"\" for an image without text); "
                              f"keys present: {sorted(obj)}")
    count = _field(obj, "count", int, 1, where)
    if count < 1:
        raise PromptFileError(f"{where}: key 'count' is {count}; give at least 1 image per prompt")
    image = next((obj[k] for k in IMAGE_KEYS if k in obj), None)
    if image is not None and not isinstance(image, str):
        raise PromptFileError(f"{where}: the image path is {image!r}; expected a string")
    txt = None if obj["txt"] is None else _field(obj, "txt", str, "", where)
    return Prompt(txt=txt, capt=_field(obj, "capt", str, "", where) or "",
                  seed=_field(obj, "seed", int, 0, where), count=count, image=image)


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSON Lines file.

    Raises FileNotFoundError for a missing file and ValueError naming ``path:line`` for a line that is not JSON.
    """
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    try:
        rows = read_jsonl(path)
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist (--prompts / eval.prompts_file)") from None
    except ValueError as e:
        raise PromptFileError(f"{e}; each line must be one object like {{\"txt\": \"hello\", \"seed\": 0}}") from None
    prompts = [parse_prompt(obj, f"{path}:{lineno}") for lineno, obj in rows]
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts; write one JSON object per line")
    return prompts
