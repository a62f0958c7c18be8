"""Specification of textdiff/data/remote.py and of remote shards in the stream: shards and manifests over HTTP and
S3 (moto on 127.0.0.1) stream as from disk, and injected faults (resets, 5xx, stalls, 404s) are retried, resumed
at the byte reached, or counted as shard errors, with exact resume intact."""

import importlib.util
import io
import json
import logging
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import textdiff.data.remote as remote
from textdiff.config import AugmentConfig, ConfigError, DataConfig
from textdiff.data.remote import ReadPolicy, RemoteShard, ShardReadError, backoff_s, checked_block, is_transient
from textdiff.data.shard_urls import ShardsError, beside_url, resolve_shards
from textdiff.data.stream import build_train_stream

N_SHARDS, PER_SHARD = 6, 6  # 36 samples of 6.8 KB (3 members with PAX headers): 11 blocks of 4096 a shard
BLOCK = 4096
AUG = AugmentConfig(crop_prob=0.5, flip_lr_prob_es=0.5)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote_shards")
    rng = np.random.default_rng(7)
    entries = []
    for s in range(N_SHARDS):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as writer:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
                meta = {"captions": ["a sign"], "safebox": None if i % 3 == 0 else [2, 4, 14, 12], "px_scale": [1, 1]}
                writer.write({"__key__": f"s{s}_{i}", "png": buf.getvalue(), "txt": b"" if i % 3 == 0 else b"word",
                              "json": json.dumps(meta).encode()})
        entries.append({"path": f"shard-{s:06d}.tar", "count": PER_SHARD})
    (out / "manifest.json").write_text(json.dumps({"shards": entries}))
    return out


# --- a shard server on 127.0.0.1 that fails the Nth request for a path ----------------------------------------

Rule = Callable[[str, int, int], Optional[object]]  # (path, request number for it from 1, range start) -> fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body, sent apart, wait ~40 ms for a delayed ACK each request

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.server.answer(self, head=True)

    def do_GET(self):
        self.server.answer(self, head=False)


class FaultServer(ThreadingHTTPServer):
    """Serves ``root`` under ``/run<N>/`` with HTTP Range support; ``rule`` picks a fault for a request of the
    current run: 404, 500 or 503 (that status), "reset" (half the body, then the connection shut), "stall" (half the
    body, then silence until ``release``), "norange" (the whole file with 200, as a server without Range
    support). ``log`` records every request of the current run, by path without the prefix."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.release, self.lock, self.run = root, threading.Event(), threading.Lock(), 0
        self.reset()

    def reset(self, rule: Rule = lambda path, n, start: None) -> str:
        """A fresh fault schedule (request counts start again at 1) under a fresh URL prefix, returned: a block
        that an earlier stream still had in flight meets no fault of this run and stays out of its log."""
        with self.lock:
            self.run += 1
            self.rule, self.counts, self.log = rule, Counter(), []
        return f"http://127.0.0.1:{self.server_port}/run{self.run}"

    def handle_error(self, request, client_address):
        pass  # broken pipes after resets and abandoned reads are the point of this server

    def requests(self, path: str) -> list[tuple[str, Optional[int], Optional[object]]]:
        """``(method, range start or None, fault)`` of each request for ``path``, in order."""
        return [(m, start, fault) for m, p, start, fault in self.log if p == path]

    def answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        run, _, rest = handler.path.lstrip("/").partition("/")
        path, ranged = "/" + rest, handler.headers.get("Range")
        file = self.root / rest
        data = file.read_bytes() if file.is_file() else None
        start, end = 0, (len(data) - 1 if data else 0)
        if ranged:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else end, end)
        with self.lock:
            fault = None
            if run == f"run{self.run}":
                self.counts[path] += 1
                fault = self.rule(path, self.counts[path], start)
                self.log.append((handler.command, path, start if ranged else None, fault))
        if data is None or fault in (404, 500, 503):
            handler.send_response(404 if data is None else fault)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if fault == "norange":
            ranged, start, end = None, 0, len(data) - 1
        body = data[start:end + 1]
        handler.send_response(206 if ranged else 200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Accept-Ranges", "bytes")
        if ranged:
            handler.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        handler.end_headers()
        if head:
            return
        if fault in ("reset", "stall"):
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            if fault == "stall":
                self.release.wait(10)
            # shutdown, not close alone: DataLoader workers forked from this process hold copies of the socket,
            # and a close would wait for theirs; the client sees the body end before its Content-Length
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(body)


@pytest.fixture(scope="module")
def server(shard_dir):
    srv = FaultServer(shard_dir)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4096 bytes, so that a 16 KB shard takes 5 requests and a fault can hit the middle of one."""
    monkeypatch.setattr(remote, "BLOCK_BYTES", BLOCK)


