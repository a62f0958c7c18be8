"""The training loop: batches -> conditioning dropout -> diffusion loss -> DeepSpeed step -> EMA -> logs.

``train(cfg, run_dir, resume, monitor)`` is what ``launch.sh`` runs on every rank. :class:`Trainer` holds the
parts (engine, EMA, stream, checkpoints, logger) and :meth:`Trainer.run` is the loop itself, written out
plainly. What the run shows while it trains (sample grids, the spelling evaluation) is a *monitor* the trainer
calls with the EMA weights (textdiff/train/monitor.py), so the trainer only trains.

The step never waits for the accelerator: the losses, their timestep quartiles, the count of non-finite
losses and the gradient norm stay on the device and are reduced over the ranks once per ``train.log_every``
(textdiff/train/window.py, which also says what a NaN loss does); the only per-step agreement is a vote on
host values (does every rank have its batch, did a rank get a stop signal), a CPU all-reduce. SIGTERM or
SIGINT make every rank finish the current step, save a checkpoint, and return normally.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from textdiff.config import ConfigError, TextdiffConfig
from textdiff.data.preview import save_batch_preview
from textdiff.data.stream import build_train_stream
from textdiff.diffusion import build_diffusion
from textdiff.diffusion.timestep_sampler import build_timestep_sampler
from textdiff.files import atomic_write_bytes
from textdiff.formats.checkpoint import CONFIG_FILE, load_untrusted, rank_file, read_config, resolve_resume
from textdiff.formats.weights import load_weights
from textdiff.models import build_model
from textdiff.train import engine as eng
from textdiff.train.checkpoint import CheckpointManager, RunDirError, check_resume_compatible, write_failure
from textdiff.train.control import StopFlag, rng_state, seed_everything, set_rng_state
from textdiff.train.logging import TrainLogger, gpu_memory_gib, per_rank, setup_logging
from textdiff.train.loss import diffusion_loss, grad_norm
from textdiff.train.master_ema import MasterEMA
from textdiff.train.monitor import Monitor, MonitorView
from textdiff.train.window import LossWindow, step_stats

log = logging.getLogger(__name__)

LOSS_HISTORY = 1000  # per-step losses kept (and checkpointed) for the run summary


class StepAborted(RuntimeError):
    """A step was given up on every rank (data workers killed by a stop signal); the weights are untouched."""


class Trainer:
    """Everything one rank needs to train: built from the config, resumed from a checkpoint if asked, with
    an optional ``monitor`` it hands the EMA weights to (textdiff/train/monitor.py)."""

    def __init__(self, cfg: TextdiffConfig, run_dir: str | Path, resume: Optional[str] = None,
                 load_capt_weights: bool = True, monitor: Optional[Monitor] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size, _ = eng.init_distributed()
        setup_logging(self.rank)
        self.device = eng.device()
        self.dtype = eng.compute_dtype(cfg.deepspeed)
        self.monitor = monitor
        self._check_monitor()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint, self.rank, self.world_size,
                                      dist.barrier)
        resume_from = resolve_resume(resume, self.ckpt.root)
        if resume is None and resolve_resume("auto", self.ckpt.root) is not None:
            raise ConfigError(f"--run-dir {self.run_dir} already holds checkpoints; pass --resume auto to "
                              "continue that run, or choose a new --run-dir")
        self.stream = self._check_and_build_stream(resume_from)

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
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.window = LossWindow(self.dtype, self.accumulation, self.world_size)

        named = eng.trainable_named_parameters(self.engine)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # the EMA averages this rank's fp32 master weights where they are: sharded like the optimizer state
        # under ZeRO (every rank its own partition), on rank 0 alone where every rank holds all of them; 0-dim
        # gains (trained as [1]) come out 0-dim, as in the model
        self.ema = MasterEMA(self.engine, self.param_names, self.params, [n in promoted for n in self.param_names],
                             cfg.ema, self.rank)
        self.step = 0
        self.losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        if resume_from is not None:
            self._load(resume_from)
        self.batches = iter(self.stream)
        self.logger = TrainLogger(self.run_dir, self.rank)
        self.fresh = resume_from is None
        self._ema_model: Optional[torch.nn.Module] = None  # rank 0's plain model for the monitor
        self.first_batch: Optional[dict] = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg.to_dict(), indent=2)
            atomic_write_bytes(self.run_dir / "config.json", (text + "\n").encode())
            self.logger.text("config", self.step, f"```json\n{text}\n```")

    def _check_monitor(self) -> None:
        """Before any training work: rank 0 asks the monitor whether it can run (Tesseract found, prompts
        read), and every rank stops together with a ConfigError if not (a run must not find out at its first
        evaluation)."""
        error = self.monitor.setup_error() if self.monitor is not None and self.rank == 0 else None
        if self._all_reduce([float(error is not None)])[0]:
            raise ConfigError(error or "rank 0 could not set up the run's monitor (eval.*); see its error")

    def _check_and_build_stream(self, resume_from: Optional[Path]):
        """What a run can get wrong, found before the model and engine are built: a run directory it cannot
        write (RunDirError), the batch keys, the shards ``data.shards`` names, and whether ``resume_from``'s
        config and data-stream position fit this run (ConfigError). Returns the data stream, continuing at
        ``resume_from``'s position where the batch and world size allow it."""
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
        state = None
        if resume_from is not None:
            for warning in check_resume_compatible(read_config(resume_from), cfg.to_dict(), str(resume_from)):
                if self.rank == 0:
                    log.warning(warning)
            mine = resume_from / rank_file(self.rank)
            if mine.is_file():  # a missing rank file is reported by CheckpointManager.load, naming the world size
                state = self._usable_stream_state(load_untrusted(mine)["stream"], micro, resume_from)
        try:  # building a stream reads no sample yet: this resolves and counts the shards only
            return build_train_stream(cfg.data, cfg.augment, cfg.model.image_size, cfg.model.low_res_size, micro,
                                      self.rank, self.world_size, state=state)
        except ValueError as e:
            if state is None:
                raise ConfigError(str(e)) from None
            # a saved position that does not fit this run's data.* (e.g. other shards)
            raise ConfigError(f"cannot continue the data stream saved in {resume_from}: {e}. data.shards or "
                              f"another data.* key differs from {resume_from / CONFIG_FILE}: resume with its "
                              "values, or start a new --run-dir") from None

    def _usable_stream_state(self, stream_state: dict, micro_batch: int, path: Path) -> Optional[dict]:
        """The saved stream position, or None (start the stream afresh) when the batch or world size changed."""
        if stream_state.get("batch_size") != micro_batch or stream_state.get("world_size") != self.world_size:
            log.warning("batch size or world size changed since %s: the data stream starts afresh, so samples "
                        "seen before may repeat", path)
            return None
        return stream_state

    def _load(self, path: Path) -> None:
        rank_state, textdiff_state = self.ckpt.load(self.engine, path, every_rank=self.ema.sharded)
        self.step = rank_state["step"]
        self.losses.extend(rank_state["losses"])
        set_rng_state(rank_state["rng"])
        self.generator.set_state(rank_state["generator"])
        self.timesteps.load_state_dict(rank_state["timestep_sampler"])
        if textdiff_state is not None:
            self.ema.load(textdiff_state["ema"])
        log.info("resumed from %s at step %d", path, self.step)

    def ema_weights(self, rate: float | str) -> Optional[dict[str, torch.Tensor]]:
        """{parameter name: full fp32 EMA} of one rate at the current step on rank 0, None elsewhere (all ranks
        must call this: a sharded EMA is gathered)."""
        return self.ema.weights(rate, self.step)

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

    def reduce_window(self) -> dict[str, float]:
        """The mean losses of the steps since the last call, summed over the ranks (all ranks call this:
        :meth:`LossWindow.reduce`); each step's mean loss joins ``self.losses``."""
        values, per_step = self.window.reduce(self.step)
        self.losses.extend(per_step)
        return values

    def check_finite(self) -> None:
        """Raise TrainingDiverged on every rank (all call this) if a step since the last log had a non-finite
        loss under bf16/fp32."""
        self.window.check_finite(self.step)

    def train_step(self, stop: Optional[StopFlag] = None) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its timings and
        votes (``_images_per_s``, ``_samples_per_s``, ``_skipped``, ``_stop``). The losses stay on the device
        in ``self.window`` until :meth:`reduce_window` (at ``train.log_every``).

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
        if not skipped:
            self.ema.update()
        self.step += 1
        step_t = torch.cat(ts)
        step_terms = {k: torch.cat(v) for k, v in terms.items()}
        if self.timesteps.learns_from_losses:  # its next draw depends on every rank's losses: gather now
            gathered = self._all_gather(torch.stack([step_t.double(), step_terms["loss"].double().cpu()]))
            finite = torch.isfinite(gathered[1])  # an fp16 overflow step must not enter the loss history
            self.timesteps.update(gathered[0][finite].long(), gathered[1][finite])
        self.window.append(step_stats(step_terms, step_t, self.diffusion.num_timesteps), nonfinite)
        step_time = time.perf_counter() - started
        images = self.micro_batch * self.accumulation
        return {"_images_per_s": images / step_time, "_samples_per_s": images / max(data_time, 1e-9),
                "_skipped": float(skipped), "_stop": float(bool(stop_votes))}

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

    def weights_of(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        """{parameter name: full fp32 tensor} of ``"raw"`` (the optimizer's weights) or of an average the EMA
        keeps, at this step, on rank 0 (None elsewhere; all ranks must call this: sharded ones are gathered)."""
        if name != "raw":
            return self.ema_weights(name)
        full = eng.full_fp32_parameters(self.engine, self.params)
        return self.ema.shaped({n: t.detach().clone() for n, t in zip(self.param_names, full)}) \
            if self.rank == 0 else None

    def look(self, last: bool, stopping: bool) -> None:
        """Hand the monitor the weights of its averages at this step (all ranks call this: sharded ones are
        gathered; rank 0 observes while the others wait). Never from weights a non-finite step reached."""
        self.check_finite()
        weights = {name: self.weights_of(name) for name in self.monitor.averages}
        if self.rank == 0:
            if self._ema_model is None:
                self._ema_model = self._plain_model()

            def load(name: str) -> torch.nn.Module:
                load_weights(self._ema_model, weights[name], f"{name} weights at step {self.step}")
                return self._ema_model

            samples_seen = self.step * self.micro_batch * self.accumulation * self.world_size
            self.monitor.observe(MonitorView(self.step, samples_seen, load(self.monitor.averages[0]), self.first_batch,
                                             self.logger, last, stopping, load))
        dist.barrier()

    def _plain_model(self) -> torch.nn.Module:
        """A plain (non-DeepSpeed) copy of the model on this rank's device, sharing the frozen modules."""
        model = build_model(self.cfg.model, load_capt_weights=False)
        for name in eng.detach_frozen_modules(model):
            parent, _, attr = name.rpartition(".")
            object.__setattr__(model.get_submodule(parent) if parent else model, attr, self.frozen[name])
        return model.to(self.device).eval()

    def save(self) -> Path:
        """Checkpoint the current step (all ranks must call this)."""
        self.reduce_window()  # the loss history saved holds every step so far
        rank_state = {"step": self.step, "losses": list(self.losses), "rng": rng_state(),
                      "generator": self.generator.get_state(), "timestep_sampler": self.timesteps.state_dict(),
                      "stream": self.stream.state_dict()}
        ema = self.ema.state(self.step)
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
                last = self.step == cfg.max_steps
                if self.monitor is not None and self.monitor.due(self.step, last, stopping):
                    self.look(last, stopping)
                every = self.cfg.ema.snapshot_every  # and at the run's end, so an EMA can be rebuilt there
                if every and (self.step % every == 0 or last or stopping):
                    self.check_finite()  # no snapshot of weights a non-finite step reached
                    self.ema.snapshot(self.run_dir, self.step)
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


def train(cfg: TextdiffConfig, run_dir: str | Path, resume: Optional[str] = None,
          monitor: Optional[Monitor] = None) -> dict:
    """Build a :class:`Trainer` on this rank and run it; returns :meth:`Trainer.run`'s summary."""
    trainer = Trainer(cfg, run_dir, resume, monitor=monitor)
    try:
        return trainer.run()
    finally:
        trainer.close()
