"""Transcription conditioning, first half: a character tokenizer and a transformer encoder.

The encoder is trained end to end with the U-net. With ``txt_t5`` its self-attention gets a T5-style
bucketed relative position bias (32 buckets, max distance 128, bidirectional), one table shared by all
layers, on top of a learned absolute position embedding.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from textdiff.models.blocks import attention, timestep_embedding

PAD_ID, UNKNOWN_ID, NULL_ID, START_ID = 0, 1, 2, 3
# Fixed alphabet so token ids never change between runs: newline, printable ASCII, Latin-1, common typography.
ALPHABET = ("\n" + "".join(map(chr, range(32, 127))) + "".join(map(chr, range(160, 256)))
            + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u2022\u20ac\u2122")
T5_NUM_BUCKETS, T5_MAX_DISTANCE = 32, 128


class CharTokenizer:
    """Characters -> ids. ``None`` (the null, dropped transcription) -> [NULL]; ``""`` -> [START].

    Every other string becomes [START, c1, c2, ...] after NFC normalisation; characters outside
    :data:`ALPHABET` map to ``UNKNOWN_ID``. Sequences longer than ``max_seq_len`` tokens are cut, counted
    in ``num_truncated`` and reported with a warning.
    """

    def __init__(self, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self.char_to_id = {c: i + START_ID + 1 for i, c in enumerate(ALPHABET)}
        self.vocab_size = START_ID + 1 + len(ALPHABET)
        self.num_truncated = 0

    def ids(self, text: Optional[str]) -> list[int]:
        """Token ids of one transcription, before truncation."""
        if text is None:
            return [NULL_ID]
        text = unicodedata.normalize("NFC", text)
        return [START_ID] + [self.char_to_id.get(c, UNKNOWN_ID) for c in text]

    def encode(self, texts: Sequence[Optional[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (N strings or None) -> (ids [N, max_seq_len] long, mask [N, max_seq_len] bool, True = token)."""
        ids = torch.full((len(texts), self.max_seq_len), PAD_ID, dtype=torch.long)
        cut = 0
        for row, text in enumerate(texts):
            seq = self.ids(text)
            if len(seq) > self.max_seq_len:
                cut += 1
                seq = seq[: self.max_seq_len]
            ids[row, : len(seq)] = torch.tensor(seq)
        if cut:
            self.num_truncated += cut
            warnings.warn(f"{cut} transcription(s) longer than model.max_seq_len={self.max_seq_len} tokens were "
                          f"truncated ({self.num_truncated} so far); raise model.max_seq_len to keep them whole")
        return ids, ids != PAD_ID


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = T5_NUM_BUCKETS,
                             max_distance: int = T5_MAX_DISTANCE) -> torch.Tensor:
    """T5's bidirectional bucket of ``key_pos - query_pos`` (any int tensor -> same shape, in [0, num_buckets)).

    Half the buckets hold keys after the query. Within a half, distances below num_buckets/4 get one
    bucket each; larger ones share logarithmically wider buckets up to ``max_distance``, beyond which all
    fall into the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    n = relative_position.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head): forward(length) -> additive bias [heads, length, length]."""

    def __init__(self, heads: int):
        super().__init__()
        self.table = nn.Embedding(T5_NUM_BUCKETS, heads)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.table.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])  # [query, key]
        return self.table(buckets).permute(2, 0, 1)


class FeedForward(nn.Module):
    """Transformer MLP on [..., dim]: Linear(dim, mult*dim), GELU (or GEGLU with ``glu``), Linear back."""

    def __init__(self, dim: int, mult: int, glu: bool):
        super().__init__()
        self.glu = glu
        self.inp = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.out(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention on [N, L, dim] with a key padding mask and an optional additive bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(attention(q, k, v, self.heads, mask, bias))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer; with ``rezero`` no norms, and each branch scaled by a zero-init gain."""

    def __init__(self, dim: int, heads: int, ff_mult: int, ff_glu: bool, rezero: bool):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ff = FeedForward(dim, ff_mult, ff_glu)
        self.norm_attn = nn.Identity() if rezero else nn.LayerNorm(dim)
        self.norm_ff = nn.Identity() if rezero else nn.LayerNorm(dim)
        self.gain = nn.Parameter(torch.zeros(2)) if rezero else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.attn(self.norm_attn(x), mask, bias)
        x = x + (a if self.gain is None else self.gain[0] * a)
        f = self.ff(self.norm_ff(x))
        return x + (f if self.gain is None else self.gain[1] * f)


class TextEncoder(nn.Module):
    """Token ids (and the diffusion time) -> per-token features.

    forward(ids [N, L] long, mask [N, L] bool, t [N] or None) -> [N, L, dim]; padded positions hold values
    that every consumer masks out. With ``timestep_emb`` (the research code's TextEncoder) every token gets
    ``dim**-0.5 * Linear(SiLU(sinusoid(t, dim)))`` added before the layers, so the features can differ by
    noise level: what the image needs from the text at t = 900 (layout) is not what it needs at t = 50.
    """

    def __init__(self, vocab_size: int, max_seq_len: int, dim: int, depth: int, ff_mult: int, ff_glu: bool,
                 rezero: bool, t5: bool, timestep_emb: bool = False):
        super().__init__()
        heads = max(1, dim // 64)
        self.heads = heads
        self.dim = dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(max_seq_len, dim) * dim ** -0.5)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim)) if timestep_emb else None
        self.rel_bias = T5RelativePositionBias(heads) if t5 else None
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff_mult, ff_glu, rezero) for _ in range(depth))
        self.norm = nn.Identity() if rezero else nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_emb(ids) + self.pos_emb[:length]
        if self.time_proj is not None:
            if t is None:
                raise ValueError("this text encoder is timestep-aware (model.txt_timestep_emb); pass t [N]")
            x = x + self.dim ** -0.5 * self.time_proj(timestep_embedding(t, self.dim).to(x.dtype))[:, None]
        bias = self.rel_bias(length) if self.rel_bias is not None else None
        for layer in self.layers:
            x = layer(x, mask, bias)
        return self.norm(x)
