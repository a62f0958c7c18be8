"""Transcription conditioning, first half: a character tokenizer and a transformer encoder.

The encoder is trained end to end with the U-net and follows the research code's TextEncoder (an
x-transformers ``Encoder``): ScaleNorm pre-norm layers, a learned absolute position embedding and a learned
line embedding, and with ``txt_t5`` a T5-style bucketed relative position bias (32 buckets, max distance 128,
bidirectional, scaled by sqrt(dim_head)), one table shared by all layers.
"""

from __future__ import annotations

import math
import string
import unicodedata
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from textdiff.models.blocks import attention, timestep_embedding
from textdiff.models.linear import Linear

# the research code's special tokens, in its ids: start, end, unknown character, padding, and the mask token
# that its null transcription is made of
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", "<mask>")
START_ID, END_ID, UNKNOWN_ID, PAD_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NULL_TRANSCRIPTION = (START_ID,) + (MASK_ID,) * 4 + (END_ID,)  # the research code's "<mask>" x 4
# characters after the special tokens, in code-point order so ids never change between runs. "printable": the
# research code's string.printable (100 characters, newline and tab included). "textdiff": newline, printable
# ASCII, Latin-1 and common typography (202 characters)
VOCABULARIES = {
    "printable": "".join(sorted(string.printable)),
    "textdiff": ("\n" + "".join(map(chr, range(32, 127))) + "".join(map(chr, range(160, 256)))
                 + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u2022\u20ac\u2122"),
}
T5_NUM_BUCKETS, T5_MAX_DISTANCE = 32, 128
MAX_LINES = 32  # the research code's line table: lines past the 32nd share its last row


def max_characters(max_seq_len: int) -> int:
    """How many characters of a transcription fit in ``max_seq_len`` tokens (start and end tokens included)."""
    return max_seq_len - 2


class CharTokenizer:
    """Characters -> ids, framed as the research code frames them: [START, c1, c2, ..., END].

    ``None`` (the null, dropped transcription) -> the research code's null, [START, MASK x 4, END]; ``""`` ->
    [START, END]. Text is NFC-normalised; characters outside the vocabulary map to ``UNKNOWN_ID``; newlines are
    tokens like any other character. A sequence longer than ``max_seq_len`` tokens keeps its first
    ``max_seq_len - 2`` characters and its END, is counted in ``num_truncated`` and reported with a warning.
    """

    def __init__(self, max_seq_len: int, vocabulary: str = "printable"):
        self.max_seq_len = max_seq_len
        chars = VOCABULARIES[vocabulary]
        self.char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.vocab_size = len(SPECIAL_TOKENS) + len(chars)
        self.newline_id = self.char_to_id["\n"]
        self.num_truncated = 0

    def ids(self, text: Optional[str]) -> list[int]:
        """Token ids of one transcription, before truncation."""
        if text is None:
            return list(NULL_TRANSCRIPTION)
        text = unicodedata.normalize("NFC", text)
        return [START_ID] + [self.char_to_id.get(c, UNKNOWN_ID) for c in text] + [END_ID]

    def encode(self, texts: Sequence[Optional[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (N strings or None) -> (ids [N, max_seq_len] long, mask [N, max_seq_len] bool, True = token)."""
        ids = torch.full((len(texts), self.max_seq_len), PAD_ID, dtype=torch.long)
        cut = 0
        for row, text in enumerate(texts):
            seq = self.ids(text)
            if len(seq) > self.max_seq_len:
                cut += 1
                seq = seq[: self.max_seq_len - 1] + [END_ID]
            ids[row, : len(seq)] = torch.tensor(seq)
        if cut:
            self.num_truncated += cut
            warnings.warn(f"{cut} transcription(s) longer than model.max_seq_len={self.max_seq_len} tokens (start "
                          f"and end included) were truncated ({self.num_truncated} so far); raise "
                          "model.max_seq_len to keep them whole")
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
    """One learned scalar per (bucket, head), times ``scale``: forward(length) -> additive bias [heads, length, length].

    x-transformers (which the research code uses) multiplies the table by sqrt(dim_head): the bias is added to
    logits already divided by sqrt(dim_head), so the table lives on the scale of the raw q.k products.
    """

    def __init__(self, heads: int, scale: float = 1.0):
        super().__init__()
        self.table = nn.Embedding(T5_NUM_BUCKETS, heads)
        self.scale = scale

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.table.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])  # [query, key]
        return self.table(buckets).permute(2, 0, 1) * self.scale


class LineEmbedding(nn.Module):
    """forward(ids [N, L]) -> [N, L, dim]: a learned vector per line, scaled by dim**-0.5 (the research code's).

    A token's line is the number of newline tokens up to and including it (a newline opens the next line),
    capped at ``max_lines - 1``.
    """

    def __init__(self, dim: int, newline_id: int, max_lines: int = MAX_LINES):
        super().__init__()
        self.newline_id, self.max_lines, self.scale = newline_id, max_lines, dim ** -0.5
        self.emb = nn.Embedding(max_lines, dim)  # N(0, 1), as nn.Embedding starts

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        line = (ids == self.newline_id).long().cumsum(dim=1).clamp(max=self.max_lines - 1)
        return self.emb(line) * self.scale


class ScaleNorm(nn.Module):
    """x / max(|x| / sqrt(dim), eps) * g over the last axis, one learned scalar g (x-transformers' ScaleNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale, self.eps = dim ** -0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> same
        return x / (x.norm(dim=-1, keepdim=True) * self.scale).clamp(min=self.eps) * self.g


class FeedForward(nn.Module):
    """Transformer MLP on [..., dim]: Linear(dim, mult*dim), GELU (or GEGLU with ``glu``), Linear back."""

    def __init__(self, dim: int, mult: int, glu: bool):
        super().__init__()
        self.glu = glu
        self.inp = Linear(dim, dim * mult * (2 if glu else 1))
        self.out = Linear(dim * mult, dim)

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
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(attention(q, k, v, self.heads, mask, bias))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer with ScaleNorm (x-transformers' ``use_scalenorm``, which the research code sets
    whenever rezero is off); with ``rezero`` no norms, and each branch scaled by a zero-init gain."""

    def __init__(self, dim: int, heads: int, ff_mult: int, ff_glu: bool, rezero: bool):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ff = FeedForward(dim, ff_mult, ff_glu)
        self.norm_attn = nn.Identity() if rezero else ScaleNorm(dim)
        self.norm_ff = nn.Identity() if rezero else ScaleNorm(dim)
        self.gain = nn.Parameter(torch.zeros(2)) if rezero else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.attn(self.norm_attn(x), mask, bias)
        x = x + (a if self.gain is None else self.gain[0] * a)
        f = self.ff(self.norm_ff(x))
        return x + (f if self.gain is None else self.gain[1] * f)


class TextEncoder(nn.Module):
    """Token ids (and the diffusion time) -> per-token features, as the research code's TextEncoder.

    forward(ids [N, L] long, mask [N, L] bool, t [N] or None) -> [N, L, dim]; padded positions hold values
    that every consumer masks out. Each token starts as token embedding (Kaiming-normal, std sqrt(2 / dim)) +
    dim**-0.5 * position embedding + (with ``newline_id``) dim**-0.5 * line embedding; with ``timestep_emb``
    it also gets ``dim**-0.5 * Linear(SiLU(sinusoid(t, dim)))``, so the features can differ by noise level:
    what the image needs from the text at t = 900 (layout) is not what it needs at t = 50. The layers end
    without a final norm (every consumer normalises the text itself).
    """

    def __init__(self, vocab_size: int, max_seq_len: int, dim: int, depth: int, ff_mult: int, ff_glu: bool,
                 rezero: bool, t5: bool, timestep_emb: bool = False, newline_id: Optional[int] = None):
        super().__init__()
        heads = max(1, dim // 64)
        self.heads = heads
        self.dim = dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        nn.init.kaiming_normal_(self.token_emb.weight)
        self.pos_emb = nn.Parameter(torch.randn(max_seq_len, dim))
        self.line_emb = LineEmbedding(dim, newline_id) if newline_id is not None else None
        self.time_proj = nn.Sequential(nn.SiLU(), Linear(dim, dim)) if timestep_emb else None
        self.rel_bias = T5RelativePositionBias(heads, scale=(dim // heads) ** 0.5) if t5 else None
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff_mult, ff_glu, rezero) for _ in range(depth))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_emb(ids) + self.dim ** -0.5 * self.pos_emb[:length]
        if self.line_emb is not None:
            x = x + self.line_emb(ids)
        if self.time_proj is not None:
            if t is None:
                raise ValueError("this text encoder is timestep-aware (model.txt_timestep_emb); pass t [N]")
            x = x + self.dim ** -0.5 * self.time_proj(timestep_embedding(t, self.dim).to(x.dtype))[:, None]
        bias = self.rel_bias(length) if self.rel_bias is not None else None
        for layer in self.layers:
            x = layer(x, mask, bias)
        return x
