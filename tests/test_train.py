"""train.py end to end on tiny data, plot_curves.py, and the real-data check."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import pytest
import torch

import plot_curves
import schedule
import train
from conftest import (METRIC_KEYS, assert_same_weights, interrupt_at, metrics, tiny_args, untimed,
                      weights)


def test_end_to_end_writes_every_run_file(tiny_folder, tmp_path):
    out = tmp_path / "run"
    summary = train.main(tiny_args(tiny_folder, out, "--val-split", "40"))
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert METRIC_KEYS | {"val_loss", "val_acc"} <= rows[0].keys()
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["arch"] == "resnet20" and info["torch"] == torch.__version__
    assert {"torchvision", "device", "git_commit"} <= info.keys()
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain types only
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "arch"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert summary["final_test_acc"] == rows[-1]["test_acc"] and summary["out"] == str(out)
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)


def test_no_best_checkpoint_without_validation_split(tiny_folder, tmp_path):
    train.main(tiny_args(tiny_folder, tmp_path / "r", "--epochs", "1"))
    assert (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "best.pt").exists()
    assert "val_acc" not in metrics(tmp_path / "r")[0]


def test_seeded_runs_are_identical(tiny_folder, tmp_path):
    train.main(tiny_args(tiny_folder, tmp_path / "a", "--epochs", "1"))
    train.main(tiny_args(tiny_folder, tmp_path / "b", "--epochs", "1"))
    train.main(tiny_args(tiny_folder, tmp_path / "c", "--epochs", "1", "--seed", "1"))
    assert untimed(metrics(tmp_path / "a")) == untimed(metrics(tmp_path / "b"))
    assert untimed(metrics(tmp_path / "a")) != untimed(metrics(tmp_path / "c"))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.parametrize("where, epoch, step", [("evaluate", 1, 0), ("batches", 1, 2)])
def test_resume_equals_straight_run(tiny_folder, tmp_path, monkeypatch, where, epoch, step):
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, "--val-split", "40"))
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_at(m, where, epoch, step)
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(tiny_folder, broken, "--val-split", "40"))
    assert e.value.code == 128 + signal.SIGTERM
    assert len(metrics(broken)) == 1
    ckpt = torch.load(broken / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == ((1, 0) if where == "evaluate" else (1, step + 1))
    summary = train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert untimed(metrics(broken)) == untimed(metrics(straight))
    assert_same_weights(weights(broken), weights(straight))
    assert summary["final_test_acc"] == metrics(straight)[-1]["test_acc"]
    # finished: a no-op
    again = train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert again["final_test_acc"] == summary["final_test_acc"] and len(metrics(broken)) == 2


def test_eval_only_reproduces_logged_accuracy(tiny_folder, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    res = train.main(["--eval-only", "--resume", str(out / "last.pt"), "--data-dir", tiny_folder, "--device", "cpu"])
    assert res["test_acc"] == metrics(out)[-1]["test_acc"]
    assert abs(res["test_loss"] - metrics(out)[-1]["test_loss"]) < 1e-6
    assert len(res["per_class"]) == 10 and "airplane" in capsys.readouterr().out


def test_lr_schedule_is_a_function_of_the_global_step():
    cfg = train.Config(epochs=10, warmup_epochs=1.0, milestones=[5.0, 7.5], gamma=0.1)
    spe = 100
    f = [schedule.lr_factor(s, spe, cfg) for s in range(10 * spe)]
    assert f[0] == pytest.approx(0.01) and f[99] == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert f[499] == 1.0 and f[500] == pytest.approx(0.1) and f[749] == pytest.approx(0.1)
    assert f[750] == pytest.approx(0.01)
    default = train.Config(epochs=30, warmup_epochs=0.0)
    assert default.milestone_epochs() == [15.0, 22.5]


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = train.Config(epochs=10, warmup_epochs=2.0, schedule="linear")
    spe = 100
    f = [schedule.lr_factor(s, spe, cfg) for s in range(10 * spe + 1)]
    assert f[199] == pytest.approx(1.0) and f[200] == pytest.approx(1.0)  # peak at the end of warm-up
    assert f[600] == pytest.approx(0.5) and f[1000] == 0.0  # halfway down at epoch 6, zero after the last step
    assert all(a >= b for a, b in zip(f[200:], f[201:]))


def test_fast_recipe_sets_defaults_and_flags_still_win():
    cfg = train.parse_config(["--recipe", "fast", "--out", "x"])
    assert (cfg.epochs, cfg.schedule, cfg.lr, cfg.warmup_epochs) == (20, "linear", 0.2, 2.0)
    assert train.parse_config(["--recipe", "fast", "--epochs", "12", "--out", "x"]).epochs == 12


@pytest.mark.parametrize("epochs", [16, 18])
def test_fast16_and_fast18_recipes_are_fast_with_crops_shifted_by_2(epochs):
    """README's fast16 and fast18 runs were started as --recipe fast --epochs N --crop-padding 2: the same config."""
    preset = dataclasses.asdict(train.parse_config(["--recipe", f"fast{epochs}", "--out", "x"]))
    flags = dataclasses.asdict(train.parse_config(["--recipe", "fast", "--epochs", str(epochs), "--crop-padding", "2",
                                                   "--out", "x"]))
    assert (preset.pop("recipe"), flags.pop("recipe")) == (f"fast{epochs}", "fast")
    assert preset == flags and (preset["crop_padding"], preset["epochs"]) == (2, epochs)


