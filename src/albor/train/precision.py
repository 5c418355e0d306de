"""`precision: auto`: whether a run computes in bf16 or fp32, and why.

On a `target` planned for elsewhere, bf16 where its datasheet peak is higher; on CUDA, bf16
where the GPU supports it; on a CPU, bf16 where a matmul at the model's width runs at least
`AUTO_BF16_MARGIN` times faster in bf16 than in fp32, measured when the plan (or apply) runs.
A precision set in the config is taken as it is, unmeasured.
"""

from __future__ import annotations

import os

from albor.model.config import ModelConfig
from albor.train import hardware
from albor.train.settings import Precision, TargetDevice, TrainSettings

# precision: auto on CPU times one matmul of the model's width in each dtype: the tokens of a
# micro-batch (at most this many rows) x hidden x intermediate, as the MLP computes it.
AUTO_MATMUL_ROWS = 1024
# ... and fewer rows for a model so wide that one matmul would take longer than about this many
# FLOPs (a 7B-wide matmul of 1024 rows is ~90 GFLOP: seconds on a laptop, per dtype).
AUTO_MATMUL_MAX_FLOPS = 4e9
AUTO_SECONDS = 0.12  # timed per dtype: the plan stays about a second
# bf16 must beat fp32 by this factor: autocast adds casts the matmul alone does not show, and
# two measurements within noise of each other would choose differently from run to run.
AUTO_BF16_MARGIN = 1.1


def choose_precision(
    settings: TrainSettings,
    mc: ModelConfig,
    seq_len: int,
    device: str,
    target: tuple[str, hardware.Accelerator] | None = None,
) -> tuple[Precision, str, dict[str, float]]:
    """The precision a run computes in, why, and the GFLOP/s measured for it (CPU, auto only)."""
    if settings.precision != "auto":
        return settings.precision, f"precision: {settings.precision} set in the config", {}
    if target is not None:
        name, acc = target
        if isinstance(settings.target, TargetDevice):
            return "bf16", f"auto: the {name} is planned in bf16 (peak_tflops taken as bf16's)", {}
        if acc.bf16_tflops > acc.fp32_tflops:
            peaks = f"{acc.bf16_tflops:g} TFLOP/s vs fp32 {acc.fp32_tflops:g}"
            return "bf16", f"auto: {name} runs bf16 at {peaks} (datasheet)", {}
        return "fp32", f"auto: {name} is no faster in bf16 (datasheet)", {}
    if device == "cuda":
        if hardware.bf16_support("cuda") == "native":
            return "bf16", "auto: this GPU supports bf16 (torch.cuda.is_bf16_supported)", {}
        return "fp32", "auto: this GPU has no bf16 support", {}
    threads = settings.threads or os.cpu_count() or 1
    rows = min(settings.micro_batch * seq_len, AUTO_MATMUL_ROWS)
    per_row = 2 * mc.hidden_size * mc.intermediate_size
    rows = max(min(rows, int(AUTO_MATMUL_MAX_FLOPS // per_row)), 1)
    shape = (rows, mc.hidden_size, mc.intermediate_size)
    gflops = {
        p: round(hardware.matmul_flops(shape, p, threads, AUTO_SECONDS) / 1e9, 1)
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = gflops["fp32"], gflops["bf16"]
    measured = (
        f"bf16 matmul {bf16:g} GFLOP/s vs fp32 {fp32:g} on this CPU "
        f"({rows}x{mc.hidden_size}x{mc.intermediate_size}, {threads} threads)"
    )
    if bf16 >= AUTO_BF16_MARGIN * fp32:
        return "bf16", f"auto: {measured}", gflops
    return "fp32", f"auto: {measured}; bf16 is not {AUTO_BF16_MARGIN:g}x faster", gflops
