"""The DeepSpeed engine: process group, ZeRO stage 0-3, fp16 (dynamic loss scale) or bf16 or fp32.

DeepSpeed reads its own keys of the recipe (``cfg.deepspeed``: batch sizes, optimizer, scheduler,
``zero_optimization``, ``fp16``/``bf16``, ``gradient_clipping``). Frozen submodules (the CLIP caption
encoder with ``model.freeze_capt_encoder``) are taken out of the module DeepSpeed wraps before it sees it:
they stay out of the optimizer, out of ZeRO-3 partitioning and out of checkpoints, and run as plain
modules on every rank, in the engine's compute dtype.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import deepspeed
import deepspeed.ops
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch import nn

from textdiff.config import ConfigError, TextdiffConfig
from textdiff.config.deepspeed_keys import zero_stage
from textdiff.malloc import keep_freed_memory
from textdiff.train.param_groups import optimizer_inputs


def free_port() -> int:
    """A TCP port that is free right now on this machine (for a single-process run's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(cores: int, local_ranks: int) -> int:
    """Intra-op threads for each of ``local_ranks`` CPU ranks on ``cores`` cores (at least 1)."""
    return max(1, cores // max(1, local_ranks))


def extension_cache_dir() -> Path:
    """Where DeepSpeed's JIT-built ops go (``TORCH_EXTENSIONS_DIR``): one folder per Python, torch and DeepSpeed
    version and environment, so the runs of one environment share one build, and another environment (other
    headers, other flags) never rebuilds it under them, as torch's shared default folder lets happen."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return (base / "textdiff" / "torch_extensions" /
            f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-"
            f"deepspeed{deepspeed.__version__}-{env}")


def build_shm_op_once() -> None:
    """Build (first run) or load DeepSpeed's shared-memory op while holding an exclusive lock in its cache folder.

    Runs that start together wait for the one build instead of compiling it side by side. The lock is
    ``flock``, which the kernel drops when its holder dies, so a killed build never blocks the next run
    (older torch's lock *file* does, for ever). DeepSpeed's own call at ``init_distributed`` then finds
    the op loaded. A no-op where the accelerator has no such op (CUDA).
    """
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or extension_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "textdiff-build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder.load(verbose=False)


def shm_buffer_path(uid: int, addr: str, port: str, rank: int) -> Path:
    """Where DeepSpeed's CPU shm op keeps ``rank``'s all-reduce buffer (66 MB; named in its
    ops/csrc/cpu/comm/shm.cpp as ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int, world: int) -> bool:
    """Unlink this rank's shm all-reduce buffer name once every rank has mapped the buffers; returns
    whether there was one.

    DeepSpeed creates one per rank at ``init_distributed`` on CPU when all ranks are local (LOCAL_SIZE ==
    WORLD_SIZE) and never removes it: each run left 66 MB per rank in /dev/shm, which is memory, until a
    machine running many short jobs (a test suite) had 20 GB there. Every rank maps every rank's buffer
    before its ``init_distributed`` returns, so after a barrier the names are no longer needed: the
    mappings stay valid until the processes exit, and the kernel frees the memory then, even on a crash.
    Every rank must call this (it holds a barrier).
    """
    if os.environ.get("LOCAL_SIZE") != str(world):
        return False
    if world > 1:
        torch.distributed.barrier()
    path = shm_buffer_path(os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) expanded per node (``[2, 2, 2, 1]``)."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def slurm_environment(environ: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE) of a task that SLURM's
    ``srun`` started in a world of several tasks and no launcher set up; {} otherwise (a launcher's RANK is
    there, or one task alone). MASTER_ADDR and MASTER_PORT must come from the batch script: srun has no
    rendezvous of its own, and a ConfigError says how to set them."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in environ:
        return {}
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise ConfigError(f"srun started {environ['SLURM_NTASKS']} tasks but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set; in the batch script, export "
                          "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) and a free "
                          "MASTER_PORT (docs/training.md, \"On a cluster\")")
    local_size = environ.get("SLURM_NTASKS_PER_NODE") or \
        str(tasks_per_node(environ.get("SLURM_TASKS_PER_NODE", "1"))[int(environ.get("SLURM_NODEID", "0"))])
    return {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": environ["SLURM_NTASKS"], "LOCAL_SIZE": local_size}


def started_alone(environ: dict[str, str]) -> bool:
    """Whether no launcher set up a world: no RANK (deepspeed, torchrun, or srun through
    :func:`slurm_environment`) and no MPI rank (DeepSpeed's own MPI discovery takes those)."""
    return not any(k in environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"))


def init_distributed() -> tuple[int, int, int]:
    """Join (or, when started without a launcher, create) the process group; returns (rank, world, local_rank).

    Under ``deepspeed``/``torchrun`` the launcher's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are used,
    under ``srun`` SLURM's (:func:`slurm_environment`), under ``mpirun`` DeepSpeed's MPI discovery; a plain
    ``bash launch.sh`` run becomes a world of one on a free local port. On CPU it also picks the
    threads per rank (unless ``OMP_NUM_THREADS`` is set), keeps freed memory for the next step
    (:func:`textdiff.malloc.keep_freed_memory`) and leaves no shm buffer behind (:func:`release_shm_buffer`).
    """
    os.environ.update(slurm_environment(dict(os.environ)))
    alone = started_alone(os.environ)
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache_dir()))
    build_shm_op_once()
    for attempt in range(3 if alone else 1):
        if alone:  # picked just before binding; another process can still take it in between, so retry
            os.environ["MASTER_PORT"] = str(free_port())
        try:
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
            break
        except torch.distributed.DistNetworkError as e:
            if not alone or "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(local_rank)
    else:
        release_shm_buffer(torch.distributed.get_rank(), torch.distributed.get_world_size())
        keep_freed_memory()
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores; more threads than cores makes every op wait on its siblings
            torch.set_num_threads(cpu_threads_per_rank(os.cpu_count() or 1, int(os.environ.get("LOCAL_SIZE", "1"))))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def device() -> torch.device:
    """This rank's compute device (``cuda:LOCAL_RANK``, or ``cpu``)."""
    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", "0")))


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed casts the module to: float16 with ``fp16.enabled``, bfloat16 with ``bf16.enabled``."""
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    return torch.float32


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` with ``train.channels_last``, else the default contiguous format."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _as_input(v: torch.Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> torch.Tensor:
    if not v.is_floating_point():
        return v
    return v.to(dtype, memory_format=fmt) if v.dim() == 4 else v.to(dtype)


def engine_forward(engine: nn.Module, dtype: torch.dtype, channels_last: bool = False):
    """``fn(x, t, **cond)`` running the engine in its compute ``dtype`` (floating inputs cast to it, image-shaped
    ``[N, C, H, W]`` ones in channels-last memory format with ``channels_last``, so every convolution's output,
    and with it the U-net's activations, is channels-last too) and returning float32, as the diffusion losses
    expect."""
    fmt = memory_format(channels_last)

    def fn(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        cond = {k: _as_input(v, dtype, fmt) for k, v in cond.items()}
        return engine(_as_input(x, dtype, fmt), t, **cond).float()
    return fn


def set_cudnn_benchmark(enabled: bool) -> None:
    """``torch.backends.cudnn.benchmark`` from ``train.cudnn_benchmark`` (off by default, as the research code)."""
    torch.backends.cudnn.benchmark = enabled


def detach_frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Unregister every largest submodule whose parameters are all frozen; returns {dotted name: module}.

    The module stays reachable as a plain attribute, so ``model.forward`` still calls it, but
    ``model.parameters()``, ``state_dict()`` and DeepSpeed no longer see it.
    """
    detached = {}
    for name, child in list(model.named_children()):
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            del model._modules[name]
            object.__setattr__(model, name, child)
            detached[name] = child
        else:
            detached.update({f"{name}.{k}": v for k, v in detach_frozen_modules(child).items()})
    return detached


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """Reshape every 0-dim parameter to shape [1] in place; returns their names.

    DeepSpeed 0.19 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails for 0-dim tensors. A
    [1]-shaped gain broadcasts the same way in the forward pass; :func:`textdiff.formats.weights.fit_shapes` reshapes such
    entries back to the model's shapes.
    """
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


def check_batch_keys(ds_config: dict, world_size: int) -> None:
    """Raise ConfigError unless the batch keys agree: train_batch_size = micro x accumulation x world size."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if micro is None:
        raise ConfigError("the recipe needs train_micro_batch_size_per_gpu (the per-rank batch of one forward "
                          "pass); see docs/training.md")
    if total is not None and accum is not None and total != micro * accum * world_size:
        raise ConfigError(f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {accum} x {world_size} ranks; drop train_batch_size "
                          "(DeepSpeed then derives it) or fix one of them")
    if total is not None and accum is None and total % (micro * world_size):
        raise ConfigError(f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu {micro} "
                          f"x {world_size} ranks; set gradient_accumulation_steps or another train_batch_size")


def build_engine(model: nn.Module, cfg: TextdiffConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, {name: frozen module kept outside it}, names of
    0-dim parameters trained as [1] (see :func:`promote_scalar_parameters`)).

    Only parameters with ``requires_grad`` reach the optimizer, in the per-group learning rates of
    ``train.text_lr``/``gain_lr``/``capt_lr`` when set (textdiff/train/param_groups.py); with
    ``train.channels_last`` the 4-D weights are stored channels-last where :func:`weights_stay_plain` (the
    inputs are channels-last always, :func:`engine_forward`). The frozen modules are moved to this rank's
    device and compute dtype by hand, since DeepSpeed no longer owns them.
    """
    check_batch_keys(cfg.deepspeed, world_size)
    frozen = detach_frozen_modules(model)
    promoted = promote_scalar_parameters(model)
    dev, dtype = device(), compute_dtype(cfg.deepspeed)
    for module in frozen.values():
        module.to(device=dev, dtype=dtype)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parameters, ds_config = optimizer_inputs(trainable, cfg.train, dict(cfg.deepspeed))
    if own_clipping(cfg.deepspeed):
        ds_config["gradient_clipping"] = 0.0  # clip_gradients_ does it, see there
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameters, config=ds_config)
    if cfg.train.channels_last and weights_stay_plain(cfg.deepspeed):
        # after initialize: DeepSpeed broadcasts each weight as a flat byte view, which a channels-last tensor
        # has not; the optimizer keeps the same Parameter objects, only their storage changes
        engine.module.to(memory_format=torch.channels_last)
    if zero_stage(cfg.deepspeed) == 0 and world_size == 1:
        # one rank has nothing to sum: DeepSpeed's all-reduce would still flatten, reduce and copy back every
        # gradient each step (ZeRO 1-3 keep theirs: their optimizers do bookkeeping in it)
        engine.enable_backward_allreduce = False
    return engine, frozen, promoted


def own_grad_norm(ds_config: dict) -> bool:
    """Whether textdiff takes the gradient norm itself: fp32 at ZeRO 0, where DeepSpeed reports none and its
    clipping would loop over the parameters (the ZeRO and 16-bit optimizers clip their own flat partitions)."""
    return zero_stage(ds_config) == 0 and compute_dtype(ds_config) == torch.float32


def own_clipping(ds_config: dict) -> float:
    """The ``gradient_clipping`` norm textdiff applies itself (:func:`clip_gradients_`) where
    :func:`own_grad_norm`; 0 when DeepSpeed clips (or nobody does)."""
    return float(ds_config.get("gradient_clipping", 0.0)) if own_grad_norm(ds_config) else 0.0


def clip_gradients_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` (already summed over the ranks) in place so that their joint L2 norm
    is at most ``max_norm``, as DeepSpeed does (``max_norm / (norm + 1e-6)``, at most 1); returns the norm
    before clipping, a 0-dim tensor on the device. Two multi-tensor ops and no host sync, where DeepSpeed's
    fp32 path takes one norm per parameter and an all-reduce of it."""
    return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm, foreach=True)


def weights_stay_plain(ds_config: dict) -> bool:
    """Whether DeepSpeed leaves the weights as the module's own tensors, updated in place (fp32, ZeRO stage 0),
    so they can be stored channels-last. Under fp16/bf16 or ZeRO 1-3 it makes them views of one flat buffer,
    contiguous by construction, and points them back there after each step."""
    return zero_stage(ds_config) == 0 and compute_dtype(ds_config) == torch.float32


def trainable_named_parameters(engine) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what the optimizer updates, in a fixed order."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


# the optimizer attributes that hold this rank's fp32 partitions: ZeRO 3, ZeRO 1-2, DeepSpeed's bf16 optimizer
SHARDED_MASTERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
# every rank holds all of them: FP16_Optimizer (fp16 or bf16 with DeepSpeed's FusedAdam at ZeRO 0) keeps one flat
# fp32 copy per group, fp32_groups_flat[i] flattening fp16_groups[i]; FP16_UnfusedOptimizer (any other optimizer
# there: torch_adam, SGD, Lion ...) one fp32 copy per tensor, fp32_groups[i][j] of fp16_groups[i][j]
REPLICATED_MASTERS = ("fp32_groups_flat", "fp32_groups")


class UnknownOptimizerLayout(RuntimeError):
    """DeepSpeed built an optimizer whose fp32 master weights textdiff cannot find; the EMA would otherwise
    average the 16-bit weights."""


def master_layout(optimizer, params: list[nn.Parameter]) -> str:
    """Where ``optimizer`` keeps the fp32 master weights of ``params``: one of :data:`SHARDED_MASTERS` or
    :data:`REPLICATED_MASTERS` (the attribute holding them), or ``"params"`` (fp32 at ZeRO 0: the optimizer
    steps the parameters themselves).

    Raises UnknownOptimizerLayout, naming the optimizer's class, for any other optimizer: one whose parameter
    groups do not hold ``params`` themselves, or ``params`` that are not fp32.
    """
    for attr in (*SHARDED_MASTERS, *REPLICATED_MASTERS):
        if hasattr(optimizer, attr):
            return attr
    stepped = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
    if all(id(p) in stepped for p in params) and all(p.dtype == torch.float32 for p in params):
        return "params"
    kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    raise UnknownOptimizerLayout(
        f"DeepSpeed built the optimizer {kind}, whose fp32 master weights textdiff cannot find (it knows "
        f"{', '.join(SHARDED_MASTERS + REPLICATED_MASTERS)}, or an fp32 optimizer stepping the parameters; these "
        f"are {'/'.join(dtypes)}); the EMA must not average 16-bit weights. Use another zero_optimization.stage, "
        "fp16/bf16 setting or optimizer, or teach textdiff/train/engine.py this layout")


def fp32_master_weights(engine, params: list[nn.Parameter]) -> tuple[list[torch.Tensor], bool]:
    """This rank's fp32 master weights, the tensors the optimizer steps, and whether they are sharded.

    Under ZeRO 1-3 and DeepSpeed's bf16 optimizer: this rank's flat fp32 partitions (sharded: every rank
    holds its own); under fp16 (or bf16) at ZeRO 0: FP16_Optimizer's flat fp32 copy of each parameter group,
    or FP16_UnfusedOptimizer's fp32 copy of each tensor, groups one after the other (every rank holds all of
    it); in fp32 at ZeRO 0: ``params`` themselves. Views, not copies: they change with every step. Raises
    UnknownOptimizerLayout for an optimizer of another layout (:func:`master_layout`).
    """
    optimizer = engine.optimizer
    layout = master_layout(optimizer, params)
    if layout in SHARDED_MASTERS:
        return list(getattr(optimizer, layout)), True
    if layout == "fp32_groups":
        return [t for group in optimizer.fp32_groups for t in group], False
    if layout == "fp32_groups_flat":
        return list(optimizer.fp32_groups_flat), False
    return [p.detach() for p in params], False


def master_is_params(engine, params: list[nn.Parameter]) -> bool:
    """Whether :func:`fp32_master_weights` are the parameters themselves (fp32 at ZeRO 0: DeepSpeed keeps
    no master copy)."""
    return master_layout(engine.optimizer, params) == "params"


def _unsharded_views(engine, params: list[nn.Parameter], flats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flats``, laid out as the unsharded :func:`fp32_master_weights` (one tensor per parameter,
    per tensor of FP16_UnfusedOptimizer's groups, or FP16_Optimizer's flat groups), shaped as ``params``."""
    layout = master_layout(engine.optimizer, params)
    if layout == "params":
        return [v.reshape(p.shape) for v, p in zip(flats, params)]
    groups = engine.optimizer.fp16_groups
    views = {}
    if layout == "fp32_groups":
        for p, t in zip((p for group in groups for p in group), flats):
            views[id(p)] = t.view(p.shape)
    else:
        for group, flat in zip(groups, flats):
            offset = 0
            for p in group:
                views[id(p)] = flat.narrow(0, offset, p.numel()).view(p.shape)
                offset += p.numel()
    return [views[id(p)] for p in params]


@torch.no_grad()
def full_fp32_parameters(engine, params: list[nn.Parameter],
                         master: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """Full-shape fp32 values of ``params`` from the master weights, or from ``master``: tensors laid out
    as :func:`fp32_master_weights` (an EMA of them). Sharded masters are gathered from every rank (all
    ranks must call this; one all-reduce per tensor), replicated ones are read where they are."""
    current, sharded = fp32_master_weights(engine, params)
    values = current if master is None else master
    if not sharded:
        return _unsharded_views(engine, params, values)
    saved = None
    if master is not None:  # DeepSpeed gathers from its own partitions: lend them the given values meanwhile
        saved = [t.clone() for t in current]
        torch._foreach_copy_(current, [v.to(t.dtype) for v, t in zip(master, current)])
    try:
        return [safe_get_full_fp32_param(p) for p in params]
    finally:
        if saved is not None:
            torch._foreach_copy_(current, saved)


@torch.no_grad()
def partition_fp32(engine, params: list[nn.Parameter], full: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of :func:`full_fp32_parameters`: full-shape fp32 values of ``params`` (every rank
    passes the same) -> new tensors laid out as this rank's :func:`fp32_master_weights`."""
    current, sharded = fp32_master_weights(engine, params)
    if not sharded:
        out = [t.detach().clone().float() for t in current]
        for view, value in zip(_unsharded_views(engine, params, out), full):
            view.copy_(value.reshape(view.shape))
        return out
    saved = [t.clone() for t in current]
    try:
        for p, value in zip(params, full):
            value = value.to(current[0].device, torch.float32).flatten()
            if hasattr(p, "ds_id"):
                _set_zero3_partition(p, value)
            else:
                safe_set_full_fp32_param(p, value.view(p.shape))
        return [t.detach().clone().float() for t in current]
    finally:
        torch._foreach_copy_(current, saved)


def _set_zero3_partition(param: nn.Parameter, value: torch.Tensor) -> None:
    """This rank's slice of the flat ``value`` into the ZeRO-3 fp32 partition of ``param``, zero-padded.

    DeepSpeed 0.19's ``set_full_hp_param`` reads past the end of the value on the ranks whose partition of a
    small tensor is all padding (a [1] gain on 2 ranks), so this does its narrow itself.
    """
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = part.numel() * optimizer._get_param_partition_rank(param)
    piece = value[start:start + part.numel()]
    part.zero_()
    part[:piece.numel()].copy_(piece)
