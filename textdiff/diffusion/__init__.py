"""Gaussian diffusion: schedules, the forward/reverse process and its losses, respacing, timestep samplers.

``build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)`` is the one entry point.
"""

from __future__ import annotations

from textdiff.config.respacing import space_timesteps
from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.diffusion.respace import respace
from textdiff.diffusion.schedules import betas_for


def build_diffusion(diffusion_cfg, learn_sigma: bool) -> GaussianDiffusion:
    """The process described by the ``diffusion`` config section, respaced if it says so.

    ``learn_sigma`` comes from ``model.learn_sigma``: it decides whether the network's output carries the
    variance half and so which loss applies.
    """
    full = GaussianDiffusion(
        betas_for(diffusion_cfg.noise_schedule, diffusion_cfg.diffusion_steps),
        learn_sigma=learn_sigma, predict_xstart=diffusion_cfg.predict_xstart, use_kl=diffusion_cfg.use_kl,
        rescale_learned_sigmas=diffusion_cfg.rescale_learned_sigmas,
        rescale_timesteps=diffusion_cfg.rescale_timesteps, predict_v=diffusion_cfg.predict_v,
        loss_weighting=diffusion_cfg.loss_weighting, min_snr_gamma=diffusion_cfg.min_snr_gamma,
        decoder_nll_cdf=diffusion_cfg.decoder_nll_cdf, vb_loss_ratio=diffusion_cfg.vb_loss_ratio)
    if not diffusion_cfg.timestep_respacing:
        return full
    return respace(full, space_timesteps(full.num_timesteps, diffusion_cfg.timestep_respacing))


__all__ = ["GaussianDiffusion", "build_diffusion", "respace", "space_timesteps"]
