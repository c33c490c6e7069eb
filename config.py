"""train.py's one typed config: a dataclass filled by argparse, validated up front, saved to the run dir."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from hardware import amp_dtype, compile_unavailable, cuda_index
from resnet import MODEL_NAMES, is_plain

# The paper's CIFAR schedule (section 4.2): lr 0.1, wd 1e-4, batch 128, /10 at 32k and 48k iterations, stop at
# 64k, on a 45k/5k split. 45,000 // 128 = 351 steps per epoch: 32k, 48k, 64k = 91.2, 136.8, 182.3 epochs.
# Time to accuracy (docs/speed.md): fewer epochs, a higher peak, a linear decay to zero, not steps.
FAST = dict(epochs=20, schedule="linear", lr=0.2, warmup_epochs=2.0)
RECIPES = {
    "default": {},
    "paper": dict(epochs=182, milestones=[91.2, 136.8], lr=0.1, batch_size=128, momentum=0.9, nesterov=False,
                  weight_decay=1e-4, label_smoothing=0.0, warmup_epochs=0.0, val_split=5000),
    "fast": FAST,
    # fast in 16 epochs with crops shifted by at most 2 pixels, not 4: the classic loop's 30-epoch accuracy on three
    # seeds in about a third of its time on a 2-core AVX2 CPU (docs/speed.md)
    "fast16": FAST | dict(epochs=16, crop_padding=2),
    # the same in 18 epochs, for --amp where bf16 is fast (a GPU, or a CPU with AMX): the classic loop's accuracy on
    # two seeds in under a fifth of its time on a 2-core AMX Xeon, 2026-12-03 (docs/speed.md)
    "fast18": FAST | dict(epochs=18, crop_padding=2),
    # a GPU's: 4x the batch (fewer, larger steps: a modern GPU is launch-bound at 128) at 4x the lr, bf16 autocast
    # and a compiled step; more epochs than fast18 buy back what the large batch costs: at 32, the default recipe's
    # accuracy on three seeds (docs/gpu.md)
    "gpu": FAST | dict(epochs=32, batch_size=512, lr=0.8, crop_padding=2, amp=True, compile=True),
}


def _section(name: str, runtime: bool = False):
    """A field factory for one group of flags (a header in --help). runtime=True: the flag describes this
    process and its hardware, not the experiment, so a resumed run takes it from the new command line (a run
    trained with --amp on a GPU resumes, or is evaluated, on a CPU)."""
    def make(default, help: str, **argparse_kw):
        meta = {"help": help, "section": name, "runtime": runtime, **argparse_kw}
        return field(default=default, metadata=meta)
    return make


_model, _optim, _sched = _section("model"), _section("optimisation"), _section("schedule")
_data = _section("data")
_rundir, _process = _section("run directory"), _section("hardware and process", runtime=True)


IMAGE_SIDE = 32  # CIFAR's images
# Training levers measured and not kept (docs/speed.md): gone from the flags; a run made with one is refused on
# --resume (its weights still evaluate). Their defaults; the git tag names the last commit that has them.
RETIRED_LEVERS = {"whiten_init": False, "ema": 0.0, "flip": "random", "crop_sizes": None, "resize_to": None,
                  "clean_epochs": 0}
RETIRED_LEVERS_TAG = "with-retired-levers"


class UserError(Exception):
    """A mistake the user can fix: reported in one line, exit code 2 (1 for a run that failed)."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


