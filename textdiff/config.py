"""The one typed config tree of textdiff.

A run recipe is one JSON file (see ``ds_configs/``) that DeepSpeed reads too: DeepSpeed's own keys sit at
the top level, and textdiff's sections sit under the ``"textdiff"`` key::

    {"train_batch_size": 504, ..., "textdiff": {"model": {...}, "diffusion": {...}, "data": {...}}}

Each module reads its own section (``cfg.model``, ``cfg.data`` ...). Loading validates: an unknown key, a
wrong type or an impossible combination is a :class:`ConfigError` that names the key. Command-line
overrides have the form ``SECTION.KEY=VALUE`` (VALUE parsed as JSON, else taken as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


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


@dataclass
class DiffusionConfig:
    """Forward process and loss."""

    diffusion_steps: int = 1000
    noise_schedule: Literal["linear", "cosine"] = "cosine"
    timestep_respacing: str = ""  # e.g. "250" or "ddim50"; empty: all steps
    use_kl: bool = False
    predict_xstart: bool = False
    # the network predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022) instead of eps
    predict_v: bool = False
    # weight of the simple loss per step, stated on the x_0 error (textdiff/diffusion/gaussian.py): "none" (the
    # seed's), "min_snr" (min(SNR, min_snr_gamma), Hang et al. 2023), "snr_plus_one" and "v" (the research code's
    # RESCALED_MSE_SNR_PLUS_ONE and RESCALED_MSE_V losses)
    loss_weighting: Literal["none", "min_snr", "snr_plus_one", "v"] = "none"
    min_snr_gamma: float = 5.0
    # normal CDF of the t = 0 decoder NLL in the VLB: "tanh" (the research code's approximation) or "exact"
    decoder_nll_cdf: Literal["tanh", "exact"] = "tanh"
    # the VLB term of the hybrid loss is scaled by K / vb_loss_ratio with rescale_learned_sigmas (research flag)
    vb_loss_ratio: float = 1000.0
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True
    schedule_sampler: Literal["uniform", "loss-second-moment"] = "uniform"

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.diffusion_steps > 1, "diffusion.diffusion_steps", "must be at least 2")
        _require(not (self.predict_xstart and self.predict_v), "diffusion.predict_v",
                 "and diffusion.predict_xstart are both true; the network predicts one target, choose one")
        _require(self.min_snr_gamma > 0, "diffusion.min_snr_gamma", "must be positive (Hang et al. use 5)")
        _require(self.vb_loss_ratio > 0, "diffusion.vb_loss_ratio", "must be positive (the research code's 1000)")
        if self.timestep_respacing:
            from textdiff.diffusion.respace import space_timesteps  # late: only a respaced config needs the diffusion package
            try:
                space_timesteps(self.diffusion_steps, self.timestep_respacing)
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    """Which shards to stream and how the loader runs."""

    shards: str = ""  # brace pattern, glob, comma list, or a manifest.json; local paths or fsspec URLs (s3://...)
    resampled: bool = True  # infinite stream of resampled shards; False: shuffled epochs
    shuffle_buffer: int = 1000
    num_workers: int = 2
    pin_memory: bool = False
    prefetch_factor: int = 2
    seed: int = 0
    save_first_batch: bool = True
    open_shards: int = 4  # shards each reader reads at once, drawing every sample from one of them at random
    allow_pipe: bool = False  # shard URLs "pipe:CMD" run CMD in a shell: refused unless true
    max_pixels: int = 64_000_000  # decompression-bomb cap (make_shards --max-pixels); larger images are corrupt
    # remote shards and manifests (textdiff/data/remote.py): a request that fails transiently (reset, HTTP 5xx/429,
    # stall) is sent again up to `retries` times with exponential backoff, resuming at the byte reached; waiting for
    # any request's answer gives up after `timeout_s` seconds (a stalled read counts as a transient failure)
    retries: int = 5
    timeout_s: float = 60.0

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1 (batches each worker keeps ready)")
        _require(self.open_shards >= 1, "data.open_shards", "must be >= 1 (1: one shard after the other)")
        _require(self.max_pixels >= 1, "data.max_pixels", "must be >= 1 (width x height of the largest image)")
        _require(self.retries >= 0, "data.retries", "must be >= 0 (0: a failed request of a remote shard ends it)")
        _require(self.timeout_s > 0, "data.timeout_s", "must be > 0 (seconds to wait for a remote shard's answer)")


@dataclass
class AugmentConfig:
    """Text-aware augmentation (crops, flips, resizes) with the seed's knobs."""

    crop_prob: float = 0.0
    crop_prob_es: float = 0.0
    crop_min_scale: float = 0.75
    crop_max_scale: float = 1.0
    crop_min_scale_es: float = 0.25
    use_special_crop_for_empty_string: bool = False
    use_random_safebox_for_empty_string: bool = False
    # where that box comes from: "borrowed", a real safebox of another image of the shuffle block (the research
    # code's); "random", a synthetic box with edges 10-90% of the short side (also the fallback without one)
    es_safebox: Literal["borrowed", "random"] = "borrowed"
    # an image with text but no safebox: "centre_crop", its largest centred square (the research code's, which
    # may cut text); "pad", protected whole, padded to a square where it is not one
    no_safebox: Literal["centre_crop", "pad"] = "centre_crop"
    flip_lr_prob_es: float = 0.0
    # low-res conditioning of upsamplers, as the research code: area for power-of-two factors, else bilinear;
    # antialias: bilinear with antialiasing; bicubic_down: bicubic (up256.json turns both on, as the seed's README)
    antialias: bool = False
    bicubic_down: bool = False
    low_res_clamp: bool = False  # clamp the low-res image to [-1, 1] (bicubic overshoots); the research code does not
    blur_prob: float = 0.0
    blur_sigma_min: float = 0.4
    blur_sigma_max: float = 0.6

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        for key in ("crop_prob", "crop_prob_es", "flip_lr_prob_es", "blur_prob"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"augment.{key}", "must lie in [0, 1]")
        _require(0.0 < self.crop_min_scale <= self.crop_max_scale <= 1.0, "augment.crop_min_scale",
                 "needs 0 < crop_min_scale <= crop_max_scale <= 1")
        _require(0.0 < self.crop_min_scale_es <= 1.0, "augment.crop_min_scale_es", "must lie in (0, 1]")
        _require(self.blur_sigma_min <= self.blur_sigma_max, "augment.blur_sigma_min",
                 "must not exceed augment.blur_sigma_max")
        _require(self.blur_sigma_min > 0.0, "augment.blur_sigma_min", "must be positive (a Gaussian's width in px)")


