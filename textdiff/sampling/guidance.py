"""Classifier-free guidance with separate scales for the transcription and the caption.

With ``e(txt, capt)`` the model's eps under a conditioning (``null`` = dropped), scales ``s_t`` and ``s_c``:

    eps = e(null, null) + s_t (e(txt, null) - e(null, null)) + s_c (e(txt, capt) - e(txt, null))
        = (1 - s_t) e(null, null) + (s_t - s_c) e(txt, null) + s_c e(txt, capt)

so ``s_t = s_c = 1`` is the plain conditional output. (The seed's ``guidance_scale`` g is ``s = 1 + g``.)
Branches whose weight is zero are not evaluated; the rest run as one batched forward, their cond dicts
concatenated along dim 0. With a learned variance only the eps half is guided; the variance half comes
from the least conditioned branch evaluated, as the research code takes it from its unconditional branch
(the null branch whenever the transcription is guided; without any guidance, the conditional output). :func:`guidance_after_step` applies guidance only below a step,
as the research code's ``guidance_after_step``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from textdiff.diffusion.schedules import per_row

Cond = dict[str, torch.Tensor]


def guidance_weights(scale_txt: float, scale_capt: float) -> tuple[float, float, float]:
    """Weights of ``(e(null, null), e(txt, null), e(txt, capt))``; they sum to 1."""
    return 1.0 - scale_txt, scale_txt - scale_capt, scale_capt


def concat_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate cond dicts along dim 0 (every value is batch-first, as ``prepare_cond`` promises)."""
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"guidance cond dicts have different keys: {sorted(keys)} vs {sorted(c)}; build them "
                             "all with the same model.prepare_cond arguments")
    out = {}
    for key in conds[0]:
        if not all(isinstance(c[key], torch.Tensor) for c in conds):
            raise ValueError(f"cond[{key!r}] is not a tensor; prepare_cond must return batch-first tensors only")
        out[key] = torch.cat([c[key] for c in conds], dim=0)
    return out


def guidance_conds(prepare_cond: Callable[..., Cond], txt: list[Optional[str]], capt: Optional[list[Optional[str]]],
                   **extra) -> tuple[Cond, Optional[Cond], Cond]:
    """Cond dicts ``(txt + capt, txt only, null)`` from strings via ``model.prepare_cond``.

    ``capt=None`` means the model has no caption conditioning: the middle dict is then ``None``. ``extra``
    (``low_res``, ``noise_cond_t``) is passed to every call, so all branches see the same low-res image.
    """
    nulls = [None] * len(txt)
    if capt is None:
        return prepare_cond(txt, nulls, **extra), None, prepare_cond(nulls, nulls, **extra)
    return (prepare_cond(txt, capt, **extra), prepare_cond(txt, nulls, **extra),
            prepare_cond(nulls, nulls, **extra))


def guided_model(model: Callable[..., torch.Tensor], cond: Cond, cond_txt_only: Optional[Cond], cond_null: Cond,
                 scale_txt: float, scale_capt: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(x, t)`` returning the guided output of ``model(x, t, **cond)``, ``[N, C or 2C, ...]``.

    ``cond``: full conditioning; ``cond_txt_only``: transcription with the null caption (``None`` when the
    model has no caption conditioning, then ``scale_capt`` is ignored); ``cond_null``: both dropped.
    """
    # without caption conditioning the caption scale is the transcription's, so the txt-only branch weighs 0
    w_null, w_txt, w_full = guidance_weights(scale_txt, scale_txt if cond_txt_only is None else scale_capt)
    branches = [(w, c) for w, c in ((w_null, cond_null), (w_txt, cond_txt_only), (w_full, cond)) if w != 0.0]
    batched = concat_conds([c for _, c in branches])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, channels = x.shape[0], x.shape[1]
        k = len(branches)
        out = model(torch.cat([x] * k), torch.cat([t] * k), **batched).split(n)
        eps = sum(w * o[:, :channels] for (w, _), o in zip(branches, out))
        return torch.cat([eps, out[0][:, channels:]], dim=1)
    return fn


def guidance_after_step(guided: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        plain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        after_step: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(x, t)``: ``guided(x, t)`` for the rows whose step ``t`` ``[N]`` is below ``after_step``, ``plain(x, t)``
    (the unguided conditional output) for the rest, ``[N, C or 2C, ...]``: guidance starts only once sampling
    has come down past ``after_step`` (the research code's ``guidance_after_step``). Each branch is evaluated
    only when some row needs it (the samplers give every row the same step)."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        use = t < after_step  # t is on the host (the samplers keep it there): deciding waits for nothing
        if bool(use.all()):
            return guided(x, t)
        if not bool(use.any()):
            return plain(x, t)
        use = per_row(use.to(x.device, non_blocking=True), x)
        return torch.where(use, guided(x, t), plain(x, t))
    return fn
