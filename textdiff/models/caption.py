"""Caption conditioning: a frozen open_clip text tower and its tokenizer.

Which tower: ``model.clipname`` is an open_clip model name (``ViT-L-14-336``, the seed's ViT-L/14@336px) or
the path of a local JSON model config in open_clip's format (``{"embed_dim": .., "text_cfg": {..}}``); the
tests use ``tests/models/tiny_clip.json`` (width 32, 2 layers) with ``clip_pretrained=""``, random weights.
Which weights: ``model.clip_weights_path`` (a local file: an open_clip checkpoint, a safetensors file or
OpenAI's TorchScript ``.pt``) wins; else ``model.clip_pretrained`` (an open_clip tag such as ``openai``,
fetched through open_clip's cache); an empty tag means random weights, which only makes sense for tests and
parameter counts.

Only the text tower is built (never the image tower). The U-net uses its per-token activations for
Imagen-style attention (with ``clip_use_penultimate_layer`` the penultimate layer's, raw: the U-net gives them a
new trainable LayerNorm, as the research code does; otherwise the last layer's after CLIP's own final LayerNorm)
and its pooled, projected embedding for GLIDE-style addition to the timestep embedding. With
``freeze_capt_encoder`` its parameters have ``requires_grad=False`` and it runs in eval mode under
``torch.no_grad``; ``TextdiffUNet.trainable_parameters()`` lists what the optimizer should see.
"""

from __future__ import annotations

import difflib
import json
import socket
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import huggingface_hub
import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

from textdiff.config import ConfigError, ModelConfig

PLACEHOLDER_CAPTION = "unknown"  # the seed's string for a missing or dropped caption


def clip_model_config(clipname: str) -> dict:
    """open_clip model config for ``model.clipname`` (a registered name or a local JSON file)."""
    if clipname.endswith(".json"):
        path = Path(clipname)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"model.clipname {clipname} does not exist; give an open_clip model name "
                              "(e.g. ViT-L-14-336) or the path of a local JSON text-tower config") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.clipname {clipname} is not valid JSON: line {e.lineno}: {e.msg}") from None
    else:
        cfg = open_clip.get_model_config(clipname)
        if cfg is None:
            close = difflib.get_close_matches(clipname, open_clip.list_models(), n=3)
            raise ConfigError(f"model.clipname {clipname!r} is not an open_clip model"
                              + (f"; did you mean {', '.join(close)}?" if close else
                                 "; see open_clip.list_models() (the seed's ViT-L/14@336px is ViT-L-14-336)"))
    if "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ConfigError(f"model.clipname {clipname}: the config needs 'embed_dim' and 'text_cfg' keys")
    if cfg["text_cfg"].get("hf_model_name"):
        raise ConfigError(f"model.clipname {clipname} uses a Hugging Face text tower; choose a CLIP whose text "
                          "tower is open_clip's own transformer (e.g. ViT-L-14-336)")
    return cfg


def read_text_tower_weights(path: str) -> dict[str, torch.Tensor]:
    """The text-tower entries of a CLIP checkpoint at ``path``, keyed as in open_clip's TextTransformer."""
    if not Path(path).is_file():
        raise ConfigError(f"model.clip_weights_path {path} does not exist; point it at a local CLIP weight file "
                          "(open_clip_pytorch_model.bin, *.safetensors, or OpenAI's ViT-L-14-336px.pt)")
    try:
        state = open_clip.factory.load_state_dict(path)
    except Exception:  # OpenAI's checkpoints are TorchScript archives, which torch.load(weights_only) refuses
        state = torch.jit.load(path, map_location="cpu").state_dict()
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    roots = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in state.items() if k.startswith(roots)}