@dataclass
class TrainConfig:
    """The training loop (DeepSpeed owns batch sizes, optimizer, scheduler, precision)."""

    max_steps: int = 1000
    # wall-clock budget of one invocation in minutes (0: none): training stops after the step that passes it,
    # saving a checkpoint, so a later --resume auto continues
    max_minutes: float = 0.0
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500  # EMA sample grid to TensorBoard and RUN_DIR/samples/ every N steps; 0: never
    sample_steps: int = 25
    sample_guidance_scale_txt: float = 1.0
    sample_guidance_scale_capt: float = 1.0
    sample_prompts: tuple[str, ...] = ("hello", "textdiff", "")  # transcriptions of the sample grid
    sample_captions: tuple[str, ...] = ()  # one caption per prompt (empty: none) for caption models
    sample_ema_rate: Optional[float] = None  # which EMA the grid shows; None: the first of ema.rates
    # Imagen's dynamic thresholding quantile for the grid's x_0 predictions; None: none (early in training the
    # unclipped x_0 at the last steps of a cosine schedule blows up to saturated noise)
    sample_dynamic_threshold: Optional[float] = 0.995
    # the research code's per-group learning rates (textdiff/train/param_groups.py): the transcription encoder and
    # the cross/weave attention layers, their learned gains, an unfrozen caption encoder; -1: optimizer.params.lr
    text_lr: float = -1.0
    gain_lr: float = -1.0
    capt_lr: float = -1.0
    # the batches (so the activations) and, in fp32 ZeRO 0, the weights in channels-last memory format
    channels_last: bool = False
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark: cuDNN times its kernels for each new shape

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.max_steps > 0, "train.max_steps", "must be positive")
        for key in ("text_lr", "gain_lr", "capt_lr"):
            _require(getattr(self, key) == -1 or getattr(self, key) > 0, f"train.{key}",
                     "must be -1 (the optimizer's lr, as the research code) or positive")
        _require(self.max_minutes >= 0, "train.max_minutes", "must be >= 0 (0: no time limit)")
        _require(self.log_every > 0, "train.log_every", "must be positive")
        _require(self.sample_every >= 0, "train.sample_every", "must be >= 0 (0: no sample grids)")
        _require(self.sample_steps > 0, "train.sample_steps", "must be positive")
        _require(self.sample_dynamic_threshold is None or 0.0 < self.sample_dynamic_threshold <= 1.0,
                 "train.sample_dynamic_threshold", "must be a quantile in (0, 1] (e.g. 0.995) or null")
        _require(not self.sample_captions or len(self.sample_captions) == len(self.sample_prompts),
                 "train.sample_captions", f"has {len(self.sample_captions)} captions for "
                 f"{len(self.sample_prompts)} train.sample_prompts; give one each, or none")


