"""Conditioning dropout rates and the null conditions used by classifier-free guidance."""

import math

import pytest
import torch

from textdiff.config import ModelConfig
from textdiff.models import cond_dropout
from textdiff.models.conditioning import dropout_masks

N = 20000


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_dropout_rates_hit_their_probabilities():
    cfg = ModelConfig(txt=True, txt_resolutions=(8,), using_capt=True, txt_pdrop=0.1, capt_pdrop=0.2, all_pdrop=0.3)
    drop_txt, drop_capt = dropout_masks(N, cfg, torch.Generator().manual_seed(0))
    # txt dropped alone or with all: 1 - 0.9 * 0.7 = 0.37; capt: 1 - 0.8 * 0.7 = 0.44; both: 0.3 + 0.7*0.1*0.2
    assert within_binomial(int(drop_txt.sum()), N, 0.37)
    assert within_binomial(int(drop_capt.sum()), N, 0.44)
    assert within_binomial(int((drop_txt & drop_capt).sum()), N, 0.314)


def test_cond_dropout_replaces_dropped_entries_by_none():
    cfg = ModelConfig(txt=True, txt_resolutions=(8,), using_capt=True, all_pdrop=0.5)
    txt, capt = cond_dropout(["a"] * 1000, ["c"] * 1000, cfg, torch.Generator().manual_seed(1))
    assert set(txt) == {"a", None} and [t is None for t in txt] == [c is None for c in capt]
    assert within_binomial(txt.count(None), 1000, 0.5)


@pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, 64)])
def test_dropout_extremes_drop_nothing_or_everything(p, expected):
    cfg = ModelConfig(txt=True, txt_resolutions=(8,), txt_pdrop=p)
    txt, capt = cond_dropout([""] * 64, [""] * 64, cfg, torch.Generator().manual_seed(2))
    assert txt.count(None) == expected and capt.count(None) == 0


def test_cond_dropout_is_reproducible_with_a_seeded_generator():
    cfg = ModelConfig(txt=True, txt_resolutions=(8,), txt_pdrop=0.5)
    runs = [cond_dropout(list("abcdefgh"), [""] * 8, cfg, torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert runs[0] == runs[1]


def test_null_transcription_gives_a_different_output_than_empty_string(tiny):
    model = tiny.model(tiny.cfg(txt=True))
    x, t = tiny.inputs(n=1)
    with torch.no_grad():
        null, empty = (model(x, t, **model.prepare_cond(txt, None)) for txt in ([None], [""]))
    assert (null - empty).abs().max() > 1e-3


def test_empty_null_transcription_skips_the_text_blocks(tiny):
    model = tiny.model(tiny.cfg(txt=True, weave_attn=True, txt_null="empty"))
    x, t = tiny.inputs(n=1)
    cond = model.prepare_cond([None], None)
    assert not cond["txt_mask"].any()
    with torch.no_grad():
        out = model(x, t, **cond)
        for block in model.modules():
            if type(block).__name__ == "TextCrossAttnBlock":
                block.forward = lambda h, *args: h
        without_text_blocks = model(x, t, **cond)
    assert torch.allclose(out, without_text_blocks, atol=1e-6)


def test_null_conds_for_guidance_concatenate_with_real_ones(tiny):
    model = tiny.model(tiny.cfg(txt=True, using_capt=True))
    x, t = tiny.inputs()
    cond = model.prepare_cond(["ab", "c"], ["a sign", ""])
    null = model.prepare_cond([None, None], [None, None])
    assert all(v.shape[0] == 2 for v in null.values()) and null.keys() == cond.keys()
    both = {k: torch.cat([cond[k], null[k]]) for k in cond}
    with torch.no_grad():
        batched = model(torch.cat([x, x]), torch.cat([t, t]), **both)
        separate = torch.cat([model(x, t, **cond), model(x, t, **null)])
    assert torch.allclose(batched, separate, atol=1e-5)
