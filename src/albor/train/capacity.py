"""Whether a run fits the device it is planned for: memory, and the speed options it supports.

The device is the machine at hand, or the `target` GPU a run is planned for elsewhere (a named
one from `hardware.ACCELERATORS`, or a datasheet given in the config). On the machine at hand
bf16 and `torch.compile` are checked against what it supports, and memory against what it has;
on a target, memory against its datasheet.
"""

from __future__ import annotations

from albor.model.estimate import format_bytes
from albor.plan import Plan
from albor.train import hardware
from albor.train.settings import TrainSettings

_SMALLER = (
    "lower micro_batch (raise grad_accum to keep the tokens per step) or seq_len, or pick a "
    "smaller model"
)


def target_of(settings: TrainSettings) -> tuple[str, hardware.Accelerator] | None:
    """The GPU the run is planned for, by name with its datasheet (None: the machine at hand)."""
    t = settings.target
    if t is None:
        return None
    if isinstance(t, str):
        return t, hardware.ACCELERATORS[t]
    device = hardware.Accelerator(t.peak_tflops, t.peak_tflops, t.memory_gib, t.mfu)
    return f"device of {t.peak_tflops:g} TFLOP/s", device


def check_fit(
    p: Plan,
    settings: TrainSettings,
    device: str,
    target: tuple[str, hardware.Accelerator] | None,
    needed: int,
) -> None:
    """`needed` bytes against the target's memory, or the speed options and memory of
    `device` here."""
    if target is not None:
        _check_target(p, needed, target)
        return
    _check_speed_options(p, settings, device)  # precision as set: auto chose what runs
    available, what = hardware.device_memory(device)
    if available is None:
        p.add("device", "fail", f"device {device}: {what} (set device: cpu)")
        return
    p.require(
        "memory",
        needed <= available,
        f"{format_bytes(needed)} of {format_bytes(available)} ({what}, {device})",
        f"needs {format_bytes(needed)} but {device} has {format_bytes(available)} ({what}): "
        f"{_SMALLER}",
    )


def _check_target(p: Plan, needed: int, target: tuple[str, hardware.Accelerator]) -> None:
    name, device = target
    memory = int(device.memory_gib * 2**30)
    p.require(
        "memory",
        needed <= memory,
        f"{format_bytes(needed)} of {format_bytes(memory)} (one {name}, datasheet)",
        f"needs {format_bytes(needed)} but a {name} has {format_bytes(memory)}: {_SMALLER}, "
        "or plan for a larger target",
    )


def _check_speed_options(p: Plan, settings: TrainSettings, device: str) -> None:
    """bf16 and torch.compile need support the device may lack; say so before training starts."""
    if settings.precision == "bf16":
        support = hardware.bf16_support(device)
        if device == "cuda":
            p.require(
                "precision",
                support == "native",
                "bf16 autocast, fp32 master weights and optimizer",
                "this GPU has no bf16 support: set precision: fp32",
            )
        else:
            p.warn_if(
                "precision",
                support != "native",
                "this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 will be emulated "
                "and slower than fp32; set precision: fp32",
                "bf16 autocast on CPU (native bf16 instructions), fp32 master weights",
            )
    if settings.compile:
        need = hardware.compile_support(device)
        p.require(
            "compile",
            need is None,
            f"torch.compile on {device} (the first steps are slow while it compiles)",
            f"compile: true needs {need} on {device}: install it or set compile: false",
        )