def test_gpu_recipe_fits_its_amp_and_compile_to_the_device_and_says_so(tiny_folder, tmp_path, monkeypatch, capsys):
    """--recipe gpu sets batch 512 at lr 0.8, --amp and --compile. Where the device cannot use the last two (no
    bf16 units; a CPU, which it does not compile on), the run turns them off, one note each; a flag the user typed
    stays. A resumed run's process flags that the command line leaves out are its recipe's, fitted again."""
    import config

    cfg = train.parse_config(["--recipe", "gpu", "--out", "x"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule, cfg.amp, cfg.compile) == (32, 512, 0.8, "linear",
                                                                                        True, True)
    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "amp_dtype", lambda device, asked="auto": ("bf16", None))
    assert config.fit_recipe_to_device(cfg, cpu, set()) == [
        "--recipe gpu sets --compile, but it compiles on CUDA only: training uncompiled (--compile forces it)"]
    assert cfg.amp and not cfg.compile
    typed = train.parse_config(["--recipe", "gpu", "--compile", "--out", "x"])
    assert config.fit_recipe_to_device(typed, cpu, {"recipe", "compile"}) == [] and typed.compile
    mode = train.parse_config(["--recipe", "gpu", "--compile-mode", "max-autotune", "--out", "x"])
    assert config.fit_recipe_to_device(mode, cpu, {"recipe", "compile_mode"}) == [] and mode.compile  # asks for it

    monkeypatch.setattr(config, "amp_dtype", lambda device, asked="auto": (None, "no bf16 here"))
    out = tmp_path / "r"
    small = ("--recipe", "gpu", "--batch-size", "32", "--lr", "0.1", "--warmup-epochs", "1")
    train.main(tiny_args(tiny_folder, out, *small))
    err = capsys.readouterr().err
    assert "train.py: note: --recipe gpu sets --amp, but no bf16 here: training in fp32" in err
    assert "train.py: note: --recipe gpu sets --compile, but it compiles on CUDA only" in err
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["recipe"], saved["amp"], saved["compile"]) == ("gpu", False, False)
    for argv, amp in ((["--resume", str(out)], True), (["--resume", str(out), "--no-amp"], False)):
        now = train.parse_config(argv)
        resumed = config.Config.for_resume(saved, now, config.explicit_flags(argv))
        assert (resumed.amp, resumed.compile) == (amp, True)  # the recipe's, unless typed
    gone = config.Config.for_resume({**saved, "recipe": "quarter"}, now, {"resume"})  # a recipe since removed
    assert (gone.amp, gone.compile) == (False, False)
    argv = ["--resume", str(out), "--compile-mode", "reduce-overhead"]  # the run's recipe compiles: a mode fits
    resumed = config.Config.for_resume(saved, train.parse_config(argv), config.explicit_flags(argv))
    assert (resumed.compile, resumed.compile_mode) == (True, "reduce-overhead")
    with pytest.raises(config.UserError, match="--compile-mode reduce-overhead is the mode of --compile, which"):
        config.Config.for_resume({**saved, "recipe": "default"}, train.parse_config(argv), {"resume", "compile_mode"})


