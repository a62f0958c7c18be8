"""The training loop in-process (world size 1): exact resume, NaN handling, SIGTERM, frozen CLIP under ZeRO-3."""

import os
import signal
import time
import uuid

import fsspec
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from textdiff.config import ConfigError
from textdiff.train import engine as eng
from textdiff.formats.checkpoint import complete_checkpoints
from textdiff.eval.monitor import TrainingMonitor
from textdiff.train.loop import Trainer
from textdiff.train.loss import diffusion_loss, grad_norm
from textdiff.train.window import TrainingDiverged, nonfinite_action, step_stats

pytestmark = pytest.mark.slow  # DeepSpeed engines in this process


def _recording(batches, keys):
    for batch in batches:
        keys.extend(batch["key"])
        yield batch


def _run(cfg, run_dir, resume=None, keys=None):
    trainer = Trainer(cfg, run_dir, resume=resume)
    if keys is not None:
        trainer.batches = _recording(trainer.batches, keys)
    summary = trainer.run()
    trainer.close()
    return trainer, summary


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_four_steps_straight_equal_two_plus_resumed_two(tiny, tmp_path, stage):
    zero = f"deepspeed.zero_optimization.stage={stage}"
    straight_keys, first_keys, second_keys = [], [], []
    straight, _ = _run(tiny(zero, "train.max_steps=4"), tmp_path / "straight", keys=straight_keys)
    _run(tiny(zero, "train.max_steps=2"), tmp_path / "split", keys=first_keys)
    resumed, summary = _run(tiny(zero, "train.max_steps=4"), tmp_path / "split", resume="auto", keys=second_keys)

    assert summary["step"] == 4 and resumed.ema.num_updates == 4
    for (name, a), b in zip(straight.engine.module.state_dict().items(), resumed.engine.module.state_dict().values()):
        assert torch.equal(a, b), name
    for rate in (0.9, 0.5):
        for name, a in straight.ema_weights(rate).items():
            assert torch.equal(a, resumed.ema_weights(rate)[name]), (rate, name)
    assert len(straight_keys) == 16 and len(set(straight_keys)) == 16  # 4 steps x 4 images, none repeated
    assert first_keys + second_keys == straight_keys
    assert [s for s, _ in complete_checkpoints(tmp_path / "split" / "checkpoints")] == [2, 4]


def test_a_nan_loss_under_fp32_stops_at_the_next_reduction_naming_the_step_and_saves_nothing(tiny, tmp_path):
    """The step does not wait to read the loss: the NaN of step 2 is counted on the device and raises at the
    next check, before a sample, an evaluation or a checkpoint (which must not hold what that step reached)."""
    cfg = tiny("train.max_steps=10", "checkpoint.save_every=1", "train.sample_every=1")
    trainer = Trainer(cfg, tmp_path / "run", monitor=TrainingMonitor(cfg, tmp_path / "run"))
    trainer.train_step()
    with torch.no_grad():
        trainer.engine.module.out_conv.bias.fill_(float("nan"))
    trainer.train_step()
    trainer.train_step()
    for check in (trainer.check_finite, lambda: trainer.look(False, False), trainer.save, trainer.reduce_window):
        with pytest.raises(TrainingDiverged, match=r"not finite at step 2 \(in 1 micro-batches of 1 x 1 ranks; "
                                                   r"2 of the 3 steps up to step 3\) under float32"):
            check()
    assert complete_checkpoints(tmp_path / "run" / "checkpoints") == []
    trainer.close()


def test_a_training_step_reads_no_value_of_the_device_on_the_host(tiny, tmp_path):
    """No loss, norm or statistic is turned into a Python number inside the step (on a GPU each would wait for
    the device). What remains are the optimizer's step counters, which torch keeps on the CPU."""
    trainer = Trainer(tiny("train.max_steps=10", "train.log_every=100"), tmp_path / "run")
    trainer.train_step()
    counters = {s["step"].data_ptr() for s in trainer.engine.optimizer.state.values() if "step" in s}
    assert len(counters) == len(trainer.params)

    class HostReads(TorchDispatchMode):
        reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                if args[0].data_ptr() not in counters:
                    self.reads.append(func)
            return func(*args, **(kwargs or {}))

    with HostReads():
        trainer.train_step()
    assert HostReads.reads == []
    assert trainer.reduce_window()["train/loss"] > 0
    trainer.close()


