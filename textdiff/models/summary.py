"""Parameter counts of a built U-net, per part (what ``tools/model_summary.py`` prints).

The parts and the research code's modules they stand for: ``unet`` (UNetModel's blocks, time embedding, in/out
layers), ``txt_encoder`` (TextEncoder), ``weave_attn`` (ImageToTextCrossAttention), ``cross_attn``
(CrossAttention), ``pos_tables`` (tgt_pos_embs), ``capt_adapters`` (AttentionBlock.encoder_kv, capt_embed),
``capt_norm`` (capt_ln_final), ``capt_encoder_*`` (the CLIP text tower, trainable or frozen).
"""

from __future__ import annotations

import torch
from torch import nn

from textdiff.config import ModelConfig
from textdiff.models.unet import build_model

PARTS = ("unet", "txt_encoder", "cross_attn", "weave_attn", "pos_tables", "capt_adapters", "capt_norm",
         "capt_encoder_trainable", "capt_encoder_frozen")


def part_of(name: str, param: nn.Parameter) -> str:
    """Which part a parameter, named as in ``model.named_parameters()``, belongs to (one of PARTS)."""
    if name.startswith("capt_encoder."):
        return "capt_encoder_trainable" if param.requires_grad else "capt_encoder_frozen"
    if name.startswith("text_encoder."):
        return "txt_encoder"
    if ".weave." in name:
        return "weave_attn"
    if ".cross." in name:
        return "cross_attn"
    if name.startswith("pos_tables."):
        return "pos_tables"
    if ".capt_kv." in name or name.startswith(("capt_emb_proj.", "null_capt_")):
        return "capt_adapters"
    if name.startswith("capt_norm."):
        return "capt_norm"
    return "unet"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{part: parameter count} for every part in PARTS, plus ``total`` and ``total_trainable``."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        counts[part_of(name, p)] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["total_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def count_without_weights(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of ``build_model(cfg)`` built on the meta device: no memory, no weight download."""
    with torch.device("meta"):
        return parameter_counts(build_model(cfg, load_capt_weights=False))