def _reachable(url_or_host: str) -> bool:
    host = urlparse(url_or_host).hostname or url_or_host
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _pretrained_weights_file(cfg: ModelConfig) -> str:
    """Local path of the open_clip weights named by (clipname, clip_pretrained); fetched only when not cached."""
    pretrained = open_clip.get_pretrained_cfg(cfg.clipname, cfg.clip_pretrained)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(cfg.clipname)
        raise ConfigError(f"model.clip_pretrained {cfg.clip_pretrained!r} is not a tag of {cfg.clipname}; "
                          f"known tags: {', '.join(tags) or 'none'}; or set model.clip_weights_path")
    hub = pretrained.get("hf_hub", "")
    if hub:
        repo, name = hub.rstrip("/"), None
        if not hub.endswith("/"):
            repo, name = hub.rsplit("/", 1)
        for filename in ([name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            cached = huggingface_hub.try_to_load_from_cache(repo, filename)
            if isinstance(cached, str):
                return cached
    advice = (f"Download the weight file once on a machine with network access and set "
              f"model.clip_weights_path=/path/to/file (--set model.clip_weights_path=...)")
    source = "huggingface.co" if hub else pretrained.get("url", "")
    if not _reachable(source):  # fail at once rather than after a minute of hub retries
        raise ConfigError(f"model.clip_pretrained: the {cfg.clipname} '{cfg.clip_pretrained}' weights are not in the "
                          f"local cache and {source} cannot be reached. {advice}")
    try:
        return open_clip.download_pretrained(pretrained)
    except Exception as e:
        raise ConfigError(f"model.clip_pretrained: could not fetch the {cfg.clipname} '{cfg.clip_pretrained}' "
                          f"weights ({type(e).__name__}: {e}). {advice}") from None


class CaptionEncoder(nn.Module):
    """Frozen (or trainable) CLIP text tower.

    forward(ids [N, Lc] long) -> (tokens [N, Lc, width], pooled [N, embed_dim]); the tokens of the penultimate
    layer come without a norm (the caller owns that LayerNorm, which trains while the tower is frozen).
    ``tokenize(captions)`` -> ids [N, Lc]; ``None`` and ``""`` become :data:`PLACEHOLDER_CAPTION`.
    """

    def __init__(self, cfg: ModelConfig, load_weights: bool = True):
        super().__init__()
        model_cfg = clip_model_config(cfg.clipname)
        if cfg.clipname.endswith(".json") and cfg.clip_pretrained and not cfg.clip_weights_path:
            raise ConfigError(f"model.clip_pretrained is {cfg.clip_pretrained!r}, but a local config "
                              f"({cfg.clipname}) has no pretrained tags; set model.clip_weights_path, or "
                              "model.clip_pretrained=\"\" for random weights")
        # resolve the weight file first, so a missing one fails before minutes of random initialisation
        weights = cfg.clip_weights_path or (_pretrained_weights_file(cfg) if load_weights and cfg.clip_pretrained
                                            else None)
        quick_gelu = model_cfg.get("quick_gelu", False)
        if cfg.clip_pretrained and not cfg.clipname.endswith(".json"):
            quick_gelu = quick_gelu or open_clip.get_pretrained_cfg(cfg.clipname, cfg.clip_pretrained).get(
                "quick_gelu", False)
        self.tower = _build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"], quick_gelu=quick_gelu)
        self.width = self.tower.width
        self.embed_dim = model_cfg["embed_dim"]
        self.penultimate = cfg.clip_use_penultimate_layer
        self.layer = len(self.tower.transformer.resblocks) - (2 if self.penultimate else 1)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.tower.context_length)
        if weights:
            missing, unexpected = self.tower.load_state_dict(read_text_tower_weights(weights), strict=False)
            if missing:
                raise ConfigError(f"model.clip_weights_path {weights} lacks text-tower weights for {cfg.clipname} "
                                  f"(missing {', '.join(missing[:3])}...); is it a checkpoint of that model?")
        self.frozen = cfg.freeze_capt_encoder
        if self.frozen:
            self.tower.requires_grad_(False)
            self.tower.eval()

    def train(self, mode: bool = True) -> "CaptionEncoder":
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def tokenize(self, captions: Sequence[str | None]) -> torch.Tensor:
        """Captions -> open_clip token ids [N, context_length]; missing ones use the placeholder caption."""
        return self.tokenizer([c if c else PLACEHOLDER_CAPTION for c in captions])

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.tower.forward_intermediates(ids, indices=[self.layer], output_fmt="NLC",
                                                   normalize_intermediates=not self.penultimate)
        return out["text_intermediates"][0], out["text_features"]
