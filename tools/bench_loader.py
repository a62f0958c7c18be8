"""Samples/s of the shard stream against the original code's folder loader, on the same images, same run.

    python tools/make_shards.py --synthetic 2000 data/bench
    python tools/bench_loader.py --shards data/bench/manifest.json --workers 0,1,2

The folder baseline is the layout the original research code read: one image file per sample in a folder
tree, its transcription in a ``.txt`` beside it, and captions, safeboxes and px scales in three JSON
objects keyed by image key, loaded through a map-style Dataset and a shuffling DataLoader. The benchmark
writes that tree from the shards (same image bytes), then times decode + augment + batch for both paths
with the same augmentation (``augment_sample``) and collation, for each worker count, after warm-up
batches (worker start-up is not counted), alternating the two paths ``--repeats`` times. It prints the
median samples/s and the ratio shard/folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from textdiff.config import AugmentConfig, DataConfig, load_config
from textdiff.data.augment import augment_sample, sample_rng
from textdiff.data.stream import IMAGE_EXTENSIONS, build_train_stream, collate, resolve_shards


def write_folder_tree(shards_spec: str, root: Path) -> int:
    """Unpack the shards into the original code's layout under ``root``; returns the number of images."""
    root.mkdir(parents=True, exist_ok=True)
    capts, safeboxes, px_scales = {}, {}, {}
    urls = resolve_shards(shards_spec).urls
    n = 0
    for sample in tqdm(wds.tariterators.tarfile_samples([{"url": u} for u in urls]), desc="folder tree"):
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "txt" not in sample or "json" not in sample:
            continue
        key = sample["__key__"]
        sub = root / f"part{n // 500:04d}"  # nested folders of 500, as image dumps usually come
        sub.mkdir(exist_ok=True)
        (sub / f"{os.path.basename(key)}.{ext}").write_bytes(sample[ext])
        (sub / f"{os.path.basename(key)}.txt").write_bytes(sample["txt"])
        meta = json.loads(sample["json"])
        name = f"{sub.name}_{os.path.basename(key)}"  # the original code's key: path with "/" -> "_"
        capts[name], px_scales[name] = meta.get("captions") or [], meta.get("px_scale") or [1.0, 1.0]
        if meta.get("safebox") is not None:
            safeboxes[name] = meta["safebox"]
        n += 1
    for fname, table in (("capts.json", capts), ("safeboxes.json", safeboxes), ("px_scales.json", px_scales)):
        (root / fname).write_text(json.dumps(table))
    return n


class FolderDataset(Dataset):
    """The original code's loader: scan the tree, read image + .txt per item, metadata from JSON maps."""

    def __init__(self, root: Path, augment: AugmentConfig, image_size: int, low_res_size: int, seed: int):
        self.items = sorted(p for p in root.rglob("*") if p.suffix.lstrip(".").lower() in IMAGE_EXTENSIONS)
        self.capts, self.safeboxes, self.px_scales = (json.loads((root / f).read_text()) for f in
                                                      ("capts.json", "safeboxes.json", "px_scales.json"))
        self.augment, self.image_size, self.low_res_size, self.seed = augment, image_size, low_res_size, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path = self.items[index]
        key = f"{path.parent.name}_{path.stem}"
        image = Image.open(path)  # decoded by augment_sample, as in the stream
        txt = path.with_suffix(".txt").read_text(encoding="utf-8")
        rng = sample_rng(self.seed, 0, index)
        captions = self.capts.get(key) or []
        capt = captions[int(rng.integers(len(captions)))] if captions else ""
        out = augment_sample(image, txt, self.safeboxes.get(key), self.px_scales.get(key, (1.0, 1.0)),
                             self.augment, self.image_size, self.low_res_size, rng)
        return {**out, "txt": txt, "capt": capt, "key": key}


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (the DataLoader workers; Linux)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def samples_per_second(batches, warmup: int, timed: int, batch_size: int) -> tuple[float, float]:
    """Samples per wall second and per CPU second (all loader processes) over ``timed`` batches, after
    ``warmup`` batches (worker start-up excluded). The CPU rate is the loader's own cost, which other
    processes on a shared machine barely disturb; the wall rate is what training would see."""
    it = iter(batches)
    for _ in islice(it, warmup):
        pass
    start, cpu_start = time.perf_counter(), cpu_seconds()
    n = sum(1 for _ in islice(it, timed))
    if n < timed:
        raise SystemExit(f"error: only {n} timed batches; use fewer --batches or more images")
    return n * batch_size / (time.perf_counter() - start), n * batch_size / (cpu_seconds() - cpu_start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="brace pattern, glob or manifest.json of the shards")
    p.add_argument("--config", type=Path, help="recipe JSON whose augment section and model sizes to use")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--image-size", type=int, help="output side in px (default: model.image_size, or 64)")
    p.add_argument("--low-res-size", type=int, help="low-res side in px, 0 for none (default: model.low_res_size)")
    p.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per path and worker count; the median "
                   "is printed (default 3)")
    p.add_argument("--shuffle-buffer", type=int, default=DataConfig.shuffle_buffer,
                   help=f"data.shuffle_buffer of the shard stream (default {DataConfig.shuffle_buffer})")
    p.add_argument("--folder", type=Path, help="where to write the folder tree (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set) if args.config else None
    augment = cfg.augment if cfg else AugmentConfig(crop_prob=0.5, crop_prob_es=0.5, flip_lr_prob_es=0.5)
    image_size = args.image_size or (cfg.model.image_size if cfg else 64)
    low_res_size = args.low_res_size if args.low_res_size is not None else cfg.model.low_res_size if cfg else 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or Path(tmp) / "folder"
        n = write_folder_tree(args.shards, root)
        needed = (args.warmup + args.batches) * args.batch_size
        print(f"{n} images; each measurement reads {needed}; image_size {image_size}, low_res {low_res_size}")
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            extra = {"prefetch_factor": 4} if workers > 0 else {}
            folder_rates, shard_rates = [], []
            for _ in range(args.repeats):  # alternate the two paths so load changes hit both alike
                folder = FolderDataset(root, augment, image_size, low_res_size, seed=0)
                loader = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                    drop_last=True, collate_fn=collate, **extra)
                folder_rates.append(samples_per_second(loader, args.warmup, args.batches, args.batch_size))
                data = DataConfig(shards=args.shards, num_workers=workers, prefetch_factor=4, resampled=True,
                                  shuffle_buffer=args.shuffle_buffer)
                stream = build_train_stream(data, augment, image_size, low_res_size, args.batch_size, 0, 1)
                shard_rates.append(samples_per_second(stream, args.warmup, args.batches, args.batch_size))
            folder_rate, folder_cpu = (statistics.median(r) for r in zip(*folder_rates))
            shard_rate, shard_cpu = (statistics.median(r) for r in zip(*shard_rates))
            rows.append((workers, folder_rate, shard_rate))
            print(f"workers {workers}: folder {folder_rate:7.1f} samples/s | shards {shard_rate:7.1f} samples/s | "
                  f"shards/folder {shard_rate / folder_rate:4.2f} || per CPU-second: folder {folder_cpu:7.1f} | "
                  f"shards {shard_cpu:7.1f} | shards/folder {shard_cpu / folder_cpu:4.2f}", flush=True)
        base = {name: rows[0][i] for i, name in ((1, "folder"), (2, "shards"))}
        for workers, folder_rate, shard_rate in rows[1:]:
            print(f"scaling {rows[0][0]} -> {workers} workers: folder x{folder_rate / base['folder']:.2f}, "
                  f"shards x{shard_rate / base['shards']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