def test_nonfinite_loss_is_skipped_only_under_fp16():
    assert nonfinite_action(torch.float16) == "skip"
    assert nonfinite_action(torch.bfloat16) == "stop"
    assert nonfinite_action(torch.float32) == "stop"


def test_sigterm_saves_a_checkpoint_mirrors_it_and_returns(tiny, tmp_path):
    remote = f"memory://mirror-{uuid.uuid4().hex}"
    trainer = Trainer(tiny("train.max_steps=50", f"checkpoint.remote_url={remote}"), tmp_path / "run")

    def term_after_two(batches):
        for i, batch in enumerate(batches):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    trainer.batches = term_after_two(trainer.batches)
    summary = trainer.run()
    trainer.close()
    assert summary["stopped"] and summary["step"] == 3
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    mirrored = fsspec.filesystem("memory").ls(f"{remote}/step_00000003", detail=False)
    assert {p.rsplit("/", 1)[1] for p in mirrored} >= {"COMPLETE", "textdiff.pt", "rank_00000.pt", "config.json"}


def test_frozen_caption_encoder_stays_out_of_zero3_and_the_optimizer(tiny, tiny_clip, tmp_path):
    trainer = Trainer(tiny("deepspeed.zero_optimization.stage=3", "model.using_capt=true",
                           f"model.clipname={tiny_clip}", "model.clip_pretrained=", "model.capt_pdrop=0.1",
                           "train.max_steps=2"), tmp_path / "run")
    encoder = trainer.frozen["capt_encoder"]
    assert not any(n.startswith("capt_encoder.") for n, _ in trainer.engine.module.named_parameters())
    assert all(not hasattr(p, "ds_id") for p in encoder.parameters())  # not ZeRO-partitioned
    optimized = {id(p) for group in trainer.engine.optimizer.fp16_groups for p in group}
    assert len(optimized) == len(list(trainer.engine.module.parameters()))
    assert not optimized & {id(p) for p in encoder.parameters()}
    weights = [p.clone() for p in encoder.parameters()]
    summary = trainer.run()
    trainer.close()
    assert summary["step"] == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert all(torch.equal(a, b) for a, b in zip(weights, encoder.parameters()))
    assert trainer.ema_weights(0.9)["out_conv.weight"].shape == (6, 32, 3, 3)


