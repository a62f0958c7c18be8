"""Which diffusion steps a training batch trains on: uniform, or loss-aware (importance sampling).

Each sampler returns steps and importance weights ``w = 1 / (K p(t))``; weighting the per-sample loss by
``w`` keeps the loss unbiased. The loss-aware sampler (Nichol & Dhariwal 2021) draws ``t`` with probability
proportional to ``sqrt(E[loss_t^2])`` over the last ``history`` losses seen at each step, once every step
has a full history; its state is JSON-able for checkpoints.
"""

from __future__ import annotations

from typing import Optional

import torch


class UniformSampler:
    """Every step equally likely; weights are all 1."""

    learns_from_losses = False  # update() is a no-op: the loop need not gather the losses every step

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> torch.Tensor:
        """Unnormalised probabilities of each step, ``[K]`` float64."""
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps ``[N]`` long and importance weights ``[N]`` float32, on the CPU (``generator``: a CPU one)."""
        w = self.weights()
        p = w / w.sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (len(p) * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""

    def state_dict(self) -> dict:
        """Nothing to save."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class LossSecondMomentSampler(UniformSampler):
    """Steps drawn with probability ~ sqrt(mean of the last ``history`` squared losses) at each step.

    Until every step has ``history`` losses it samples uniformly; afterwards it mixes in ``uniform_prob``
    of the uniform distribution so no step starves. In distributed training call :meth:`update` with the
    steps and losses gathered from every rank, so all ranks hold the same state.
    """

    learns_from_losses = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def weights(self) -> torch.Tensor:
        """Unnormalised probabilities of each step, ``[K]`` float64."""
        if not bool((self.counts == self.history).all()):
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = (self.losses ** 2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample ``losses`` ``[N]`` seen at steps ``t`` ``[N]``, keeping the last ``history``."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] == self.history:
                self.losses[step] = torch.roll(self.losses[step], -1)
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        """JSON-able state: loss history and counts per step."""
        return {"history": self.history, "losses": self.losses.tolist(), "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; the step count and history length must match."""
        losses = torch.tensor(state["losses"], dtype=torch.float64)
        if losses.shape != self.losses.shape:
            raise ValueError(f"loss-second-moment sampler state has shape {tuple(losses.shape)}, expected "
                             f"{tuple(self.losses.shape)} (diffusion.diffusion_steps x history); was it saved "
                             "with other diffusion settings?")
        self.losses = losses
        self.counts = torch.tensor(state["counts"], dtype=torch.long)


def build_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """The sampler named by ``diffusion.schedule_sampler``: ``uniform`` or ``loss-second-moment``."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"diffusion.schedule_sampler is {name!r}; choose uniform or loss-second-moment")
