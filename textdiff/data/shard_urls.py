"""Which shards ``data.shards`` names: brace patterns, globs, comma and ``::`` lists, manifests (local or remote)
-> a :class:`ShardList` of URLs and sample counts, checked before anything expensive is built.

Naming the shards is this module; reading them is textdiff.data.stream (and textdiff.data.remote for URLs).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Optional

import webdataset as wds

from textdiff.config import DataConfig
from textdiff.data.remote import PIPE_PREFIX, ReadPolicy, backend_error, is_remote, read_policy, read_remote


class ShardsError(ValueError):
    """``data.shards`` names no usable shards (missing file, empty glob, unreadable manifest, refused URL)."""


@dataclass(frozen=True)
class ShardList:
    """The shards of a data set: ``urls`` in a fixed order and, when a manifest gives them, sample counts."""

    urls: tuple[str, ...]
    counts: tuple[Optional[int], ...]


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas outside braces, so ``a-{0,1}.tar,b.tar`` gives two patterns."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _manifest_entry(entry: Any, manifest: str) -> tuple[str, Optional[int]]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, dict):
        name = next((entry[k] for k in ("path", "url", "name", "file") if k in entry), None)
        count = next((entry[k] for k in ("count", "samples", "num_samples", "n_samples") if k in entry), None)
        if isinstance(name, str):
            return name, int(count) if count is not None else None
    raise ShardsError(f"{manifest}: shard entry {entry!r} has no path; rewrite it with tools/make_shards.py")


def beside_url(manifest_url: str, name: str) -> str:
    """Shard ``name`` of the manifest at ``manifest_url`` (``scheme://host/...``), relative to the manifest's
    folder as a local manifest's names are: ``a.tar``, ``../b/a.tar``, ``/root/a.tar`` (from the bucket or host
    root); a name that is a URL itself is kept."""
    if is_remote(name):
        return name
    scheme, _, rest = manifest_url.partition("://")
    host, _, path = rest.partition("/")
    folder = posixpath.dirname("/" + path.split("?", 1)[0])
    return f"{scheme}://{host}{posixpath.normpath(posixpath.join(folder, name))}"


def read_manifest(path: str, policy: ReadPolicy = ReadPolicy()) -> ShardList:
    """The shard list of a ``manifest.json`` written by tools/make_shards.py (names relative to it), at a local
    path or an fsspec URL (read with ``policy``'s retries and timeouts)."""
    remote = is_remote(path)
    try:
        if remote:
            manifest = json.loads(read_remote(path, policy))
        else:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 that does not decode
        raise ShardsError(f"data.shards: cannot read manifest {path}: {e}; run tools/make_shards.py") from None
    entries = manifest.get("shards") if isinstance(manifest, dict) else None
    if not entries:
        raise ShardsError(f"data.shards: manifest {path} lists no shards (key 'shards'); run tools/make_shards.py")
    pairs = [_manifest_entry(e, path) for e in entries]
    if remote:
        urls = tuple(beside_url(path, u) for u, _ in pairs)
    else:
        base = os.path.dirname(os.path.abspath(path))
        urls = tuple(u if is_remote(u) or os.path.isabs(u) else os.path.join(base, u) for u, _ in pairs)
    return ShardList(urls, tuple(c for _, c in pairs))


def resolve_data_shards(data: DataConfig) -> ShardList:
    """The shards ``data.shards`` names, checked before any expensive work; raises :class:`ShardsError`
    (a ValueError) with a message naming ``data.shards`` (or ``data.allow_pipe``) and what to do."""
    return resolve_shards(data.shards, allow_pipe=data.allow_pipe, policy=read_policy(data))


def resolve_shards(spec: str, allow_pipe: bool = False, policy: ReadPolicy = ReadPolicy()) -> ShardList:
    """Shard URLs from ``data.shards``: brace patterns, globs, comma or ``::`` lists, or a manifest.json.

    Local paths must exist (the error names the missing one); a manifest may be local or at an fsspec URL
    (read with ``policy``); other URLs are kept as they are once fsspec has a backend for their protocol, except
    ``pipe:`` URLs (a shell command, from the spec or a manifest), refused unless ``allow_pipe``. Counts come
    from a manifest (the given one, or ``manifest.json`` beside local shards). Raises :class:`ShardsError`.
    """
    if not spec:
        raise ShardsError("data.shards is empty; set it to the brace pattern in the manifest.json of "
                          "tools/make_shards.py, or to that manifest.json")
    urls: list[str] = []
    counts: list[Optional[int]] = []
    manifests: dict[str, dict[str, Optional[int]]] = {}  # folder -> counts of its manifest, read once
    for part in (p.strip() for chunk in spec.split("::") for p in _split_top_level_commas(chunk)):
        if not part:
            continue
        if part.endswith(".json") and not part.startswith(PIPE_PREFIX):
            _check_backend(part, spec)
            listed = read_manifest(part, policy)
            urls += listed.urls
            counts += listed.counts
            continue
        for url in wds.shardlists.expand_urls(part):
            if is_remote(url) and "*" in url and not url.startswith(PIPE_PREFIX):
                raise ShardsError(f"data.shards: {url} is a glob of remote shards, which is not expanded; write a "
                                  "brace pattern (shard-{000000..000999}.tar) or give the manifest.json URL")
            if is_remote(url):
                matches = [url]
            elif any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ShardsError(f"data.shards: the glob {url} matches no file")
            elif not os.path.exists(url):
                raise ShardsError(f"data.shards: shard {url} does not exist; check the pattern or run "
                                  "tools/make_shards.py")
            else:
                matches = [url]
            urls += matches
            counts += [_count_beside(m, manifests) for m in matches]
    if not urls:
        raise ShardsError(f"data.shards={spec!r} names no shards")
    piped = next((u for u in urls if u.startswith(PIPE_PREFIX)), None)
    if piped is not None and not allow_pipe:
        raise ShardsError(f"data.shards: the shard URL {piped!r} (from {spec!r}) runs a shell command; set "
                          "data.allow_pipe=true only if you trust whoever wrote it, or give a local path or an "
                          "fsspec URL (s3://, gs://, https://, ...)")
    first_of_protocol: dict[str, str] = {}
    for url in (u for u in urls if is_remote(u) and not u.startswith(PIPE_PREFIX)):
        first_of_protocol.setdefault(url.split("://", 1)[0], url)
    for url in first_of_protocol.values():
        _check_backend(url, spec)
    return ShardList(tuple(urls), tuple(counts))


def _check_backend(url: str, spec: str) -> None:
    """Refuse a URL that no installed fsspec backend opens, before any reader meets it as 0-sample shards."""
    if is_remote(url) and not url.startswith(PIPE_PREFIX):
        why = backend_error(url)
        if why is not None:
            raise ShardsError(f"data.shards: cannot open {url} (from {spec!r}): {why}; install the package it "
                              "names (gcsfs for gs://), or give a local path or another URL")


def _count_beside(url: str, manifests: dict[str, dict[str, Optional[int]]]) -> Optional[int]:
    """The sample count of a local shard from the manifest.json in its folder, if there is one."""
    if is_remote(url):
        return None
    folder = os.path.dirname(os.path.abspath(url))
    if folder not in manifests:
        manifest = os.path.join(folder, "manifest.json")
        try:
            listed = read_manifest(manifest) if os.path.exists(manifest) else ShardList((), ())
        except ValueError:
            listed = ShardList((), ())
        manifests[folder] = dict(zip(listed.urls, listed.counts))
    return manifests[folder].get(os.path.abspath(url))