def test_flip_tta_is_the_mean_of_both_views(tiny_folder, tmp_path):
    """--tta reports, beside the plain accuracy, the accuracy of logits averaged over each image and its mirror."""
    from data import Loader, load_cifar10
    from runs import load_model

    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1", "--tta"))
    row = metrics(out)[-1]
    model = load_model(str(out / "last.pt")).to(memory_format=torch.channels_last)  # as train.py evaluates
    d = load_cifar10(tiny_folder)
    x, y = next(Loader(d.test_x, d.test_y, 1000, "cpu", train=False, channels_last=True).batches())
    with torch.no_grad():
        plain, mirrored = model(x), model(torch.flip(x, dims=[3]))
    assert row["test_acc"] == pytest.approx((plain.argmax(1) == y).float().mean().item())
    assert row["test_acc_tta"] == pytest.approx(((plain + mirrored).argmax(1) == y).float().mean().item())
    res = train.main(["--eval-only", "--tta", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu"])
    assert res["test_acc_tta"] == pytest.approx(row["test_acc_tta"])


def test_plot_curves_draws_a_partial_log(tmp_path):
    run = tmp_path / "running"
    run.mkdir()
    row = {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.3, "test_loss": 1.8, "test_acc": 0.35,
           "epoch_time_s": 10.0, "images_per_s": 100.0}
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n" + json.dumps({**row, "epoch": 2, "test_acc": 0.5}) + "\n")
        f.write('{"epoch": 3, "lr": 0.0')  # the job is writing its third line
    assert [r["epoch"] for r in plot_curves.read_metrics(str(run))] == [1, 2]
    out = plot_curves.main([str(run), str(run), "-o", str(tmp_path / "c.png"), "--labels", "a", "b"])
    assert os.path.getsize(out) > 10_000
    assert plot_curves.main([str(run), "--x", "time"]) == str(run / "curves.png")


def test_real_cifar10_one_epoch_on_5000_images(real_cifar, tmp_path):
    """ResNet-18 (width 16), one epoch on a 5,000-image subset, tested on all 10,000 test images."""
    s = train.main(["--data-dir", real_cifar, "--subset", "5000", "--epochs", "1", "--warmup-epochs", "0",
                    "--out", str(tmp_path / "real"), "--no-progress"])
    rows = metrics(tmp_path / "real")
    assert rows[0]["test_acc"] == s["final_test_acc"]
    assert s["final_test_acc"] > 0.25, s  # chance is 0.10
    ckpt = torch.load(tmp_path / "real" / "last.pt", weights_only=True)
    assert ckpt["classes"][0] == "airplane" and ckpt["classes"][-1] == "truck"


def test_pictures_of_a_trained_model(tiny_folder, tmp_path):
    """The end of training and --eval-only draw confusion.png (counts summing to the test set) and mistakes.png."""
    from PIL import Image

    from data import load_cifar10

    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--epochs", "1"))
    for name in ("confusion.png", "mistakes.png"):
        assert Image.open(out / name).size[0] > 600, name
    pictures = tmp_path / "eval"
    res = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu",
                      "--out", str(pictures)])
    counts = torch.tensor(res["confusion"])
    data = load_cifar10(tiny_folder)
    assert counts.shape == (10, 10) and counts.sum().item() == len(data.test_y)
    assert counts.sum(1).tolist() == torch.bincount(data.test_y, minlength=10).tolist()  # rows: the true classes
    assert abs(counts.diagonal().sum().item() / len(data.test_y) - res["test_acc"]) <= 0.02  # up to near-ties
    assert (pictures / "confusion.png").is_file() and (pictures / "mistakes.png").is_file()


