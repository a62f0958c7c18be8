"""A batch in human-readable form: a labelled PNG grid and a JSON file (the seed's ``save_first_batch``).

Each tile shows the training image (enlarged with nearest-neighbour so pixels stay visible), the low-res
conditioning image below it when the batch has one, and three label lines: key, transcription, caption.
``"txt": ""`` is a text-free image, labelled ``(no text)`` in the grid and kept as ``""`` in the JSON; ``None``
(transcription unknown) is labelled ``(unknown)`` and written as ``null``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from textdiff.files import atomic_write_bytes

TILE_MIN = 128  # px: small training images are enlarged to at least this for viewing
LABEL_LINES = 3
LINE_HEIGHT = 12


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]`` (one channel repeated for monochrome)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """The PNG file of a PIL image or a ``[H, W, 3]`` (or ``[H, W]``) uint8 array."""
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, format="PNG")
    return buf.getvalue()


def _label(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` on one line, shortened with an ellipsis to fit ``width`` px."""
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def batch_grid(batch: dict, columns: int = 8) -> Image.Image:
    """One labelled RGB grid of a batch in the layout of docs/architecture.md."""
    images = to_uint8(batch["image"])
    low_res = to_uint8(batch["low_res"]) if "low_res" in batch else None
    n, size = images.shape[0], images.shape[1]
    tile = max(size, TILE_MIN)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    cell_h = tile * (2 if low_res is not None else 1) + LABEL_LINES * LINE_HEIGHT + 4
    grid = Image.new("RGB", (columns * (tile + 4), rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % columns) * (tile + 4), (i // columns) * cell_h
        grid.paste(Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        if low_res is not None:
            y += tile
            grid.paste(Image.fromarray(low_res[i]).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        y += tile + 2
        txt = batch["txt"][i]
        shown = "(unknown)" if txt is None else txt if txt else "(no text)"
        lines = (batch["key"][i], "txt: " + shown,
                 "capt: " + (batch["capt"][i] if batch["capt"][i] else "(none)"))
        for j, line in enumerate(lines):
            draw.text((x, y + j * LINE_HEIGHT), _label(line, font, tile), fill=(0, 0, 0), font=font)
    return grid


def batch_record(batch: dict) -> dict:
    """The JSON side of a preview: shapes and, per sample, key, txt, capt and pixel range."""
    record = {"image_shape": list(batch["image"].shape), "samples": []}
    if "low_res" in batch:
        record["low_res_shape"] = list(batch["low_res"].shape)
    for i, key in enumerate(batch["key"]):
        image = batch["image"][i]
        record["samples"].append({"key": key, "txt": batch["txt"][i], "capt": batch["capt"][i],
                                  "image_min": round(float(image.min()), 4),
                                  "image_max": round(float(image.max()), 4)})
    return record


def save_batch_preview(batch: dict, out_dir: str | Path, name: str = "first_batch") -> tuple[Path, Path]:
    """Write ``OUT_DIR/NAME.png`` (labelled grid) and ``OUT_DIR/NAME.json`` atomically; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / f"{name}.png", out_dir / f"{name}.json"
    atomic_write_bytes(png, png_bytes(batch_grid(batch)))
    text = json.dumps(batch_record(batch), indent=1, ensure_ascii=False)
    atomic_write_bytes(js, (text + "\n").encode("utf-8"))
    return png, js
