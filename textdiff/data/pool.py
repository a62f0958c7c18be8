"""Work over many images in a pool of processes, with a progress bar: what sharding, scene rendering and
annotation share."""

from __future__ import annotations

import multiprocessing
import sys
from typing import Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm


def pool_map(fn: Callable, items: Sequence, workers: int, desc: str, progress: bool, unit: str = "img",
             ordered: bool = True) -> Iterator:
    """``fn`` over ``items`` in a pool of ``workers`` processes (0: in this process), with tqdm; the results in
    the order of ``items`` (``ordered``), else as they finish. A picklable ``fn`` (a module-level function or
    a ``functools.partial`` of one) is needed with workers; workers are forked where the platform allows, so
    they inherit what the parent loaded (models, decoded assets)."""
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)
    if workers <= 0:
        results: Iterable = map(fn, items)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
        chunk = max(1, min(64, len(items) // (workers * 8)))
        results = pool.imap(fn, items, chunksize=chunk) if ordered else pool.imap_unordered(fn, items, chunk)
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
