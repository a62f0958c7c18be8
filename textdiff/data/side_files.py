"""Side files of a source folder: one JSON object ``{key: value}``, or JSON Lines of ``{"key": ..., "value":
...}``, mapping image keys (textdiff/data/sources.py) to captions, safeboxes, px scales, transcriptions or
unreadable-text boxes. Each value is parsed and each key resolved to one image; nothing is fatal by itself:
problems come back as :class:`~textdiff.data.sources.Problem` records for the caller to skip, count or raise.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

from textdiff.data.sources import KeyIndex, Problem, SourceError


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    pass


def read_key_values(path: Path) -> tuple[list[tuple[str, Any, str]], list[Problem]]:
    """Entries ``(key, value, where)`` of a side file (JSON object or JSON Lines) and its malformed lines.

    ``where`` is ``file`` for a JSON object and ``file:LINE`` for JSON Lines. A key written twice in a JSON
    object is kept as two entries, so it is reported like any image listed twice.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"side file {path} does not exist; check the path given to "
                          "--captions/--safeboxes/--px-scales/--transcriptions/--unreadable") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"side file {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    if _looks_like_lines(text):
        return _read_lines(path, text)
    try:
        whole = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise SourceError(f"side file {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}; fix "
                          "it, or write JSON Lines of {\"key\": ..., \"value\": ...}") from None
    if not isinstance(whole, _Pairs):
        raise SourceError(f"side file {path} holds a JSON {type(whole).__name__}; expected an object "
                          '{"key": value} or JSON Lines of {"key": ..., "value": ...}')
    return [(k, _plain(v), str(path)) for k, v in whole], []


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so keys written twice survive parsing."""


def _plain(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _looks_like_lines(text: str) -> bool:
    """JSON Lines if any line alone is an object with a "key" field (so a malformed first line still counts)."""
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "key" in obj:
            return True
    return False


def _read_lines(path: Path, text: str) -> tuple[list[tuple[str, Any, str]], list[Problem]]:
    entries, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line, object_pairs_hook=_reject_duplicates)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, "bad_json_line", f"line {lineno} is not valid JSON ({e.msg} at column "
                                    f"{e.colno}); write {{\"key\": ..., \"value\": ...}}"))
            continue
        except _DuplicateKey as e:
            problems.append(Problem(where, "bad_json_line", f"line {lineno} repeats the field {e.args[0]!r}"))
            continue
        if not isinstance(obj, dict) or set(obj) != {"key", "value"} or not isinstance(obj["key"], str):
            problems.append(Problem(where, "bad_json_line", f"line {lineno} is {line.strip()[:80]!r}; expected "
                                    "exactly {\"key\": \"image/key\", \"value\": ...}"))
            continue
        entries.append((obj["key"], obj["value"], where))
    return entries, problems


def parse_captions(value: Any) -> list[str]:
    """A caption string or list of strings -> list of strings; raises ValueError naming the problem."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    raise ValueError(f"caption value {value!r} is not a string or a list of strings")


def _numbers(value: Any, count: int, what: str) -> list[float]:
    ok = (isinstance(value, list) and len(value) == count
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok:
        raise ValueError(f"{what} {value!r} is not a list of {count} finite numbers")
    return list(value)


def parse_safebox(value: Any) -> Optional[list[float]]:
    """``[left, top, right, bottom]`` or None; raises ValueError when malformed or inverted."""
    if value is None:
        return None
    box = _numbers(value, 4, "safebox")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"safebox {box} is inverted or empty (needs left < right and top < bottom)")
    return box


def parse_unreadable(value: Any) -> list[list[float]]:
    """The boxes of text OCR could not read, ``[[l, t, r, b], ...]`` (``[]``: none); raises ValueError when the
    value is not a list or a box is malformed, inverted or empty."""
    if not isinstance(value, list):
        raise ValueError(f"unreadable value {value!r} is not a list of boxes [[left, top, right, bottom], ...]")
    boxes = [_numbers(box, 4, "unreadable box") for box in value]
    for box in boxes:
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"unreadable box {box} is inverted or empty (needs left < right and top < bottom)")
    return boxes


def parse_px_scale(value: Any) -> list[float]:
    """``[sx, sy]`` with both positive; raises ValueError otherwise."""
    scale = _numbers(value, 2, "px_scale")
    if not all(s > 0 for s in scale):
        raise ValueError(f"px_scale {scale} must be positive (stored size / original size)")
    return scale


def resolve_side_file(path: Path, index: KeyIndex, parse: Callable[[Any], Any], bad_kind: str = "bad_value"
                      ) -> tuple[dict[str, Any], list[Problem], set[str]]:
    """Map a side file onto images: ``({rel_path: parsed value}, problems, rel_paths to skip)``.

    Unknown and ambiguous keys and malformed lines are problems of the file; an image two keys name, or
    whose value does not parse, is a problem of the image too (it is skipped, since its value is unknown).
    """
    entries, problems = read_key_values(path)
    values: dict[str, Any] = {}
    keys_of: dict[str, list[str]] = defaultdict(list)
    skip: set[str] = set()
    for key, raw, where in entries:
        matches = index.resolve(key)
        if not matches:
            problems.append(Problem(where, "unknown_key", f"key {key!r} matches no image in the source folder "
                                    "(keys are paths relative to it, '/' separators, extension optional)", key))
            continue
        if len(matches) > 1:
            problems.append(Problem(where, "ambiguous_key", f"key {key!r} matches {len(matches)} images "
                                    f"({', '.join(matches)}); write the path with its extension", key))
            continue
        rel = matches[0]
        keys_of[rel].append(key)
        if len(keys_of[rel]) > 1:
            if rel not in skip:
                problems.append(Problem(where, "listed_twice", f"image {rel} is listed twice (keys "
                                        f"{', '.join(map(repr, keys_of[rel]))}); keep one entry", key))
            skip.add(rel)
            continue
        try:
            values[rel] = parse(raw)
        except ValueError as e:
            problems.append(Problem(where, bad_kind, f"{e} (key {key!r})", key))
            skip.add(rel)
    for rel in skip:
        values.pop(rel, None)
    return values, problems, skip
