"""The CUDA paths, on a machine with a GPU (skipped elsewhere): checkpoints readable on a CPU, fp32 evaluation after
--amp, deterministic runs and resume, --compile, no host sync in a training step, bf16 and channels_last really in
use, the GPU recipe with its fused SGD, sync-BN on a one-rank NCCL group, the classic loop and bench.py on the GPU,
NCCL with two GPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import train
from hardware import amp_dtype
from conftest import ROOT, assert_same_weights, interrupt_at, metrics, untimed, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_args(data_dir: str, out, *extra: str) -> list[str]:
    return ["--data-dir", data_dir, "--arch", "resnet20", "--width", "4", "--epochs", "2", "--batch-size", "32",
            "--out", str(out), "--no-progress", "--log-every", "2", "--device", "cuda", *extra]


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


def test_gpu_checkpoint_loads_and_evaluates_on_cpu(tiny_folder, tmp_path):
    amp = ["--amp"] if amp_dtype(torch.device("cuda"))[0] else []  # train.py's rule: bf16, or fp16 on a T4 or V100
    out = tmp_path / "r"
    train.main(gpu_args(tiny_folder, out, *amp))
    ckpt = torch.load(out / "last.pt", weights_only=True)  # no map_location: a CPU-only machine does this
    assert all(t.device.type == "cpu" for t in all_tensors(ckpt))
    on_gpu = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cuda"])
    assert on_gpu["test_acc"] == metrics(out)[-1]["test_acc"]  # fp32 evaluation, in training and after
    on_cpu = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu"])
    assert abs(on_cpu["test_acc"] - on_gpu["test_acc"]) <= 0.02  # TF32/cuDNN vs CPU kernels: an image or two
    # and the run resumes on the CPU: --amp is the process's flag, not the run's
    train.main(["--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu", "--no-progress", "--epochs", "3"])
    assert len(metrics(out)) == 3


@pytest.mark.parametrize("levers", [(), ("--crop-padding", "2", "--warmup", "until-error", "--warmup-error", "0.95")],
                         ids=["default", "pad2-until-error"])
def test_deterministic_runs_are_identical_and_resume_exactly(tiny_folder, tmp_path, monkeypatch, levers):
    args = ("--deterministic", "--val-split", "40", *levers)
    train.main(gpu_args(tiny_folder, tmp_path / "a", *args))
    train.main(gpu_args(tiny_folder, tmp_path / "b", *args))
    assert untimed(metrics(tmp_path / "a")) == untimed(metrics(tmp_path / "b"))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_at(m, "batches", 1, 2)
        with pytest.raises(SystemExit):
            train.main(gpu_args(tiny_folder, broken, *args))
    train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cuda",
                "--deterministic"])
    assert untimed(metrics(broken)) == untimed(metrics(tmp_path / "a"))
    assert_same_weights(weights(broken), weights(tmp_path / "a"))


needs_bf16 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                reason="bf16 arithmetic needs compute capability 8.0")


def test_compiled_run_logs_its_compile_apart_and_evaluates_as_logged(tiny_folder, tmp_path):
    from hardware import compile_unavailable

    if why := compile_unavailable(torch.device("cuda")):
        pytest.skip(why)
    out = tmp_path / "r"
    train.main(gpu_args(tiny_folder, out, "--compile"))
    first, second = metrics(out)
    assert first["compile_s"] > 0 and "compile_s" not in second
    res = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cuda"])
    assert res["test_acc"] == second["test_acc"]  # the uncompiled module, evaluated in the run's format


def test_a_training_step_never_waits_for_the_gpu(tiny_folder):
    """train.py's step (data, bf16 forward where the GPU has it, loss, fused SGD, lr schedule, epoch sums) under
    torch.cuda.set_sync_debug_mode("error")."""
    import gpu_check
    from data import load_cifar

    result = gpu_check.host_syncs(torch.device("cuda"), load_cifar(tiny_folder), batch=32, steps=5)
    assert result["checked"] and result["syncs"] == 0, result


@needs_bf16
def test_amp_trains_in_bf16_and_channels_last_and_evaluates_in_fp32(tiny_folder, tmp_path, monkeypatch):
    """The first convolution's output dtype and input layout in every forward: bf16 and channels_last in
    training under --amp, fp32 and channels_last in evaluation."""
    seen = []  # (training?, output dtype, channels_last input?)
    build = train.build_model

    def hooked(*args, **kw):
        model = build(*args, **kw)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, inp, out: seen.append(
            (m.training, out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(train, "build_model", hooked)
    train.main(gpu_args(tiny_folder, tmp_path / "r", "--amp"))
    assert {s for s in seen if s[0]} == {(True, torch.bfloat16, True)}
    evaluated = [s for s in seen if not s[0]][:-1]  # the last forward draws the pictures, outside evaluate
    assert evaluated and set(evaluated) == {(False, torch.float32, True)}


@needs_bf16
def test_gpu_recipe_keeps_its_amp_and_compile_and_steps_with_fused_sgd(tiny_folder, tmp_path):
    import config
    from data import load_cifar
    from hardware import compile_unavailable

    cfg = config.parse_config(["--recipe", "gpu", "--batch-size", "32", "--out", str(tmp_path / "r")])
    cuda = torch.device("cuda")
    compiles = compile_unavailable(cuda) is None  # Triton installed
    notes = config.fit_recipe_to_device(cfg, cuda, {"recipe", "batch_size", "out"})
    assert cfg.amp and cfg.compile == compiles and len(notes) == (0 if compiles else 1), notes
    data = load_cifar(tiny_folder)
    loaders = train.make_loaders(cfg, data, cuda, 0, 1)
    state = train.new_state(cfg, data, loaders.train, cuda)
    assert state.optimizer.defaults["fused"]


def test_sync_bn_on_a_one_rank_nccl_group_is_as_accurate_as_batchnorm(monkeypatch, tmp_path):
    """Our sync-BN's sync path on CUDA (NCCL), bf16 input, against fp64: no worse than cuDNN's BatchNorm2d."""
    from test_distributed import assert_sync_bn_as_accurate_as_batchnorm

    assert_sync_bn_as_accurate_as_batchnorm(torch.device("cuda"), "nccl", monkeypatch, tmp_path)


def test_classic_loop_and_bench_run_on_the_gpu(tiny_folder, tmp_path):
    import bench
    import classic

    torch.backends.cudnn.benchmark = False
    row = classic.main([str(tmp_path / "classic"), "--data-dir", tiny_folder, "--epochs", "1", "--width", "4",
                        "--device", "cuda"])
    assert 0 <= row["test_acc"] <= 1
    assert torch.backends.cudnn.benchmark  # cuDNN autotuning, as the classic repos run on a GPU
    torch.backends.cudnn.benchmark = False
    r = bench.main(["--quick", "--device", "cuda"])
    assert r["ours_images_per_s"] > 0 and r["peak_memory_mb"] > 0
    assert torch.backends.cudnn.benchmark  # every loop timed with train.py's backend settings
    assert r["matmul_peak_tflops"]["fp32_on_tf32_cores"] == torch.backends.cudnn.allow_tf32


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_torchrun_nccl_two_gpus(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *gpu_args(tiny_folder, out, "--sync-bn")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cuda"])
    assert res["test_acc"] == metrics(out)[-1]["test_acc"]
