"""What this machine can do, and the process-wide settings train.py and bench.py run with: the CPU's name and
bf16 units, whether --amp and --compile can work, a oneDNN fault to avoid, the allocator and cuDNN settings.
Imports only torch: every module above may ask it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

import torch


CPU_BF16_PROBES = {"_is_avx512_bf16_supported": "AVX512-BF16", "_is_amx_tile_supported": "AMX"}  # private torch.cpu
# probes: they may go away, and a missing one reads as absent


def cpu_bf16_units() -> list[str]:
    """This CPU's bf16 arithmetic units, e.g. ["AVX512-BF16", "AMX"]; [] where it has none."""
    return [unit for probe, unit in CPU_BF16_PROBES.items() if getattr(torch.cpu, probe, lambda: False)()]


def bf16_unavailable(device: torch.device) -> str | None:
    """Why bf16 autocast (--amp) would not pay on `device`, or None. fp16 would need a GradScaler; bf16 needs
    none, but it needs bf16 arithmetic in hardware: compute capability 8.0 on CUDA (A100, H100, RTX 30xx+); on
    the CPU, AVX512-BF16 or AMX (Intel Xeon since Cooper Lake and Sapphire Rapids, AMD Zen 4 and later), without
    which PyTorch emulates it, slower than fp32."""
    if device.type == "cuda":  # not torch.cuda.is_bf16_supported(): by default it also says yes where it emulates
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return None
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 arithmetic "
                "and would emulate it, slowly: it needs 8.0 or newer (A100, H100, RTX 30xx+)")
    if cpu_bf16_units():
        return None
    return "this CPU has no bf16 arithmetic (AVX512-BF16 or AMX), so bf16 would be emulated, slower than fp32"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(device: torch.device, asked: str = "auto") -> tuple[str | None, str | None]:
    """The autocast dtype --amp trains in on `device` ("bf16" or "fp16") and a note to print, or (None, why not).
    auto: bf16 where the device has it in hardware; fp16 with a loss scaler on a CUDA card without it but with
    tensor cores (compute capability 7.x: T4, V100); nothing on a CPU without bf16 units. An explicit dtype
    wins: fp16 on a CPU runs emulated (slower than fp32), with a note."""
    if asked == "bf16" or asked == "auto" and not bf16_unavailable(device):
        return (None, bf16_unavailable(device)) if bf16_unavailable(device) else ("bf16", None)
    if device.type == "cpu":
        if asked == "fp16":
            return "fp16", "--amp-dtype fp16 on a CPU: its fp16 arithmetic is emulated, slower than fp32"
        return None, bf16_unavailable(device)
    major, minor = torch.cuda.get_device_capability(device)
    if asked == "auto" and major < 7:
        return None, (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has neither bf16 "
                      "arithmetic nor fp16 tensor cores")
    return "fp16", None


def has_tf32(device: torch.device) -> bool:
    """Whether fp32 convolutions and matmuls may run on TF32 tensor cores here (CUDA, compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def cuda_index(local_rank: int) -> int:
    """The GPU a process of this node drives: its local rank, where it sees every GPU of the node; 0, where it
    sees one (a launcher that sets CUDA_VISIBLE_DEVICES per process). ValueError when it sees several, but
    fewer than its local rank needs."""
    count = torch.cuda.device_count()
    if local_rank < count or count == 1:
        return local_rank if local_rank < count else 0
    raise ValueError(f"local rank {local_rank} needs GPU {local_rank}, but this process sees {count} GPUs")


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot work on this device, or None: on the CPU its backend (inductor) builds C++ with
    the compiler it finds ($CXX, else g++; clang++ on macOS), on CUDA it needs Triton."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton on CUDA, which is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, or an import error on an unusual build
        return "torch.compile on the CPU needs a C++ compiler ($CXX, or g++) and none works here"
    return None


def channels_last_fault(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why training `model` channels_last on `device` would meet a oneDNN fault, or None. On the CPU the backward
    (weights) of a 1x1 stride-2 convolution on channels_last input with fewer input channels than one channel
    block hangs, crashes or returns wrong gradients (uxlfoundation/oneDNN#6035; seen here on AVX2 with 4
    channels: a projection shortcut of ResNet-18 at --width 4). The block is 8 channels on AVX2, 16 on AVX-512:
    16 is the bound."""
    if device.type != "cpu":
        return None
    small = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
             and m.stride != (1, 1) and m.in_channels < 16]
    if not small:
        return None
    return (f"1x1 stride-2 convolutions on {small[0].in_channels} channels, whose channels_last backward is "
            "faulty on the CPU (oneDNN#6035)")


def keep_freed_memory() -> bool:
    """Stop glibc's malloc from giving freed tensors back to the OS. By default every large activation is
    unmapped when freed and page-faulted back in, zeroed by the kernel, at the next step: 3-10% of a CPU run's
    time went to that in the kernel on a 2-core EPYC, 2026-12-03 (docs/speed.md, the lever table). The
    price: freed blocks stay with the process (a peak of 1.61 GB resident against 1.39 GB there).
    Process-wide; True where it applied (Linux with glibc), False elsewhere, where there is nothing to do."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter runs on
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; mallopt returns 1 on success
    return mallopt is not None and mallopt(m_trim_threshold, 2**31 - 1) == 1 and mallopt(m_mmap_max, 0) == 1


def configure_backends(device: torch.device, deterministic: bool) -> bool:
    """cuDNN picks the fastest kernels for our fixed shapes, unless deterministic kernels are asked for; on
    the CPU, freed memory stays in the process for the next step (keep_freed_memory: True where it applied)."""
    kept = device.type == "cpu" and keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(deterministic)  # process-wide: also switched back off for the next run
    return kept


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, cores and vector instructions, e.g. "cpu: AMD EPYC (2 cores,
    AVX2)": timings, and the last bits of a CPU run's numbers, depend on them (AVX2 and AVX-512 kernels round
    differently)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:  # Linux; platform.processor() there says only "x86_64"
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    units = [torch.backends.cpu.get_cpu_capability(), *cpu_bf16_units()]  # e.g. AVX512, AMX: what --amp runs on
    return f"cpu: {model} ({os.cpu_count()} cores, {', '.join(units)})"


@contextlib.contextmanager
def strict_fp32():
    """Inside, fp32 convolutions and matmuls compute in fp32, not TF32: cuDNN runs fp32 convolutions on TF32
    tensor cores by default on CUDA (10 mantissa bits). Both settings come back afterwards. The CPU's kernels
    have no TF32: there it changes nothing."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
