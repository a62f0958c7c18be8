"""The engine's process setup: one extension cache per environment, one build of DeepSpeed's shm op at a time,
and no shm buffer left behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import deepspeed.ops
import pytest
import torch

from textdiff.config import ConfigError
from textdiff.train import engine as eng

from ..conftest import outside_env


def test_the_extension_cache_is_one_folder_per_torch_deepspeed_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = eng.extension_cache_dir()
    assert first.parent == tmp_path / "textdiff" / "torch_extensions"
    assert f"torch{torch.__version__}-deepspeed{deepspeed.__version__}" in first.name
    assert eng.extension_cache_dir() == first  # stable: every run of this environment shares it
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert eng.extension_cache_dir() != first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    assert eng.extension_cache_dir() != first


class _SlowBuilder:
    """Stands in for DeepSpeed's op builder: a load that takes 0.3 s and notes when it ran."""

    NAME = "textdiff_test_op"

    def __init__(self, spans):
        self.spans = spans

    def load(self, verbose=False):
        start = time.monotonic()
        time.sleep(0.3)
        self.spans.append((start, time.monotonic()))


@pytest.fixture
def slow_builder(tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    spans = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, _SlowBuilder.NAME, True)  # probed with the real builders
    monkeypatch.setattr(get_accelerator(), "create_op_builder", lambda name: _SlowBuilder(spans))
    return spans


def test_runs_starting_together_build_the_op_one_after_the_other(slow_builder):
    threads = [threading.Thread(target=eng.build_shm_op_once) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted(slow_builder)
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))  # never two at once


@pytest.mark.slow
def test_a_build_killed_while_holding_the_lock_does_not_block_the_next_run(slow_builder, tmp_path):
    (tmp_path / "ext").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(tmp_path / 'ext' / 'textdiff-build.lock')!r}, 'a')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)  # a build killed mid-way (kill -9, OOM)
    holder.wait(timeout=10)
    started = time.monotonic()
    eng.build_shm_op_once()
    assert time.monotonic() - started < 5.0 and len(slow_builder) == 1
    assert (tmp_path / "ext" / "textdiff-build.lock").exists()  # the file stays; only the kernel's lock went


def test_fp32_zero0_clipping_is_textdiffs_and_scales_like_deepspeeds():
    """textdiff clips where DeepSpeed would loop over parameters (fp32, ZeRO 0), with DeepSpeed's formula:
    gradients of joint norm 5 clipped to 1 are scaled by 1 / (5 + 1e-6); a norm below the limit is kept."""
    assert eng.own_clipping({"gradient_clipping": 1.0}) == 1.0
    assert eng.own_clipping({"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}) == 0.0
    assert eng.own_clipping({"gradient_clipping": 1.0, "bf16": {"enabled": True}}) == 0.0
    assert eng.own_clipping({}) == 0.0
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = eng.clip_gradients_([a, b], 1.0)
    assert float(norm) == 5.0
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([3.0, 0.0, 4.0]) / (5 + 1e-6))
    assert float(eng.clip_gradients_([a, b], 2.0)) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([3.0, 0.0, 4.0]) / (5 + 1e-6))


