"""What the machine offers a training run, probed without allocating on the device: memory,
CPU matmul speed in fp32 and bf16, CPU instruction flags, and whether bf16 and torch.compile can
run there; and the datasheets of the GPUs a run may be planned for (`target`), for the machine
one will rent rather than the one at hand."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass


def device_memory(device: str) -> tuple[int | None, str]:
    """Memory the run may use on `device` and where that figure comes from, without allocating."""
    if device == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024, "available RAM"
        except (OSError, KeyError, ValueError):
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return int(pages), "physical RAM"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return int(props.total_memory), props.name


def matmul_flops(
    shape: tuple[int, int, int], precision: str, threads: int, seconds: float = 0.1
) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul on this CPU in `precision` (fp32 or bf16), timed
    for about `seconds` after one untimed call (which pays for kernel selection)."""
    import torch

    m, k, n = shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        return 2 * m * k * n * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def cpu_peak_flops(threads: int, precision: str = "fp32") -> float:
    """Matmul FLOP/s of this CPU in `precision` (fp32 or bf16) measured in ~0.1 s: the ceiling
    for the time estimate."""
    return matmul_flops((512, 512, 512), precision, threads)


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not available)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(device: str) -> str:
    """How `device` runs bf16: "native", "emulated" (a CPU without bf16 instructions, slower than
    fp32) or "none" (a GPU without bf16)."""
    if device == "cuda":
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "native" if ok else "none"
    return "native" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "emulated"


def compile_support(device: str) -> str | None:
    """What torch.compile lacks on `device` (None: nothing): triton on CUDA, a C++ compiler on
    CPU."""
    if device == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "the triton package"
    compilers = [os.environ.get("CXX") or "", "g++", "clang++", "c++"]
    return None if any(c and shutil.which(c) for c in compilers) else "a C++ compiler (g++)"


# --- the machine a plan is for -------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    """One device as its datasheet gives it: dense (no sparsity) peak TFLOP/s in bf16 (tensor
    cores) and in fp32, and memory. `mfu`: the fraction of the peak albor measured a training
    step to reach on it, when it has been measured (None: not yet)."""

    bf16_tflops: float
    fp32_tflops: float
    memory_gib: float
    mfu: float | None = None

    def peak_flops(self, precision: str) -> float:
        return (self.bf16_tflops if precision == "bf16" else self.fp32_tflops) * 1e12


# Datasheet figures (NVIDIA product pages and architecture whitepapers), dense.
ACCELERATORS: dict[str, Accelerator] = {
    # mfu measured by benchmarks/train.py (--device cuda --preset 350m --compile: seq 2048,
    # micro-batch 8, bf16) on one H200, torch 2.11, 2026-12-04: 46.6% of the datasheet peak
    # (the plain PyTorch loop: 47.8%).
    "h200": Accelerator(bf16_tflops=989, fp32_tflops=67, memory_gib=141, mfu=0.466),
    "h100": Accelerator(bf16_tflops=989, fp32_tflops=67, memory_gib=80),  # SXM
    "h100-pcie": Accelerator(bf16_tflops=756, fp32_tflops=51, memory_gib=80),
    "a100-80gb": Accelerator(bf16_tflops=312, fp32_tflops=19.5, memory_gib=80),
    "a100-40gb": Accelerator(bf16_tflops=312, fp32_tflops=19.5, memory_gib=40),
    "l40s": Accelerator(bf16_tflops=362, fp32_tflops=91.6, memory_gib=48),
    "l4": Accelerator(bf16_tflops=121, fp32_tflops=30.3, memory_gib=24),
    "rtx4090": Accelerator(bf16_tflops=165.2, fp32_tflops=82.6, memory_gib=24),
    "rtx3090": Accelerator(bf16_tflops=71, fp32_tflops=35.6, memory_gib=24),
}

# Fraction of a GPU's datasheet peak a training step is assumed to reach where albor has not
# measured it: well-tuned LLM training reports 35-55% on datacenter GPUs; the low end is the
# honest default for a small model and an untuned loop.
ASSUMED_GPU_MFU = 0.35
