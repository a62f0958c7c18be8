"""Checkpoints during training: DeepSpeed engine state plus textdiff state, written atomically, pruned,
optionally mirrored; and what a resume may change. The layout and its readers: textdiff/formats/checkpoint.py.

A save writes into ``.partial-step_N``; once every rank has finished and every file is fsync'ed, rank 0
writes ``COMPLETE`` and renames the folder to ``step_N``, so a half-written checkpoint is never taken for the
latest one. Saving a step again (a stop signal at a save step) first renames the old ``step_N`` to
``.replaced-step_N``, which is found as step N until the new copy is in place: a complete copy of the step
exists at every instant. Afterwards only the last ``checkpoint.keep_last`` and every
``checkpoint.keep_every``-th step are kept, and with ``checkpoint.remote_url`` the finished directory is
copied there through fsspec (its ``COMPLETE`` last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import fsspec

from textdiff.config import ConfigError
from textdiff.files import atomic_write_bytes, fsync_dir
from textdiff.formats.checkpoint import (COMPLETE, CONFIG_FILE, PARTIAL_PREFIX, REPLACED_PREFIX, TEXTDIFF_STATE,
                                         atomic_torch_save, checkpoint_name, complete_checkpoints, fsync_tree,
                                         latest_checkpoint, load_untrusted, rank_file)

log = logging.getLogger(__name__)


# model keys that change no weight shape or meaning: changing them on resume is allowed without a warning
_MODEL_KEYS_FREE = {"txt_pdrop", "capt_pdrop", "all_pdrop", "dropout", "silu_impl", "clip_weights_path",
                    "use_checkpoint", "use_checkpoint_below_res"}
# diffusion keys that change what the network's output means: changing them on resume is an error
_DIFFUSION_KEYS_FIXED = {"diffusion_steps", "noise_schedule", "predict_xstart", "predict_v", "rescale_timesteps"}
# data keys the saved stream position depends on (which reader reads which shard, in which order): changing them
# on resume is an error, since the position would not mean the same samples
_DATA_KEYS_FIXED = ("num_workers", "seed", "resampled", "shuffle_buffer", "open_shards")


def steps_to_delete(steps: Iterable[int], keep_last: int, keep_every: int) -> list[int]:
    """Which of ``steps`` retention removes: all but the last ``keep_last`` and multiples of ``keep_every``
    (0: none kept for that reason)."""
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


def _diff(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<absent>") != current.get(k, "<absent>"))


def check_resume_compatible(saved: dict, current: dict, where: str) -> list[str]:
    """Compare two recipe dicts (``TextdiffConfig.to_dict()`` layout) before resuming.

    Raises ConfigError naming the keys when the model architecture or the meaning of its output differs;
    returns warnings for allowed changes (DeepSpeed keys such as lr or batch size, data, train, EMA...).
    """
    s_td, c_td = saved.get("textdiff", {}), current.get("textdiff", {})
    fixed = [f"model.{k}" for k in _diff(s_td.get("model", {}), c_td.get("model", {})) if k not in _MODEL_KEYS_FREE]
    fixed += [f"diffusion.{k}" for k in _diff(s_td.get("diffusion", {}), c_td.get("diffusion", {}))
              if k in _DIFFUSION_KEYS_FIXED]
    if fixed:
        detail = ", ".join(f"{k} (saved {_lookup(s_td, k)!r}, now {_lookup(c_td, k)!r})" for k in fixed)
        raise ConfigError(f"cannot resume from {where}: the model differs in {detail}; use the config saved "
                          f"in {where}/{CONFIG_FILE}, or start a new run directory")
    s_data, c_data = s_td.get("data", {}), c_td.get("data", {})
    for k in _DATA_KEYS_FIXED:
        if k in s_data and s_data[k] != c_data.get(k, s_data[k]):
            raise ConfigError(f"cannot resume from {where}: data.{k} is {c_data[k]!r} now but {s_data[k]!r} in the "
                              f"saved run, and the saved data-stream position only holds for data.{k}="
                              f"{json.dumps(s_data[k])}; resume with --set data.{k}={json.dumps(s_data[k])}, or "
                              "start a new --run-dir to train with the new value")
    warnings = []
    s_ds = {k: v for k, v in saved.items() if k != "textdiff"}
    c_ds = {k: v for k, v in current.items() if k != "textdiff"}
    for k in _diff(s_ds, c_ds):
        warnings.append(f"DeepSpeed key {k} changed since {where}: {s_ds.get(k, '<absent>')!r} -> "
                        f"{c_ds.get(k, '<absent>')!r}")
    for section in sorted(set(s_td) | set(c_td)):
        for k in _diff(s_td.get(section, {}), c_td.get(section, {})):
            if f"{section}.{k}" not in fixed:
                warnings.append(f"{section}.{k} changed since {where}: {_lookup(s_td, f'{section}.{k}')!r} -> "
                                f"{_lookup(c_td, f'{section}.{k}')!r}")
    return warnings


def _lookup(tree: dict, dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return tree.get(section, {}).get(key, "<absent>")


def copy_to_remote(local_dir: Path, remote_url: str) -> str:
    """Copy a complete checkpoint directory to ``remote_url/<its name>`` through fsspec, ``COMPLETE`` last.

    Returns the remote directory's URL. Any fsspec protocol works (``s3://``, ``gs://``, ``file://``,
    ``memory://``) if its package is installed.
    """
    fs, base = fsspec.core.url_to_fs(remote_url)
    target = f"{base.rstrip('/')}/{local_dir.name}"
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.name == COMPLETE):
        dest = f"{target}/{p.relative_to(local_dir).as_posix()}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(p), dest)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{target}" if protocol not in ("file", "local") else target


class RunDirError(RuntimeError):
    """A file of the run directory could not be written; the message names the path and the cause."""


def write_failure(e: BaseException) -> Optional[str]:
    """``"PATH: cause"`` when ``e`` is a failed write (an OSError, or torch.save's RuntimeError, which hides the
    OSError's errno in its message), else None."""
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    text = str(e)
    if "PytorchStreamWriter failed" in text or "file write failed" in text or "unexpected pos" in text:
        return f"torch.save could not write ({text.splitlines()[0]}), most likely a full disk"
    return None


def load_safely(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_untrusted`.

    DeepSpeed reads module, optimizer and scheduler states through ``engine.checkpoint_engine.load``, whose
    torch version calls ``torch.load(weights_only=False)``. (Its universal-checkpoint loader calls torch.load
    itself; ``checkpoint.load_universal`` is refused by the config check for that reason.)
    """
    engine.checkpoint_engine.load = lambda path, map_location=None: load_untrusted(path, map_location)


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` for one rank of a run.

    barrier: called where all ranks must meet (``torch.distributed.barrier`` in training; a no-op alone).
    """

    def __init__(self, root: str | Path, cfg, rank: int, world_size: int, barrier: Callable[[], None]):
        self.root = Path(root)
        self.cfg = cfg
        self.rank, self.world_size, self.barrier = rank, world_size, barrier

    def save(self, engine, step: int, rank_state: dict, textdiff_state: Optional[dict], config: dict) -> Path:
        """Write the checkpoint after ``step`` steps on every rank; returns its final directory.

        rank_state: this rank's state (stream position, RNG); textdiff_state: rank 0's (EMA...), None elsewhere;
        config: the recipe dict. Every rank must call this at the same step. Raises RunDirError naming the
        file and the cause when a write fails (read-only folder, full disk); earlier checkpoints stay intact.
        """
        try:
            return self._save(engine, step, rank_state, textdiff_state, config)
        except (OSError, RuntimeError) as e:
            cause = write_failure(e)
            if cause is None:
                raise
            if self.rank == 0:  # what was written of it only takes the space a resumed run needs
                shutil.rmtree(self.root / (PARTIAL_PREFIX + checkpoint_name(step)), ignore_errors=True)
            last = latest_checkpoint(self.root)
            raise RunDirError(f"cannot write checkpoint {checkpoint_name(step)} under {self.root}: {cause}. The last "
                              f"complete checkpoint ({last if last is not None else 'none yet'}) is intact; free "
                              "space or make the folder writable, then continue with --resume auto") from e

    def _save(self, engine, step: int, rank_state: dict, textdiff_state: Optional[dict], config: dict) -> Path:
        final = self.root / checkpoint_name(step)
        partial_tag = PARTIAL_PREFIX + final.name
        partial = self.root / partial_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=partial_tag, save_latest=False)
        partial.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(rank_state, partial / rank_file(self.rank))
        fsync_tree(partial)  # this rank's DeepSpeed files too, before COMPLETE vouches for them
        self.barrier()
        if self.rank == 0:
            atomic_torch_save(textdiff_state, partial / TEXTDIFF_STATE)
            atomic_write_bytes(partial / CONFIG_FILE, json.dumps(config, indent=2).encode())
            atomic_write_bytes(partial / COMPLETE, f"{step}\n".encode())
            fsync_dir(partial)
            self._publish(partial, final)
            self._prune()
            if self.cfg.remote_url:
                log.info("copied checkpoint to %s", copy_to_remote(final, self.cfg.remote_url))
        self.barrier()
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        """Rename the finished ``partial`` to ``final``; a ``final`` already there (the same step saved again,
        e.g. SIGTERM right after a periodic save) is first renamed aside, and removed only once the new one
        is in place."""
        replaced = final.with_name(REPLACED_PREFIX + final.name)
        if final.exists():
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(partial, final)
        fsync_dir(self.root)
        if replaced.exists():
            shutil.rmtree(replaced)

    def _prune(self) -> None:
        found = dict(complete_checkpoints(self.root))
        for step in steps_to_delete(found, self.cfg.keep_last, self.cfg.keep_every):
            shutil.rmtree(found[step], ignore_errors=True)
        for stale in [*self.root.glob(PARTIAL_PREFIX + "*"), *self.root.glob(REPLACED_PREFIX + "*")]:
            if stale.name.startswith(PARTIAL_PREFIX) or (self.root / stale.name[len(REPLACED_PREFIX):]).is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, path: Path, every_rank: bool = False) -> tuple[dict, Optional[dict]]:
        """Restore the engine from checkpoint ``path``; returns (this rank's state, the textdiff state (the
        full EMA...; None on ranks other than 0 unless ``every_rank``, for an EMA sharded over the ranks)).
        Raises ConfigError when the checkpoint lacks this rank's state, and
        UnsafeCheckpointError when any file DeepSpeed or textdiff reads holds a pickle that would run code."""
        load_safely(engine)
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint {path}; is it from this run's ZeRO stage?")
        mine = path / rank_file(self.rank)
        if not mine.is_file():
            raise ConfigError(f"checkpoint {path} has no {mine.name}: it was written by fewer ranks than this "
                              f"run's {self.world_size}; resume with the same number of ranks")
        rank_state = load_untrusted(mine)
        textdiff_state = load_untrusted(path / TEXTDIFF_STATE) if self.rank == 0 or every_rank else None
        return rank_state, textdiff_state
