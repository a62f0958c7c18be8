"""The training loop: batches -> conditioning dropout -> diffusion loss -> DeepSpeed step -> EMA -> logs.

``train(cfg, run_dir, resume)`` is what ``launch.sh`` runs on every rank. :class:`Trainer` holds the parts
(engine, EMA, stream, checkpoints, logger) and :meth:`Trainer.run` is the loop itself, written out plainly.

The step never waits for the accelerator: the losses, their timestep quartiles, the count of non-finite
losses and the gradient norm stay on the device and are reduced over the ranks once per ``train.log_every``
(:meth:`Trainer.reduce_window`); the only per-step agreement is a vote on host values (does every rank have
its batch, did a rank get a stop signal), a CPU all-reduce.

Failure behaviour: a NaN or inf loss on any rank is seen by all ranks at the next reduction of the window:
the next log, and before every checkpoint, sample grid and evaluation. With fp16 the step goes through and
DeepSpeed's loss scaler skips it (counted in ``train/skipped_steps``); with bf16 or fp32 there is no scaler to
skip it, so every rank stops there with :class:`TrainingDiverged` naming the first bad step, before anything
is saved from the weights that step reached. SIGTERM or SIGINT make every rank finish the current step, save
a checkpoint, and return normally.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from textdiff.config import ConfigError, TextdiffConfig
from textdiff.files import atomic_write_bytes
from textdiff.train import engine as eng
from textdiff.formats.checkpoint import (CONFIG_FILE, load_untrusted, rank_file, rate_key, read_config,
                                         resolve_resume)
from textdiff.train.checkpoint import CheckpointManager, RunDirError, check_resume_compatible, write_failure
from textdiff.train.control import StopFlag, rng_state, seed_everything, set_rng_state
from textdiff.train.ema import EMA
from textdiff.train.logging import (EVAL_GRID_COLUMNS, TrainLogger, append_jsonl, eval_scalars, gpu_memory_gib,
                                    image_grid, per_rank, save_png, setup_logging)

log = logging.getLogger(__name__)

LOSS_HISTORY = 1000  # per-step losses kept (and checkpointed) for the run summary


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf under bf16/fp32; the message names the step."""


class StepAborted(RuntimeError):
    """A step was given up on every rank (data workers killed by a stop signal); the weights are untouched."""


def nonfinite_action(dtype: torch.dtype) -> str:
    """What a NaN/inf loss does: ``"skip"`` under fp16 (the loss scaler drops the step), else ``"stop"``."""
    return "skip" if dtype == torch.float16 else "stop"


