"""Throughput of one training step through the DeepSpeed engine and the same step in plain PyTorch.

Both run in one process on the same fixed synthetic batch (no data loading), so the ratio of their step
times is the engine's overhead (ZeRO bookkeeping, loss scaling, its optimizer wrappers) at that config.
The plain step is what a hand-written loop does: the model in fp32 under ``torch.autocast`` for fp16/bf16
(with a GradScaler for fp16), ``torch.optim.AdamW`` with the recipe's hyper-parameters, gradient clipping.
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref
from dataclasses import replace
from typing import Callable

import deepspeed.comm
import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from textdiff.config import TextdiffConfig
from textdiff.diffusion import build_diffusion
from textdiff.diffusion.timestep_sampler import UniformSampler
from textdiff.models import build_model
from textdiff.train import engine as eng
from textdiff.train.ema import EMA
from textdiff.train.loss import diffusion_loss


def synthetic_batch(cfg: TextdiffConfig, n: int, generator: torch.Generator) -> dict:
    """A stream-shaped batch of ``n``: random images in [-1, 1], short transcriptions and captions."""
    size, low = cfg.model.image_size, cfg.model.low_res_size
    batch = {"image": torch.rand(n, 3, size, size, generator=generator) * 2 - 1,
             "txt": [("hello world " * 8)[: 4 + i % 20] for i in range(n)],
             "capt": ["a sign on a wall"] * n, "key": [str(i) for i in range(n)]}
    if low:
        batch["low_res"] = torch.rand(n, 3, low, low, generator=generator) * 2 - 1
    return batch


def step_seconds(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                 device: torch.device) -> dict[str, float]:
    """Median wall time of each named ``step()`` over ``repeats`` rounds, the order reversed every other
    round (A, B, B, A, A, B, ...) so that a shared machine's changing load and any drift within a round hit
    every step alike; ``warmup`` untimed rounds first."""
    def timed(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(steps[name]))
    return {name: statistics.median(t) for name, t in times.items()}


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that the ops run under it create and that are still alive,
    and their peak (CPU has no allocator statistics; CUDA uses ``torch.cuda.max_memory_allocated``)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes one ``step()`` allocates above what existed before it (weights, optimizer state): its
    activations, gradients and temporaries."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as counter:
        step()
    return counter.peak


def training_step(model: nn.Module, forward: Callable[[], torch.Tensor], target: torch.Tensor,
                  dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """``step()``: autocast ``forward()`` in ``dtype`` (fp32: none), MSE to ``target``, backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = forward()
        F.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def page_faults(step: Callable[[], None]) -> int:
    """The page faults one ``step()`` takes (minor and major, this process): each is a page the step touches
    that the kernel had to map in, zeroed, because the allocator had returned it (:mod:`textdiff.malloc`)."""
    import resource  # deferred: a Unix-only module

    before = resource.getrusage(resource.RUSAGE_SELF)
    step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one ``step()`` as ``torch.utils.flop_counter`` counts them (matmuls, convolutions and
    attention, forward and backward; elementwise ops count 0)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, n: int = 0, repeats: int = 5) -> float:
    """The measured rate of an n x n matmul in ``dtype`` (median of ``repeats``): the denominator of MFU,
    the fraction of what this device's matrix units deliver that a step gets (n: 4096 on CUDA, 512 else)."""
    n = n or (4096 if device.type == "cuda" else 512)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = step_seconds({"mm": lambda: a @ b}, repeats, 1, device)["mm"]
    return 2 * n ** 3 / seconds


def _plain_optimizer(params, ds_config: dict) -> torch.optim.Optimizer:
    opt = ds_config.get("optimizer", {"params": {}})
    p = {k: v for k, v in opt.get("params", {}).items() if k in ("lr", "betas", "eps", "weight_decay")}
    return torch.optim.AdamW(params, **p)


