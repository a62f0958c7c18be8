"""The real command: the DeepSpeed launcher starts two CPU ranks of launch.sh, which train, checkpoint, log
to TensorBoard, and resume (the second time through ``--no_python``)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from textdiff.formats.checkpoint import complete_checkpoints, load_untrusted
from textdiff.train.engine import free_port

from ..conftest import outside_env, write_recipe

pytestmark = pytest.mark.slow  # the DeepSpeed launcher in subprocesses

REPO = Path(__file__).resolve().parents[2]


def _deepspeed(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**outside_env(), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    port = free_port()
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # the ranks' shm all-reduce buffers (66 MB each, in memory) are not left in /dev/shm after the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")), port
    return proc


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_two_cpu_ranks_train_checkpoint_log_and_resume(synthetic_shards, tmp_path):
    recipe = write_recipe(synthetic_shards, tmp_path / "tiny.json", "train.max_steps=30", "train.log_every=1",
                          "train.sample_every=30", "train.sample_steps=3", 'train.sample_prompts=["ab", ""]',
                          "checkpoint.save_every=15", "data.save_first_batch=true")
    run = tmp_path / "run"
    _deepspeed("launch.sh", "--config", str(recipe), "--run-dir", str(run))

    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [15, 30]
    last = run / "checkpoints" / "step_00000030"
    assert (last / "rank_00000.pt").is_file() and (last / "rank_00001.pt").is_file()
    assert (run / "first_batch.png").is_file() and (run / "samples" / "step_00000030.png").is_file()
    events = _events(run)
    loss = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 31))
    assert np.mean(loss[-10:]) < 0.7 * np.mean(loss[:10])  # it learns: the last 10 steps' loss is 30% lower
    tags = set(events.Tags()["scalars"])
    expected = {"train/mse", "train/vb", "train/grad_norm", "train/lr", "train/loss_scale", "train/skipped_steps",
                "perf/images_per_s/rank0", "perf/images_per_s/rank1", "perf/samples_per_s/rank1",
                "data/skipped_corrupt", "data/shard_errors"}
    assert expected <= tags and any(t.startswith("train/loss_q") for t in tags)
    assert events.Scalars("train/lr")[-1].value == pytest.approx(2e-3)
    (image,) = events.Images("samples/ema")
    assert image.step == 30 and image.encoded_image_string.startswith(b"\x89PNG")

    proc = _deepspeed("--no_python", "./launch.sh", "--config", str(recipe), "--run-dir", str(run),
                      "--resume", "auto", "--set", "train.max_steps=32", "--set", "train.sample_every=0")
    assert "resumed from" in proc.stderr and "step 30" in proc.stderr
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [30, 32]
    assert [e.step for e in _events(run).Scalars("train/loss")][-2:] == [31, 32]
    state = load_untrusted(run / "checkpoints" / "step_00000032" / "textdiff.pt")  # 2 ranks write no pickle
    assert state["ema"]["num_updates"] == 32


def test_bash_and_python_both_run_launch_sh():
    for runner in (["bash"], [sys.executable, "-u"]):
        proc = subprocess.run([*runner, "launch.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                              env={**outside_env(), "PYTHON": sys.executable}, timeout=120)
        assert proc.returncode == 0 and "--resume auto|PATH" in proc.stdout, proc.stderr


def test_a_bad_override_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run(["bash", "launch.sh", "--config", "ds_configs/demo_cpu.json", "--set", "train.max_step=5"],
                          cwd=REPO, capture_output=True, text=True, env={**outside_env(), "PYTHON": sys.executable},
                          timeout=120)
    assert proc.returncode == 2 and "train.max_step" in proc.stderr and "train.max_steps" in proc.stderr


@pytest.mark.parametrize("override, named", [
    ("deepspeed.zero_optimisation.stage=2", "did you mean deepspeed.zero_optimization?"),
    ("deepspeed.scheduler.params.warmup_max_lr=-0.001", "deepspeed.scheduler.params.warmup_max_lr is -0.001"),
    ("data.shards=/no/such/shard-{000000..000001}.tar", "data.shards: shard /no/such/shard-000000.tar does not exist"),
])
def test_a_bad_deepspeed_key_learning_rate_or_shards_path_exits_2(override, named):
    proc = subprocess.run(["bash", "launch.sh", "--config", "ds_configs/demo_cpu.json", "--set", override],
                          cwd=REPO, capture_output=True, text=True, env={**outside_env(), "PYTHON": sys.executable},
                          timeout=120)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_sharded_ema_resumes_exactly(synthetic_shards, tmp_path, stage):
    """Under ZeRO each rank averages its own fp32 partition; the checkpoint holds the gathered full EMA, and
    a run resumed from it ends with the EMA of the uninterrupted run, to the bit."""
    recipe = write_recipe(synthetic_shards, tmp_path / "tiny.json", "train.max_steps=4",
                          f"deepspeed.zero_optimization.stage={stage}", "checkpoint.save_every=2",
                          "train.sample_every=2", "train.sample_steps=2", 'train.sample_prompts=["ab"]')
    _deepspeed("launch.sh", "--config", str(recipe), "--run-dir", str(tmp_path / "straight"))
    _deepspeed("launch.sh", "--config", str(recipe), "--run-dir", str(tmp_path / "split"),
               "--set", "train.max_steps=2")
    _deepspeed("launch.sh", "--config", str(recipe), "--run-dir", str(tmp_path / "split"), "--resume", "auto")
    assert (tmp_path / "split" / "samples" / "step_00000004.png").is_file()  # gathered on both ranks to sample
    straight, resumed = (load_untrusted(tmp_path / run / "checkpoints" / "step_00000004" / "textdiff.pt")["ema"]
                         for run in ("straight", "split"))
    assert straight["num_updates"] == resumed["num_updates"] == 4
    assert straight["names"] == resumed["names"]
    for rate in straight["averages"]:
        for name, a, b in zip(straight["names"], straight["averages"][rate], resumed["averages"][rate]):
            assert torch.equal(a, b), (rate, name)
