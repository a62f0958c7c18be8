"""Conditioning dropout for classifier-free guidance.

A dropped transcription becomes ``None`` (the null transcription, distinct from ``""`` = "this image has no
text"); a dropped caption becomes ``None`` too, which the model turns into its null caption as
``model.capt_null`` says: the seed's fixed stand-in caption "unknown" through CLIP (``"placeholder"``), a learned
token (``"learned"``), or nothing (``"empty"``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from textdiff.config import ModelConfig


def dropout_masks(n: int, cfg: ModelConfig, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_txt [n] bool, drop_capt [n] bool): each sample drops its transcription with probability
    txt_pdrop, its caption with capt_pdrop, and both with all_pdrop, all independently."""
    u = torch.rand(n, 3, generator=generator)
    drop_all = u[:, 2] < cfg.all_pdrop
    return (u[:, 0] < cfg.txt_pdrop) | drop_all, (u[:, 1] < cfg.capt_pdrop) | drop_all


def cond_dropout(txt: Sequence[Optional[str]], capt: Sequence[Optional[str]], cfg: ModelConfig,
                 generator: Optional[torch.Generator] = None) -> tuple[list, list]:
    """Apply ``model.txt_pdrop``, ``capt_pdrop`` and ``all_pdrop`` to a batch of strings.

    txt, capt: N strings each. Returns new lists where dropped entries are ``None``.
    """
    if len(txt) != len(capt):
        raise ValueError(f"cond_dropout got {len(txt)} transcriptions but {len(capt)} captions; pass one each")
    drop_txt, drop_capt = dropout_masks(len(txt), cfg, generator)
    return ([None if d else s for s, d in zip(txt, drop_txt.tolist())],
            [None if d else s for s, d in zip(capt, drop_capt.tolist())])
