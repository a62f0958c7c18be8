"""Samples/s of the shard stream against the original code's folder loader, on the same images, same run.

    python tools/make_shards.py --synthetic 2000 data/bench
    python tools/bench_loader.py --shards data/bench/manifest.json --workers 0,1,2
    python tools/bench_loader.py --shards data/bench/manifest.json --workers 0,1,2 --http

The folder baseline is the layout the original research code read: one image file per sample in a folder
tree, its transcription in a ``.txt`` beside it, and captions, safeboxes and px scales in three JSON
objects keyed by image key, loaded through a map-style Dataset and a shuffling DataLoader. The benchmark
writes that tree from the shards (same image bytes), then times decode + augment + batch for both paths
with the same augmentation (``augment_sample``) and collation, for each worker count, after warm-up
batches (worker start-up is not counted), alternating the two paths ``--repeats`` times. It prints the
median samples/s and the ratio shard/folder.

``--http`` compares instead the shard stream from disk (A) with the same stream over HTTP (B): the manifest's
folder served on 127.0.0.1 by a Range-capable server in a child process (its CPU time not counted as the
loader's), read through textdiff.data.remote, in A-B-B-A rounds (``--repeats`` rounds, so each path goes first
as often), and prints the medians and the ratio http/disk.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from textdiff.config import AugmentConfig, DataConfig, load_config
from textdiff.data.augment import augment_sample, sample_rng
from textdiff.data.shard_urls import resolve_shards
from textdiff.data.stream import IMAGE_EXTENSIONS, build_train_stream, collate


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


def cpu_seconds(exclude: tuple[int, ...] = ()) -> float:
    """CPU seconds used so far by this process and its live children (the DataLoader workers; Linux), but for
    the children ``exclude`` names (the HTTP server of ``--http``)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        if child.pid in exclude:
            continue
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def samples_per_second(batches, warmup: int, timed: int, batch_size: int, exclude: tuple[int, ...] = ()
                       ) -> tuple[float, float]:
    """Samples per wall second and per CPU second (all loader processes but ``exclude``) over ``timed`` batches,
    after ``warmup`` batches (worker start-up excluded). The CPU rate is the loader's own cost, which other
    processes on a shared machine barely disturb; the wall rate is what training would see."""
    it = iter(batches)
    for _ in islice(it, warmup):
        pass
    start, cpu_start = time.perf_counter(), cpu_seconds(exclude)
    n = sum(1 for _ in islice(it, timed))
    if n < timed:
        raise SystemExit(f"error: only {n} timed batches; use fewer --batches or more images")
    return n * batch_size / (time.perf_counter() - start), n * batch_size / (cpu_seconds(exclude) - cpu_start)


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered as 206 (http.server's own handler ignores Range)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out apart: without it each waits for a delayed ACK

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path, ranged = self.translate_path(self.path), self.headers.get("Range")
        if not ranged or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def _serve(folder: str, ports: multiprocessing.Queue) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeRequestHandler, directory=folder))
    ports.put(server.server_port)
    server.serve_forever()


def compare_http(args: argparse.Namespace, augment: AugmentConfig, image_size: int, low_res_size: int) -> None:
    """The shard stream from disk against the same shards over HTTP on 127.0.0.1, A-B-B-A, for each worker count."""
    if not args.shards.endswith(".json") or not os.path.isfile(args.shards):
        raise SystemExit(f"error: --http serves the folder of a local manifest.json; --shards is {args.shards}")
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(os.path.dirname(os.path.abspath(args.shards)), ports),
                                     daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}/{os.path.basename(args.shards)}"
    print(f"disk: {args.shards} | http: {url} (server pid {server.pid}, its CPU not counted)")
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            rates: dict[str, list[tuple[float, float]]] = {"disk": [], "http": []}
            for round_ in range(args.repeats):
                for name in ("disk", "http") if round_ % 2 == 0 else ("http", "disk"):
                    data = DataConfig(shards=args.shards if name == "disk" else url, num_workers=workers,
                                      prefetch_factor=4, resampled=True, shuffle_buffer=args.shuffle_buffer)
                    stream = build_train_stream(data, augment, image_size, low_res_size, args.batch_size, 0, 1)
                    rates[name].append(samples_per_second(stream, args.warmup, args.batches, args.batch_size,
                                                          exclude=(server.pid,)))
            (disk, disk_cpu), (http, http_cpu) = ((statistics.median(r) for r in zip(*rates[n])) for n in rates)
            print(f"workers {workers}: disk {disk:7.1f} samples/s | http {http:7.1f} samples/s | http/disk "
                  f"{http / disk:4.2f} || per CPU-second: disk {disk_cpu:7.1f} | http {http_cpu:7.1f} | "
                  f"http/disk {http_cpu / disk_cpu:4.2f} || rounds (wall): disk "
                  f"{[round(r) for r, _ in rates['disk']]} http {[round(r) for r, _ in rates['http']]}", flush=True)
    finally:
        server.terminate()
        server.join()


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
    p.add_argument("--http", action="store_true", help="compare the shards from disk with the same shards over "
                   "HTTP on 127.0.0.1 (A-B-B-A rounds) instead of with the folder loader; --shards: a manifest.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set) if args.config else None
    augment = cfg.augment if cfg else AugmentConfig(crop_prob=0.5, crop_prob_es=0.5, flip_lr_prob_es=0.5)
    image_size = args.image_size or (cfg.model.image_size if cfg else 64)
    low_res_size = args.low_res_size if args.low_res_size is not None else cfg.model.low_res_size if cfg else 0
    if args.http:
        compare_http(args, augment, image_size, low_res_size)
        return 0
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