@dataclass
class Config:
    # model
    arch: str = _model("resnet18", f"model: {', '.join(MODEL_NAMES)}")
    width: int = _model(16, "width of the first stage (ResNet-18: 16 -> 16/32/64/128)")
    zero_init_residual: bool = _model(False, "start each residual block as the identity")
    # optimisation
    epochs: int = _optim(50, "training epochs; with --resume a larger value extends the run (its schedule "
                             "becomes that of a run started with the new --epochs)")
    batch_size: int = _optim(128, "global batch size (split evenly across torchrun ranks)")
    lr: float = _optim(0.1, "peak learning rate, for the global batch")
    momentum: float = _optim(0.9, "SGD momentum")
    nesterov: bool = _optim(True, "Nesterov momentum")
    weight_decay: float = _optim(5e-4, "L2 weight decay")
    label_smoothing: float = _optim(0.1, "label smoothing of the cross-entropy, in [0, 1)")
    # schedule
    schedule: str = _sched("step", "after warm-up: step (x --gamma at each milestone) or linear (straight "
                                   "down to 0 at the last step)", choices=("step", "linear"))
    milestones: list[float] | None = _sched(None, "epochs at which the lr is multiplied by --gamma (default: "
                                                  "50%% and 75%% of --epochs)", nargs="+")
    gamma: float = _sched(0.1, "lr factor at each milestone")
    warmup_epochs: float | None = _sched(None, "lr warm-up length, in epochs (fractions allowed; the longest "
                                               "with --warmup until-error); default 1 epoch, at most 20%% of "
                                               "--epochs")
    warmup: str = _sched("linear", "warm-up shape: linear ramp to --lr; constant 0.1x --lr; or until-error: "
                                   "0.1x --lr until the running training error falls below --warmup-error, "
                                   "--warmup-epochs at the longest (the paper's rule for its 110-layer nets)",
                         choices=("linear", "constant", "until-error"))
    warmup_error: float | None = _sched(None, "with --warmup until-error: the training error over the last "
                                              "20 steps' batches (all processes') that ends the warm-up; "
                                              "default 0.8, the paper's 80%%")
    recipe: str = _sched("default", "preset, whose values explicit flags override: " + "; ".join(
        f"{name}: " + (", ".join(f"{k} {v}" for k, v in preset.items()) or "the defaults")
        for name, preset in RECIPES.items()), choices=tuple(RECIPES))
    # data
    dataset: str = _data("cifar10", "cifar10 or cifar100: which torchvision folder --data-dir holds "
                                    "(downloaded when missing) and, for cifar100, its own mean/std; class "
                                    "folders work for either", choices=("cifar10", "cifar100"))
    crop_padding: int = _data(4, "zero padding on each side of a training image before its random crop: "
                                 "the translation range in pixels (the paper: 4; 0: flips only)")
    seed: int = _data(0, "seed for init, subset, split, order and augmentation")
    subset: int | None = _data(None, "train on a seeded random subset of N training images")
    val_split: int = _data(0, "hold out N training images for validation (and best.pt)")
    # run directory
    out: str | None = _rundir(None, "run directory (default runs/<arch>-<timestamp>)")
    overwrite: bool = _rundir(False, "allow writing into an existing run directory")
    # hardware and process: taken from the new command line on --resume
    data_dir: str = _process("./data", "the data: cifar-10-batches-py/ or cifar-100-python/ (downloaded when "
                                       "missing), or train/ and test/ class folders")
    resume: str | None = _process(None, "run dir or checkpoint to continue from (or to evaluate); auto, with "
                                        "--out DIR: go on with DIR's run where it has one, else start it there "
                                        "(one command for the first launch and every restart)")
    eval_only: bool = _process(False, "evaluate the --resume checkpoint on the test set")
    device: str = _process("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = _process(False, "mixed precision in training (--amp-dtype): bf16 autocast on CUDA (compute "
                                "capability >= 8.0) or a CPU with AVX512-BF16 or AMX; fp16 autocast with a loss "
                                "scaler on older CUDA cards (T4, V100); weights and BN statistics stay fp32, "
                                "evaluation is fp32")
    amp_dtype: str = _process("auto", "the dtype of --amp: auto (bf16 where the device has it in hardware, else "
                                      "fp16 on CUDA), bf16, or fp16 (loss-scaled; on a CPU emulated, slow)",
                              choices=("auto", "bf16", "fp16"))
    channels_last: bool = _process(True, "channels_last memory format (faster on CPU and GPU)")
    compile: bool = _process(False, "torch.compile the training model")
    compile_mode: str | None = _process(None, "torch.compile's mode with --compile: default; reduce-overhead "
                                              "(CUDA graphs: fewer kernel launches); max-autotune",
                                        choices=("default", "reduce-overhead", "max-autotune"))
    dist_timeout: float = _process(30.0, "under torchrun: minutes a process waits for the others at one "
                                         "collective before the run fails; setup is bounded by it too (a first "
                                         "download, decode or --compile on many processes sharing a host)")
    sync_bn: bool = _process(False, "BatchNorm statistics of the global batch across torchrun processes (CPU "
                                    "or CUDA)")
    deterministic: bool = _process(False, "deterministic kernels (slower on CUDA; no cudnn.benchmark); "
                                          "sets PyTorch's deterministic mode to this value. CPU runs are "
                                          "deterministic anyway")
    tta: bool = _process(False, "also report test accuracy with flip test-time augmentation (logged as "
                                "test_acc_tta)")
    save_every_steps: int = _process(0, "also checkpoint every N steps inside an epoch")
    log_every: int = _process(20, "steps between progress updates and non-finite checks")
    eval_every: int = _process(1, "evaluate on the test (and validation) set every N epochs and after the "
                                  "last; the epochs between log their training figures only")
    progress: bool = _process(True, "tqdm progress bar")

    def warmup_length(self) -> float:
        """Warm-up in epochs: --warmup-epochs as given, or by default 1 epoch capped at 20% of a short run."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(1.0, 0.2 * self.epochs)

    def warmup_error_threshold(self) -> float:
        return self.warmup_error if self.warmup_error is not None else 0.8

    def milestone_epochs(self) -> list[float]:
        return list(self.milestones) if self.milestones else [0.5 * self.epochs, 0.75 * self.epochs]

    def resume_path(self) -> str:
        return os.path.join(self.resume, "last.pt") if os.path.isdir(self.resume) else self.resume

    @classmethod
    def for_resume(cls, saved: dict, now: "Config", explicit: set[str] = frozenset()) -> "Config":
        """The checkpoint's experiment config with this command line's runtime flags.

        explicit: the flags the user typed. A larger --epochs extends the run; any other experiment flag that
        differs from the run's is refused (UserError naming them all), never dropped in silence.
        """
        if used := {k: saved[k] for k, default in RETIRED_LEVERS.items() if saved.get(k, default) != default}:
            flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items())
            raise UserError(f"this run was trained with {flags}, retired from train.py: evaluate it with "
                            f"--eval-only, or resume it from the git tag {RETIRED_LEVERS_TAG}")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in saved.items() if k in names})
        preset = RECIPES.get(cfg.recipe, {})  # a run saved under a recipe since removed: none
        for k in RUNTIME_FIELDS:  # the new command line's; where not typed, what the run's recipe sets
            setattr(cfg, k, getattr(now, k) if k in explicit else preset.get(k, getattr(now, k)))
        cfg.out = os.path.dirname(now.resume_path()) or "."  # as the user typed it: relative stays relative
        if cfg.compile_mode is not None and not cfg.compile:  # the run's recipe may compile: known only here
            raise UserError(compile_mode_unused(cfg))
        if "epochs" in explicit and now.epochs > cfg.epochs:
            cfg.epochs = now.epochs
        typed = sorted(explicit - set(RUNTIME_FIELDS) - {"out"})
        differ = [k for k in typed if getattr(now, k) != getattr(cfg, k)]
        if "out" in explicit and os.path.abspath(now.out) != os.path.abspath(cfg.out):
            differ.append("out")
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {getattr(now, k)} (run: {getattr(cfg, k)})"
                              for k in differ)
            raise UserError(f"--resume continues the run as it was configured; these flags differ from it: "
                            f"{flags}. Only a larger --epochs can change; start a new run (--out) for the "
                            "others")
        return cfg

    def check_data(self, n_train: int, world: int) -> None:
        if self.subset is not None and self.subset > n_train:
            raise UserError(f"--subset {self.subset} is larger than the {n_train} training images")
        n = self.subset or n_train
        if self.val_split >= n:
            raise UserError(f"--val-split {self.val_split} leaves no training images out of {n}")
        if n - self.val_split < self.batch_size:
            raise UserError(f"{n - self.val_split} training images are fewer than one batch of "
                            f"{self.batch_size}")


# The process's flags (section "hardware and process"): a resumed run takes them from the new command line.
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["runtime"])


class Parser(argparse.ArgumentParser):
    """Every script's parser: a bad flag is one line, "<script>: error: ...", exit 2."""

    def error(self, message: str):  # one line, exit 2 (argparse would add the usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_script(prog: str, main, argv: list[str] | None, errors: tuple[type[Exception], ...]):
    """main(argv), with a user mistake (one of `errors`) reported as one line and its exit code (2 unless it
    carries another), Ctrl-C as "interrupted", exit 130, and a closed output pipe (`... | head`) as one line,
    exit 141 like a shell's SIGPIPE. What a script saved before stays saved."""
    try:
        result = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at the interpreter's exit
        return result
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "code", 2)) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # Python's advice: point stdout at devnull, or flushing it at exit raises the same error again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: output closed by the reader (broken pipe); stopped", file=sys.stderr)
        raise SystemExit(141) from None


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, typed from its annotation, under its section's header in --help."""
    p = Parser(prog="train.py", description="Train a ResNet on CIFAR-10.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        kw = {k: v for k, v in f.metadata.items() if k not in ("section", "runtime")}
        section = f.metadata["section"]
        group = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.split(" | ")[0]  # "int | None" -> "int"
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **kw)
        else:
            types = {"str": str, "int": int, "float": float, "list[float]": float, "list[int]": int}
            group.add_argument(flag, type=types[kind], default=f.default, **kw)
    return p