def test_mistakes_are_the_most_confident_wrong_predictions(tmp_path):
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    true = torch.tensor([0, 1, 2, 3, 4, 5])
    pred = torch.tensor([0, 2, 2, 0, 1, 5])  # wrong: 1, 3, 4
    prob = torch.tensor([0.99, 0.6, 0.9, 0.95, 0.7, 0.5])
    shown = plot_curves.plot_mistakes(images, true, pred, prob, [str(i) for i in range(10)], str(tmp_path / "m.png"),
                                      n=2)
    assert shown == [3, 4] and (tmp_path / "m.png").is_file()
    counts = plot_curves.confusion_matrix(true, pred, 10)
    assert counts[1, 2] == 1 and counts[3, 0] == 1 and counts.trace() == 3 and counts.sum() == 6


def test_cifar100_trains_with_its_classes_and_statistics(tmp_path, skip_md5, capsys):
    from conftest import write_cifar100
    from data import pixel_stats
    from runs import load_model

    splits = write_cifar100(str(tmp_path / "c100"))
    out = tmp_path / "r"
    train.main(["--dataset", "cifar100", "--data-dir", str(tmp_path / "c100"), "--arch", "resnet20", "--width", "4",
                "--epochs", "1", "--batch-size", "32", "--out", str(out), "--no-progress", "--device", "cpu"])
    model = load_model(str(out / "last.pt"))
    mean, std = pixel_stats(splits["train"][0])
    assert model.fc.out_features == 100 and len(model.classes) == 100
    assert model.normalization == {"mean": list(mean), "std": list(std)}
    res = train.main(["--eval-only", "--resume", str(out), "--data-dir", str(tmp_path / "c100"), "--device", "cpu"])
    assert res["test_acc"] == metrics(out)[-1]["test_acc"] and len(res["per_class"]) == 100
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "cifar1000", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--dataset" in err[0]