@dataclass
class EMAConfig:
    """EMA of the weights that starts as an arithmetic average."""

    rates: tuple[float, ...] = (0.9999,)
    # how the average starts (textdiff/train/ema.py): "arithmetic" (the seed's) mean of the weights so far until
    # the rate takes over, or "ramp": decay min(rate, (1 + n) / (10 + n)), which forgets the random start fast
    warmup: Literal["arithmetic", "ramp"] = "arithmetic"
    # -1 (the research code's default): no arithmetic start, the plain EMA of the rate from the first update;
    # the seed's example run sets 0
    arithmetic_avg_from_step: int = -1
    arithmetic_avg_extra_shift: int = 0

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(len(self.rates) > 0 and len(set(self.rates)) == len(self.rates), "ema.rates",
                 f"is {list(self.rates)}; give one or more distinct rates, e.g. [0.9999]")
        for r in self.rates:
            _require(0.0 < r < 1.0, "ema.rates", f"holds {r}; every rate must lie in (0, 1)")
        _require(self.arithmetic_avg_from_step >= -1, "ema.arithmetic_avg_from_step",
                 f"is {self.arithmetic_avg_from_step}; give -1 (plain EMA from the start) or a step >= 0")
        _require(self.arithmetic_avg_extra_shift >= 0, "ema.arithmetic_avg_extra_shift", "must be >= 0")
        _require(self.warmup == "arithmetic" or (self.arithmetic_avg_from_step == -1
                                                 and self.arithmetic_avg_extra_shift == 0),
                 "ema.arithmetic_avg_from_step", "only applies to ema.warmup=\"arithmetic\"; leave it unset (-1) "
                 "and arithmetic_avg_extra_shift 0 with \"ramp\"")


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written and kept."""

    save_every: int = 500
    keep_last: int = 2
    keep_every: int = 0  # also keep every Mth step; 0: none
    remote_url: Optional[str] = None  # fsspec URL each completed checkpoint is copied to

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.save_every > 0, "checkpoint.save_every", "must be positive")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
        _require(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: keep only the last ones)")


@dataclass
class EvalConfig:
    """Spelling evaluation (OCR) during training."""

    every: int = 0  # 0: off
    steps: int = 25
    num_prompts: int = 16
    normalize: bool = True  # compare case-folded text with whitespace runs collapsed
    prompts_file: Optional[str] = None  # JSONL of {"txt", "capt", "seed", "count"}; None: built-in held-out set
    seed: int = 0  # seed of the built-in held-out prompts
    tesseract_cmd: str = "tesseract"  # program name on PATH or full path
    ocr_lang: str = "eng"
    psm: int = 7  # Tesseract page segmentation mode; 7: one line of text
    ocr_retry_psm: int = 0  # read images that came back empty once more in this mode (8: one word); 0: no retry
    ocr_height: int = 192  # upscale images by a whole factor to about this height before OCR (64 px: x3)
    # upscale instead so the text's ink is about this tall (px), at most to ocr_height; 0: ocr_height alone
    ocr_glyph_height: int = 0
    # the only characters Tesseract may read (e.g. "0123456789" for digit strings); "": any
    whitelist: str = ""
    ocr_binarize: bool = True  # Otsu threshold before OCR
    ocr_timeout_s: float = 5.0  # per image
    # compare with every whitespace character removed (strings without spaces, e.g. digit codes, which
    # Tesseract may split into words)
    drop_spaces: bool = False
    # transcription guidance scales to evaluate at, each its own eval/g<scale>/* tags; the first is also
    # eval/cer ...; empty: train.sample_guidance_scale_txt alone
    guidance_scales: tuple[float, ...] = ()
    # also sample every prompt with the null transcription and score it against the prompt (eval/cer_null):
    # the control that shows the CER comes from the transcription, not from the data's prior
    null_control: bool = False
    sampler: str = "ddim"
    # write each evaluation's images to RUN_DIR/eval/step_N/ (grid.png, <condition>/NNN.png) for re-scoring
    save_images: bool = True
    # a text-free image counts as showing text when OCR reads a word this long with this confidence (0..100)
    false_text_min_chars: int = 2
    false_text_min_conf: float = 50.0

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(self.every >= 0, "eval.every", "must be >= 0 (0 turns evaluation off)")
        _require(self.steps > 0, "eval.steps", "must be positive")
        _require(self.num_prompts > 0, "eval.num_prompts", "must be positive")
        _require(0 <= self.psm <= 13, "eval.psm", f"is {self.psm}; Tesseract's modes are 0..13 (7: one line)")
        _require(0 <= self.ocr_retry_psm <= 13, "eval.ocr_retry_psm",
                 f"is {self.ocr_retry_psm}; 0 (no retry) or one of Tesseract's modes 1..13 (8: one word)")
        _require(16 <= self.ocr_height <= 4096, "eval.ocr_height", "must lie in [16, 4096] px")
        _require(self.ocr_glyph_height == 0 or 8 <= self.ocr_glyph_height <= 512, "eval.ocr_glyph_height",
                 "must be 0 (scale to eval.ocr_height) or lie in [8, 512] px (Tesseract reads 30-50 px glyphs best)")
        _require(not any(c.isspace() or c in "\"'\\" for c in self.whitelist), "eval.whitelist",
                 "holds whitespace or a quote; list the characters OCR may read, e.g. 0123456789")
        _require(self.ocr_timeout_s > 0, "eval.ocr_timeout_s", "must be positive")
        _require(self.false_text_min_chars >= 1, "eval.false_text_min_chars", "must be at least 1")
        _require(all(g >= 0 for g in self.guidance_scales), "eval.guidance_scales",
                 f"is {list(self.guidance_scales)}; guidance scales are >= 0 (1: no guidance)")
        _require(len(set(self.guidance_scales)) == len(self.guidance_scales), "eval.guidance_scales",
                 "holds a scale twice")
        _require(0 <= self.false_text_min_conf <= 100, "eval.false_text_min_conf", "must lie in [0, 100]")


@dataclass
class TextdiffConfig:
    """The whole tree. ``deepspeed`` keeps DeepSpeed's own keys exactly as written in the file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict = field(default_factory=dict)

    def validate(self) -> "TextdiffConfig":
        """Validate every section; returns self so calls chain."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.deepspeed:
            from textdiff.train.ds_keys import deepspeed_config_error  # late: DeepSpeed's own key lists

            error = deepspeed_config_error(self.deepspeed)
            if error:
                raise ConfigError(error)
        return self

    def to_dict(self) -> dict:
        """The tree as the JSON recipe layout (DeepSpeed keys at top level, textdiff sections below)."""
        out = dict(self.deepspeed)
        out["textdiff"] = {f.name: _to_jsonable(dataclasses.asdict(getattr(self, f.name)))
                           for f in dataclasses.fields(self) if f.name != "deepspeed"}
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(TextdiffConfig) if f.name != "deepspeed")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation and convert lists to tuples; raise naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} is {value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):  # the seed wrote lists as "16,8,4"
            value = [v for v in value.split(",") if v.strip()]
            value = [json.loads(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} is {value!r}; expected a list")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is {value!r}; expected a JSON object")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} is {value!r}; expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} is {value!r}; expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} is {value!r}; expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} is {value!r}; expected a string")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {annotation!r}")


def _build_section(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> TextdiffConfig:
    """Build and validate the tree from a recipe dict (DeepSpeed keys + ``textdiff`` sections)."""
    raw = dict(raw)
    sections = raw.pop("textdiff", {})
    if not isinstance(sections, dict):
        raise ConfigError("textdiff must be a JSON object of sections")
    hints = typing.get_type_hints(TextdiffConfig)
    kwargs = {}
    for name, value in sections.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean textdiff.{close[0]}?" if close else f"; sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"unknown section textdiff.{name}{hint}")
        kwargs[name] = _build_section(hints[name], value, name)
    return TextdiffConfig(deepspeed=raw, **kwargs).validate()


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``SECTION.KEY=VALUE`` into (section, key, value); VALUE is JSON if it parses, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r} is not of the form SECTION.KEY=VALUE (e.g. train.max_steps=20)")
    path, value_text = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    return section.strip(), key.strip(), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the recipe dict with ``SECTION.KEY=VALUE`` overrides applied.

    ``deepspeed.KEY=VALUE`` sets a top-level DeepSpeed key (dots below it address nested keys).
    """
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "deepspeed":
            node = raw
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
            continue
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; sections: {', '.join(SECTIONS)}, deepspeed"
            raise ConfigError(f"--set {text!r}: unknown section {section}{hint}")
        raw.setdefault("textdiff", {}).setdefault(section, {})[key] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TextdiffConfig:
    """Read a recipe JSON file, apply ``--set`` overrides, and validate; errors name the file and key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass one of ds_configs/*.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    try:
        return config_from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
