"""The cascade: stage sizes checked before work, upsampled sizes, seeds, guidance at scale 1, noise levels."""

import copy
import dataclasses

import pytest
import torch

from textdiff.diffusion import build_diffusion
from textdiff.diffusion.schedules import alpha_bar_at
from textdiff.sampling.cascade import (CascadeError, StageSettings, check_cascade, per_sample_noise, run_cascade,
                                       sample_stage)
from textdiff.sampling.loading import LoadedModel, load_for_sampling
from textdiff.sampling.samplers import sample, sampling_timesteps
from textdiff.sampling.thresholding import clipping

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = StageSettings(sampler="ddim", steps="3")


@pytest.fixture(scope="module")
def base(runs):
    return load_for_sampling(runs.base, "raw")


@pytest.fixture(scope="module")
def up(runs):
    return load_for_sampling(runs.up, "raw")


def test_the_cascade_upsamples_the_base_models_images_to_the_upsamplers_size(base, up):
    images = run_cascade([base, up], [FAST, FAST], ["ab", ""], ["", ""], [0, 1], progress=False)
    assert [tuple(x.shape) for x in images] == [(2, 3, 16, 16), (2, 3, 32, 32)]
    # stage 1 is the upsampler run on stage 0's images: the same call by hand gives the same pixels ...
    alone = sample_stage(up, FAST, ["ab", ""], ["", ""], [0, 1], stage=1, low_res=images[0], progress=False)
    assert torch.equal(alone, images[1])
    # ... and those images matter: the negated low-res input moves each sample by about 1.2 (max |diff|)
    other = sample_stage(up, FAST, ["ab", ""], ["", ""], [0, 1], stage=1, low_res=-images[0], progress=False)
    assert (other - images[1]).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_an_upsampler_for_other_sizes_is_an_error_before_any_work(runs):
    cfgs = [runs.base_cfg.model, runs.up_from8_cfg.model]
    with pytest.raises(CascadeError, match=r"up_from8 upsamples 8 px images .* stage 0 \(base\) makes 16 px"):
        check_cascade(cfgs, ["base", "up_from8"], [FAST, FAST])


def test_an_upsampler_as_first_stage_is_an_error(runs):
    with pytest.raises(CascadeError, match="first stage must be a base model"):
        check_cascade([runs.up_cfg.model], ["up"], [FAST])


def test_a_noise_level_for_an_upsampler_without_noise_conditioning_is_an_error(runs):
    with pytest.raises(CascadeError, match="--noise-cond-level 100 needs a noise-conditioned upsampler"):
        check_cascade([runs.base_cfg.model, runs.up_cfg.model], ["base", "up"],
                      [FAST, StageSettings(steps="3", noise_cond_level=100)])


def test_unknown_sampler_eta_without_ddim_and_bad_steps_are_named(base):
    abar = base.diffusion.alphas_cumprod
    with pytest.raises(CascadeError, match="sampler 'euler' is unknown; choose one of ddpm, ddim"):
        StageSettings(sampler="euler").check("base", abar)
    with pytest.raises(CascadeError, match="eta 0.5 only applies to the ddim sampler, not plms"):
        StageSettings(sampler="plms", eta=0.5).check("base", abar)
    with pytest.raises(CascadeError, match="base: steps '200'"):
        StageSettings(steps="200").check("base", abar)
    StageSettings(sampler="plms", steps="logsnr20").check("base", abar)


def test_same_seeds_give_the_same_images_and_other_seeds_others(base):
    a = sample_stage(base, FAST, ["ab", "cd"], ["", ""], [7, 8], progress=False)
    b = sample_stage(base, FAST, ["ab", "cd"], ["", ""], [7, 8], progress=False)
    c = sample_stage(base, FAST, ["ab", "cd"], ["", ""], [9, 8], progress=False)
    assert torch.equal(a, b)
    assert float((a[0] - c[0]).abs().max()) > 0.1
    assert torch.equal(a[1], c[1])


