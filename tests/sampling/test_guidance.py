"""Specification of textdiff.sampling.guidance against a stand-in model(x, t, **cond)."""

import pytest
import torch

from textdiff.sampling.guidance import concat_conds, guidance_after_step, guidance_conds, guided_model


class Recorder:
    """eps = x + txt + 10 capt (per sample), variance half = txt - capt; records each forward's batch size."""

    def __init__(self, learn_sigma=False):
        self.batches = []
        self.learn_sigma = learn_sigma

    def __call__(self, x, t, txt, capt):
        self.batches.append(x.shape[0])
        eps = x + txt[:, None] + 10 * capt[:, None] + 0 * t[:, None]
        return torch.cat([eps, (txt - capt)[:, None].expand_as(x)], dim=1) if self.learn_sigma else eps


def _conds(n=2):
    full = {"txt": torch.full((n,), 1.0), "capt": torch.full((n,), 2.0)}
    txt_only = {"txt": torch.full((n,), 1.0), "capt": torch.zeros(n)}
    null = {"txt": torch.zeros(n), "capt": torch.zeros(n)}
    return full, txt_only, null


X, T = torch.zeros(2, 3), torch.tensor([5.0, 5.0])


def test_scale_1_and_1_is_the_conditional_output_in_one_forward_of_n():
    model = Recorder()
    full, txt_only, null = _conds()
    out = guided_model(model, full, txt_only, null, 1.0, 1.0)(X, T)
    assert torch.equal(out, model(X, T, **full))
    assert model.batches[0] == 2


def test_separate_scales_compose_as_documented_in_one_batched_forward():
    model = Recorder()
    full, txt_only, null = _conds()
    out = guided_model(model, full, txt_only, null, 3.0, 2.0)(X, T)
    # e(null) = 0, e(txt) = 1, e(txt, capt) = 21: 0 + 3 (1 - 0) + 2 (21 - 1) = 43
    assert torch.allclose(out, torch.full((2, 3), 43.0))
    assert model.batches == [6]


def test_caption_free_models_guide_the_transcription_only():
    model = Recorder()
    full, _, null = _conds()
    out = guided_model(model, full, None, null, 2.0, 5.0)(X, T)
    assert torch.allclose(out, torch.full((2, 3), 42.0))  # 0 + 2 (21 - 0)
    assert model.batches == [4]


def test_learned_variance_is_not_guided_and_comes_from_the_least_conditioned_branch():
    model = Recorder(learn_sigma=True)
    full, txt_only, null = _conds()
    out = guided_model(model, full, txt_only, null, 3.0, 2.0)(X, T)
    assert torch.allclose(out[:, :3], torch.full((2, 3), 43.0))
    assert torch.equal(out[:, 3:], torch.zeros(2, 3))  # the null branch's (the research code's): txt - capt = 0 - 0
    caption_only = guided_model(model, full, txt_only, null, 1.0, 2.0)(X, T)  # null branch weighs 0: not run
    assert torch.equal(caption_only[:, 3:], torch.ones(2, 3))  # the txt-only branch's: 1 - 0
    unguided = guided_model(model, full, txt_only, null, 1.0, 1.0)(X, T)
    assert torch.equal(unguided[:, 3:], torch.full((2, 3), -1.0))  # the conditional output's: 1 - 2


def test_guidance_conds_drop_with_none():
    seen = []

    def prepare_cond(txt, capt, **extra):
        seen.append((txt, capt, extra))
        return {"n": torch.zeros(len(txt))}

    guidance_conds(prepare_cond, ["hi", "yo"], ["a cat", ""], low_res=1)
    assert seen == [(["hi", "yo"], ["a cat", ""], {"low_res": 1}), (["hi", "yo"], [None, None], {"low_res": 1}),
                    ([None, None], [None, None], {"low_res": 1})]


def test_cond_dicts_with_different_keys_are_refused():
    with pytest.raises(ValueError, match="prepare_cond"):
        concat_conds([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "prk", "plms", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"])
def test_every_sampler_samples_the_guided_combination(name):
    """A sampler given the guided wrapper runs exactly as on the combined eps, at every one of its model calls
    (fractional PRK midpoints and multistep histories included); scales 1, 1 are the conditional model."""
    from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas
    from textdiff.sampling.samplers import sample, sampling_timesteps

    abar = alphas_cumprod(cosine_betas(1000))
    ts = sampling_timesteps(1000, "karras6", abar)
    model = Recorder()
    full, txt_only, null = _conds()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full, txt_only, null = ({k: v.double() for k, v in c.items()} for c in (full, txt_only, null))

    def combined(x_, t_):
        e_null, e_txt, e_full = (model(x_, t_, **c) for c in (null, txt_only, full))
        return e_null + 3.0 * (e_txt - e_null) + 2.0 * (e_full - e_txt)

    def run(fn):
        return sample(name, fn, x, abar, ts, generator=torch.Generator().manual_seed(1), disable=True)

    assert torch.allclose(run(guided_model(model, full, txt_only, null, 3.0, 2.0)), run(combined), atol=1e-12)
    assert torch.allclose(run(guided_model(model, full, txt_only, null, 1.0, 1.0)),
                          run(lambda x_, t_: model(x_, t_, **full)), atol=1e-12)


def test_guidance_after_step_guides_only_the_rows_below_the_step():
    calls = []

    def branch(value):
        def fn(x, t):
            calls.append(value)
            return torch.full_like(x, value)
        return fn

    fn = guidance_after_step(branch(3.0), branch(1.0), after_step=500)
    x = torch.zeros(2, 1, 2, 2)
    out = fn(x, torch.tensor([900.0, 400.0]))
    assert out[:, 0, 0, 0].tolist() == [1.0, 3.0]  # 900 >= 500: unguided; 400 < 500: guided
    calls.clear()
    assert fn(x, torch.tensor([500.0, 500.0])).unique().tolist() == [1.0] and calls == [1.0]  # the guided one unrun
    calls.clear()
    assert fn(x, torch.tensor([499.0, 0.0])).unique().tolist() == [3.0] and calls == [3.0]
