"""The inputs of tools/annotate.py: a folder of images, WebDataset tar shards, or a local Hugging Face data
set, each listed as :class:`Item` references that a worker process opens itself (so millions of images
never pass through the main process).

- **folder** (any depth): an image's key is the key make_shards gives it: its path relative to the folder,
  ``/`` separators, no extension (``signs/street/0001``), or with its extension where two files share a name
  (``x.jpg`` beside ``x.png``).
- **shards** (``.tar`` files, e.g. img2dataset's output, or one ``.tar``): a sample is the members sharing a
  WebDataset key (the name up to the first dot of its base name); its image is the first member whose
  extension is one of ``image_key`` (``jpg;jpeg;png;webp``), its caption the member ``caption_key``
  (``txt``: img2dataset's ``KEY.txt`` is the caption). The key is the sample's key; when one repeats in
  two shards, every key becomes ``SHARD/KEY`` (the shard's file name without ``.tar``).
- **parquet** (one ``.parquet`` file or a folder of them, any depth) and **arrow** (a folder written by
  ``datasets``' ``save_to_disk``, a Dataset or, with ``split``, a DatasetDict): rows with an image column
  (``image_key``; found alone when one column holds images: a ``datasets.Image`` struct of bytes and path,
  or raw bytes) and a caption column (``caption_key``; ``text`` or ``caption`` when present). The key is
  the row's number over the whole set, zero-padded (``00000042``), or the value of column ``id_key``.

Bad images are found as make_shards finds them (the same decoding: :func:`decode_image`).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from PIL import Image

from textdiff.data import sources
from textdiff.data.sources import KeyIndex, Problem, SourceError

try:  # parquet and Arrow files of Hugging Face data sets; installed with the annotate extra (and by datasets)
    import pyarrow
    import pyarrow.parquet
except ImportError:  # folders and shards need none; a data set says what to install (SourceError)
    pyarrow = None

KINDS = ("folder", "shards", "parquet", "arrow")
DEFAULT_IMAGE_EXTS = "jpg;jpeg;png;webp"
DEFAULT_CAPTION_EXT = "txt"
CAPTION_COLUMNS = ("text", "caption")  # tried in this order when no caption_key is given
KEY_DIGITS = 8  # row keys of a data set: 00000042 (more digits when it holds 10^8 rows or more)
# Pillow's format name -> the extension make_shards reads it by
FORMAT_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
PYARROW_HINT = "pip install -e '.[annotate]' (pyarrow reads parquet and Arrow files)"


@dataclass(frozen=True)
class SourceSpec:
    """Where the images are and which fields hold what (flags of tools/annotate.py)."""

    path: str
    kind: str = "auto"  # one of KINDS, or "auto": told from what the path holds
    image_key: Optional[str] = None  # shards: member extensions ("jpg;png"); data sets: the image column
    caption_key: Optional[str] = None  # shards: the caption member's extension; data sets: its column
    id_key: Optional[str] = None  # data sets: the column whose values are the keys
    split: Optional[str] = None  # arrow: the split of a DatasetDict folder

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Item:
    """One input image as a worker opens it: ``path`` the file; for a shard, ``offset`` and ``size`` of the
    image member's bytes (and ``caption_offset``/``caption_size``, -1: none); for parquet, ``offset`` the row
    group and ``size`` the row in it; for arrow, ``offset`` the row of the file. ``rel_path``: a folder
    image's path relative to the folder (the mirror's layout)."""

    key: str
    where: str
    path: str
    offset: int = -1
    size: int = -1
    caption_offset: int = -1
    caption_size: int = -1
    rel_path: str = ""


@dataclass
class Plan:
    """A source listed: its ``kind``, the ``items`` to read, ``problems`` found while listing (counted as
    skipped), ``inputs`` (images or samples found) and the resolved field names."""

    kind: str
    root: Path
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    inputs: int = 0
    image_key: Optional[str] = None
    caption_key: Optional[str] = None
    id_key: Optional[str] = None

    @property
    def has_captions(self) -> bool:
        return self.caption_key is not None


def detect_kind(path: Path) -> str:
    """The kind of source ``path`` holds; SourceError names the path and the flag when it holds none or
    several."""
    if not path.exists():
        raise SourceError(f"source {path} does not exist; give a folder of images, .tar shards, a .parquet file "
                          "or folder, or a datasets save_to_disk folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return "shards"
        if suffix == ".parquet":
            return "parquet"
        raise SourceError(f"source {path} is a {suffix or 'suffix-less'} file; give a folder, a .tar shard or a "
                          ".parquet file")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "arrow"
    found = {"folder": False, "shards": False, "parquet": False}
    for p in path.rglob("*"):
        suffix = p.suffix.lower()
        if suffix in sources.IMAGE_SUFFIXES:
            found["folder"] = True
        elif suffix == ".tar":
            found["shards"] = True
        elif suffix == ".parquet":
            found["parquet"] = True
    kinds = [k for k, v in found.items() if v]
    if len(kinds) != 1:
        what = " and ".join(kinds) if kinds else "no images, .tar or .parquet files"
        raise SourceError(f"source folder {path} holds {what}; " + (
            "say which to read with --source-kind" if kinds else "give a folder that holds images or shards"))
    return kinds[0]


def plan_source(spec: SourceSpec) -> Plan:
    """List the images of ``spec`` (:class:`Plan`); SourceError names a path, flag or column that cannot be
    used, before any image is read."""
    path = Path(spec.path)
    kind = detect_kind(path) if spec.kind == "auto" else spec.kind
    if kind not in KINDS:
        raise SourceError(f"--source-kind {spec.kind!r}: choose auto or one of {', '.join(KINDS)}")
    if kind != "folder" and not path.exists():
        raise SourceError(f"source {path} does not exist")
    if kind in ("folder",) and (spec.image_key or spec.caption_key or spec.id_key):
        raise SourceError("--image-key, --caption-key and --id-key name the fields of shards and data sets; a "
                          "folder's images are its image files (captions: pass them to make_shards --captions)")
    if kind == "shards" and spec.id_key:
        raise SourceError("--id-key names a data set's column; a shard sample's key is its WebDataset key")
    if kind != "arrow" and spec.split:
        raise SourceError("--split picks a split of a datasets save_to_disk folder; this source is "
                          f"{kind}")
    return {"folder": _plan_folder, "shards": _plan_shards, "parquet": _plan_parquet, "arrow": _plan_arrow}[kind](
        path, spec)


def folder_keys(rel_paths: list[str]) -> list[str]:
    """The side-file key of each image of a folder: its canonical key (no extension), or its path with the
    extension where the canonical key names several images (``x.jpg`` and ``x.png``)."""
    index = KeyIndex(rel_paths)
    return [sources.canonical_key(rel) if index.resolve(sources.canonical_key(rel)) == [rel] else rel
            for rel in rel_paths]


def _plan_folder(path: Path, spec: SourceSpec) -> Plan:
    rel_paths = sources.scan_images(path)
    if not rel_paths:
        raise SourceError(f"source folder {path} holds no images ({', '.join(sources.IMAGE_SUFFIXES)})")
    items = [Item(key, rel, str(path / rel), rel_path=rel) for rel, key in zip(rel_paths, folder_keys(rel_paths))]
    return Plan("folder", path, items, inputs=len(items))


def split_member(name: str) -> tuple[str, str]:
    """A tar member's (WebDataset key, extension): ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _plan_shards(path: Path, spec: SourceSpec) -> Plan:
    shards = [path] if path.is_file() else sorted(path.rglob("*.tar"))
    if not shards:
        raise SourceError(f"source {path} holds no .tar shards")
    image_exts = [e.lower() for e in (spec.image_key or DEFAULT_IMAGE_EXTS).split(";") if e]
    caption_ext = (spec.caption_key or DEFAULT_CAPTION_EXT).lower()
    samples: list[tuple[Path, str, dict[str, tuple[int, int]]]] = []
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r:")  # plain tar only: members are then read by offset, without the tarfile
        except tarfile.ReadError as e:
            raise SourceError(f"shard {shard} is not a plain tar ({e}); compressed shards (.tar.gz) are not read: "
                              "decompress them first") from None
        with tar:
            members: dict[str, dict[str, tuple[int, int]]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = split_member(member.name)
                    members.setdefault(key, {})[ext] = (member.offset_data, member.size)
        samples += [(shard, key, exts) for key, exts in members.items()]
    repeated = [k for k, n in Counter(key for _, key, _ in samples).items() if n > 1]
    items, problems, captions = [], [], 0
    for shard, key, exts in samples:
        full_key = f"{shard.stem}/{key}" if repeated else key
        where = f"{shard}:{key}"
        image = next((exts[e] for e in image_exts if e in exts), None)
        if image is None:
            problems.append(Problem(where, "no_image", f"sample {key!r} has no member {' or '.join(image_exts)} "
                                    f"(members: {', '.join(sorted(exts))}); give --image-key", full_key))
            continue
        caption = exts.get(caption_ext, (-1, -1))
        captions += caption[0] >= 0
        items.append(Item(full_key, where, str(shard), image[0], image[1], caption[0], caption[1]))
    return Plan("shards", path, items, problems, len(samples), ";".join(image_exts),
                caption_ext if captions else None)


def _hf_columns(schema, spec: SourceSpec, where: str) -> tuple[str, Optional[str]]:
    """The image column and caption column (or None) of an Arrow ``schema``."""
    names = list(schema.names)
    if spec.image_key is not None:
        if spec.image_key not in names:
            raise SourceError(f"--image-key {spec.image_key!r} is not a column of {where}; its columns: "
                              f"{', '.join(names)}")
        image = spec.image_key
    else:
        found = [f.name for f in schema if _holds_images(f.type)]
        if len(found) != 1:
            raise SourceError(f"{where} has {len(found)} image columns ({', '.join(found) or 'none'}); name the one "
                              f"to read with --image-key (columns: {', '.join(names)})")
        image = found[0]
    if spec.caption_key is not None:
        if spec.caption_key not in names:
            raise SourceError(f"--caption-key {spec.caption_key!r} is not a column of {where}; its columns: "
                              f"{', '.join(names)}")
        return image, spec.caption_key
    return image, next((c for c in CAPTION_COLUMNS if c in names), None)


def _holds_images(arrow_type) -> bool:
    """A datasets.Image column (struct of bytes and path) or raw bytes."""
    if pyarrow.types.is_struct(arrow_type):
        return {arrow_type.field(i).name for i in range(arrow_type.num_fields)} >= {"bytes", "path"}
    return pyarrow.types.is_binary(arrow_type) or pyarrow.types.is_large_binary(arrow_type)


def _row_keys(total: int, ids: Optional[list], id_key: Optional[str], where: str) -> list[str]:
    if ids is None:
        digits = max(KEY_DIGITS, len(str(max(total - 1, 0))))
        return [f"{i:0{digits}d}" for i in range(total)]
    keys = [str(v) for v in ids]
    bad = next((k for k in keys if not k or k.startswith("/") or ".." in PurePosixPath(k).parts), None)
    if bad is not None:
        raise SourceError(f"--id-key {id_key!r} of {where} holds the key {bad!r}; keys must be non-empty relative "
                          "names (a key becomes a file name in --write-txt)")
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        raise SourceError(f"--id-key {id_key!r} of {where} repeats the key {repeated[0]!r}; pick a column of "
                          "unique values, or leave --id-key out to key rows by number")
    return keys


def _require_pyarrow(path: Path) -> None:
    if pyarrow is None:
        raise SourceError(f"reading {path} needs pyarrow: {PYARROW_HINT}")


def _plan_parquet(path: Path, spec: SourceSpec) -> Plan:
    _require_pyarrow(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise SourceError(f"source {path} holds no .parquet files")
    image, caption = _hf_columns(pyarrow.parquet.ParquetFile(files[0]).schema_arrow, spec, str(files[0]))
    rows, ids = [], [] if spec.id_key else None
    for f in files:
        parquet = pyarrow.parquet.ParquetFile(f)
        missing = [c for c in (image, caption, spec.id_key) if c and c not in parquet.schema_arrow.names]
        if missing:
            raise SourceError(f"{f} lacks the column {missing[0]!r} that {files[0]} has; give files of one schema")
        for group in range(parquet.metadata.num_row_groups):
            rows += [(f, group, r) for r in range(parquet.metadata.row_group(group).num_rows)]
        if ids is not None:
            ids += parquet.read(columns=[spec.id_key]).column(0).to_pylist()
    keys = _row_keys(len(rows), ids, spec.id_key, str(path))
    items = [Item(key, f"{f}:row {group}/{r}", str(f), group, r) for key, (f, group, r) in zip(keys, rows)]
    return Plan("parquet", path, items, inputs=len(items), image_key=image, caption_key=caption, id_key=spec.id_key)


def _arrow_files(path: Path, split: Optional[str]) -> tuple[Path, list[Path]]:
    """The folder of one Dataset and its Arrow files, from a save_to_disk folder (``split`` of a DatasetDict)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split is None and len(splits) != 1:
            raise SourceError(f"{path} is a DatasetDict of splits {', '.join(splits)}; pick one with --split")
        split = split or splits[0]
        if split not in splits:
            raise SourceError(f"--split {split!r} is not a split of {path}; its splits: {', '.join(splits)}")
        path = path / split
    elif split is not None:
        raise SourceError(f"--split {split!r}: {path} holds one Dataset, not a DatasetDict; leave --split out")
    state = path / "state.json"
    if not state.is_file():
        raise SourceError(f"{path} has no state.json; give a folder written by datasets' save_to_disk")
    files = [path / f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
    if not files:
        raise SourceError(f"{state} lists no data files")
    return path, files


def _plan_arrow(path: Path, spec: SourceSpec) -> Plan:
    _require_pyarrow(path)
    folder, files = _arrow_files(path, spec.split)
    image, caption = _hf_columns(_arrow_table(str(files[0])).schema, spec, str(folder))
    rows, ids = [], [] if spec.id_key else None
    for f in files:
        table = _arrow_table(str(f))
        rows += [(f, r) for r in range(table.num_rows)]
        if ids is not None:
            if spec.id_key not in table.schema.names:
                raise SourceError(f"--id-key {spec.id_key!r} is not a column of {folder}; its columns: "
                                  f"{', '.join(table.schema.names)}")
            ids += table.column(spec.id_key).to_pylist()
    keys = _row_keys(len(rows), ids, spec.id_key, str(folder))
    items = [Item(key, f"{f}:row {r}", str(f), r) for key, (f, r) in zip(keys, rows)]
    return Plan("arrow", folder, items, inputs=len(items), image_key=image, caption_key=caption, id_key=spec.id_key)


@lru_cache(maxsize=4)
def _arrow_table(path: str):
    """An Arrow stream file (save_to_disk's) as a table mapped from disk, not read into memory."""
    return pyarrow.ipc.open_stream(pyarrow.memory_map(path)).read_all()


@lru_cache(maxsize=2)
def _parquet_group(path: str, group: int, columns: tuple[str, ...]):
    """One row group of a parquet file (a worker reads its items in order, so a group is decoded once)."""
    return pyarrow.parquet.ParquetFile(path).read_row_group(group, columns=list(columns))


def _image_bytes(value: Any, base: Path, where: str) -> bytes:
    """The bytes of a data set's image value: a datasets.Image struct (bytes, or a path relative to ``base``),
    raw bytes, or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        file = Path(value) if Path(value).is_absolute() else base / value
        try:
            return file.read_bytes()
        except OSError as e:
            raise _Unreadable(f"the image file {file} it names cannot be read ({e.strerror})") from None
    raise _Unreadable(f"its image is {type(value).__name__}, not bytes or a path")


class _Unreadable(Exception):
    pass


def _caption(value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    captions = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    captions = [c.strip() for c in captions if c and c.strip()]
    return captions or None


def read_item(item: Item, plan_kind: str, image_key: Optional[str], caption_key: Optional[str]
              ) -> tuple[bytes, Optional[list[str]]] | Problem:
    """The image bytes and captions (None: none) of ``item``, or the Problem that makes it unreadable."""
    try:
        if plan_kind == "folder":
            return Path(item.path).read_bytes(), None
        if plan_kind == "shards":
            with open(item.path, "rb") as f:
                f.seek(item.offset)
                data = f.read(item.size)
                caption = None
                if item.caption_offset >= 0:
                    f.seek(item.caption_offset)
                    caption = _caption(f.read(item.caption_size).decode("utf-8", errors="replace"))
            return data, caption
        columns = tuple(c for c in (image_key, caption_key) if c)
        if plan_kind == "parquet":
            row = _parquet_group(item.path, item.offset, columns).slice(item.size, 1).to_pylist()[0]
        else:
            row = _arrow_table(item.path).slice(item.offset, 1).select(list(columns)).to_pylist()[0]
        return _image_bytes(row[image_key], Path(item.path).parent, item.where), \
            _caption(row[caption_key]) if caption_key else None
    except _Unreadable as e:
        return Problem(item.where, "bad_image", str(e), item.key)
    except OSError as e:
        return Problem(item.where, "bad_image", f"cannot be read ({type(e).__name__}: {e})", item.key)


def decode_image(data: bytes, where: str, max_pixels: int) -> tuple[Image.Image, str] | Problem:
    """The image as make_shards stores it (fully decoded, EXIF orientation applied, RGB with alpha on white)
    and its format as Pillow names it (``JPEG``), or the Problem (``bad_image``, ``too_many_pixels``) that
    makes make_shards skip it."""
    try:
        image, fmt = sources.decode_image(data, where, max_pixels)  # make_shards' decoding, bomb caps and all
    except sources.SkipInput as skip:
        return skip.problem
    image, _ = sources.upright(image)
    return sources.to_rgb(image), fmt


def mirror_name(item: Item, ext: str) -> str:
    """The path of ``item``'s image in a ``--write-txt`` mirror: a folder image's own relative path, else
    ``KEY.EXT``."""
    return item.rel_path or f"{item.key}.{ext}"