def _in_fp64(loaded: LoadedModel) -> LoadedModel:
    """The same weights computing in float64 (the model casts its float32 inputs; network_fn rounds its
    outputs back to float32, so the sampler's own arithmetic is unchanged)."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).double())


def _row_vs_alone(loaded: LoadedModel, settings: StageSettings) -> float:
    """Max |difference| of sample "cd" (seed 2) drawn in a batch of three and drawn alone."""
    together = sample_stage(loaded, settings, ["ab", "cd", ""], ["", "", ""], [1, 2, 3], progress=False)
    alone = sample_stage(loaded, settings, ["cd"], [""], [2], progress=False)
    return float((together[1] - alone[0]).abs().max())


# Batch invariance by design: per-sample start noise and per-row sampler generators are exact, and nothing
# mixes rows. What is left is the network's arithmetic: CPU conv/matmul kernels pick their blocking (the
# order of each sum) by batch size, so in float32 a row's outputs move by rounding, about 2**-24 relative per
# reordered sum, and the 3-step chain amplifies that (6e-5 seen on an AMD EPYC, 1e-6 on Intel). In float64
# the same reordering is 2**-53 relative, 5e8x smaller; after network_fn rounds the outputs to float32 the
# rows agree but for a rare 1-ulp flip (1.2e-7 at |x| < 1), which the chain cannot lift past 1e-5.
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batch_composition_does_not_change_a_sample(base, sampler):
    assert _row_vs_alone(_in_fp64(base), StageSettings(sampler=sampler, steps="3")) < 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_in_float32_batch_composition_moves_a_sample_only_by_rounding(base, sampler):
    """The float32 batch-vs-alone difference is the same kind of error as float32's own rounding of this
    chain (float32 vs float64 network): |e_batch - e_alone| <= |e_batch| + |e_alone|, about 2x the rounding
    of one run (0.85-1.0x measured on an AMD EPYC); 8x leaves margin for another CPU's kernels."""
    settings = StageSettings(sampler=sampler, steps="3")
    rounding = float((sample_stage(base, settings, ["cd"], [""], [2], progress=False)
                      - sample_stage(_in_fp64(base), settings, ["cd"], [""], [2], progress=False)).abs().max())
    assert 0.0 < rounding < 1e-3
    assert _row_vs_alone(base, settings) <= 8 * rounding


def test_guidance_scale_one_equals_the_conditional_model(base):
    settings = StageSettings(sampler="ddim", steps="3", guidance_txt=1.0, clip_denoised=False)
    guided = sample_stage(base, settings, ["ab", "cd"], ["", ""], [4, 5], progress=False)
    cond = base.model.prepare_cond(["ab", "cd"], None)
    plain = sample("ddim", base.diffusion.sampling_fn(lambda x, t: base.model(x, t, **cond)),
                   per_sample_noise([4, 5], (3, 16, 16), 0), base.diffusion.alphas_cumprod,
                   sampling_timesteps(base.diffusion.num_timesteps, "3"), disable=True).clamp(-1, 1)
    assert float((guided - plain).abs().max()) < 1e-5
    stronger = sample_stage(base, StageSettings(sampler="ddim", steps="3", guidance_txt=4.0, clip_denoised=False),
                            ["ab", "cd"], ["", ""], [4, 5], progress=False)
    assert float((stronger - plain).abs().max()) > 1e-3


def test_guidance_after_step_switches_guidance_on_below_the_step(base):
    kw = dict(sampler="ddim", steps="3", clip_denoised=False)
    prompts = (["ab", "cd"], ["", ""], [4, 5])
    plain = sample_stage(base, StageSettings(**kw), *prompts, progress=False)
    guided = sample_stage(base, StageSettings(**kw, guidance_txt=4.0), *prompts, progress=False)
    never = sample_stage(base, StageSettings(**kw, guidance_txt=4.0, guidance_after_step=0), *prompts, progress=False)
    always = sample_stage(base, StageSettings(**kw, guidance_txt=4.0, guidance_after_step=100), *prompts,
                          progress=False)
    late = sample_stage(base, StageSettings(**kw, guidance_txt=4.0, guidance_after_step=50), *prompts, progress=False)
    assert torch.equal(never, plain) and torch.equal(always, guided)  # steps of a 100-step process: 0..99
    assert float((late - plain).abs().max()) > 1e-3 and float((late - guided).abs().max()) > 1e-3


