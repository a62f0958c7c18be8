"""textdiff.malloc: the CPU process keeps what it frees, so the next step's buffers take no page faults."""

import json
import os
import subprocess
import sys

import pytest

from textdiff.malloc import USER_SETTINGS, keep_freed_memory, user_chose_allocator

MIB = 2 ** 20
# A round allocates and touches 8 blocks of 16 MiB, as a step allocates its activations, then frees them
# all. By default glibc then trims the 128 MiB of free heap top (its trim threshold is twice the largest
# block it mmap-ed: 32 MiB), and the next round's first touches fault again: 32,768 faults with 4 KiB
# pages, and at least 63 even where transparent huge pages back the heap (2 MiB each, less the ends).
BLOCKS, BLOCK = 8, 16 * MIB
FEWEST_FAULTS_RETURNED = 63
MOST_FAULTS_KEPT = 8  # a reused block is mapped already; this leaves room for the interpreter's own pages

PROBE = """
import json, resource, sys
import torch
from textdiff.malloc import keep_freed_memory
kept = keep_freed_memory(json.loads(sys.argv[1]))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(int(sys.argv[3]) // 4) for _ in range(int(sys.argv[2]))]  # allocated and touched
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(environ: dict) -> dict:
    """In a fresh process whose environment is this one's without malloc settings, plus ``environ`` (so
    glibc reads it too): keep_freed_memory(environ), then six rounds of allocate, touch, free; the page
    faults of each round."""
    own = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(environ), str(BLOCKS), str(BLOCK)],
                         env={**own, **environ}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage page faults")
def test_a_freed_block_is_reused_without_page_faults():
    result = probe({})
    assert result["kept"] is True
    assert result["faults"][0] >= FEWEST_FAULTS_RETURNED  # the first touches map the heap in
    # the next rounds' blocks need not fit the holes the first one's left (a 64-byte aligned block takes a
    # few bytes more than the chunk it freed); by the fourth, malloc has holes for all of them
    assert max(result["faults"][3:]) <= MOST_FAULTS_KEPT, result


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage page faults")
def test_the_users_own_malloc_settings_are_left_alone():
    """With MALLOC_TRIM_THRESHOLD_=128 KiB in the process's environment, malloc stays as the user set it:
    glibc then fixes its thresholds (no dynamic raise after a free), so 16 MiB blocks are mmap-ed and
    unmapped every round and each round takes its faults, which is what textdiff's setting saves. (glibc's
    plain default is no fixed point to test against: its thresholds rise after the first frees, and whether
    the heap top is trimmed then depends on where the interpreter's small objects land: a CI machine kept
    the blocks from the fourth round on.)"""
    result = probe({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert result["kept"] is False
    assert min(result["faults"][3:]) >= FEWEST_FAULTS_RETURNED, result


@pytest.mark.parametrize("environ, chose", [
    ({}, False),
    ({"LD_PRELOAD": "/opt/lib/libprofiler.so"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
])
def test_user_chose_allocator(environ, chose):
    assert user_chose_allocator(environ) is chose


def test_keep_freed_memory_declines_when_the_user_chose():
    assert keep_freed_memory({"LD_PRELOAD": "libjemalloc.so"}) is False