def diffusion_loss(model: torch.nn.Module, model_fn, diffusion, timesteps, batch: dict, cfg: TextdiffConfig,
                   generator: torch.Generator, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch -> (importance-weighted mean loss, t [N] on CPU, per-sample terms {"loss", "mse", "vb"}
    [N] float32, detached, on ``device``: reading them is left to the caller, so the step need not wait).

    batch: a stream batch (``image`` [N, C, S, S], ``txt``, ``capt``, ``low_res`` for upsamplers); conditioning
    dropout, noise-conditioning steps, timesteps and noise all come from ``generator`` (exact resume).
    model: supplies ``prepare_cond``; model_fn(x_t, t, **cond) runs the network (through the engine).
    """
    from textdiff.diffusion.noise_cond import noise_low_res, sample_noise_cond_steps
    from textdiff.models import cond_dropout

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
    terms = diffusion.training_losses(model_fn, x0, t, model_kwargs=cond, noise=noise)
    loss = (terms["loss"] * weights.to(device, non_blocking=True)).mean()
    return loss, t, {k: v.detach().float() for k, v in terms.items()}


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of ``params`` together (before clipping), a 0-dim tensor on their device:
    one multi-tensor norm, no host sync."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def step_stats(terms: dict[str, torch.Tensor], t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """One step's sums for the log, on the terms' device: [loss, mse, vb sums, samples, loss sum by
    timestep quartile (4), samples by quartile (4)]. terms: per-sample [N]; t: [N] step indices."""
    quartile = (4 * t.long() // num_timesteps).clamp(max=3).to(terms["loss"].device)
    # not F.one_hot: off CUDA it reads the indices' min and max on the host to check them
    onehot = (quartile[:, None] == torch.arange(4, device=quartile.device)).to(terms["loss"].dtype)  # [N, 4]
    sums = torch.stack([terms["loss"].sum(), terms["mse"].sum(), terms["vb"].sum(),
                        torch.tensor(float(len(t)), device=onehot.device)])
    return torch.cat([sums, terms["loss"] @ onehot, onehot.sum(0)])


class Trainer:
    """Everything one rank needs to train: built from the config, resumed from a checkpoint if asked."""

    def __init__(self, cfg: TextdiffConfig, run_dir: str | Path, resume: Optional[str] = None,
                 load_capt_weights: bool = True):
        from textdiff.data.stream import build_train_stream
        from textdiff.diffusion import build_diffusion
        from textdiff.diffusion.timesteps import build_timestep_sampler
        from textdiff.models import build_model

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size, _ = eng.init_distributed()
        setup_logging(self.rank)
        self.device = eng.device()
        self.dtype = eng.compute_dtype(cfg.deepspeed)
        self.eval_prompts = self._setup_eval() if cfg.eval.every else []
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint, self.rank, self.world_size,
                                      dist.barrier)
        resume_from = resolve_resume(resume, self.ckpt.root)
        if resume is None and resolve_resume("auto", self.ckpt.root) is not None:
            raise ConfigError(f"--run-dir {self.run_dir} already holds checkpoints; pass --resume auto to "
                              "continue that run, or choose a new --run-dir")
        self._check_before_building(resume_from)

        self.generator = seed_everything(cfg.train.seed, self.rank)
        eng.set_cudnn_benchmark(cfg.train.cudnn_benchmark)
        model = build_model(cfg.model, load_capt_weights=load_capt_weights)
        self.engine, self.frozen, promoted = eng.build_engine(model, cfg, self.world_size)
        self.engine_fn = eng.engine_forward(self.engine, self.dtype, cfg.train.channels_last)
        self.diffusion = build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        self.timesteps = build_timestep_sampler(cfg.diffusion.schedule_sampler, self.diffusion.num_timesteps)
        # DeepSpeed reports no gradient norm for an fp32 ZeRO-0 engine; the loop measures it then, and clips
        # with it
        self._own_grad_norm, self._own_clip = eng.own_grad_norm(cfg.deepspeed), eng.own_clipping(cfg.deepspeed)
        self._grad_norm: Optional[torch.Tensor] = None
        # the per-micro-batch votes (data, stop) are host values: a CPU all-reduce decides them without
        # waiting for the accelerator (gloo, also under NCCL)
        self._host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        # per step since the last reduction, on the device: step_stats and the non-finite micro-batch count
        self._window: list[torch.Tensor] = []
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.accumulation = self.engine.gradient_accumulation_steps()

        named = eng.trainable_named_parameters(self.engine)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.scalar = [n in promoted for n in self.param_names]  # kept 0-dim in the EMA, as in the model
        # the EMA averages this rank's fp32 master weights where they are: sharded like the optimizer state
        # under ZeRO (every rank its own partition), on rank 0 alone where every rank holds all of them
        master, self.ema_sharded = eng.fp32_master_weights(self.engine, self.params)
        plain = eng.master_is_params(self.engine, self.params)
        labels = self.param_names if plain else [f"fp32 master {i}" for i in range(len(master))]
        self.ema = EMA(labels, master, cfg.ema) if self.ema_sharded or self.rank == 0 else None
        self._ema_cache: dict[str, tuple[int, Optional[dict[str, torch.Tensor]]]] = {}  # rate -> (step, full EMA)
        self.step = 0
        self.losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        stream_state = None
        if resume_from is not None:
            stream_state = self._load(resume_from)
        self.stream = build_train_stream(cfg.data, cfg.augment, cfg.model.image_size, cfg.model.low_res_size,
                                         self.micro_batch, self.rank, self.world_size, state=stream_state)
        self.batches = iter(self.stream)
        self.logger = TrainLogger(self.run_dir, self.rank)
        self.fresh = resume_from is None
        self._sampler_model: Optional[torch.nn.Module] = None
        self._sampler_step = -1  # the step whose EMA weights _sampler_model holds
        self.first_batch: Optional[dict] = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg.to_dict(), indent=2)
            atomic_write_bytes(self.run_dir / "config.json", (text + "\n").encode())
            self.logger.text("config", self.step, f"```json\n{text}\n```")

    def _setup_eval(self) -> list:
        """Before any training work: rank 0 finds Tesseract and reads the evaluation prompts, and every rank
        stops together with a ConfigError if that failed (a run must not find out at its first evaluation)."""
        from textdiff.eval.ocr import TesseractMissingError, find_tesseract
        from textdiff.eval.prompts import eval_prompts

        prompts, error = [], None
        if self.rank == 0:
            size = self.cfg.model.low_res_size or self.cfg.model.image_size  # upsamplers are given renders of it
            try:
                find_tesseract(self.cfg.eval.tesseract_cmd)
                prompts = eval_prompts(self.cfg.eval, size=size)
            except (TesseractMissingError, ValueError) as e:  # PromptFileError is a ValueError
                error = f"eval.every is {self.cfg.eval.every} but {e}; or set eval.every=0 to train without it"
        if self._all_reduce([float(error is not None)])[0]:
            raise ConfigError(error or "rank 0 could not set up the spelling evaluation (eval.*); see its error")
        return prompts

    def _check_before_building(self, resume_from: Optional[Path]) -> None:
        """What a run can get wrong, found before the model and engine are built: a run directory it cannot
        write (RunDirError), the batch keys, the shards ``data.shards`` names, and whether ``resume_from``'s
        config and data-stream position fit this run (ConfigError)."""
        from textdiff.data.stream import build_train_stream

        cfg = self.cfg
        try:  # a read-only folder or a full disk, found now rather than at the first checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-rank{self.rank}"
            probe.write_bytes(b"textdiff\n")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"--run-dir {self.run_dir} is not writable: {write_failure(e)}") from None
        eng.check_batch_keys(cfg.deepspeed, self.world_size)
        micro = cfg.deepspeed["train_micro_batch_size_per_gpu"]
        try:  # building a stream reads no sample yet: this resolves and counts the shards only
            build_train_stream(cfg.data, cfg.augment, cfg.model.image_size, cfg.model.low_res_size, micro,
                               self.rank, self.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if resume_from is None:
            return
        for warning in check_resume_compatible(read_config(resume_from), cfg.to_dict(), str(resume_from)):
            if self.rank == 0:
                log.warning(warning)
        mine = resume_from / rank_file(self.rank)
        state = None  # a missing rank file is reported by CheckpointManager.load, naming the world size
        if mine.is_file():
            state = self._usable_stream_state(load_untrusted(mine)["stream"], micro, resume_from, warn=False)
        try:
            build_train_stream(cfg.data, cfg.augment, cfg.model.image_size, cfg.model.low_res_size, micro,
                               self.rank, self.world_size, state=state)
        except ValueError as e:  # a saved position that does not fit this run's data.* (e.g. other shards)
            raise ConfigError(f"cannot continue the data stream saved in {resume_from}: {e}. data.shards or "
                              f"another data.* key differs from {resume_from / CONFIG_FILE}: resume with its "
                              "values, or start a new --run-dir") from None

    def _usable_stream_state(self, stream_state: dict, micro_batch: int, path: Path, warn: bool = True
                             ) -> Optional[dict]:
        """The saved stream position, or None (start the stream afresh) when the batch or world size changed."""
        if stream_state.get("batch_size") != micro_batch or stream_state.get("world_size") != self.world_size:
            if warn:
                log.warning("batch size or world size changed since %s: the data stream starts afresh, so "
                            "samples seen before may repeat", path)
            return None
        return stream_state

    def _load(self, path: Path) -> Optional[dict]:
        rank_state, textdiff_state = self.ckpt.load(self.engine, path, every_rank=self.ema_sharded)
        self.step = rank_state["step"]
        self.losses.extend(rank_state["losses"])
        set_rng_state(rank_state["rng"])
        self.generator.set_state(rank_state["generator"])
        self.timesteps.load_state_dict(rank_state["timestep_sampler"])
        if self.ema is not None:
            self._load_ema(textdiff_state["ema"])
        log.info("resumed from %s at step %d", path, self.step)
        return self._usable_stream_state(rank_state["stream"], self.micro_batch, path)

    def _load_ema(self, saved: dict) -> None:
        """Lay the checkpoint's full fp32 averages (names in model order) out as this rank's master weights."""
        if list(saved["names"]) != self.param_names:
            missing = sorted(set(self.param_names) - set(saved["names"]))[:3]
            raise ValueError(f"the checkpoint's EMA holds other parameters than this model (e.g. missing "
                             f"{missing}); resume with the model config the run was started with")
        averages = {k: eng.partition_fp32(self.engine, self.params, v) for k, v in saved["averages"].items()}
        self.ema.load_state_dict({"num_updates": saved["num_updates"], "names": self.ema.names,
                                  "averages": averages})

    def ema_weights(self, rate: float | str) -> Optional[dict[str, torch.Tensor]]:
        """{parameter name: full fp32 EMA} of one rate at the current step on rank 0, None elsewhere; the
        model's shapes (0-dim gains too). Gathers a sharded EMA (all ranks must call this); kept per step."""
        key = rate if isinstance(rate, str) else rate_key(rate)
        if key in self._ema_cache and self._ema_cache[key][0] == self.step:
            return self._ema_cache[key][1]
        if self.ema is None:  # a replicated EMA lives on rank 0 alone
            return None
        local = list(self.ema.named_averages(key).values())
        full = eng.full_fp32_parameters(self.engine, self.params, local)
        weights = None
        if self.rank == 0:
            weights = {n: t.reshape(()) if scalar else t
                       for n, t, scalar in zip(self.param_names, full, self.scalar)}
        # every rank remembers the step, so that a second call at this step (the grid, then the evaluation)
        # gathers nowhere rather than on all ranks but the one that kept the result
        self._ema_cache = {key: (self.step, weights)}
        return weights

    def _ema_state(self) -> Optional[dict]:
        """The full EMA for the checkpoint on rank 0 (all ranks must call this): count, names, averages."""
        averages = {key: self.ema_weights(key) for key in self.ema.averages} if self.ema is not None else {}
        if self.rank != 0:
            return None
        return {"num_updates": self.ema.num_updates, "names": list(self.param_names),
                "averages": {k: [t.cpu() for t in v.values()] for k, v in averages.items()}}

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, torch.float64).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.cat(out, dim=-1).cpu()

    def _vote(self, values: list[float]) -> list[float]:
        """Sum of host-side ``values`` over the ranks."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._host_group)
        return t.tolist()

    def train_step(self, stop: Optional[StopFlag] = None) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its timings and
        votes (``_images_per_s``, ``_samples_per_s``, ``_skipped``, ``_stop``). The losses stay on the device
        in ``self._window`` until :meth:`reduce_window` (at ``train.log_every``).

        No device value is read on the host: one CPU vote per micro-batch (does every rank have its batch; at
        the last, did a rank get a stop signal). A NaN/inf loss is counted on the device and raises
        TrainingDiverged at the next :meth:`reduce_window` or :meth:`check_finite` (under bf16/fp32).
        """
        started, data_time = time.perf_counter(), 0.0
        skipped_before = self.engine.skipped_steps
        ts, terms = [], {"loss": [], "mse": [], "vb": []}
        nonfinite = torch.zeros((), device=self.device)
        stop_votes = 0.0
        for micro in range(self.accumulation):
            t0 = time.perf_counter()
            batch = self._next_batch(stop)
            data_time += time.perf_counter() - t0
            last = micro == self.accumulation - 1
            missing, stopping = self._vote([float(batch is None), float(last and stop is not None and stop.requested)])
            stop_votes += stopping
            if missing:  # every rank gives up this step together
                if stop is not None:
                    stop.requested = True
                raise StepAborted(f"step {self.step + 1} abandoned: data workers were stopped on "
                                  "some rank while it was stopping; saving the last complete step")
            if stop is not None:
                stop.defer_worker_errors()
            if self.first_batch is None:
                self.first_batch = batch
                if self.fresh and self.rank == 0 and self.cfg.data.save_first_batch:
                    from textdiff.data.preview import save_batch_preview

                    save_batch_preview(batch, self.run_dir)
            loss, t, micro_terms = diffusion_loss(self.engine.module, self.engine_fn, self.diffusion, self.timesteps,
                                                  batch, self.cfg, self.generator, self.device)
            nonfinite = nonfinite + (~torch.isfinite(loss.detach())).float()
            self.engine.backward(loss)
            if last and self._own_grad_norm:  # the gradients are summed over the ranks by now
                self._grad_norm = (eng.clip_gradients_(self.params, self._own_clip) if self._own_clip
                                   else grad_norm(self.params))
            self.engine.step()
            ts.append(t)
            for k in terms:
                terms[k].append(micro_terms[k])
        if stop is not None and stop_votes:
            stop.requested = True
        skipped = self.engine.skipped_steps > skipped_before
        if self.ema is not None and not skipped:
            self.ema.update(eng.fp32_master_weights(self.engine, self.params)[0])
        self.step += 1
        step_t = torch.cat(ts)
        step_terms = {k: torch.cat(v) for k, v in terms.items()}
        if self.timesteps.learns_from_losses:  # its next draw depends on every rank's losses: gather now
            gathered = self._all_gather(torch.stack([step_t.double(), step_terms["loss"].double().cpu()]))
            finite = torch.isfinite(gathered[1])  # an fp16 overflow step must not enter the loss history
            self.timesteps.update(gathered[0][finite].long(), gathered[1][finite])
        self._window.append(torch.cat([step_stats(step_terms, step_t, self.diffusion.num_timesteps),
                                       nonfinite.reshape(1).to(step_terms["loss"].dtype)]))
        step_time = time.perf_counter() - started
        images = self.micro_batch * self.accumulation
        return {"_images_per_s": images / step_time, "_samples_per_s": images / max(data_time, 1e-9),
                "_skipped": float(skipped), "_stop": float(bool(stop_votes))}

    def reduce_window(self) -> dict[str, float]:
        """The losses of the steps since the last call, summed over the ranks in one all-reduce (all ranks
        call this): their means ``train/loss``, ``train/mse``, ``train/vb`` and ``train/loss_q0..3`` (the
        quartiles with samples); each step's mean loss joins ``self.losses``."""
        if not self._window:
            return {}
        stats = torch.stack(self._window).double()  # [steps, 13]
        dist.all_reduce(stats)
        stats = stats.cpu()
        self._raise_if_diverged(stats[:, 12])
        self._window = []
        self.losses.extend((stats[:, 0] / stats[:, 3]).tolist())
        total = stats.sum(0)
        out = {"train/loss": float(total[0] / total[3]), "train/mse": float(total[1] / total[3]),
               "train/vb": float(total[2] / total[3])}
        for q in range(4):
            if total[8 + q] > 0:
                out[f"train/loss_q{q}"] = float(total[4 + q] / total[8 + q])
        return out

    def check_finite(self) -> None:
        """Raise TrainingDiverged (on every rank: all must call this) if a step since the last reduction had a
        non-finite loss under bf16/fp32; the window is kept for the next log."""
        if self._window:
            counts = torch.stack([row[12] for row in self._window]).double()
            dist.all_reduce(counts)
            self._raise_if_diverged(counts.cpu())

    def _raise_if_diverged(self, nonfinite: torch.Tensor) -> None:
        """nonfinite: [steps] non-finite micro-batches of each step in the window, summed over the ranks."""
        bad = nonfinite.nonzero().flatten()
        if len(bad) == 0 or nonfinite_action(self.dtype) != "stop":
            return
        first = self.step - len(nonfinite) + 1 + int(bad[0])
        raise TrainingDiverged(
            f"the loss is not finite at step {first} (in {int(nonfinite[bad[0]])} micro-batches of "
            f"{self.accumulation} x {self.world_size} ranks; {len(bad)} of the {len(nonfinite)} steps up to step "
            f"{self.step}) under {str(self.dtype).removeprefix('torch.')}, which has no loss scaling to skip it; "
            f"nothing was saved after it. Resume from the last checkpoint with a lower lr or gradient_clipping, "
            "or check the data")

    def _next_batch(self, stop: Optional[StopFlag]) -> Optional[dict]:
        """The next batch, or None when the data workers were killed by a stop signal (this rank is stopping)."""
        try:
            return next(self.batches)
        except RuntimeError as e:
            if stop is None or not stop.requested or "DataLoader worker" not in str(e):
                raise
            log.warning("data workers stopped with the run (%s)", e)
            return None

    def log_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write the mean losses since the last log, this step's timings and the engine's state to
        TensorBoard (all ranks must call this); returns the values written."""
        perf = self._all_gather(torch.tensor([[metrics["_images_per_s"]], [metrics["_samples_per_s"]]]))
        counters = self.stream.counters()
        skipped_data = self._all_reduce([counters["skipped_corrupt"], counters["shard_errors"]])
        values = self.reduce_window()
        norm = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        if norm is not None:
            values["train/grad_norm"] = float(norm)
        values["train/lr"] = float(self.engine.get_lr()[0])
        optimizer = self.engine.optimizer
        values["train/loss_scale"] = float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 1.0)))
        values["train/skipped_steps"] = float(self.engine.skipped_steps)
        values.update(per_rank("perf/images_per_s", perf[0].tolist()))
        values.update(per_rank("perf/samples_per_s", perf[1].tolist()))
        values["data/skipped_corrupt"], values["data/shard_errors"] = skipped_data
        values["data/epoch"] = float(counters["epoch"])
        values.update(gpu_memory_gib(self.device) or {})
        self.logger.scalars(self.step, values)
        return values

    def _ema_model(self) -> torch.nn.Module:
        """A plain (non-DeepSpeed) copy of the model on rank 0 for sampling, sharing the frozen modules."""
        from textdiff.models import build_model

        model = build_model(self.cfg.model, load_capt_weights=False)
        for name in eng.detach_frozen_modules(model):
            parent, _, attr = name.rpartition(".")
            object.__setattr__(model.get_submodule(parent) if parent else model, attr, self.frozen[name])
        return model.to(self.device).eval()

    def _sample_rate(self) -> float:
        cfg = self.cfg
        return cfg.train.sample_ema_rate if cfg.train.sample_ema_rate is not None else cfg.ema.rates[0]

    def _ema_sampler(self):
        """Rank 0: a LoadedModel holding the EMA weights of the current step (loaded once per step)."""
        from textdiff.formats.weights import load_weights
        from textdiff.sampling.loading import LoadedModel

        rate = self._sample_rate()
        if self._sampler_model is None:
            self._sampler_model = self._ema_model()
        if self._sampler_step != self.step:
            load_weights(self._sampler_model, self.ema_weights(rate), f"EMA {rate} at step {self.step}")
            self._sampler_step = self.step
        return LoadedModel(self._sampler_model, self.diffusion, self.cfg, str(self.run_dir), f"ema:{rate}")

    def _sample_ema(self, txt: list[Optional[str]], capt: list[str], seeds: list[int], steps: int,
                    low_res: Optional[torch.Tensor], guidance_txt: Optional[float] = None,
                    sampler: str = "ddim") -> torch.Tensor:
        """Rank 0: sample the EMA weights with the sample grid's guidance (or ``guidance_txt``) and thresholding.

        txt (None: the null transcription), capt, seeds: N each; low_res: [N, C, s, s] in [-1, 1] for
        upsamplers. Returns [N, C, S, S] in [-1, 1].
        """
        from textdiff.sampling.cascade import StageSettings, sample_stage
        from textdiff.sampling.samplers import default_grid

        cfg = self.cfg.train
        settings = StageSettings(sampler=sampler, steps=default_grid(sampler, str(steps)),
                                 guidance_txt=cfg.sample_guidance_scale_txt if guidance_txt is None else guidance_txt,
                                 guidance_capt=cfg.sample_guidance_scale_capt,
                                 dynamic_threshold=cfg.sample_dynamic_threshold)
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        with torch.no_grad():
            return sample_stage(self._ema_sampler(), settings, txt, capt, seeds, low_res=low_res,
                                precision=precision, progress=False)

    def sample_grid(self, first_batch: Optional[dict]) -> Optional[torch.Tensor]:
        """Rank 0: sample ``train.sample_prompts`` with the EMA weights and guidance; write the grid to
        TensorBoard (``samples/ema``) and ``RUN_DIR/samples/step_N.png``. Returns it ([3, H, W]), None elsewhere.

        Upsamplers take their low-res inputs from the first training batch (the same images every time).
        """
        self.check_finite()  # no grid from weights a non-finite step reached
        self.ema_weights(self._sample_rate())  # every rank takes part in gathering a sharded EMA
        if self.rank != 0:
            return None
        cfg = self.cfg.train
        n = len(cfg.sample_prompts)
        captions = list(cfg.sample_captions) or [""] * n
        low_res = None
        if self.cfg.model.low_res_size:
            repeats = -(-n // first_batch["low_res"].shape[0])
            low_res = first_batch["low_res"].repeat(repeats, 1, 1, 1)[:n]
        images = self._sample_ema(list(cfg.sample_prompts), captions, list(range(n)), cfg.sample_steps, low_res)
        grid = image_grid(images, nrow=n)
        self.logger.image("samples/ema", self.step, grid)
        save_png(grid, self.run_dir / "samples" / f"step_{self.step:08d}.png")
        return grid

    def evaluate(self) -> Optional[dict]:
        """Spelling evaluation (all ranks call this; only rank 0 works, the others wait at a barrier).

        Rank 0 samples ``self.eval_prompts`` with the EMA weights (``eval.sampler`` at ``eval.steps``) under
        each condition of :func:`eval_conditions` (guidance scales, and the null transcription with
        ``eval.null_control``), reads them with Tesseract, logs ``eval/*`` scalars (the first condition as
        ``eval/cer`` ..., each as ``eval/<condition>/cer`` ..., the null control as ``eval/cer_null``) and
        the ``eval/samples`` grid (one row block per condition), writes the images under
        ``RUN_DIR/eval/step_N/`` with ``eval.save_images``, and appends one line to ``RUN_DIR/eval.jsonl``.
        Returns that line's dict on rank 0, None elsewhere or when Tesseract failed (a warning is logged and
        training goes on: one OCR timeout on a busy machine must not end a run).
        """
        from textdiff.eval.ocr import TesseractError, TesseractMissingError
        from textdiff.eval.spelling import eval_conditions, evaluate_spelling

        record = None
        self.check_finite()  # no evaluation of weights a non-finite step reached
        self.ema_weights(self._sample_rate())  # every rank takes part in gathering a sharded EMA
        if self.rank == 0:
            started = time.perf_counter()
            conditions = eval_conditions(self.cfg.eval, self.cfg.train.sample_guidance_scale_txt)
            shown: dict[str, list[torch.Tensor]] = {c.name: [] for c in conditions}
            try:
                results = {c.name: evaluate_spelling(
                    lambda txt, capt, seed, c=c: self._eval_sample_fn(txt, capt, seed, shown[c.name], c),
                    self.eval_prompts, self.cfg.eval) for c in conditions}
            except (TesseractError, TesseractMissingError) as e:
                log.warning("spelling evaluation at step %d failed, training goes on: %s", self.step, e)
            else:
                first = results[conditions[0].name]
                record = {"step": self.step, "samples_seen": self.step * self.micro_batch * self.accumulation
                          * self.world_size, "time": round(time.time(), 3), **first, "conditions": results}
                if "null" in results:
                    record["cer_null"] = results["null"].get("cer")
                record["seconds"] = round(time.perf_counter() - started, 3)
                scalars = eval_scalars(first)
                for name, metrics in results.items():
                    scalars.update({k.replace("eval/", f"eval/{name}/", 1): v for k, v in eval_scalars(metrics).items()})
                if "null" in results and "cer" in results["null"]:
                    scalars["eval/cer_null"] = float(results["null"]["cer"])
                self.logger.scalars(self.step, scalars)
                images = torch.cat([torch.cat(shown[c.name]) for c in conditions])
                per_condition = len(images) // len(conditions)  # one row per condition up to 2 x 8 images
                columns = per_condition if per_condition <= 2 * EVAL_GRID_COLUMNS else EVAL_GRID_COLUMNS
                grid = image_grid(images, columns)
                self.logger.image("eval/samples", self.step, grid)
                if self.cfg.eval.save_images:
                    self._save_eval_images(grid, shown)
                append_jsonl(self.run_dir / "eval.jsonl", record)
                log.info("eval at step %d (%.1f s): %s", self.step, record["seconds"],
                         ", ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k.count("/") == 1))
        dist.barrier()
        return record

    def _save_eval_images(self, grid: torch.Tensor, shown: dict[str, list[torch.Tensor]]) -> None:
        """RUN_DIR/eval/step_N/grid.png and <condition>/NNN.png (prompt order of expand(eval prompts))."""
        from textdiff.data.preview import png_bytes, to_uint8

        out = self.run_dir / "eval" / f"step_{self.step:08d}"
        save_png(grid, out / "grid.png")
        for name, batches in shown.items():
            for i, array in enumerate(to_uint8(torch.cat(batches))):
                (out / name).mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out / name / f"{i:03d}.png", png_bytes(array))

    def _eval_sample_fn(self, txt: list[str], capt: list[str], seed: int, shown: list[torch.Tensor],
                        condition) -> np.ndarray:
        """evaluate_spelling's sample_fn under one eval condition: image j gets seed ``seed + j`` (as
        tools/sample.py numbers a prompt's images); the null control samples the null transcription in place
        of each prompt's; upsamplers upscale the synthetic render of each transcription. Returns uint8
        [N, S, S, 3]."""
        from textdiff.data.augment import to_tensor
        from textdiff.data.preview import to_uint8
        from textdiff.data.synthetic import render_sample
        from textdiff.eval.prompts import render_rng

        seeds = [seed + j for j in range(len(txt))]
        low_res = None
        if self.cfg.model.low_res_size:
            size = self.cfg.model.low_res_size
            low_res = torch.stack([to_tensor(np.asarray(render_sample(t, render_rng(s, 0), size).image.convert("RGB")))
                                   for t, s in zip(txt, seeds)])
        asked = [None] * len(txt) if condition.null_txt else list(txt)
        images = self._sample_ema(asked, capt, seeds, self.cfg.eval.steps, low_res, condition.guidance_txt,
                                  self.cfg.eval.sampler)
        shown.append(images.cpu())
        return to_uint8(images)

    def save(self) -> Path:
        """Checkpoint the current step (all ranks must call this)."""
        self.reduce_window()  # the loss history saved holds every step so far
        rank_state = {"step": self.step, "losses": list(self.losses), "rng": rng_state(),
                      "generator": self.generator.get_state(), "timestep_sampler": self.timesteps.state_dict(),
                      "stream": self.stream.state_dict()}
        ema = self._ema_state()
        textdiff_state = {"step": self.step, "ema": ema} if self.rank == 0 else None
        path = self.ckpt.save(self.engine, self.step, rank_state, textdiff_state, self.cfg.to_dict())
        log.info("saved checkpoint %s", path)
        return path

    def run(self) -> dict:
        """Train until ``train.max_steps``, a stop signal or ``train.max_minutes`` of this run's wall time (the
        ranks then stop together, as on a signal, after saving); returns {"step", "losses", "checkpoint",
        "stopped"}."""
        cfg = self.cfg.train
        stop = StopFlag()
        stop.install()
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
        last_saved, stopping = None, False
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=self.rank != 0, desc="train",
                        dynamic_ncols=True)
        try:
            while self.step < cfg.max_steps:
                if deadline is not None and time.monotonic() > deadline and not stop.requested:
                    log.info("train.max_minutes=%g reached at step %d: stopping after this step", cfg.max_minutes,
                             self.step)
                    stop.requested = True  # voted on in the step, so every rank stops with this one
                try:
                    metrics = self.train_step(stop)
                except StepAborted as e:
                    log.warning("%s", e)
                    last_saved, stopping = self.save(), True
                    break
                # the ranks' agreed vote, not this rank's live flag: a signal landing after the vote must not
                # send one rank into save() while the others start the next step (it counts next step)
                stopping = bool(metrics["_stop"])
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or stopping:
                    logged = self.log_metrics(metrics)
                    progress.set_postfix(loss=f"{logged['train/loss']:.4f}", refresh=False)  # update(1) shows it
                progress.update(1)
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == cfg.max_steps):
                    self.sample_grid(self.first_batch)
                every = self.cfg.eval.every  # skipped when stopping: the launcher kills a rank 30 s after SIGTERM
                if every and (self.step % every == 0 or self.step == cfg.max_steps) and not stopping:
                    self.evaluate()
                if self.step % self.cfg.checkpoint.save_every == 0 or self.step == cfg.max_steps or stopping:
                    last_saved = self.save()
                if stopping:
                    break
        finally:
            stop.restore()
            progress.close()
            self.logger.flush()
        return {"step": self.step, "losses": list(self.losses), "checkpoint": last_saved,
                "stopped": stopping}

    def close(self) -> None:
        """Close the event file."""
        self.logger.close()


def train(cfg: TextdiffConfig, run_dir: str | Path, resume: Optional[str] = None) -> dict:
    """Build a :class:`Trainer` on this rank and run it; returns :meth:`Trainer.run`'s summary."""
    trainer = Trainer(cfg, run_dir, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