def test_the_noise_level_changes_a_noise_conditioned_upsampler(runs, base):
    up_nc = load_for_sampling(runs.up_nc, "raw")
    low = sample_stage(base, FAST, ["ab"], [""], [3], progress=False)
    clean = sample_stage(up_nc, FAST, ["ab"], [""], [3], stage=1, low_res=low, progress=False)
    noisy = sample_stage(up_nc, StageSettings(steps="3", noise_cond_level=300), ["ab"], [""], [3], stage=1,
                         low_res=low, progress=False)
    assert clean.shape == (1, 3, 32, 32)
    assert float((clean - noisy).abs().max()) > 1e-3


def test_random_streams_of_neighbouring_seeds_do_not_repeat_each_other():
    start = per_sample_noise([5, 6], (3, 4, 4), 0)
    sampler = per_sample_noise([5, 6], (3, 4, 4), 0, "sampler")
    assert torch.equal(start[0], torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(sampler[0], start[1])
    assert float((per_sample_noise([5], (3, 4, 4), 1)[0] - start[0]).abs().max()) > 0.5


def _recording(fn, calls: list):
    def wrapped(x, t):
        out = fn(x, t)
        calls.append((x, t, out))
        return out
    return wrapped


def _implied_x0(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The x_0 a sampler reads from the eps it is given, in float64: (x - sqrt(1 - abar) eps) / sqrt(abar)."""
    a = alpha_bar_at(abar, t).double().reshape(-1, 1, 1, 1)
    return (x.double() - (1 - a).sqrt() * eps[:, :x.shape[1]].double()) / a.sqrt()


def test_with_clip_denoised_every_x0_the_sampler_reads_lies_in_the_unit_range(base):
    """clip_denoised (on by default) clips the x_0 the model implies before the sampler reads it, at every
    step, so whatever an eps model predicts, DDIM's last step (onto abar = 1, where x = x_0) lands in [-1, 1].
    Shown on an untrained eps model, whose x_0 estimates run far outside the range unclipped. The only slack is
    float32 rounding of the eps <-> x_0 round trip, which 1/sqrt(abar) amplifies: a few ulps of
    (|x| + 1) / sqrt(abar), bounded below with 8 ulps."""
    diffusion_cfg = dataclasses.replace(base.cfg.diffusion, predict_xstart=False)
    diffusion = build_diffusion(diffusion_cfg, learn_sigma=True)
    eps_model = LoadedModel(base.model, diffusion, dataclasses.replace(base.cfg, diffusion=diffusion_cfg), "eps",
                            "raw")
    abar = diffusion.alphas_cumprod
    cond = base.model.prepare_cond(["ab", "cd"], None)
    raw = diffusion.sampling_fn(lambda x, t: base.model(x, t, **cond))
    timesteps = sampling_timesteps(diffusion.num_timesteps, "3")
    x_start = per_sample_noise([1, 2], (3, 16, 16), 0)
    unclipped_calls, clipped_calls = [], []
    with torch.no_grad():
        sample("ddim", _recording(raw, unclipped_calls), x_start, abar, timesteps, disable=True)
        clipped = sample("ddim", _recording(clipping(raw, abar), clipped_calls), x_start, abar, timesteps,
                         disable=True)
    # without clipping, the first estimate is the model's error over sqrt(abar) at the top of the schedule
    first = _implied_x0(*unclipped_calls[0], abar)
    assert float(first.abs().amax()) > 10 and float((first.abs() > 1).float().mean()) > 0.5
    assert len(clipped_calls) == 3
    for x, t, eps in clipped_calls:
        slack = 8 * 2.0 ** -24 * (float(x.abs().amax()) + 1) / float(alpha_bar_at(abar, t).min().sqrt())
        assert float(_implied_x0(x, t, eps, abar).abs().amax()) <= 1 + slack
    assert float(clipped.abs().amax()) <= 1 + slack
    # and it is what sample_stage does by default, for the same prompts and seeds
    with torch.no_grad():
        staged = sample_stage(eps_model, StageSettings(sampler="ddim", steps="3"), ["ab", "cd"], ["", ""], [1, 2],
                              progress=False)
    assert torch.equal(staged, clipped.clamp(-1, 1))
