"""The U-net and its conditioning: ``build_model(cfg.model)``, ``cond_dropout``."""

from textdiff.models.conditioning import cond_dropout
from textdiff.models.unet import TextdiffUNet, build_model

__all__ = ["TextdiffUNet", "build_model", "cond_dropout"]