def bench_train(cfg: TextdiffConfig, steps: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Time ``steps`` optimizer steps (micro-batch x accumulation images each) through the engine, in
    plain PyTorch (A-B-B-A rounds), then through the engine without and with the EMA update (A-B-B-A rounds
    again); returns images/s of the first two (from the median step time), ``overhead`` = engine step time /
    plain step time, ``ema_overhead`` = (engine + EMA) / engine, the collectives (calls, MB) of one step
    without and with the EMA, and the engine step's model FLOPs utilisation: ``gflop_per_step`` (the plain
    step's matmuls, convolutions and attention, counted by ``torch.utils.flop_counter``: the same model work)
    per second of the engine step over ``matmul_gflop_s``, a matmul measured in the step's dtype."""
    rank, world, _ = eng.init_distributed()
    device, dtype = eng.device(), eng.compute_dtype(cfg.deepspeed)
    torch.manual_seed(seed)
    plain_model = build_model(cfg.model, load_capt_weights=False)
    engine_model = copy.deepcopy(plain_model)
    engine, _, _ = eng.build_engine(engine_model, cfg, world)
    micro, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    diffusion = build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
    timesteps = UniformSampler(diffusion.num_timesteps)
    batch = synthetic_batch(cfg, micro, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)

    engine_fn = eng.engine_forward(engine, dtype, cfg.train.channels_last)

    own_clip = eng.own_clipping(cfg.deepspeed)
    trainable_engine = [p for _, p in eng.trainable_named_parameters(engine)]

    def engine_step():  # as Trainer.train_step does it
        for micro in range(accumulation):
            loss, _, _ = diffusion_loss(engine.module, engine_fn, diffusion, timesteps, batch, cfg, generator, device)
            engine.backward(loss)
            if own_clip and micro == accumulation - 1:
                eng.clip_gradients_(trainable_engine, own_clip)
            engine.step()

    plain_model.to(device).train()
    trainable = [p for p in plain_model.parameters() if p.requires_grad]
    optimizer = _plain_optimizer(trainable, cfg.deepspeed)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    clip = float(cfg.deepspeed.get("gradient_clipping", 0.0))

    def plain_fn(x, t, **cond):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return plain_model(x, t, **cond).float()

    def plain_step():
        for _ in range(accumulation):
            loss, _, _ = diffusion_loss(plain_model, plain_fn, diffusion, timesteps, batch, cfg, generator, device)
            scaler.scale(loss / accumulation).backward()
        if clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    # the EMA as the Trainer keeps it: this rank's fp32 master weights (its ZeRO partition), _foreach updates
    master, sharded = eng.fp32_master_weights(engine, trainable_engine)
    ema = EMA([f"fp32 master {i}" for i in range(len(master))], master, cfg.ema) if sharded or rank == 0 else None

    def engine_ema_step():
        engine_step()
        if ema is not None:
            ema.update(eng.fp32_master_weights(engine, trainable_engine)[0])

    seconds = step_seconds({"engine": engine_step, "plain": plain_step}, steps, warmup, device)
    ema_seconds = step_seconds({"engine": engine_step, "engine_ema": engine_ema_step}, steps, 0, device)
    with CollectiveCounter() as without_ema:
        engine_step()
    with CollectiveCounter() as with_ema:
        engine_ema_step()
    engine_s, plain_s = seconds["engine"], seconds["plain"]
    images = micro * accumulation
    flops, rate = step_flops(plain_step), matmul_flops_per_s(dtype, device)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "zero_stage": eng.zero_stage(cfg.deepspeed), "world_size": world, "rank": rank,
            "images_per_step": images, "steps": steps, "engine_images_per_s": images / engine_s,
            "plain_images_per_s": images / plain_s, "overhead": engine_s / plain_s,
            "ema_sharded": sharded, "ema_overhead": ema_seconds["engine_ema"] / ema_seconds["engine"],
            "collectives_per_step": without_ema.calls, "collective_mb_per_step": without_ema.bytes / 2 ** 20,
            "collectives_per_step_with_ema": with_ema.calls,
            "collective_mb_per_step_with_ema": with_ema.bytes / 2 ** 20, "gflop_per_step": flops / 1e9,
            "matmul_gflop_s": rate / 1e9, "mfu": flops / engine_s / rate}


class CollectiveCounter:
    """Counts the collectives called inside it, at ``deepspeed.comm`` (what DeepSpeed calls) and at
    ``torch.distributed`` (textdiff's own), and their tensors' bytes; a call made from inside a counted one
    (deepspeed.comm handing over to torch.distributed) is not counted again."""

    NAMES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce_scatter_tensor",
             "reduce_scatter_fn", "reduce_scatter", "all_gather_into_tensor", "allgather_fn", "all_gather",
             "all_gather_coalesced", "broadcast", "reduce", "all_to_all_single")

    def __init__(self):
        self.calls = self.bytes = 0
        self._depth = 0
        self._saved: list[tuple[object, str, Callable]] = []

    def __enter__(self) -> "CollectiveCounter":
        for module in (deepspeed.comm, torch.distributed):
            for name in self.NAMES:
                if hasattr(module, name):
                    original = getattr(module, name)
                    self._saved.append((module, name, original))
                    setattr(module, name, self._counting(original))
        return self

    def _counting(self, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls += 1
                self.bytes += sum(a.numel() * a.element_size() for a in tree_flatten((args, kwargs))[0]
                                  if isinstance(a, torch.Tensor))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __exit__(self, *exc) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)
        self._saved = []


def checkpointing_bench(cfg: TextdiffConfig, variants: dict[str, dict], steps: int = 6, warmup: int = 2,
                        device: torch.device = torch.device("cpu"), seed: int = 0) -> list[dict]:
    """textdiff's plain training step (as :func:`textdiff.bench.peer.peer_bench` times it, fp32) with
    activation checkpointing set as each variant says (``{"name": {"use_checkpoint": ..., ...}}``; the first
    is the reference), A-B-B-A; returns per variant its images/s, the step's peak MB (at 46 M that is the
    optimizer's, not the activations'), the MB the forward pass keeps for the backward (``saved_mb``), and
    each relative to the first."""
    n = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 8))
    batch = synthetic_batch(cfg, n, torch.Generator().manual_seed(seed))
    x = batch["image"].to(device)
    t = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    target = torch.randn(n, cfg.model.in_channels * (2 if cfg.model.learn_sigma else 1), *x.shape[2:],
                         generator=torch.Generator().manual_seed(seed + 1)).to(device)
    runs, saved = {}, {}
    for name, keys in variants.items():
        torch.manual_seed(seed)
        model = build_model(replace(cfg.model, **keys), load_capt_weights=False).to(device).train()
        cond = model.prepare_cond(batch["txt"], batch["capt"])
        forward = (lambda m=model, c=cond: m(x, t, **c))
        runs[name] = training_step(model, forward, target, torch.float32, device)
        with LiveTensorBytes() as counter:
            out = forward()  # alive now: what the backward pass will read
        saved[name] = counter.live
        del out
    seconds = step_seconds(runs, steps, warmup, device)
    peak = {name: peak_step_bytes(step, device) for name, step in runs.items()}
    first = next(iter(runs))
    return [{"variant": name, **variants[name], "img_s": n / seconds[name], "peak_mb": peak[name] / 2 ** 20,
             "saved_mb": saved[name] / 2 ** 20, "time_ratio": seconds[name] / seconds[first],
             "memory_ratio": peak[name] / peak[first], "saved_ratio": saved[name] / saved[first]}
            for name in runs]