def data_cfg(shards: str, **kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("resampled", False)
    kw.setdefault("shuffle_buffer", 5)
    kw.setdefault("retries", 3)
    kw.setdefault("timeout_s", 2.0)  # a stall test sets its own; on 2 busy cores a sound request can take 0.5 s
    return DataConfig(shards=shards, **kw)


def batches(cfg: DataConfig, n: int, state: Optional[dict] = None, batch_size: int = 6):
    stream = build_train_stream(cfg, AUG, 16, 8, batch_size, 0, 1, state=state)
    return list(islice(stream, n)), stream


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def member_ends(path: Path) -> dict[str, int]:
    """{sample key: offset of the end of its last member's padded data}."""
    with tarfile.open(path) as tar:
        ends = {}
        for m in tar.getmembers():
            ends[m.name.split(".")[0]] = m.offset_data + -(-m.size // 512) * 512
    return ends


# --- streaming remote shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_http_shards_and_manifest_stream_the_batches_of_the_same_shards_from_disk(shard_dir, server, num_workers):
    base = server.reset()
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json"), num_workers=num_workers), 8)
    remote_batches, stream = batches(data_cfg(f"{base}/manifest.json", num_workers=num_workers), 8)
    assert_same_batches(remote_batches, local)  # 48 samples: the 36 of epoch 0 and 12 of epoch 1
    assert stream.counters()["shard_errors"] == 0
    gets = [(m, start) for m, p, start, _ in server.log if p.endswith(".tar") and m == "GET"]
    # streamed in ranged requests of one block: never the whole 51 KB shard at once
    assert gets and all(start is not None and start % BLOCK == 0 for _, start in gets)
    for s in range(N_SHARDS):
        starts = [start for m, start, _ in server.requests(f"/shard-{s:06d}.tar") if m == "GET"]
        # up to the tar's end marker at 42496 (block 10) and the block in flight after it; front to back in
        # one reader (two workers may read a shard in epochs 0 and 1 at once)
        assert sorted(set(starts)) == list(range(0, 12 * BLOCK, BLOCK))
        if num_workers == 0:
            assert starts[:12] == list(range(0, 12 * BLOCK, BLOCK))


def test_workers_forked_after_a_remote_read_leave_this_process_connections_working(shard_dir, server):
    """fsspec's instance cache would let each worker close this process's connections on the event loop they share
    after the fork (one epoll): the next request here on one would hang until the timeout (and fail: no retry)."""
    base = server.reset()
    once = ReadPolicy(retries=0, timeout_s=3.0)
    resolve_shards(f"{base}/manifest.json", policy=once)  # leaves a kept-alive connection in this process
    _, stream = batches(data_cfg(f"{base}/manifest.json", num_workers=2), 4)  # 2 workers read shards
    time.sleep(1.5)  # what a worker would do to the inherited instances, it has done by now (fsspec waits 1 s)
    began = time.monotonic()
    assert resolve_shards(f"{base}/manifest.json", policy=once).counts == (6,) * 6
    assert time.monotonic() - began < 1.0 and stream.counters()["shard_errors"] == 0


def test_remote_shards_are_opened_without_a_shell_or_curl(shard_dir, server, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    got, stream = batches(data_cfg(f"{server.reset()}/shard-{{000000..000005}}.tar"), 6)
    assert sorted(k for b in got for k in b["key"]) == sorted(f"s{s}_{i}" for s in range(6) for i in range(6))
    assert stream.counters()["shard_errors"] == 0


def test_a_remote_manifest_names_its_shards_relative_to_itself(server, shard_dir):
    lists = shard_dir / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "manifest.json").write_text(json.dumps({"shards": [
        {"path": "/shard-000000.tar", "count": 6}, {"path": "../shard-000000.tar", "count": 5},
        "shard-000002.tar", {"url": "s3://other-bucket/x.tar", "count": 3}]}))
    base = server.reset()
    listed = resolve_shards(f"{base}/lists/manifest.json")
    assert listed.urls == (f"http://127.0.0.1:{server.server_port}/shard-000000.tar", f"{base}/shard-000000.tar",
                           f"{base}/lists/shard-000002.tar", "s3://other-bucket/x.tar")
    assert listed.counts == (6, 5, None, 3)
    assert beside_url("s3://bucket/sets/a/manifest.json", "../b/x.tar") == "s3://bucket/sets/b/x.tar"


def test_a_remote_manifest_is_read_through_faults_and_a_missing_one_names_data_shards(server):
    base = server.reset(lambda path, n, start: {1: 503, 2: 503, 4: "reset"}.get(n) if path == "/manifest.json"
                        else None)
    policy = ReadPolicy(retries=2, timeout_s=2.0)
    listed = resolve_shards(f"{base}/manifest.json", policy=policy)  # opening failed once (HEAD, GET), reading once
    assert listed.counts == (6,) * 6 and listed.urls[5] == f"{base}/shard-000005.tar"
    assert [m for m, _, _ in server.requests("/manifest.json")] == ["HEAD", "GET", "HEAD", "GET", "GET"]
    with pytest.raises(ShardsError, match=r"data.shards: cannot read manifest http://.*/none.json: .*HTTP 404"):
        resolve_shards(f"{base}/none.json", policy=policy)


def test_a_url_without_an_installed_fsspec_backend_or_with_a_glob_is_refused_before_any_reader_starts():
    with pytest.raises(ShardsError, match=r"s3://b/shards/\*.tar is a glob of remote shards.*brace pattern"):
        resolve_shards("s3://b/shards/*.tar")
    with pytest.raises(ShardsError, match=r"data.shards: cannot open ais://b/x-0.tar .*fsspec knows no protocol 'ais'"):
        resolve_shards("ais://b/x-{0..1}.tar")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ShardsError, match="gs://c/y.tar .*Please install gcsfs"):
            resolve_shards("gs://c/y.tar")


# --- S3 through s3fs, against moto in server mode on 127.0.0.1 ------------------------------------------------


@pytest.fixture(scope="module")
def s3_shards(shard_dir, tmp_path_factory):
    """The shards and manifest under s3://shards/set/ of a moto server on 127.0.0.1, with the environment that
    s3fs reads (keys, AWS_ENDPOINT_URL), and no ~/.aws."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    none = tmp_path_factory.mktemp("no_aws") / "none"
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}",
                               AWS_CONFIG_FILE=str(none), AWS_SHARED_CREDENTIALS_FILE=str(none)).items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        import fsspec
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("shards")
        for path in sorted(shard_dir.glob("*.tar")) + [shard_dir / "manifest.json"]:
            fs.pipe(f"shards/set/{path.name}", path.read_bytes())
        yield "s3://shards/set"
    moto.stop()


def test_s3_shards_and_manifest_stream_the_batches_of_the_same_shards_from_disk(shard_dir, s3_shards):
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json")), 8)
    from_s3, stream = batches(data_cfg(f"{s3_shards}/manifest.json", timeout_s=10), 8)  # botocore loads slowly
    assert_same_batches(from_s3, local)
    assert stream.counters()["shard_errors"] == 0
    listed = resolve_shards(f"{s3_shards}/shard-{{000000..000005}}.tar")
    assert listed.urls[0] == "s3://shards/set/shard-000000.tar" and len(listed.urls) == 6


def test_an_s3_key_that_does_not_exist_is_a_shard_error_named_in_the_log(s3_shards, caplog):
    cfg = data_cfg(f"{s3_shards}/shard-000000.tar,{s3_shards}/shard-000009.tar", retries=2, timeout_s=10)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        got, stream = batches(cfg, 1)
    assert sorted(got[0]["key"]) == [f"s0_{i}" for i in range(6)]
    assert stream.counters()["shard_errors"] == 1
    assert "shard s3://shards/set/shard-000009.tar is short: 0 samples read" in caplog.text
    assert "FileNotFoundError" in caplog.text and "not retried (permanent)" in caplog.text


# --- faults ---------------------------------------------------------------------------------------------------


def test_a_connection_reset_mid_shard_resumes_at_the_byte_offset_reached(shard_dir, server):
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json")), 6)  # epoch 0
    base = server.reset(lambda path, n, start: "reset" if path == "/shard-000001.tar" and n == 3 else None)
    got, stream = batches(data_cfg(f"{base}/manifest.json"), 6)
    assert_same_batches(got, local)
    assert stream.counters()["shard_errors"] == 0
    # HEAD, block 0, block 1 cut off half-way by a reset, block 1 again (not from byte 0), then on
    assert server.requests("/shard-000001.tar")[:5] == [("HEAD", None, None), ("GET", 0, None),
                                                        ("GET", 4096, "reset"), ("GET", 4096, None),
                                                        ("GET", 8192, None)]


def test_http_500_and_503_are_retried_until_they_pass(shard_dir, server, caplog):
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json")), 6)
    faults = {1: 503, 2: 503, 3: 500, 4: 503, 7: 503}  # on opening (HEAD, fsspec's GET fallback) twice; a block
    base = server.reset(lambda path, n, start: faults.get(n) if path == "/shard-000002.tar" else None)
    with caplog.at_level(logging.INFO, logger="textdiff.data.remote"):
        got, stream = batches(data_cfg(f"{base}/manifest.json", retries=2), 6)
    assert_same_batches(got, local)
    assert stream.counters()["shard_errors"] == 0
    assert [(m, start) for m, start, _ in server.requests("/shard-000002.tar")[4:8]] == [
        ("HEAD", None), ("GET", 0), ("GET", 4096), ("GET", 4096)]  # the 503 of block 1, and block 1 again
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    assert "shard-000002.tar: bytes 4096-8191: ClientResponseError: 503" in retries[2]


def test_a_stalled_read_is_abandoned_after_timeout_s_and_resumed_at_the_offset_reached(shard_dir, server):
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json")), 6)
    base = server.reset(lambda path, n, start: "stall" if path == "/shard-000003.tar" and n == 4 else None)
    began = time.monotonic()
    got, stream = batches(data_cfg(f"{base}/manifest.json", timeout_s=0.5), 6)
    took = time.monotonic() - began
    assert_same_batches(got, local)
    assert 0.5 <= took < 5.0  # waited out the 0.5 s timeout once, not the server's 10 s of silence
    assert [(m, start) for m, start, _ in server.requests("/shard-000003.tar")[3:5]] == [("GET", 8192), ("GET", 8192)]


def test_a_server_without_range_support_still_streams_the_same_batches(shard_dir, server):
    local, _ = batches(data_cfg(str(shard_dir / "manifest.json")), 6)
    base = server.reset(lambda path, n, start: "norange")
    got, _ = batches(data_cfg(f"{base}/manifest.json"), 6)
    assert_same_batches(got, local)
    assert [m for m, _, _ in server.requests("/shard-000004.tar")] == ["HEAD", "GET"]  # the whole shard at once


def test_a_shard_that_disappears_is_a_shard_error_named_in_the_log_and_not_retried(shard_dir, server, caplog):
    ends = member_ends(shard_dir / "shard-000004.tar")
    gone = {"/shard-000005.tar": 1, "/shard-000004.tar": 5}  # from which request on: before opening, after 3 blocks
    base = server.reset(lambda path, n, start: 404 if n >= gone.get(path, n + 1) else None)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        got, stream = batches(data_cfg(f"{base}/manifest.json", retries=3), 5, batch_size=5)
    keys = [k for b in got for k in b["key"]]
    # shard 4 went after 3 blocks (12288 bytes, inside s4_1.txt's header): s4_0 and s4_1 without its .txt were
    # read, and s4_1, the last one, dropped; the 25 samples are all that epoch 0 holds
    assert [k for k, end in ends.items() if end <= 3 * BLOCK] == ["s4_0"] and ends["s4_1"] == 13824
    assert [k for k in keys if k.startswith("s4_")] == ["s4_0"]
    assert not any(k.startswith("s5_") for k in keys) and len(set(keys)) == 25
    assert stream.counters()["shard_errors"] == 2
    assert f"shard {base}/shard-000004.tar is short: 2 samples read of the 6" in caplog.text
    assert f"shard {base}/shard-000005.tar is short: 0 samples read of the 6" in caplog.text
    assert "HTTP 404" in caplog.text and "not retried (permanent)" in caplog.text
    assert [f for _, _, f in server.requests("/shard-000004.tar")] == [None, None, None, None, 404]  # no retry
    assert [m for m, _, _ in server.requests("/shard-000005.tar")] == ["HEAD", "GET"]  # fsspec's HEAD, then GET


def test_a_fault_past_its_retries_ends_the_shard_counted_without_a_partial_sample(shard_dir, server, caplog):
    base = server.reset(lambda path, n, start: 503 if path == "/shard-000001.tar" and start >= 3 * BLOCK else None)
    with caplog.at_level(logging.WARNING, logger="textdiff.data.stream"):
        got, stream = batches(data_cfg(f"{base}/manifest.json", retries=2), 1, batch_size=31)  # epoch 0
    keys = got[0]["key"]
    assert [k for k in keys if k.startswith("s1_")] == ["s1_0"] and len(set(keys)) == 31
    assert None not in got[0]["txt"]  # s1_1, read without its .txt, was not delivered as "unknown text"
    assert stream.counters()["shard_errors"] == 1
    assert [start for _, start, f in server.requests("/shard-000001.tar") if f == 503] == [12288] * 3  # 1 + 2 retries
    assert "still failing after 2 retries (data.retries)" in caplog.text


@pytest.mark.parametrize("num_workers,open_shards", [(0, 4), (2, 2)])
def test_resume_with_faults_gives_the_batches_and_counters_of_an_unbroken_run(shard_dir, server, num_workers,
                                                                             open_shards):
    """Every run meets the same faults: a reset and a 503 that retries overcome, a shard gone (404) and one failing
    for good from byte 12288 on. 2 epochs of 25 samples = 10 batches of 5. (A stall is a timing: one that a
    busy machine stretched past its retries would end a shard in one run and not in another.)"""
    transient = {("/shard-000000.tar", 3): "reset", ("/shard-000002.tar", 2): 503, ("/shard-000003.tar", 5): 500}

    def rule(path, n, start):
        if path == "/shard-000005.tar" or (path == "/shard-000001.tar" and start >= 3 * BLOCK):
            return 404 if path == "/shard-000005.tar" else 503
        return transient.get((path, n))

    def cfg():  # each run under its own URL prefix: the shard names, so the saved state, stay the same
        return data_cfg(f"{server.reset(rule)}/manifest.json", retries=1, num_workers=num_workers,
                        open_shards=open_shards)

    straight, unbroken = batches(cfg(), 10, batch_size=5)
    assert unbroken.counters() == {"batches": 10, "samples": 50, "skipped_corrupt": 0, "shard_errors": 4, "epoch": 1}
    for cut in (3, 7):
        head, first = batches(cfg(), cut, batch_size=5)
        state = json.loads(json.dumps(first.state_dict()))
        tail, resumed = batches(cfg(), 10 - cut, state=state, batch_size=5)
        assert_same_batches(head + tail, straight)
        assert resumed.counters() == unbroken.counters()


# --- the parts ------------------------------------------------------------------------------------------------


def test_backoff_doubles_from_timeout_over_60_capped_at_1_s_with_jitter_and_at_timeout():
    assert [backoff_s(k, 60.0, 0.5) for k in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff_s(1, 60.0, 0.0) == 0.5 and backoff_s(1, 120.0, 0.99) == pytest.approx(1.49)
    assert backoff_s(3, 0.6, 0.5) == pytest.approx(0.04)  # the tests' small timeouts wait milliseconds
    assert backoff_s(10, 60.0, 0.5) == 60.0  # 512 s capped at one timeout


def test_transient_errors_are_connection_timeout_and_5xx_ones_and_404_403_are_permanent():
    import aiohttp
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def http(status):
        return aiohttp.ClientResponseError(None, (), status=status, message="")

    def s3(code, status):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))

    def caused(outer, inner):
        outer.__cause__ = inner
        return outer

    for error in (http(503), http(500), http(429), s3("SlowDown", 503), s3("InternalError", 500),
                  ConnectionResetError(), TimeoutError(), aiohttp.ServerDisconnectedError(),
                  aiohttp.ClientPayloadError("cut"), caused(FileNotFoundError("u"), http(503))):
        assert is_transient(error), error
    for error in (http(404), http(403), s3("NoSuchKey", 404), s3("AccessDenied", 403), FileNotFoundError("u"),
                  caused(FileNotFoundError("u"), http(404)), ValueError("bad URL")):
        assert not is_transient(error), error


def test_checked_block_keeps_a_whole_file_sent_for_a_range_and_refuses_a_short_one():
    data = bytes(range(100))
    assert checked_block(data[10:20], 10, 20, 100) == data[10:20]
    assert checked_block(data, 10, 20, 100) == data[10:]  # the server ignored Range: keep the rest, ask no more
    with pytest.raises(ConnectionError, match="5 bytes for a request of bytes 10-19 of 100"):
        checked_block(data[10:15], 10, 20, 100)


def test_a_remote_shard_reads_every_byte_once_through_faults(shard_dir, server):
    faults = {3: "reset", 5: 500, 6: "stall"}
    base = server.reset(lambda path, n, start: faults.get(n))
    with RemoteShard(f"{base}/shard-000000.tar", ReadPolicy(retries=2, timeout_s=0.3, block_bytes=BLOCK)) as f:
        assert f.read() == (shard_dir / "shard-000000.tar").read_bytes()
    policy = ReadPolicy(retries=2, timeout_s=0.3, block_bytes=BLOCK)
    with pytest.raises(ShardReadError, match=r"shard-000099.tar: size lookup: FileNotFoundError.*not retried"):
        RemoteShard(f"{base}/shard-000099.tar", policy)
    with RemoteShard(f"file://{shard_dir}/shard-000001.tar", policy) as f:  # a backend without an event loop
        assert f.read() == (shard_dir / "shard-000001.tar").read_bytes()


def test_data_retries_and_timeout_s_are_validated_by_name_with_cluster_defaults():
    assert (DataConfig().retries, DataConfig().timeout_s) == (5, 60.0)
    with pytest.raises(ConfigError, match=r"data.retries must be >= 0"):
        DataConfig(retries=-1).validate()
    with pytest.raises(ConfigError, match=r"data.timeout_s must be > 0"):
        DataConfig(timeout_s=0).validate()
    DataConfig(retries=0, timeout_s=0.1).validate()




