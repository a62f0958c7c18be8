"""Two "nodes" on one machine: two DeepSpeed launchers, one per node, one rank each, meeting on 127.0.0.1
(a two-host hostfile, ``--num_nodes 2 --node_rank N --no_ssh``), as a cluster without ssh launches them; and
two tasks as SLURM's srun starts them (no launcher: SLURM_PROCID, SLURM_NTASKS ... and the batch script's
MASTER_ADDR/MASTER_PORT)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from textdiff.formats.checkpoint import complete_checkpoints, load_untrusted
from textdiff.train.engine import free_port

from ..conftest import outside_env, write_recipe

pytestmark = pytest.mark.slow  # two DeepSpeed launchers in subprocesses

REPO = Path(__file__).resolve().parents[2]
STATE_FILES = {"COMPLETE", "config.json", "textdiff.pt", "rank_00000.pt", "rank_00001.pt",
               "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def _deepspeed_env() -> dict:
    return {**outside_env(), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def _deepspeed() -> str:
    return str(Path(sys.executable).with_name("deepspeed"))


def _no_shm_buffer(port: int) -> bool:
    return not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def two_nodes(hostfile: Path, *args: str, timeout: int = 300) -> list[str]:
    """Start node 0 and node 1 of a run together; wait for both; returns each node's stderr+stdout."""
    port = free_port()
    procs = [subprocess.Popen([_deepspeed(), "--hostfile", str(hostfile), "--num_nodes", "2", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_ssh", *args],
                              cwd=REPO, env=_deepspeed_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [out[-3000:] for out in outs]
    assert _no_shm_buffer(port)  # LOCAL_SIZE 1 < WORLD_SIZE 2: DeepSpeed's one-machine shm path is not taken
    return outs


def one_node_two_ranks(*args: str, timeout: int = 300) -> None:
    port = free_port()
    proc = subprocess.run([_deepspeed(), "--num_gpus", "2", "--master_port", str(port), *args], cwd=REPO,
                          env=_deepspeed_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _no_shm_buffer(port)


def srun_tasks(*args: str, timeout: int = 300) -> None:
    """Two ``python launch.sh`` tasks on two "nodes", with the variables srun gives each task."""
    port = free_port()
    procs = []
    for task in (0, 1):
        env = {**_deepspeed_env(), "SLURM_PROCID": str(task), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
               "SLURM_NODEID": str(task), "SLURM_TASKS_PER_NODE": "1(x2)", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-u", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [out[-3000:] for out in outs]
    assert _no_shm_buffer(port)


def _state(run: Path, step: int) -> tuple[dict, dict, list]:
    """(module weights, full EMA, both ranks' stream positions) of checkpoint ``step``."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    module = load_untrusted(ckpt / "mp_rank_00_model_states.pt")["module"]
    ema = load_untrusted(ckpt / "textdiff.pt")["ema"]
    streams = [load_untrusted(ckpt / f"rank_{r:05d}.pt")["stream"] for r in (0, 1)]
    return module, ema, streams


def _assert_same(a: tuple, b: tuple) -> None:
    (module_a, ema_a, streams_a), (module_b, ema_b, streams_b) = a, b
    assert module_a.keys() == module_b.keys()
    for name in module_a:
        assert torch.equal(module_a[name], module_b[name]), name
    assert ema_a["num_updates"] == ema_b["num_updates"]
    for rate in ema_a["averages"]:
        for name, x, y in zip(ema_a["names"], ema_a["averages"][rate], ema_b["averages"][rate]):
            assert torch.equal(x, y), (rate, name)
    assert streams_a == streams_b


def test_two_nodes_train_as_two_ranks_of_one_node_checkpoint_once_and_resume_exactly(synthetic_shards, tmp_path):
    """Global ranks, not local ones, split the shards and the sharded EMA: the two-node run (each rank local
    rank 0 of its node) is bit for bit the one-node run of two ranks, weights, ZeRO-2 EMA and both ranks'
    stream positions, and so is the run of two srun tasks. Its checkpoints hold each rank's files once and rank 0's alone once, a resumed two-node
    run ends where the unbroken one does, and no shared-memory buffer is made across nodes."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    recipe = write_recipe(synthetic_shards, tmp_path / "tiny.json", "train.max_steps=4",
                          "deepspeed.zero_optimization.stage=2", "checkpoint.save_every=2", "train.log_every=1",
                          "data.num_workers=1")
    launch = ["launch.sh", "--config", str(recipe)]
    outs = two_nodes(hostfile, *launch, "--run-dir", str(tmp_path / "nodes"))
    one_node_two_ranks(*launch, "--run-dir", str(tmp_path / "ranks"))
    _assert_same(_state(tmp_path / "nodes", 4), _state(tmp_path / "ranks", 4))
    srun_tasks(*launch, "--run-dir", str(tmp_path / "srun"))
    _assert_same(_state(tmp_path / "srun", 4), _state(tmp_path / "ranks", 4))

    for step, ckpt in complete_checkpoints(tmp_path / "nodes" / "checkpoints"):
        assert {p.name for p in ckpt.iterdir()} == STATE_FILES, step
    assert [p.name for p in (tmp_path / "nodes" / "checkpoints").iterdir() if p.name.startswith(".")] == []
    # rank 0, on node 0, saves and logs; node 1's rank writes only its own files
    assert "saved checkpoint" in outs[0] and "saved checkpoint" not in outs[1]

    two_nodes(hostfile, *launch, "--run-dir", str(tmp_path / "split"), "--set", "train.max_steps=2")
    resumed = two_nodes(hostfile, *launch, "--run-dir", str(tmp_path / "split"), "--resume", "auto")
    assert "resumed from" in resumed[0] and "step 2" in resumed[0]
    _assert_same(_state(tmp_path / "split", 4), _state(tmp_path / "nodes", 4))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_snapshots_of_a_sharded_power_ema_are_the_full_averages_the_checkpoint_holds(synthetic_shards, tmp_path,
                                                                                     stage):
    """Two ranks at ZeRO 1, 2 and 3, each averaging its own fp32 partition: the power-function snapshot rank 0
    writes at step 2 is the whole gathered average, equal bit for bit to the one the step-2 checkpoint keeps
    (the gather both share), for every parameter and both widths."""
    from safetensors.torch import load_file

    from textdiff.formats.ema_snapshots import list_snapshots

    recipe = write_recipe(synthetic_shards, tmp_path / "tiny.json", "train.max_steps=2",
                          f"deepspeed.zero_optimization.stage={stage}", "checkpoint.save_every=2",
                          "ema.power_sigma_rels=[0.05, 0.1]", "ema.snapshot_every=2", "data.num_workers=1")
    one_node_two_ranks("launch.sh", "--config", str(recipe), "--run-dir", str(tmp_path / "run"))
    infos = list_snapshots(tmp_path / "run")
    assert [(s.step, s.updates) for s in infos] == [(2, 2)]
    snapshot = load_file(str(infos[0].path))
    ema = load_untrusted(tmp_path / "run" / "checkpoints" / "step_00000002" / "textdiff.pt")["ema"]
    for key in ("power:0.05", "power:0.1"):
        assert len(ema["averages"][key]) == len(ema["names"]) > 0
        for name, kept in zip(ema["names"], ema["averages"][key]):
            assert torch.equal(snapshot[f"{key}/{name}"].reshape(kept.shape), kept), (key, name)