RANK_SCRIPT = """
import json, os, sys
import torch
import deepspeed.comm as dist
from textdiff.config import ConfigError
from textdiff.train import engine as eng
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
eng.init_distributed()
names = [eng.shm_buffer_path(os.getuid(), "127.0.0.1", port, r).exists() for r in range(2)]
t = torch.arange(4, dtype=torch.float32) * (rank + 1)
dist.inference_all_reduce(t)  # through the shm buffers where the CPU has the kernel (AVX2), else gloo
dist.barrier()
print(json.dumps({"names": names, "sum": t.tolist()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX shm in /dev/shm")
def test_two_cpu_ranks_leave_no_shm_buffer_behind_and_still_all_reduce_through_it():
    """DeepSpeed's CPU all-reduce buffers (66 MB per rank, in memory) lose their /dev/shm names once both
    ranks have mapped them: nothing is left after the run, and the mapped buffers still add up 0..3 times
    1 and times 2 to 0, 3, 6, 9 exactly."""
    port = str(eng.free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), port],
                              env={**outside_env(), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [err[-2000:] for _, err in outs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    for result in results:
        assert result["names"] == [False, False]  # gone from /dev/shm while the run still had them mapped
        assert result["sum"] == [0.0, 3.0, 6.0, 9.0]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))


def _half_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.arange(6.0).reshape(2, 3).half()),
            torch.nn.Parameter(torch.arange(6.0, 10.0).half()), torch.nn.Parameter(torch.arange(10.0, 15.0).half())]


def test_fp16_zero0_master_groups_map_to_parameters_and_back():
    """FP16_Optimizer's layout (fp16 or bf16 with FusedAdam at ZeRO 0): fp32_groups_flat[i] is fp16_groups[i]'s
    parameters flattened one after the other. Full values come out per parameter, in the order asked for, and
    partition_fp32 writes new values back in that layout."""
    params = _half_params()
    groups = [[params[0], params[1]], [params[2]]]
    flats = [torch.arange(10.0), torch.arange(10.0, 15.0)]
    engine = SimpleNamespace(optimizer=SimpleNamespace(fp16_groups=groups, fp32_groups_flat=flats))
    assert eng.master_layout(engine.optimizer, params) == "fp32_groups_flat"
    assert not eng.master_is_params(engine, params)
    asked = [params[2], params[0], params[1]]
    full = eng.full_fp32_parameters(engine, asked)
    assert [tuple(f.shape) for f in full] == [(5,), (2, 3), (4,)]
    assert all(f.dtype == torch.float32 and torch.equal(f, p.float()) for f, p in zip(full, asked))
    new = eng.partition_fp32(engine, asked, [torch.full(p.shape, float(i)) for i, p in enumerate(asked)])
    assert torch.equal(new[0], torch.tensor([1.0] * 6 + [2.0] * 4)) and torch.equal(new[1], torch.zeros(5))
    assert torch.equal(flats[0], torch.arange(10.0))  # the live masters are untouched


def test_fp16_unfused_master_tensors_map_to_parameters_and_back():
    """FP16_UnfusedOptimizer's layout (fp16 or bf16 with any optimizer but FusedAdam at ZeRO 0): fp32_groups[i][j]
    is an fp32 copy of fp16_groups[i][j]. The masters are those tensors, groups one after the other; full values
    come out per parameter in the order asked for, and partition_fp32 writes new values back in that layout."""
    params = _half_params()
    groups = [[params[0], params[1]], [params[2]]]
    copies = [[p.detach().float() + 0.5 for p in group] for group in groups]
    engine = SimpleNamespace(optimizer=SimpleNamespace(fp16_groups=groups, fp32_groups=copies))
    assert eng.master_layout(engine.optimizer, params) == "fp32_groups"
    masters, sharded = eng.fp32_master_weights(engine, params)
    assert not sharded and [id(t) for t in masters] == [id(t) for group in copies for t in group]
    asked = [params[2], params[0], params[1]]
    full = eng.full_fp32_parameters(engine, asked)
    assert all(f.dtype == torch.float32 and torch.equal(f, p.float() + 0.5) for f, p in zip(full, asked))
    new = eng.partition_fp32(engine, asked, [torch.full(p.shape, float(i)) for i, p in enumerate(asked)])
    assert [float(t.unique()) for t in new] == [1.0, 2.0, 0.0] and [t.shape for t in new] == [(2, 3), (4,), (5,)]
    assert torch.equal(copies[1][0], torch.arange(10.0, 15.0) + 0.5)  # the live masters are untouched


def test_an_fp32_optimizer_stepping_the_parameters_is_their_own_master():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))]
    engine = SimpleNamespace(optimizer=torch.optim.SGD(params, lr=0.1))
    assert eng.master_layout(engine.optimizer, params) == "params" and eng.master_is_params(engine, params)
    masters, sharded = eng.fp32_master_weights(engine, params)
    assert not sharded and [t.data_ptr() for t in masters] == [p.data_ptr() for p in params]


class ForeignWrapper:
    """A 16-bit optimizer wrapper of unknown layout: it steps fp32 copies that it keeps under another name."""

    def __init__(self, params):
        self.hidden_masters = [p.detach().float() for p in params]
        self.param_groups = [{"params": self.hidden_masters}]


def test_an_optimizer_whose_fp32_masters_are_unknown_is_an_error_naming_its_class():
    """Rather than averaging 16-bit weights (the old fallback), the EMA refuses an unknown layout."""
    params = _half_params()
    engine = SimpleNamespace(optimizer=ForeignWrapper(params))
    with pytest.raises(eng.UnknownOptimizerLayout, match=r"test_engine.ForeignWrapper, whose fp32 master .* these "
                                                         r"are float16"):
        eng.fp32_master_weights(engine, params)
    # fp32 parameters that the optimizer does not step are no masters either
    fp32 = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(eng.UnknownOptimizerLayout, match="these are float32"):
        eng.master_is_params(SimpleNamespace(optimizer=ForeignWrapper(fp32)), fp32)


def test_srun_tasks_get_ranks_from_slurm_and_need_the_batch_scripts_rendezvous():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
             "SLURM_TASKS_PER_NODE": "2(x3),1(x2)", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    assert eng.tasks_per_node("2(x3),1(x2)") == [2, 2, 2, 1, 1] and eng.tasks_per_node("4") == [4]
    assert eng.slurm_environment(slurm) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "2"}
    assert eng.slurm_environment({**slurm, "SLURM_NTASKS_PER_NODE": "3"})["LOCAL_SIZE"] == "3"
    assert eng.slurm_environment({**slurm, "RANK": "0"}) == {}  # a launcher inside the allocation set it up
    assert eng.slurm_environment({**slurm, "SLURM_NTASKS": "1"}) == {}  # one task: a world of one
    del slurm["MASTER_PORT"]
    with pytest.raises(ConfigError, match=r"srun started 8 tasks but MASTER_PORT is not set; .* export "
                                          r"MASTER_ADDR=\$\(scontrol show hostnames"):
        eng.slurm_environment(slurm)


def test_a_world_is_started_alone_only_without_a_launchers_or_mpis_rank():
    assert eng.started_alone({}) and eng.started_alone({"SLURM_PROCID": "0"})
    assert not any(eng.started_alone({k: "0"}) for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
