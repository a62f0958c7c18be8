"""Opening shards and manifests at any URL: local paths, ``pipe:CMD``, and every fsspec URL, read through faults.

A remote shard (``https://``, ``s3://``, ``gs://``, ... anything with an fsspec backend) is a
:class:`RemoteShard`: read front to back in ranged requests of ``BLOCK_BYTES`` (HTTP ``Range``, S3 ranged
``GetObject``) with the next block always in flight, so the network overlaps decoding and memory stays at two
blocks per open shard. Its size comes from one metadata request (HTTP ``HEAD``, S3 ``HeadObject``) first.

Faults (``data.retries``, ``data.timeout_s``):

- A request that fails transiently (connection refused or reset, a body cut short, HTTP 408/425/429/500/502/
  503/504, S3 ``SlowDown``) is sent again, up to ``retries`` times, after exponential backoff with jitter
  (:func:`backoff_s`); the request again asks for the bytes from the offset the shard has delivered so far, so
  nothing is read twice or skipped.
- Waiting for any request's answer is bounded by ``timeout_s``: a request that has not answered in full by then
  (a stalled connection) is cancelled and counts as a transient failure. fsspec backends without an event loop
  (local files, ``memory://``, sftp) are read directly and keep their own timeouts.
- Any other failure (HTTP 404 or 403, an unknown bucket) is permanent and not retried; so is a transient one
  that outlasts its retries. Either ends the shard with :class:`ShardReadError`, which the stream counts in
  ``shard_errors`` and names in its warning (textdiff.data.stream.shard_samples).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional

import fsspec
import webdataset as wds

from textdiff.config import DataConfig

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
# 4 MiB a request: two of them per open shard in memory; at S3's ~30 ms to first byte the next block has
# arrived long before a worker has decoded the current one
BLOCK_BYTES = 4 << 20
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# fsspec filesystems by (process id, protocol, options in the URL), made here rather than through fsspec's instance
# cache: a forked DataLoader worker that makes its first instance of a class empties that class's cache, and every
# parent instance dropped there closes its connections on the event loop that parent and worker share after a fork
# (one epoll), which unregisters them in the parent too: its next request on one hangs until data.timeout_s. So
# the instances of other processes stay referenced here, never closed: the parent's own, and those fsspec had
# cached when this process made its first instance of their class.
_FILESYSTEMS: dict[tuple[int, str, str], Any] = {}


class ShardReadError(OSError):
    """A shard or manifest that could not be read: a permanent failure, or a transient one past its retries."""


class TruncatedRead(ConnectionError):
    """A ranged read answered with fewer bytes than it asked for (and not the whole file): transient."""


@dataclass(frozen=True)
class ReadPolicy:
    """How remote shards are read: ``retries`` per request, ``timeout_s`` per wait, ``block_bytes`` a request."""

    retries: int = DataConfig.retries
    timeout_s: float = DataConfig.timeout_s
    block_bytes: int = BLOCK_BYTES


def read_policy(data: DataConfig) -> ReadPolicy:
    """The :class:`ReadPolicy` of ``data.retries`` and ``data.timeout_s``, with blocks of ``BLOCK_BYTES``."""
    return ReadPolicy(data.retries, data.timeout_s, BLOCK_BYTES)


def is_remote(url: str) -> bool:
    """Whether ``url`` is opened by a pipe or fsspec rather than as a local path (``pipe:``, any ``scheme://``)."""
    return url.startswith(PIPE_PREFIX) or bool(_URL_SCHEME.match(url))


def filesystem(url: str) -> tuple[Any, str]:
    """This process's fsspec filesystem for ``url`` (one per protocol and URL options, see ``_FILESYSTEMS``) and
    the path within it."""
    cls = fsspec.get_filesystem_class(url.split("://", 1)[0])
    options = cls._get_kwargs_from_urls(url)
    key = (os.getpid(), cls.__name__, repr(sorted(options.items())))
    if key not in _FILESYSTEMS:
        inherited = (os.getpid(), cls.__name__, "inherited")
        _FILESYSTEMS.setdefault(inherited, list(getattr(cls, "_cache", {}).values()))
        _FILESYSTEMS[key] = cls(skip_instance_cache=True, **options)
    return _FILESYSTEMS[key], cls._strip_protocol(url)


def backend_error(url: str) -> Optional[str]:
    """Why no fsspec backend can open ``url`` (unknown protocol, backend package not installed), or None."""
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        return f"its fsspec backend is not installed ({e})"
    except ValueError:
        return f"fsspec knows no protocol {protocol!r}"
    return None


def backoff_s(retry: int, timeout_s: float, jitter: float) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...): ``min(1, timeout_s / 60) * 2 ** (retry - 1)``
    times ``0.5 + jitter`` (``jitter`` in [0, 1), so readers that failed together retry apart), at most
    ``timeout_s``. With the defaults (60 s): about 1, 2, 4, 8, 16 s."""
    return min(timeout_s, min(1.0, timeout_s / 60) * 2 ** (retry - 1) * (0.5 + jitter))


def http_status(error: BaseException) -> Optional[int]:
    """The HTTP status an fsspec backend's error carries (aiohttp's ``status``, botocore's response), or None."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _transient_types() -> tuple[type, ...]:
    """Connection, timeout and cut-body errors, of the backends loaded in this process (none is imported here)."""
    types: list[type] = [TimeoutError, ConnectionError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    s3fs_core = sys.modules.get("s3fs.core")
    if s3fs_core is not None:
        types += list(s3fs_core.S3_RETRYABLE_ERRORS)  # what s3fs itself deems worth retrying (botocore's too)
    return tuple(types)


def is_transient(error: BaseException) -> bool:
    """Whether a failed request is worth sending again. An HTTP status in ``error`` or its causes decides (the
    innermost one: fsspec's HTTP backend reports a 503 on opening as a FileNotFoundError caused by it); without
    one, a connection, timeout or cut-body error anywhere in the chain is transient and anything else is not."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    for link in reversed(chain):
        status = http_status(link)
        if status is not None:
            return status in TRANSIENT_STATUS
    transient = _transient_types()
    return any(isinstance(link, transient) for link in chain)


def describe(error: BaseException) -> str:
    """One line for a log: the error's type and text, and the HTTP status behind it where the text lacks it."""
    status = http_status(error) or (http_status(error.__cause__) if error.__cause__ is not None else None)
    text = f"{type(error).__name__}: {error}"
    return text + (f" (HTTP {status})" if status and str(status) not in text else "")


def checked_block(data: bytes, start: int, end: int, size: int) -> bytes:
    """Bytes ``[start, end)`` of a ``size``-byte file from what a ranged read of them returned. A server that
    ignores ranges returns the whole file: its part from ``start`` on is kept (all of it on the first request,
    so such a server costs one request and the shard's size in memory). Raises :class:`TruncatedRead`."""
    if len(data) == end - start:
        return data
    if len(data) == size:
        return data[start:]
    raise TruncatedRead(f"{len(data)} bytes for a request of bytes {start}-{end - 1} of {size}")


class RemoteShard(io.RawIOBase):
    """A file at an fsspec URL, read front to back in blocks with retries and timeouts (module docstring).

    ``offset`` is the number of bytes delivered so far; every request, first or retried, starts there or at
    the end of the block in hand.
    """

    def __init__(self, url: str, policy: ReadPolicy):
        super().__init__()
        self.url, self.policy = url, policy
        self._fs, self._path = filesystem(url)
        self._async = bool(getattr(self._fs, "async_impl", False))
        self.offset = 0
        self._block = memoryview(b"")
        self._pending: Optional[tuple[int, int, Optional[concurrent.futures.Future]]] = None
        self.size = self._retried(f"{url}: size lookup", self._lookup_size)

    def __repr__(self) -> str:
        return f"RemoteShard({self.url})"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._block:
            if self.offset >= self.size:
                return 0
            self._block = memoryview(self._next_block())
        n = min(len(buffer), len(self._block))
        buffer[:n] = self._block[:n]
        self._block, self.offset = self._block[n:], self.offset + n
        return n

    def close(self) -> None:
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].cancel()
        self._pending, self._block = None, memoryview(b"")
        super().close()

    def _lookup_size(self) -> int:
        info = self._wait(self._fs._info(self._path)) if self._async else self._fs.info(self._path)
        if info.get("size") is None:
            raise ShardReadError(f"{self.url}: the server gives no size (Content-Length); serve the shards from "
                                 "a server or store that does (any S3-compatible store, nginx, ...)")
        return int(info["size"])

    def _wait(self, coroutine):
        """Run one of the backend's coroutines on fsspec's IO loop and wait at most ``timeout_s`` for it."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)
        return self._result(future)

    def _result(self, future: concurrent.futures.Future):
        try:
            return future.result(timeout=self.policy.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # cancels the request on the loop: its connection is closed, not left to hang
            raise TimeoutError(f"no answer within data.timeout_s={self.policy.timeout_s:g} s") from None

    def _submit(self, start: int) -> tuple[int, int, Optional[concurrent.futures.Future]]:
        """Send the request for the block at ``start`` (an async backend starts it now; others when awaited)."""
        end = min(start + self.policy.block_bytes, self.size)
        if not self._async:
            return start, end, None
        coroutine = self._fs._cat_file(self._path, start=start, end=end)
        return start, end, asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)

    def _receive(self, request: tuple[int, int, Optional[concurrent.futures.Future]]) -> bytes:
        start, end, future = request
        data = self._fs.cat_file(self._path, start=start, end=end) if future is None else self._result(future)
        return checked_block(data, start, end, self.size)

    def _next_block(self) -> bytes:
        """The block at ``offset`` (the one in flight, if any, else a new request), and the next one sent off."""
        request, self._pending = self._pending, None

        def attempt() -> bytes:
            nonlocal request
            current, request = request or self._submit(self.offset), None
            return self._receive(current)

        end = min(self.offset + self.policy.block_bytes, self.size)
        data = self._retried(f"{self.url}: bytes {self.offset}-{end - 1}", attempt)
        if self.offset + len(data) < self.size:
            self._pending = self._submit(self.offset + len(data))
        return data

    def _retried(self, what: str, call: Callable):
        """``call()``, sent again after a transient failure up to ``policy.retries`` times with backoff."""
        started = time.monotonic()
        for retry in range(self.policy.retries + 1):
            try:
                return call()
            except ShardReadError:
                raise
            except Exception as e:  # the backends raise anything from OSError to aiohttp's and botocore's own
                if not is_transient(e):
                    raise ShardReadError(f"{what}: {describe(e)}; not retried (permanent)") from e
                if retry == self.policy.retries:
                    raise ShardReadError(f"{what}: {describe(e)}; still failing after {retry} retries "
                                         f"(data.retries) over {time.monotonic() - started:.1f} s") from e
                wait = backoff_s(retry + 1, self.policy.timeout_s, random.random())
                log.info("%s: %s; retry %d of %d in %.2f s", what, describe(e), retry + 1, self.policy.retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")


def open_shard(url: str, policy: ReadPolicy) -> BinaryIO:
    """``url`` opened for reading front to back: a local path as a file, ``pipe:CMD`` through WebDataset's shell
    pipe (textdiff.data.shard_urls admits one only with ``data.allow_pipe``), any other URL as a
    :class:`RemoteShard`. Raises :class:`ShardReadError` (an OSError) when a remote one cannot be opened."""
    if url.startswith(PIPE_PREFIX):
        return wds.gopen(url)
    if not is_remote(url):
        return open(url, "rb")
    return RemoteShard(url, policy)


def read_remote(url: str, policy: ReadPolicy) -> bytes:
    """All bytes of the file at fsspec URL ``url`` (a manifest), with the retries and timeouts of shards."""
    with RemoteShard(url, policy) as f:
        return f.read()


def opened_shard(url: str, policy: ReadPolicy, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """WebDataset's ``{"url", "stream"}`` source of one shard for ``tar_file_expander``, closed once read;
    nothing when it cannot be opened. ``handler`` gets the errors of opening and closing (a pipe's exit status)."""
    try:
        stream = open_shard(url, policy)
    except Exception as e:  # a missing file, a refused URL, a failed pipe: the stream counts the shard as short
        handler(e)
        return
    try:
        yield {"url": url, "stream": stream}
    finally:
        try:
            stream.close()
        except Exception as e:
            handler(e)