@pytest.mark.parametrize("args, message", [
    (["{run}", "-o", "{tmp}/no/such/folder/c.png"], "folder {tmp}/no/such/folder does not exist"),
    (["{run}", "-o", "{tmp}/c.xyz"], "name an image file ending in .png"),
    (["{tmp}/empty"], "has no finished epoch yet"),
    (["{tmp}/nothing"], "has no metrics.jsonl"),
    (["{run}", "--labels", "a", "b"], "give one --labels entry per run"),
])
def test_plot_curves_mistakes_are_one_line(tmp_path, capsys, args, message):
    run, empty = tmp_path / "run", tmp_path / "empty"
    for d in (run, empty, tmp_path / "nothing"):
        d.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 2.0, "train_acc": 0.3,
                                                   "epoch_time_s": 1.0}) + "\n")
    (empty / "metrics.jsonl").write_text("")
    fill = dict(run=run, tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        plot_curves.main([a.format(**fill) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("plot_curves.py: error: ") and "\n" not in err, err
    assert message.format(**fill) in err


# ---- --warmup until-error: the paper's warm-up for its 110-layer nets

def test_error_keyed_warmup_is_a_tenth_until_it_ends_then_the_schedule_as_if_it_had_been_that_long():
    cfg = train.Config(epochs=10, warmup="until-error", warmup_epochs=2.0, schedule="linear")
    spe = 100
    running = [schedule.lr_factor(s, spe, cfg) for s in range(10 * spe)]  # not ended yet: --warmup-epochs at most
    assert running[:200] == [0.1] * 200 and running[200] == 1.0
    ended = [schedule.lr_factor(s, spe, cfg, warmup_end=40) for s in range(10 * spe + 1)]
    assert ended[:40] == [0.1] * 40 and ended[40] == 1.0  # back to the peak at the step it ended
    assert ended[520] == pytest.approx(0.5) and ended[1000] == 0.0  # the linear decay from step 40 to the end
    step = train.Config(epochs=10, warmup="until-error", warmup_epochs=1.0, milestones=[5.0])
    assert [schedule.lr_factor(s, spe, step, warmup_end=30) for s in (29, 30, 499, 500)] == [0.1, 1.0, 1.0, 0.1]


def batch(correct: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for n images of which the first `correct` are classified right."""
    y = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 10)
    logits[:correct, 0] = 1
    logits[correct:, 1] = 1
    return logits, y


def test_error_keyed_warmup_ends_on_the_window_error_or_at_its_longest():
    w = schedule.ErrorWarmup(threshold=0.8, longest=100, device="cpu", world=1)
    for step in range(1, 20):  # 19 steps at 30% correct: the test comes at the window's last step only
        w.add(*batch(3), step, 50, step)
    assert w.end is None
    w.add(*batch(1), 20, 50, 20)  # window error (19 * 7 + 9) / 200 = 71% < 80%
    assert (w.end, w.error) == (20, pytest.approx(0.71))
    w.add(*batch(0), 21, 50, 21)  # ended: nothing changes after
    assert w.end == 20 and w.sums.sum() == 0
    never = schedule.ErrorWarmup(threshold=0.8, longest=45, device="cpu", world=1)
    for step in range(1, 50):
        never.add(*batch(1), (step - 1) % 30 + 1, 30, step)  # 90% error, epochs of 30 steps
        assert never.end == (45 if step >= 45 else None)
    assert never.error is None
    short = schedule.ErrorWarmup(threshold=0.8, longest=100, device="cpu", world=1)
    for step in range(1, 8):  # an epoch of 7 steps: tested at its last step, a window of 7 steps
        short.add(*batch(1 if step < 7 else 9), step, 7, step)
        assert short.end == (7 if step == 7 else None)
    assert short.error == pytest.approx(55 / 70)  # (6 * 9 + 1) / 70 wrong: all 7 steps in the window


@pytest.mark.parametrize("threshold, ends", [("0.95", 6), ("0.01", 9)])  # at the first test; at its longest
def test_error_keyed_warmup_in_a_run(tiny_folder, tmp_path, threshold, ends):
    """200 images, batch 32: 6 steps an epoch, tested at each epoch's end; --warmup-epochs 1.5 is 9 steps."""
    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--warmup", "until-error", "--warmup-error", threshold,
                         "--warmup-epochs", "1.5", "--epochs", "3", "--schedule", "linear"))
    rows = metrics(out)
    first_logged = 0 if ends == 6 else 1  # the epoch in which it ended
    assert [r.get("warmup_end_step") for r in rows][first_logged:] == [ends] * (3 - first_logged)
    assert all("warmup_end_step" not in r for r in rows[:first_logged])
    assert rows[0]["lr"] == pytest.approx(0.1 * 0.1)  # the rate of epoch 1's last step: still warming up
    assert rows[1]["lr"] == pytest.approx(0.1 * (18 - 11) / (18 - ends))  # linear from the end step to 0
    assert (rows[-1]["warmup_end_error"] is None) == (ends == 9)


def test_error_keyed_warmup_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    """Stopped mid-window (after step 3 of 6): the window's sums and the end step are in the checkpoint."""
    args = ("--warmup", "until-error", "--warmup-error", "0.9", "--warmup-epochs", "1.9", "--epochs", "3")
    train.main(tiny_args(tiny_folder, tmp_path / "straight", *args))
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_at(m, "batches", 0, 2)
        with pytest.raises(SystemExit):
            train.main(tiny_args(tiny_folder, broken, *args))
    ckpt = torch.load(broken / "last.pt", weights_only=True)
    assert ckpt["partial"]["warmup_window"][1] == 3 * 32 and ckpt["warmup"]["end"] == -1
    train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu"])
    assert untimed(metrics(broken)) == untimed(metrics(tmp_path / "straight"))
    assert_same_weights(weights(broken), weights(tmp_path / "straight"))
    assert torch.load(broken / "last.pt", weights_only=True)["warmup"]["end"] in (6, 11)


def test_evaluation_is_strict_fp32_in_the_runs_memory_format(tiny_folder, tmp_path, monkeypatch):
    """--eval-only evaluates in the memory format the run evaluated in (channels_last by default, NCHW for a run
    trained without it), and every evaluation runs with TF32 off (cuDNN's convolutions would use it on CUDA);
    the caller's TF32 settings come back after."""
    from resnet import ResNet

    seen = []  # (channels_last input?, cuDNN TF32 allowed?) of each evaluation forward
    forward = ResNet.forward
    monkeypatch.setattr(ResNet, "forward", lambda self, x: (
        seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.backends.cudnn.allow_tf32))
        if not self.training else None, forward(self, x))[1])
    for flag, channels_last in (("--channels-last", True), ("--no-channels-last", False)):
        out = tmp_path / flag
        train.main(tiny_args(tiny_folder, out, "--epochs", "1", flag))
        seen.clear()
        res = train.main(["--eval-only", "--resume", str(out), "--data-dir", tiny_folder, "--device", "cpu"])
        assert res["test_acc"] == metrics(out)[-1]["test_acc"]
        evaluated = seen[:len(seen) - 1]  # the last forward draws the pictures, outside evaluate
        assert evaluated and set(evaluated) == {(channels_last, False)}, seen
    assert torch.backends.cudnn.allow_tf32  # given back