def test_resuming_with_another_model_width_names_the_key_before_loading(tiny, tmp_path):
    _run(tiny("train.max_steps=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.num_channels \(saved 32, now 64\)"):
        Trainer(tiny("train.max_steps=2", "model.num_channels=64"), tmp_path / "run", resume="auto")


def test_a_run_dir_with_checkpoints_needs_resume(tiny, tmp_path):
    _run(tiny("train.max_steps=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume auto"):
        Trainer(tiny("train.max_steps=2"), tmp_path / "run")


def test_sigterm_to_the_data_worker_and_the_rank_still_saves(tiny, tmp_path):
    """What DeepSpeed's launcher does on Ctrl-C or SIGTERM: terminate the data workers, then the rank. Here the
    worker dies between the two micro-batches of step 3, so step 3 is usually abandoned and step 2 saved."""
    import psutil

    trainer = Trainer(tiny("train.max_steps=50", "data.num_workers=1", "data.prefetch_factor=1",
                           "deepspeed.gradient_accumulation_steps=2"), tmp_path / "run")

    def terminate_tree_at_batch_four(batches):
        for i, batch in enumerate(batches):
            if i == 4:
                for worker in psutil.Process().children(recursive=True):
                    worker.terminate()
                time.sleep(1)  # the worker is gone before the rank's own signal, as under the launcher
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    trainer.batches = terminate_tree_at_batch_four(trainer.batches)
    summary = trainer.run()
    trainer.close()
    assert summary["stopped"] and summary["step"] in (2, 3)  # 3 only if the worker had queued batch 5 in time
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [summary["step"]]


def _forbid_building(monkeypatch):
    """Makes building the model or the engine fail the test: the check must come before either."""
    from textdiff.train import engine as eng

    def built(*args, **kwargs):
        raise AssertionError("the model or engine was built before the bad input was found")

    monkeypatch.setattr(eng, "build_engine", built)
    monkeypatch.setattr("textdiff.models.build_model", built)


@pytest.fixture
def nothing_built(monkeypatch):
    _forbid_building(monkeypatch)


@pytest.mark.parametrize("shards, message", [
    ("{root}/no-such-dir/shard-{{000000..000002}}.tar",
     r"data.shards: shard .*no-such-dir/shard-000000.tar does not exist"),
    ("{root}/shard-{{}}.tar", r"data.shards: shard .*/shard-\{{\}}.tar does not exist"),
    ("{root}/*.nothing", r"data.shards: the glob .*\*.nothing matches no file"),
])
def test_missing_shards_are_found_before_the_model_and_engine_are_built(tiny, tmp_path, nothing_built, shards,
                                                                         message):
    with pytest.raises(ConfigError, match=message.format(root=tmp_path)):
        Trainer(tiny(f"data.shards={shards.format(root=tmp_path)}"), tmp_path / "run")


def test_too_few_shards_for_the_readers_are_found_before_the_engine_is_built(tiny, tmp_path, nothing_built):
    with pytest.raises(ConfigError, match=r"data.shards has 3 shards but world_size x data.num_workers = 4"):
        Trainer(tiny("data.num_workers=4"), tmp_path / "run")


@pytest.mark.parametrize("key, saved, now", [("num_workers", 0, 1), ("seed", 0, 3), ("shuffle_buffer", 16, 8)])
def test_resuming_with_other_data_settings_is_refused_at_start_naming_the_key(tiny, tmp_path, monkeypatch, key,
                                                                             saved, now):
    _run(tiny("train.max_steps=1"), tmp_path / "run")
    _forbid_building(monkeypatch)
    with pytest.raises(ConfigError, match=rf"data.{key} is {now} now but {saved} in the saved run, .* resume with "
                                          rf"--set data.{key}={saved}, or start a new --run-dir"):
        Trainer(tiny("train.max_steps=2", f"data.{key}={now}"), tmp_path / "run", resume="auto")


def test_resuming_on_other_shards_is_refused_at_start_naming_data_shards(tiny, tmp_path, monkeypatch,
                                                                         synthetic_shards):
    _run(tiny("train.max_steps=1"), tmp_path / "run")
    _forbid_building(monkeypatch)
    two = ",".join(str(synthetic_shards / f"shard-00000{i}.tar") for i in (0, 1))
    with pytest.raises(ConfigError, match=r"cannot continue the data stream saved in .*step_00000001: .*num_shards=3.*"
                                          r"data.shards or another data.\* key differs from .*config.json"):
        Trainer(tiny("train.max_steps=2", f"data.shards={two}"), tmp_path / "run", resume="auto")


def test_the_progress_bar_shows_the_loss_of_the_step_it_counts(tiny, tmp_path, monkeypatch):
    import functools
    import io
    import re

    from textdiff.train import loop

    shown = io.StringIO()
    monkeypatch.setattr(loop, "tqdm", functools.partial(loop.tqdm, file=shown, mininterval=0, miniters=1))
    _, summary = _run(tiny("train.max_steps=3"), tmp_path / "run")
    frames = re.findall(r"(\d)/3 \[[^\]]*loss=([\d.]+)\]", shown.getvalue())
    assert {int(step) for step, _ in frames} == {1, 2, 3}
    for step, loss in frames:
        assert loss == f"{summary['losses'][int(step) - 1]:.4f}", (step, frames, summary["losses"])


class _RecordingModel:
    """diffusion_loss's model: records the low-res input and noise step that reach the network's conditioning."""

    def __init__(self):
        self.seen = {}

    def prepare_cond(self, txt, capt, low_res=None, noise_cond_t=None):
        self.seen.update(low_res=low_res, noise_cond_t=noise_cond_t)
        return {}


class _ZeroLoss:
    """diffusion_loss's process: the losses do not matter here, only what reaches the model."""

    def training_losses(self, model_fn, x0, t, model_kwargs, noise):
        zeros = torch.zeros(x0.shape[0])
        return {"loss": zeros, "mse": zeros, "vb": zeros}


def _noise_cond_loss(tiny, *overrides, n=2000):
    from textdiff.diffusion.timestep_sampler import build_timestep_sampler

    cfg = tiny("model.image_size=32", "model.low_res_size=16", "model.attention_resolutions=[16]",
               "model.txt_resolutions=[16]", *overrides)
    low_res = torch.linspace(-0.9, 0.9, 48).reshape(1, 3, 4, 4).repeat(n, 1, 1, 1)  # the same image n times
    batch = {"image": torch.zeros(n, 3, 2, 2), "txt": ["ab"] * n, "capt": [""] * n, "low_res": low_res}
    model = _RecordingModel()
    diffusion_loss(model, None, _ZeroLoss(), build_timestep_sampler("uniform", 1000), batch, cfg,
                   torch.Generator().manual_seed(0), torch.device("cpu"))
    return low_res, model.seen


def test_noise_conditioning_noises_the_low_res_input_to_the_step_the_model_is_given(tiny):
    from textdiff.diffusion.noise_cond import noise_cond_alphas_cumprod

    low_res, seen = _noise_cond_loss(tiny, "model.noise_cond=true", "model.noise_cond_max_step=600")
    t = seen["noise_cond_t"]
    # uniform on {0..599}, the limit exclusive as the research code's: both ends drawn, 600 never
    assert t.shape == (2000,) and int(t.min()) == 0 and int(t.max()) == 599
    assert float(t.float().mean()) == pytest.approx(299.5, abs=4 * 173.2 / 2000 ** 0.5)  # sd of U{0..599} is 173.2
    abar = noise_cond_alphas_cumprod().float()[t].reshape(-1, 1, 1, 1)
    # undo q(x_t | x_0) with the step the model was given: what is left must be unit Gaussian noise
    z = (seen["low_res"] - abar.sqrt() * low_res) / (1 - abar).sqrt()
    m = z.numel()  # 96000 values: mean within 4 sd (4 / sqrt(m)), variance within 4 sd (4 sqrt(2 / m))
    assert float(z.mean()) == pytest.approx(0.0, abs=4 / m ** 0.5)
    assert float(z.var()) == pytest.approx(1.0, abs=4 * (2 / m) ** 0.5)
    assert float((z * low_res).mean()) == pytest.approx(0.0, abs=4 * float(low_res.pow(2).mean().sqrt()) / m ** 0.5)


def test_without_noise_conditioning_the_low_res_input_reaches_the_model_unchanged(tiny):
    low_res, seen = _noise_cond_loss(tiny, n=8)
    assert seen["noise_cond_t"] is None and torch.equal(seen["low_res"], low_res)


def test_resuming_with_another_micro_batch_starts_the_stream_afresh_warning_once(tiny, tmp_path, capsys):
    _run(tiny("train.max_steps=1"), tmp_path / "run")
    capsys.readouterr()
    trainer = Trainer(tiny("train.max_steps=2", "deepspeed.train_micro_batch_size_per_gpu=2"), tmp_path / "run",
                      resume="auto")
    trainer.close()
    assert trainer.step == 1 and trainer.stream.counters()["batches"] == 0
    assert capsys.readouterr().err.count("the data stream starts afresh") == 1  # textdiff logs to stderr


def test_grad_norm_is_the_norm_of_all_gradients_together_as_a_tensor():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = grad_norm([a, b, torch.zeros(1, requires_grad=True)])  # a parameter without a gradient is left out
    assert isinstance(norm, torch.Tensor) and norm.item() == 5.0


def test_textdiffs_gradient_clipping_gives_the_weights_deepspeeds_does(tiny, tmp_path, monkeypatch):
    """fp32 at ZeRO 0 textdiff clips (eng.own_clipping); two steps with a limit far below the gradient norm
    (so every step is clipped) end at the weights of DeepSpeed clipping the same steps itself."""
    cfg = ("deepspeed.gradient_clipping=0.001", "deepspeed.gradient_accumulation_steps=2")
    ours = Trainer(tiny(*cfg), tmp_path / "ours")
    assert ours.engine.gradient_clipping() == 0.0
    for _ in range(2):
        ours.train_step()
    assert float(ours._grad_norm) > 0.01
    monkeypatch.setattr(eng, "own_clipping", lambda ds_config: 0.0)
    theirs = Trainer(tiny(*cfg), tmp_path / "theirs")
    assert theirs.engine.gradient_clipping() == 0.001
    for _ in range(2):
        theirs.train_step()
    for (name, a), b in zip(ours.engine.module.state_dict().items(), theirs.engine.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    ours.close(), theirs.close()


def test_the_loss_of_a_micro_batch_never_waits_for_the_device(tiny, waiting_copies_mode):
    """On the meta device (no data: reading a value on the host raises), the whole loss, from the batch's
    copy to the weighted mean, makes no copy to the device that waits for it (on CUDA each would synchronise
    the stream): the timestep tables are read on the host, where the timesteps are drawn."""
    from textdiff.diffusion import build_diffusion
    from textdiff.diffusion.timestep_sampler import build_timestep_sampler
    from textdiff.models import build_model

    cfg = tiny("model.learn_sigma=true")
    model = build_model(cfg.model).to("meta").train()
    diffusion = build_diffusion(cfg.diffusion, learn_sigma=True)
    timesteps = build_timestep_sampler(cfg.diffusion.schedule_sampler, diffusion.num_timesteps)
    batch = {"image": torch.zeros(4, 3, 16, 16), "txt": ["ab", "", "cd", "e"], "capt": [""] * 4}
    mode = waiting_copies_mode()
    with mode:
        loss, t, terms = diffusion_loss(model, model, diffusion, timesteps, batch, cfg,
                                        torch.Generator().manual_seed(0), torch.device("meta"))
    assert mode.count == 0 and loss.device.type == "meta" and t.device.type == "cpu" and terms["vb"].shape == (4,)


def test_step_stats_sum_the_terms_and_the_loss_by_timestep_quartile():
    terms = {"loss": torch.tensor([1.0, 2.0, 3.0, 5.0]), "mse": torch.ones(4), "vb": torch.zeros(4)}
    stats = step_stats(terms, torch.tensor([0, 24, 25, 99]), 100)
    assert stats.tolist() == [11.0, 4.0, 0.0, 4.0, 3.0, 3.0, 0.0, 5.0, 2.0, 1.0, 0.0, 1.0]


def test_losses_are_logged_once_per_log_every_as_the_mean_of_its_steps(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, summary = _run(tiny("train.max_steps=4", "train.log_every=2"), tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = acc.Scalars("train/loss")
    assert [e.step for e in logged] == [2, 4] and len(summary["losses"]) == 4
    for event, pair in zip(logged, (summary["losses"][:2], summary["losses"][2:])):
        assert event.value == pytest.approx(sum(pair) / 2, rel=1e-6)


# Every optimizer wrapper DeepSpeed 0.19 builds for a 16-bit engine, and the attribute holding its fp32 masters:
# fp16 or bf16 at ZeRO 0 go through _configure_fp16_optimizer (bf16 as DDP_BFLOAT16): FusedAdam (torch_adam off)
# gets FP16_Optimizer, any other optimizer FP16_UnfusedOptimizer; bf16 at ZeRO 1 with fp32 gradient accumulation
# gets BF16_Optimizer; ZeRO 1-2 and 3 their own optimizers.
SGD = 'deepspeed.optimizer={"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}'
WRAPPERS = {
    "fp16-zero0-torch_adam": (["deepspeed.fp16.enabled=true"], "FP16_UnfusedOptimizer", "fp32_groups"),
    "bf16-zero0-torch_adam": (["deepspeed.bf16.enabled=true"], "FP16_UnfusedOptimizer", "fp32_groups"),
    "fp16-zero0-sgd": (["deepspeed.fp16.enabled=true", SGD], "FP16_UnfusedOptimizer", "fp32_groups"),
    "fp16-zero0-fused_adam": (["deepspeed.fp16.enabled=true", "deepspeed.optimizer.params.torch_adam=false"],
                              "FP16_Optimizer", "fp32_groups_flat"),
    "bf16-zero0-fused_adam": (["deepspeed.bf16.enabled=true", "deepspeed.optimizer.params.torch_adam=false"],
                              "FP16_Optimizer", "fp32_groups_flat"),
    "bf16-zero1-fp32_accumulation": (["deepspeed.bf16.enabled=true", "deepspeed.zero_optimization.stage=1",
                                      'deepspeed.data_types={"grad_accum_dtype": "fp32"}'],
                                     "BF16_Optimizer", "fp32_groups_flat_partition"),
    "fp16-zero2": (["deepspeed.fp16.enabled=true", "deepspeed.zero_optimization.stage=2"],
                   "DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups"),
    "bf16-zero1": (["deepspeed.bf16.enabled=true", "deepspeed.zero_optimization.stage=1"],
                   "DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups"),
    "fp16-zero3": (["deepspeed.fp16.enabled=true", "deepspeed.zero_optimization.stage=3"],
                   "DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat"),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_under_every_16bit_optimizer_wrapper_the_ema_follows_the_fp32_master_weights(tiny, tmp_path, wrapper,
                                                                                       deepspeed_cpu_fp16):
    """The EMA starts as, and averages, the very fp32 tensors the wrapped optimizer steps, whatever wrapper
    DeepSpeed builds (the EMA had averaged the fp16 weights under FP16_UnfusedOptimizer): at rate 0.5 the first
    update is the 50/50 mean of the fp32 masters before and after the step."""
    overrides, wrapper_class, attribute = WRAPPERS[wrapper]
    trainer = Trainer(tiny(*overrides, "deepspeed.fp16.initial_scale_power=4", "ema.rates=[0.5]",
                           "deepspeed.scheduler.params.warmup_min_lr=0.002"), tmp_path / "run")  # no lr-0 step
    assert type(trainer.engine.optimizer).__name__ == wrapper_class
    assert eng.master_layout(trainer.engine.optimizer, trainer.params) == attribute
    assert all(p.dtype != torch.float32 for p in trainer.params)  # the module computes in 16 bits
    # copies: unsharded masters come back as views of the live tensors
    before = {n: v.detach().clone()
              for n, v in zip(trainer.param_names, eng.full_fp32_parameters(trainer.engine, trainer.params))}
    assert all(v.dtype == torch.float32 for v in before.values())
    for name, value in trainer.ema_weights(0.5).items():
        assert torch.equal(value, before[name]), name
    trainer.train_step()
    assert trainer.engine.skipped_steps == 0  # a loss scale of 2**4 does not overflow this model
    masters, _ = eng.fp32_master_weights(trainer.engine, trainer.params)
    # the optimizer's state (moments, momentum) is kept for exactly the tensors the EMA averages
    assert {id(t) for t in trainer.engine.basic_optimizer.state} == {id(t) for t in masters}
    assert all(t.dtype == torch.float32 for t in masters)
    after = {n: v.detach()
             for n, v in zip(trainer.param_names, eng.full_fp32_parameters(trainer.engine, trainer.params))}
    assert float((after["out_conv.weight"] - before["out_conv.weight"]).abs().max()) > 0  # the step moved it
    for name, value in trainer.ema_weights(0.5).items():
        # one lerp by 0.5 in fp32: within one rounding of the exact mean
        torch.testing.assert_close(value, before[name] + 0.5 * (after[name] - before[name]), rtol=2 ** -23,
                                   atol=2 ** -30, msg=name)
    trainer.close()


def test_ema_snapshots_are_written_every_snapshot_every_steps_and_a_resumed_run_writes_the_same(tiny, tmp_path):
    """Power-function EMAs (sharded at ZeRO 2) saved every 2 steps: steps 2 and 4, bit-identical whether the
    run went straight through or stopped at 2 and resumed; the tracked starts resume with the checkpoint."""
    from safetensors.torch import load_file

    from textdiff.formats.ema_snapshots import list_snapshots

    keys = ("deepspeed.zero_optimization.stage=2", "ema.power_sigma_rels=[0.05, 0.1]", "ema.snapshot_every=2",
            'ema.tracked=["plain:0.9", "arithmetic:0.9"]')
    straight, _ = _run(tiny(*keys, "train.max_steps=4"), tmp_path / "straight")
    _run(tiny(*keys, "train.max_steps=2"), tmp_path / "split")
    resumed, _ = _run(tiny(*keys, "train.max_steps=4"), tmp_path / "split", resume="auto")
    infos = list_snapshots(tmp_path / "straight")
    assert [(s.step, s.updates) for s in infos] == [(2, 2), (4, 4)]
    assert infos[0].sigma_rels == {"power:0.05": 0.05, "power:0.1": 0.1}
    for info, other in zip(infos, list_snapshots(tmp_path / "split")):
        a, b = load_file(str(info.path)), load_file(str(other.path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), info.step
    assert "power:0.05/out_conv.weight" in load_file(str(infos[1].path))
    for key in ("plain:0.9", "arithmetic:0.9"):
        for name, value in straight.ema_weights(key).items():
            assert torch.equal(value, resumed.ema_weights(key)[name]), (key, name)


def test_a_step_with_mask_unreadable_trains_on_a_loss_masked_batch(tiny, tmp_path):
    """Shards with unreadable boxes on every other image: the batch carries their loss mask, the step runs, and
    the per-sample loss of a masked image differs from its unmasked loss while an unmasked image's does not."""
    import json

    import numpy as np
    from PIL import Image

    from textdiff.data.shards import make_source_shards

    src, rng = tmp_path / "src", np.random.default_rng(0)
    src.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"w{i}")
    (tmp_path / "u.json").write_text(json.dumps({str(i): [[2, 2, 10, 6]] for i in range(0, 8, 2)}))
    make_source_shards(src, tmp_path / "shards", unreadable=tmp_path / "u.json", workers=0, progress=False)
    cfg = tiny(f"data.shards={tmp_path / 'shards' / 'manifest.json'}", "data.mask_unreadable=true",
               "train.max_steps=2")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step()
    trainer.train_step()
    batch = trainer.first_batch
    masked = [int(key) % 2 == 0 for key in batch["key"]]
    # 16 px images kept whole: the box (2, 2, 10, 6) leaves out 8 x 4 = 32 of 256 pixels
    assert batch["loss_mask"].shape == (4, 1, 16, 16)
    assert [int((m == 0).sum()) for m in batch["loss_mask"]] == [32 if b else 0 for b in masked]
    assert 0 < trainer.reduce_window()["train/loss"] < float("inf")

    def terms(with_mask):
        shown = batch if with_mask else {k: v for k, v in batch.items() if k != "loss_mask"}
        with torch.no_grad():
            return diffusion_loss(trainer.engine.module, trainer.engine_fn, trainer.diffusion, trainer.timesteps,
                                  shown, cfg, torch.Generator().manual_seed(0), trainer.device)[2]["loss"]

    on, off = terms(True), terms(False)
    assert [a != pytest.approx(b, rel=1e-5) for a, b in zip(on.tolist(), off.tolist())] == masked
    trainer.close()
