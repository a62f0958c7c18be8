"""The sections of the config tree besides ``model``: ``diffusion``, ``data``, ``augment``, ``train``, ``ema``,
``checkpoint``, ``eval``. Each validates itself, naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from textdiff.config.base import ConfigError, require as _require
from textdiff.config.respacing import space_timesteps


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
    # leave text that OCR could not read out of the diffusion loss: each sample's "unreadable" boxes (make_shards
    # --unreadable, tools/annotate.py --unreadable mask) become a batch's loss_mask [N, 1, S, S], 0 at every pixel
    # they touch after the crop, resize and flip; the loss is the mean over the other pixels. False: every
    # pixel counts, as the research code (no loss_mask in batches)
    mask_unreadable: bool = False

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
    # averages tracked beside `rates`, to compare starts in one run: "plain:R" (the EMA of rate R from the first
    # update), "arithmetic:R" (the research code's arithmetic mean until R takes over, from step 0), "ramp:R"
    tracked: tuple[str, ...] = ()
    # EDM2's power-function EMAs (textdiff/train/posthoc_ema.py) by relative width, e.g. [0.05, 0.10]; with
    # snapshot_every > 0 their full weights are saved every that many steps into RUN_DIR/ema_snapshots/, from
    # which tools/reconstruct_ema.py rebuilds an EMA of any width after training
    power_sigma_rels: tuple[float, ...] = ()
    snapshot_every: int = 0

    def validate(self) -> None:
        """Raise ConfigError for impossible combinations, naming the key."""
        _require(len(self.rates) > 0 and len(set(self.rates)) == len(self.rates), "ema.rates",
                 f"is {list(self.rates)}; give one or more distinct rates, e.g. [0.9999]")
        for spec in self.tracked:
            kind, _, rate = spec.partition(":")
            _require(kind in ("plain", "arithmetic", "ramp") and _is_rate(rate), "ema.tracked",
                     f"holds {spec!r}; write plain:R, arithmetic:R or ramp:R with a rate R in (0, 1), e.g. ramp:0.999")
        _require(len(set(self.tracked)) == len(self.tracked), "ema.tracked", "names an average twice")
        for s in self.power_sigma_rels:
            _require(0.0 < s < 0.2886, "ema.power_sigma_rels",
                     f"holds {s}; a relative width must lie in (0, 0.2886) (EDM2 tracks 0.05 and 0.10)")
        _require(self.snapshot_every >= 0, "ema.snapshot_every", "must be >= 0 (0: no snapshots)")
        _require(not self.snapshot_every or self.power_sigma_rels, "ema.snapshot_every",
                 "saves the power-function EMAs; set ema.power_sigma_rels too, e.g. [0.05, 0.10]")
        for r in self.rates:
            _require(0.0 < r < 1.0, "ema.rates", f"holds {r}; every rate must lie in (0, 1)")
        _require(self.arithmetic_avg_from_step >= -1, "ema.arithmetic_avg_from_step",
                 f"is {self.arithmetic_avg_from_step}; give -1 (plain EMA from the start) or a step >= 0")
        _require(self.arithmetic_avg_extra_shift >= 0, "ema.arithmetic_avg_extra_shift", "must be >= 0")
        _require(self.warmup == "arithmetic" or (self.arithmetic_avg_from_step == -1
                                                 and self.arithmetic_avg_extra_shift == 0),
                 "ema.arithmetic_avg_from_step", "only applies to ema.warmup=\"arithmetic\"; leave it unset (-1) "
                 "and arithmetic_avg_extra_shift 0 with \"ramp\"")


def _is_rate(text: str) -> bool:
    try:
        return 0.0 < float(text) < 1.0
    except ValueError:
        return False


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
    # the OCR engine that reads the images: a name registered in textdiff.ocr ("tesseract", "ppocr"); the
    # registry lives a floor above the config, so textdiff.eval checks the name when it builds the engine
    ocr_engine: str = "tesseract"
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
    # more weights scored at every evaluation, beside the sampled EMA (first condition only, same prompts and
    # seeds): "raw" (the optimizer's weights) or the name of an average the ema section keeps ("0.999",
    # "plain:0.999", "power:0.05" ...), each logged as eval/avg/<name>/cer ...
    averages: tuple[str, ...] = ()
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
        _require(bool(self.ocr_engine) and not any(c.isspace() for c in self.ocr_engine), "eval.ocr_engine",
                 f"is {self.ocr_engine!r}; name an OCR engine: tesseract or ppocr")
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
