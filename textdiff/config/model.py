"""The ``model`` section: the U-net, its conditioning and its seed flags (docs/seed_flags.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from textdiff.config.base import require as _require


@dataclass
class ModelConfig:
    """Architecture of the U-net and its conditioning (seed flag names kept where clear)."""

    image_size: int = 64
    in_channels: int = 3
    num_channels: int = 256
    num_groups: int = 32  # GroupNorm groups (the seed's 32); block widths must be multiples of it
    # space-to-depth stem: pixel-unshuffle p x p blocks into channels before the first conv (and shuffle back
    # after the last), so the U-net's first level runs at image_size / p; 1: none (the seed's)
    stem_patch: int = 1
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    # feature-map sizes, as in the seed (64px base: attention at 16, 8, 4 px); with a stem the first map is
    # image_size / stem_patch
    attention_resolutions: tuple[int, ...] = (4, 8, 16)
    num_heads: int = 16  # the middle block; every self-attention block when channels_per_head is 0
    channels_per_head: int = 64  # self-attention outside the middle block; 0: num_heads heads instead
    channels_per_head_upsample: int = -1  # the decoder's; -1: same as channels_per_head
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    monochrome: bool = False
    monochrome_adapter: bool = False
    silu_impl: Literal["torch", "fused"] = "torch"
    # activation (gradient) checkpointing, the research code's flags: recompute a U-net position's activations
    # in the backward pass instead of keeping them; use_checkpoint: every level; use_checkpoint_below_res: the
    # levels whose feature map is at most this many pixels wide (-1: none). Off by default (the seed's)
    use_checkpoint: bool = False
    use_checkpoint_below_res: int = -1
    # where GroupNorm+SiLU keeps only its input and recomputes itself in the backward pass (textdiff's own,
    # independent of the checkpointing above): "top", the feature maps at the U-net's full width, where they
    # are largest (demo step: 10-13% faster than "all" for 63.6 instead of 53.6 MB; docs/performance.md);
    # "all" maps; "none", as the research code keeps them
    norm_recompute: Literal["top", "all", "none"] = "top"
    # upsampler: size of the low-res image concatenated to the input; 0 for a base model
    low_res_size: int = 0
    noise_cond: bool = False
    # training noise-conditioning steps are drawn from 0..noise_cond_max_step - 1; -1: all 1000 (research default)
    noise_cond_max_step: int = -1

    # transcription conditioning
    txt: bool = False
    max_seq_len: int = 64  # tokens, the start and end tokens included (as the research code's tokenizer counts)
    # character vocabulary: "printable" (the research code's string.printable) or "textdiff" (printable ASCII,
    # Latin-1 and common typography); both use the research code's special tokens and null transcription
    txt_vocab: Literal["printable", "textdiff"] = "printable"
    # the research code's line embedding: each token also gets a learned vector for its line (0..31)
    txt_line_emb: bool = True
    txt_dim: int = 256
    txt_depth: int = 2
    txt_ff_mult: int = 4
    txt_ff_glu: bool = False
    txt_rezero: bool = False  # false: ScaleNorm pre-norm layers (the research code's); true: rezero, no norms
    txt_t5: bool = True
    # the research code's TextEncoder adds an embedding of the diffusion time to every token
    txt_timestep_emb: bool = True
    # add a projection of the first token's encoding (START / NULL) to the timestep embedding (Imagen's pooled
    # text embedding): global conditioning of every residual block; off in the seed
    txt_pooled_emb: bool = False
    txt_resolutions: tuple[int, ...] = ()
    # text blocks have txt_dim // cross_attn_channels_per_head heads; -1: num_heads heads (the research code's)
    cross_attn_channels_per_head: int = -1
    cross_attn_q_t_emb: bool = False
    cross_attn_orth_init: bool = False
    cross_attn_init_gain: float = 1.0
    cross_attn_gain_scale: float = 1.0
    cross_attn_use_layerscale: bool = False
    cross_attn_rezero: bool = False
    cross_attn_rezero_keeps_prenorm: bool = False
    txt_avoid_groupnorm: bool = False
    txt_attn_before_attn: bool = False
    txt_output_layers_only: bool = False
    weave_attn: bool = False
    weave_ff_mult: int = 4
    weave_ff_glu: bool = False
    weave_ff_rezero: bool = True
    weave_use_ff_gain: bool = False
    weave_qkv_dim_always_text: bool = False

    # caption conditioning (frozen open_clip text tower)
    using_capt: bool = False
    clipname: str = "ViT-L-14-336"
    clip_pretrained: str = "openai"
    clip_weights_path: Optional[str] = None  # local weight file; overrides clip_pretrained
    freeze_capt_encoder: bool = True
    glide_style_capt_attn: bool = True
    glide_style_capt_emb: bool = False
    clip_use_penultimate_layer: bool = True

    # conditioning dropout for classifier-free guidance
    txt_pdrop: float = 0.0
    capt_pdrop: float = 0.0
    all_pdrop: float = 0.0
    # null transcription: "learned" = the null token through the encoder; "empty" = cross-attention adds nothing
    txt_null: Literal["learned", "empty"] = "learned"
    # null caption: "placeholder" = the seed's fixed stand-in caption ("unknown") through CLIP; "learned" = a
    # learned token and pooled vector stand in for CLIP's outputs; "empty" = the caption adds nothing
    capt_null: Literal["placeholder", "learned", "empty"] = "placeholder"

    @property
    def text_attn_heads(self) -> int:
        """Heads of every text block, as the research code counts them: ``txt_dim // cross_attn_channels_per_head``,
        or ``num_heads`` when that is -1 (the same heads in both directions of a weave block)."""
        per_head = self.cross_attn_channels_per_head
        return self.txt_dim // per_head if per_head > 0 else self.num_heads

    @property
    def feature_size(self) -> int:
        """Side of the U-net's first feature map: ``image_size / stem_patch``."""
        return self.image_size // self.stem_patch

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.image_size > 0, "model.image_size", "must be positive")
        _require(self.num_groups > 0, "model.num_groups", "must be positive (the seed's GroupNorm uses 32)")
        for m in self.channel_mult:
            _require((self.num_channels * m) % self.num_groups == 0, "model.num_channels",
                     f"is {self.num_channels}, so a level is {self.num_channels * m} channels wide, which "
                     f"GroupNorm({self.num_groups}) cannot split; give a multiple of model.num_groups "
                     f"or change model.num_groups")
        _require(self.stem_patch >= 1 and self.image_size % self.stem_patch == 0, "model.stem_patch",
                 f"is {self.stem_patch}; give a factor >= 1 that divides model.image_size={self.image_size}")
        downsamplings = len(self.channel_mult) - 1
        factor = self.stem_patch * 2 ** downsamplings
        _require(self.image_size % factor == 0, "model.image_size",
                 f"is {self.image_size}, which the {downsamplings} downsamplings of channel_mult "
                 f"{list(self.channel_mult)}" + (f" after the stem's {self.stem_patch}x" if self.stem_patch > 1 else "")
                 + f" cannot halve evenly; give a multiple of {factor}")
        _require(self.in_channels >= 1, "model.in_channels", "must be at least 1 (3 for RGB)")
        _require(self.use_checkpoint_below_res >= -1, "model.use_checkpoint_below_res",
                 "must be a feature-map width in pixels, or -1 for no level")
        _require(self.txt_depth >= 0, "model.txt_depth", "must be >= 0 (encoder layers of the transcription)")
        _require(self.txt_dim >= 1, "model.txt_dim", "must be positive")
        _require(self.cross_attn_init_gain > 0, "model.cross_attn_init_gain",
                 f"is {self.cross_attn_init_gain}; it must be positive (the gain is stored as its logarithm); "
                 "to start the text blocks switched off use model.cross_attn_rezero=true")
        _require(self.cross_attn_gain_scale != 0, "model.cross_attn_gain_scale",
                 "must not be 0: the stored gain is log(cross_attn_init_gain) / cross_attn_gain_scale and the "
                 "effective one exp(cross_attn_gain_scale * g); give e.g. 1 (the seed's run) or 200")
        reached = {self.feature_size // 2 ** i for i in range(len(self.channel_mult))}
        for key in ("attention_resolutions", "txt_resolutions"):
            for res in getattr(self, key):
                _require(res in reached, f"model.{key}",
                         f"holds {res} px, which the U-net never reaches; with image_size "
                         f"{self.image_size} and channel_mult {list(self.channel_mult)} the feature maps are "
                         f"{sorted(reached, reverse=True)} px")
        widths = {self.num_channels * m for m in self.channel_mult}
        for key in ("channels_per_head", "channels_per_head_upsample"):
            per_head = getattr(self, key)
            if per_head == -1 and key == "channels_per_head_upsample":
                continue
            _require(per_head >= 0, f"model.{key}", "must be >= 0 (0: model.num_heads heads in every block)"
                     + (" or -1 (same as model.channels_per_head)" if key == "channels_per_head_upsample" else ""))
            for w in widths if per_head else ():
                _require(w % per_head == 0, f"model.{key}",
                         f"is {per_head}, which does not divide the block width {w}")
        every = self.channels_per_head == 0 or self.channels_per_head_upsample == 0
        for w in (widths if every else {self.num_channels * self.channel_mult[-1]}):
            _require(w % self.num_heads == 0, "model.num_heads",
                     f"is {self.num_heads}, which does not divide the " + ("block" if every else "middle")
                     + f" width {w}")
        if self.txt:
            self._validate_text_heads()
        if not self.txt:
            for key in ("txt_resolutions", "weave_attn", "txt_pdrop", "txt_pooled_emb"):
                _require(not getattr(self, key), f"model.{key}", "is set but model.txt is false; set model.txt=true")
        else:
            _require(len(self.txt_resolutions) > 0, "model.txt_resolutions",
                     "is empty but model.txt is true; give the feature-map sizes for cross-attention")
        if not self.using_capt:
            _require(self.capt_pdrop == 0.0, "model.capt_pdrop", "is set but model.using_capt is false")
        else:
            _require(self.glide_style_capt_attn or self.glide_style_capt_emb, "model.using_capt",
                     "is true but neither glide_style_capt_attn nor glide_style_capt_emb is")
        for key in ("txt_pdrop", "capt_pdrop", "all_pdrop", "dropout"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"model.{key}", "must lie in [0, 1]")
        _require(self.low_res_size >= 0 and (self.low_res_size == 0 or self.low_res_size < self.image_size),
                 "model.low_res_size", "must be 0 (base model) or smaller than model.image_size")
        _require(not self.noise_cond or self.low_res_size > 0, "model.noise_cond",
                 "needs an upsampler (model.low_res_size > 0)")
        _require(self.noise_cond_max_step == -1 or 1 <= self.noise_cond_max_step <= 1000, "model.noise_cond_max_step",
                 "must be -1 (all 1000 steps) or an exclusive limit in [1, 1000] (600: steps 0..599)")
        _require(not self.monochrome_adapter or self.monochrome, "model.monochrome_adapter",
                 "adapts a monochrome U-net to RGB; set model.monochrome=true too")
        _require(self.max_seq_len >= 3, "model.max_seq_len",
                 f"is {self.max_seq_len}; it counts the start and end tokens, so give at least 3 (one character)")
        _require(self.txt_dim % min(64, self.txt_dim) == 0, "model.txt_dim",
                 f"is {self.txt_dim}; the encoder uses 64-channel heads, so give a multiple of 64 (or less than 64)")

    def _validate_text_heads(self) -> None:
        """Text blocks: txt_dim // cross_attn_channels_per_head heads (or num_heads) over widths they divide."""
        per_head = self.cross_attn_channels_per_head
        _require(per_head == -1 or per_head > 0, "model.cross_attn_channels_per_head",
                 f"is {per_head}; give a positive width or -1 (model.num_heads heads)")
        heads = self.text_attn_heads
        key = "model.cross_attn_channels_per_head" if per_head > 0 else "model.num_heads"
        _require(heads >= 1 and self.txt_dim % heads == 0, key,
                 f"gives {heads} text-attention heads, which do not split txt_dim={self.txt_dim} evenly; change "
                 f"{key} or model.txt_dim")
        if self.weave_attn and not self.weave_qkv_dim_always_text:
            widths = {self.feature_size // 2 ** i: self.num_channels * m for i, m in enumerate(self.channel_mult)}
            for res in self.txt_resolutions:
                _require(widths.get(res, heads) % heads == 0, key,
                         f"gives {heads} heads, which do not split the {widths.get(res)} channels that the weave's "
                         f"image-to-text attention has at {res} px; change {key} or set "
                         "model.weave_qkv_dim_always_text=true")
