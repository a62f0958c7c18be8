"""Sampling never waits for the device: the meta device stands in for an accelerator.

A meta tensor has no data, so any read of a device value on the host (``.item()``, ``bool()``, ``.cpu()``,
``.tolist()``) raises; and every copy from the host to the device is seen by a dispatch mode
(``WaitingCopies`` in tests/conftest.py), so a copy that
waits for the device (``non_blocking=False``; on CUDA it synchronises the stream) is counted. Both must not
happen per step: the counts of waiting copies are the same for 2 steps and for 5.
"""

import copy
import dataclasses

import pytest
import torch

from textdiff.sampling.cascade import StageSettings, sample_stage
from textdiff.sampling.loading import load_for_sampling
from textdiff.sampling.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")


def on_meta(loaded):
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to("meta"))


@pytest.fixture(scope="module")
def base_meta(runs):
    return on_meta(load_for_sampling(runs.base, "raw"))


@pytest.fixture(scope="module")
def up_nc_meta(runs):
    return on_meta(load_for_sampling(runs.up_nc, "raw"))


def waiting_copies(mode_class, loaded, settings, low_res=None):
    mode = mode_class()
    with mode:
        out = sample_stage(loaded, settings, ["ab", "cd"], ["", ""], [0, 1], low_res=low_res, progress=False)
    assert out.device.type == "meta" and out.shape[0] == 2
    return mode.count


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_no_sampler_step_reads_the_device_or_waits_to_copy_to_it(base_meta, sampler, waiting_copies_mode):
    extra = {"eta": 1.0} if sampler == "ddim" else {}  # eta > 0: fresh noise every step
    settings = [StageSettings(sampler=sampler, steps=str(n), guidance_txt=3.0, clip_denoised=True, **extra)
                for n in (2, 5)]
    counts = [waiting_copies(waiting_copies_mode, base_meta, s) for s in settings]
    assert counts[0] == counts[1], counts


def test_guidance_after_step_and_dynamic_thresholding_add_no_wait_per_step(base_meta, waiting_copies_mode):
    settings = [StageSettings(sampler="ddpm", steps=str(n), guidance_txt=3.0, guidance_after_step=500,
                              dynamic_threshold=0.99) for n in (2, 5)]
    counts = [waiting_copies(waiting_copies_mode, base_meta, s) for s in settings]
    assert counts[0] == counts[1], counts


def test_a_noise_conditioned_upsampler_step_adds_no_wait(up_nc_meta, waiting_copies_mode):
    low_res = torch.zeros(2, 3, 16, 16, device="meta")
    settings = [StageSettings(sampler="ddim", steps=str(n), noise_cond_level=100) for n in (2, 5)]
    counts = [waiting_copies(waiting_copies_mode, up_nc_meta, s, low_res) for s in settings]
    assert counts[0] == counts[1], counts
