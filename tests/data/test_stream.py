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
from textdiff.data.stream import (
    ShardsError, build_train_stream, epoch_shards, group_samples, resolve_data_shards, resolve_shards, shard_groups,
)

N_SHARDS, PER_SHARD = 8, 6  # 48 samples


def png_bytes(rng, size=20):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_sample(writer, key, rng, txt="word", captions=("a red sign",), safebox=(2, 4, 14, 12)):
    meta = {"captions": list(captions), "safebox": list(safebox) if safebox else None, "px_scale": [1.0, 1.0],
            "width": 24, "height": 20, "source": f"{key}.png"}
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
    full = [(i, s["__key__"]) for i, s in group_samples(shards, [0, 1], 3, 0, 0, 0, 5, 0, counters)]
    assert [i for i, _ in full] == list(range(12))
    assert sorted(k for _, k in full) == sorted(f"s{s}_{i}" for s in (0, 1) for i in range(6))
    assert [k for _, k in full] != [f"s{s}_{i}" for s in (0, 1) for i in range(6)]  # shuffled
    for start in (1, 5, 7, 11):
        tail = [(i, s["__key__"]) for i, s in group_samples(shards, [0, 1], 3, 0, 0, 0, 5, start, counters)]
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
