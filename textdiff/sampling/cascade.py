"""Base model -> upsampler stages: each stage samples with its own settings from the previous stage's images.

Stage 0 is a base model (``model.low_res_size == 0``); stage k > 0 is an upsampler whose ``low_res_size`` is
stage k-1's ``image_size``. :func:`check_cascade` says so, before any weight is loaded or any step taken.

Determinism: every random draw of sample i at stage k comes from its own generators, seeded by
``stream_seed(seed_i, k, stream)`` for the starting noise, the noise-conditioning noise and the sampler's own
noise, so a sample depends on its seed and settings, not on which other samples share its batch.
Stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``) are given one generator per row, so the whole
batch still runs as one batch.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from textdiff.config import ModelConfig
from textdiff.diffusion.noise_cond import NOISE_COND_STEPS, sampling_low_res
from textdiff.sampling.guidance import guidance_after_step, guidance_conds, guided_model
from textdiff.sampling.loading import LoadedModel
from textdiff.sampling.samplers import SAMPLERS, default_grid, default_sampler, sample, sampling_timesteps
from textdiff.sampling.thresholding import clipping, dynamic_thresholding

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class CascadeError(ValueError):
    """A cascade or its settings cannot run; raised before any work, naming the flag or stage."""


@dataclass(frozen=True)
class StageSettings:
    """How one stage samples: sampler name, step spec (``"50"``, ``"ddim25"``, ``"logsnr20"``), DDIM eta,
    guidance scales, dynamic-thresholding percentile (a quantile in (0, 1], e.g. 0.995; None: off), whether
    the x_0 prediction is clipped to [-1, 1] at every step when dynamic thresholding is off (the research
    code's default; without it a barely trained model's samples blow up on the cosine schedule, whose first
    step divides by sqrt(abar) ~ 1e-4), for noise-conditioned upsamplers the noise level (a step of the
    1000-step noise-conditioning schedule; 0 = clean low-res image), and the step below which guidance applies
    (the research code's ``guidance_after_step``, a step of the model's training process; None: every step)."""

    sampler: str = default_sampler("50")  # DEFAULT_SAMPLING's choice for 50 steps (docs/samplers.md)
    steps: str = default_grid(default_sampler("50"), "50")
    eta: float = 0.0
    guidance_txt: float = 1.0
    guidance_capt: float = 1.0
    dynamic_threshold: Optional[float] = None
    clip_denoised: bool = True
    noise_cond_level: int = 0
    guidance_after_step: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-able form (the keys of the constructor)."""
        return asdict(self)

    def check(self, where: str, alphas_cumprod: torch.Tensor) -> None:
        """Raise CascadeError for settings that cannot run on a process with ``alphas_cumprod`` ``[K]``;
        ``where`` names the stage in the message."""
        if self.sampler not in SAMPLERS:
            raise CascadeError(f"{where}: sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise CascadeError(f"{where}: eta {self.eta} only applies to the ddim sampler, not {self.sampler}")
        if not 0.0 <= self.eta <= 1.0:
            raise CascadeError(f"{where}: eta {self.eta} must lie in [0, 1]")
        try:
            sampling_timesteps(len(alphas_cumprod), self.steps, alphas_cumprod)
        except ValueError as e:
            raise CascadeError(f"{where}: steps {self.steps!r}: {e}") from None
        if self.dynamic_threshold is not None and not 0.0 < self.dynamic_threshold <= 1.0:
            raise CascadeError(f"{where}: dynamic-threshold percentile {self.dynamic_threshold} must be a quantile "
                               "in (0, 1], e.g. 0.995")
        if self.guidance_after_step is not None and self.guidance_after_step < 0:
            raise CascadeError(f"{where}: guidance-after-step {self.guidance_after_step} must be >= 0 (a step of the "
                               f"{len(alphas_cumprod)}-step process), or unset for guidance at every step")
        if not 0 <= self.noise_cond_level < NOISE_COND_STEPS:
            raise CascadeError(f"{where}: noise-conditioning level {self.noise_cond_level} must lie in "
                               f"[0, {NOISE_COND_STEPS - 1}]")


def image_channels(cfg: ModelConfig) -> int:
    """Channels of the images a model makes and takes: 1 for a monochrome U-net without the RGB adapter."""
    return 1 if cfg.monochrome and not cfg.monochrome_adapter else cfg.in_channels


def check_cascade(cfgs: Sequence[ModelConfig], names: Sequence[str],
                  settings: Sequence[StageSettings]) -> None:
    """Raise CascadeError unless stage 0 is a base model and each upsampler takes the previous stage's images.

    cfgs: each stage's ``model`` section; names: how the user named each stage (path and flag).
    """
    if cfgs[0].low_res_size:
        raise CascadeError(f"{names[0]} is an upsampler (model.low_res_size={cfgs[0].low_res_size}); the first "
                           "stage must be a base model, with upsamplers given to --upsampler")
    for k in range(1, len(cfgs)):
        prev, cur = cfgs[k - 1], cfgs[k]
        if not cur.low_res_size:
            raise CascadeError(f"{names[k]} is a base model (model.low_res_size=0), not an upsampler; remove it "
                               "from --upsampler")
        if cur.low_res_size != prev.image_size:
            raise CascadeError(f"{names[k]} upsamples {cur.low_res_size} px images (model.low_res_size) but stage "
                               f"{k - 1} ({names[k - 1]}) makes {prev.image_size} px images; give an upsampler "
                               f"trained on {prev.image_size} px inputs")
        if image_channels(cur) != image_channels(prev):
            raise CascadeError(f"{names[k]} takes {image_channels(cur)}-channel images but stage {k - 1} "
                               f"({names[k - 1]}) makes {image_channels(prev)}-channel ones")
    for k, (cfg, s) in enumerate(zip(cfgs, settings)):
        if s.noise_cond_level and not cfg.noise_cond:
            raise CascadeError(f"{names[k]}: --noise-cond-level {s.noise_cond_level} needs a noise-conditioned "
                               "upsampler (model.noise_cond=true); this one is not, so leave it at 0")


STREAMS = ("start", "noise_cond", "sampler")


def stream_seed(seed: int, stage: int, stream: str) -> int:
    """The seed of one random stream (:data:`STREAMS`) of sample ``seed`` at cascade stage ``stage``.

    The base stage's starting noise is seeded by ``seed`` itself; every other stream by a hash, so no stream
    of one seed repeats a stream of another (seed s's sampler noise is not seed s+1's starting noise).
    """
    if stream not in STREAMS:
        raise ValueError(f"random stream {stream!r} is unknown; choose one of {', '.join(STREAMS)}")
    if stage == 0 and stream == "start":
        return seed
    digest = hashlib.sha256(f"textdiff-sample:{seed}:{stage}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def per_sample_noise(seeds: Sequence[int], shape: Sequence[int], stage: int, stream: str = "start") -> torch.Tensor:
    """``[N, *shape]`` standard normal noise, row i from its own CPU generator
    (``stream_seed(seeds[i], stage, stream)``), so rows depend on neither N nor the device."""
    generators = [torch.Generator().manual_seed(stream_seed(s, stage, stream)) for s in seeds]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


@contextlib.contextmanager
def autocast(device: torch.device, precision: str):
    """Autocast to fp16/bf16 on ``device`` for ``precision`` (``fp32``: nothing)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def network_fn(loaded: LoadedModel, precision: str) -> Callable[..., torch.Tensor]:
    """``net(x, t, **cond)`` -> fp32 raw model output, under autocast for ``precision``."""
    device = next(loaded.model.parameters()).device

    def net(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with autocast(device, precision):
            return loaded.model(x, t, **cond).float()
    return net


def _low_res_input(loaded: LoadedModel, low_res: torch.Tensor, seeds: Sequence[int], stage: int,
                   level: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The low-res image the upsampler sees and its noise-conditioning steps (None without noise_cond);
    level 0 leaves it un-noised (:func:`sampling_low_res`)."""
    if not loaded.cfg.model.noise_cond:
        return low_res, None
    noise = per_sample_noise(seeds, low_res.shape[1:], stage, "noise_cond").to(low_res)
    return sampling_low_res(low_res, level, noise)


def sample_stage(loaded: LoadedModel, settings: StageSettings, txt: Sequence[str], capt: Sequence[str],
                 seeds: Sequence[int], stage: int = 0, low_res: Optional[torch.Tensor] = None,
                 precision: str = "fp32", progress: bool = True) -> torch.Tensor:
    """Sample one stage for N prompts: ``[N, C, S, S]`` in [-1, 1] (S = ``model.image_size``).

    txt, capt, seeds: N each (``""`` = no text / no caption). low_res: ``[N, C, s, s]`` in [-1, 1] for an
    upsampler (s = ``model.low_res_size``).
    """
    cfg = loaded.cfg.model
    device = next(loaded.model.parameters()).device
    size = cfg.image_size
    shape = (image_channels(cfg), size, size)
    noise_cond_t = None
    if cfg.low_res_size:
        if low_res is None or tuple(low_res.shape[-2:]) != (cfg.low_res_size, cfg.low_res_size):
            got = None if low_res is None else tuple(low_res.shape)
            raise CascadeError(f"stage {stage} ({loaded.source}) needs low-res images [N, C, {cfg.low_res_size}, "
                               f"{cfg.low_res_size}], got {got}")
        low_res, noise_cond_t = _low_res_input(loaded, low_res.to(device), seeds, stage, settings.noise_cond_level)
    diffusion = loaded.diffusion
    timesteps = sampling_timesteps(diffusion.num_timesteps, settings.steps, diffusion.alphas_cumprod)
    options = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    net = network_fn(loaded, precision)
    x_start = per_sample_noise(seeds, shape, stage).to(device)
    conds = guidance_conds(loaded.model.prepare_cond, list(txt), list(capt) if cfg.using_capt else None,
                           low_res=low_res, noise_cond_t=noise_cond_t)
    fn = diffusion.sampling_fn(guided_model(net, *conds, settings.guidance_txt, settings.guidance_capt))
    if settings.guidance_after_step is not None:
        fn = guidance_after_step(fn, diffusion.sampling_fn(guided_model(net, *conds, 1.0, 1.0)),
                                 settings.guidance_after_step)
    if settings.dynamic_threshold is not None:
        fn = dynamic_thresholding(fn, diffusion.alphas_cumprod, settings.dynamic_threshold)
    elif settings.clip_denoised:
        fn = clipping(fn, diffusion.alphas_cumprod)
    # one generator per row: a stochastic sampler's noise for sample i depends on its seed alone
    generators = [torch.Generator().manual_seed(stream_seed(s, stage, "sampler")) for s in seeds]
    images = sample(settings.sampler, fn, x_start, diffusion.alphas_cumprod, timesteps, generator=generators,
                    disable=not progress, **options)
    return images.clamp(-1, 1)


def run_cascade(stages: Sequence[LoadedModel], settings: Sequence[StageSettings], txt: Sequence[str],
                capt: Sequence[str], seeds: Sequence[int], precision: str = "fp32",
                progress: bool = True) -> list[torch.Tensor]:
    """Every stage in turn for N prompts; returns each stage's images ``[N, C, S_k, S_k]`` in [-1, 1]."""
    if len(stages) != len(settings):
        raise CascadeError(f"{len(stages)} stages but {len(settings)} stage settings; give one per stage")
    check_cascade([s.cfg.model for s in stages], [s.source for s in stages], settings)
    images: list[torch.Tensor] = []
    for k, (loaded, s) in enumerate(zip(stages, settings)):
        images.append(sample_stage(loaded, s, txt, capt, seeds, stage=k,
                                   low_res=images[-1] if images else None, precision=precision, progress=progress))
    return images