def test_compile_time_is_kept_out_of_the_epochs_figures(tiny_folder, tmp_path, monkeypatch):
    """--compile compiles at the first step: that step's seconds (the compile) are logged as compile_s, not as
    training time, and its images are left out of images/s. A stand-in compiler that takes 5 s to start."""
    import config

    class SlowStart(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.started = model, False

        def forward(self, x):
            if not self.started:
                time.sleep(5)
                self.started = True
            return self.model(x)

    monkeypatch.setattr(config, "compile_unavailable", lambda device: None)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (modes.append(mode), SlowStart(model))[1])
    train.main(tiny_args(tiny_folder, tmp_path / "r", "--compile", "--compile-mode", "reduce-overhead"))
    first, second = metrics(tmp_path / "r")
    assert first["compile_s"] >= 5 and first["epoch_time_s"] < 5 and "compile_s" not in second
    assert modes == ["reduce-overhead"]


# ---- fp16 with a loss scaler: what a T4 or V100 trains in under --amp, run on the CPU (emulated) to test it


@pytest.fixture
def overflowing_scaler(monkeypatch):
    """A loss scaler that starts at 2**28: fp16 gradients overflow until it has halved itself far enough."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 28))


def test_fp16_on_a_cpu_trains_with_a_note_and_skips_overflowing_steps(tiny_folder, tmp_path, capsys,
                                                                      overflowing_scaler):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_folder, out, "--amp", "--amp-dtype", "fp16"))
    assert "train.py: note: --amp-dtype fp16 on a CPU: its fp16 arithmetic is emulated" in capsys.readouterr().err
    rows = metrics(out)
    skipped = sum(r["skipped_steps"] for r in rows)
    # each overflow halves the scale (no growth before 2,000 clean steps): the count follows from the last scale
    assert 0 < skipped < 2 * 6 and 2.0 ** (28 - skipped) == rows[-1]["loss_scale"]  # 6 steps an epoch: it trained
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == rows[-1]["loss_scale"] and ckpt["config"]["amp_dtype"] == "fp16"


def test_fp16_resumes_exactly_with_its_loss_scale(tiny_folder, tmp_path, monkeypatch, overflowing_scaler):
    args = ("--amp", "--amp-dtype", "fp16", "--epochs", "3")
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_folder, straight, *args))
    broken = tmp_path / "broken"
    with monkeypatch.context() as m:
        interrupt_at(m, "batches", 0, 3)  # inside the first epoch, while steps are still being skipped
        with pytest.raises(SystemExit):
            train.main(tiny_args(tiny_folder, broken, *args))
    assert 0 < torch.load(broken / "last.pt", weights_only=True)["scaler"]["scale"] < 2.0 ** 28
    train.main(["--resume", str(broken), "--data-dir", tiny_folder, "--no-progress", "--device", "cpu", *args[:3]])
    assert untimed(metrics(broken)) == untimed(metrics(straight))
    assert_same_weights(weights(broken), weights(straight))