def parse_config(argv: list[str] | None = None) -> Config:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**RECIPES[pre.recipe])  # a preset sets defaults; explicit flags still win
    cfg = Config(**vars(p.parse_args(argv)))
    validate(cfg)
    if cfg.out is None and not cfg.resume:
        cfg.out = os.path.join("runs", f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def validate(cfg: Config) -> None:
    """Every flag checked before any work: a clear line instead of a traceback later."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(cfg.arch in MODEL_NAMES, f"unknown --arch {cfg.arch!r}; valid: {', '.join(MODEL_NAMES)}")
    for name in ("width", "epochs", "batch_size", "lr", "log_every", "eval_every", "dist_timeout"):
        need(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(0 < cfg.gamma <= 1, f"--gamma must be in (0, 1], got {cfg.gamma}")
    need(0 <= cfg.crop_padding <= IMAGE_SIDE, f"--crop-padding must be in [0, {IMAGE_SIDE}] (pixels), got "
                                              f"{cfg.crop_padding}")
    preset = RECIPES[cfg.recipe].get("warmup_epochs")  # a short run of a preset: say where the value came from
    origin = f" (--recipe {cfg.recipe} sets {preset}: give --warmup-epochs for --epochs {cfg.epochs})" \
        if preset is not None and cfg.warmup_epochs == preset else ""
    need(cfg.warmup_epochs is None or 0 <= cfg.warmup_epochs <= cfg.epochs,
         f"--warmup-epochs must be in [0, --epochs], got {cfg.warmup_epochs}{origin}")
    need(cfg.save_every_steps >= 0, "--save-every-steps must be >= 0")
    need(cfg.compile_mode is None or cfg.compile or cfg.resume, compile_mode_unused(cfg))  # resumed: the run's
    need(cfg.amp_dtype == "auto" or cfg.amp or cfg.resume, amp_dtype_unused(cfg))
    need(cfg.warmup_error is None or cfg.warmup == "until-error",
         f"--warmup-error is the threshold of --warmup until-error; this run's warm-up is {cfg.warmup}")
    need(0 < cfg.warmup_error_threshold() < 1, f"--warmup-error must be in (0, 1), got {cfg.warmup_error}")
    need(cfg.warmup != "until-error" or cfg.warmup_length() > 0,
         f"--warmup until-error ends at --warmup-epochs at the latest; give it a positive value{origin}")
    need(cfg.schedule == "step" or cfg.warmup_length() < cfg.epochs,
         f"--schedule linear needs --warmup-epochs below --epochs{origin}")
    need(cfg.schedule == "step" or not cfg.milestones, "--milestones are for --schedule step")
    if cfg.milestones:
        m = cfg.milestones
        need(all(a < b for a, b in zip(m, m[1:])), f"--milestones must be increasing, got {m}")
        need(0 < m[0] and m[-1] < cfg.epochs, f"--milestones must lie in (0, --epochs={cfg.epochs}), got {m}")
    need(cfg.subset is None or cfg.subset > 0, f"--subset must be positive, got {cfg.subset}")
    need(cfg.val_split >= 0, f"--val-split must be >= 0, got {cfg.val_split}")
    need(not (cfg.zero_init_residual and is_plain(cfg.arch)),
         "--zero-init-residual is for residual nets; on a plain net it would zero every block")
    need(not cfg.eval_only or cfg.resume, "--eval-only needs --resume CHECKPOINT")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    need(cfg.resume != "auto" or cfg.out, "--resume auto needs --out DIR: the run it starts there, or goes on "
                                          "with where DIR holds one")
    need(cfg.resume != "auto" or not cfg.eval_only, "--eval-only needs a checkpoint, not --resume auto")


def amp_dtype_unused(cfg: Config) -> str:
    return f"--amp-dtype {cfg.amp_dtype} is the dtype of --amp, which this run does not use"


def compile_mode_unused(cfg: Config) -> str:
    return f"--compile-mode {cfg.compile_mode} is the mode of --compile, which this run does not use"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        try:
            return torch.device("cuda", cuda_index(local_rank))
        except ValueError as e:
            raise UserError(f"--device cuda: {e}") from None
    return torch.device("cpu")


def fit_recipe_to_device(cfg: Config, device: torch.device, explicit: set[str]) -> list[str]:
    """A recipe's --amp and --compile (not typed by the user; --compile-mode counts as --compile) where this
    device cannot use them: turned off, and a note for each. --recipe gpu compiles on CUDA only (a CPU compile
    costs minutes for little gain)."""
    notes, preset = [], RECIPES.get(cfg.recipe, {})  # a run saved under a recipe since removed: none
    dtype, why = amp_dtype(device, cfg.amp_dtype)
    if preset.get("amp") and "amp" not in explicit and dtype is None:
        cfg.amp = False
        notes.append(f"--recipe {cfg.recipe} sets --amp, but {why}: training in fp32")
    if preset.get("compile") and not explicit & {"compile", "compile_mode"}:  # a typed mode asks for compile
        why = compile_unavailable(device) or ("" if device.type == "cuda" else "it compiles on CUDA only")
        if why:
            cfg.compile = False
            notes.append(f"--recipe {cfg.recipe} sets --compile, but {why}: training uncompiled (--compile "
                         "forces it)")
    return notes


def validate_runtime(cfg: Config, device: torch.device, world: int) -> str | None:
    """The process's flags on this device: a UserError where one cannot work; else the note to print, if any
    (--amp's dtype resolved in cfg.amp_dtype)."""
    if cfg.sync_bn and world == 1:
        raise UserError("--sync-bn shares BatchNorm statistics across torchrun processes; this run is one "
                        "process")
    if cfg.compile and (why := compile_unavailable(device)):
        raise UserError(f"--compile: {why}; drop --compile to train without it")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide evenly across {world} processes")
    if not cfg.amp:
        if cfg.amp_dtype != "auto":  # a resumed run's --amp comes from its recipe: known only here
            raise UserError(amp_dtype_unused(cfg))
        return None
    dtype, note = amp_dtype(device, cfg.amp_dtype)
    if dtype is None:
        raise UserError(f"--amp: {note}; train in fp32 without --amp")
    cfg.amp_dtype = dtype  # what this run trains in, as config.json records it
    return note


def explicit_flags(argv: list[str]) -> set[str]:
    """Config field names the user typed on the command line (not those a --recipe or a default set)."""
    p = build_parser()
    for action in p._actions:  # an untyped flag then leaves no attribute at all
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))
