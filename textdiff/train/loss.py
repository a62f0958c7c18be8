"""One micro-batch's diffusion loss, as the training step computes it, and the gradient norm it logs."""

from __future__ import annotations

import torch

from textdiff.config import TextdiffConfig
from textdiff.diffusion.noise_cond import noise_low_res, sample_noise_cond_steps
from textdiff.models import cond_dropout


def diffusion_loss(model: torch.nn.Module, model_fn, diffusion, timesteps, batch: dict, cfg: TextdiffConfig,
                   generator: torch.Generator, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch -> (importance-weighted mean loss, t [N] on CPU, per-sample terms {"loss", "mse", "vb"}
    [N] float32, detached, on ``device``: reading them is left to the caller, so the step need not wait).

    batch: a stream batch (``image`` [N, C, S, S], ``txt``, ``capt``, ``low_res`` for upsamplers, ``loss_mask``
    [N, 1, S, S] with ``data.mask_unreadable``: the pixels the loss counts); conditioning dropout,
    noise-conditioning steps, timesteps and noise all come from ``generator`` (exact resume).
    model: supplies ``prepare_cond``; model_fn(x_t, t, **cond) runs the network (through the engine).
    """
    x0 = batch["image"].to(device, non_blocking=True)
    n = x0.shape[0]
    txt, capt = cond_dropout(batch["txt"], batch["capt"], cfg.model, generator=generator)
    low_res, noise_cond_t = batch.get("low_res"), None
    if cfg.model.noise_cond:
        noise_cond_t = sample_noise_cond_steps(n, cfg.model.noise_cond_max_step, generator=generator)
        low_res = noise_low_res(low_res, noise_cond_t, generator=generator)
    cond = model.prepare_cond(txt if cfg.model.txt else None, capt if cfg.model.using_capt else None,
                              low_res=low_res, noise_cond_t=noise_cond_t)
    t, weights = timesteps.sample(n, generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device, non_blocking=True)
    # t stays on the host: the schedule lookups happen there and only their N values travel
    masked = {"loss_mask": batch["loss_mask"].to(device, non_blocking=True)} if "loss_mask" in batch else {}
    terms = diffusion.training_losses(model_fn, x0, t, model_kwargs=cond, noise=noise, **masked)
    loss = (terms["loss"] * weights.to(device, non_blocking=True)).mean()
    return loss, t, {k: v.detach().float() for k, v in terms.items()}


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of ``params`` together (before clipping), a 0-dim tensor on their device:
    one multi-tensor norm, no host sync."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
