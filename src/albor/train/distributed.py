"""Multi-process training under `torchrun`: process group, ranks, and the few collectives used.

`torchrun --nproc-per-node N -m albor train apply CONFIG` starts N copies of the CLI with
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` set; `init()` joins them
into one process group (nccl on CUDA, gloo on CPU) with PyTorch's `env://` rendezvous, and
multi-node runs use torchrun's own rendezvous flags, so nothing here is home-made. A process
started without those variables is a world of one: every helper below is then a no-op or an
identity, and the single-process path is exactly what it was without this module.

Rank 0 is the only rank that writes (metrics, checkpoints, the artifact) and logs; the others
train, meet it at barriers, and exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


def world_size() -> int:
    """Processes in the job: the process group's size, else `WORLD_SIZE` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node: the CUDA device it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    """Whether this process is the one that writes files and logs."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device_type: str) -> torch.device:
    """Join the torchrun process group (idempotent) and return this rank's device.

    nccl for CUDA (one GPU per local rank), gloo for CPU. The group lives until the process
    exits, so that the stage runner can hold its last barrier after the stage returned. Ranks
    other than 0 log only errors.
    """
    cuda = device_type == "cuda"
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not launched() or dist.is_initialized():
        return device
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: install a full build")
    dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    atexit.register(shutdown)
    if not is_rank0():
        logging.getLogger("albor").setLevel(logging.ERROR)
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    return device


def shutdown() -> None:
    """Leave the process group (registered at exit by `init`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: object) -> None:
    """End a torchrun rank: leave the process group, flush, and exit with `code` at once.

    A no-op unless this process joined a group. Exiting through interpreter finalization
    after `destroy_process_group` still lets gloo's worker threads (kept alive by FSDP's
    device mesh) be destroyed while joinable, which aborts the rank ("terminate called
    without an active exception") after its work is done, and torchrun then reports the job
    as failed. Every file is closed and every artifact swapped in before this point.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if not isinstance(code, int | None):
        print(code, file=sys.stderr)
    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    """Wait until every rank is here (no-op for a single process)."""
    if active():
        dist.barrier()


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """The sum of `value` over ranks, in float64 (the value itself for a single process)."""
    if not active():
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (so that all ranks take the same branch)."""
    if not active():
        return flag
    t = torch.tensor(int(flag), dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (a picklable object; itself for a single process)."""
    if not active():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def to_float(value: torch.Tensor) -> float:
    """A scalar tensor as a float; a DTensor (FSDP) is reduced to its full value first."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


# --- FSDP2 ---------------------------------------------------------------------------------------


def shard(model: Any, blocks: list[Any]) -> None:
    """FSDP2: shard every block, then the root (embeddings, final norm, head), in place.

    Must happen before the optimizer is built: the parameters become DTensors.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def fsdp_no_sync(model: Any) -> Any:
    """A context factory that keeps FSDP2 from reduce-scattering gradients while it is open."""
    from contextlib import contextmanager

    @contextmanager
    def no_sync() -> Any:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return no_sync


def full_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gather a sharded model's and optimizer's full state on rank 0's CPU (a collective: every
    rank calls it; the dicts are empty on other ranks). Optimizer state is keyed by name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return dict(weights), dict(optim)


def load_full_state(
    model: Any, optimizer: Any, weights: dict[str, Any], optim: dict[str, Any]
) -> None:
    """Load full (unsharded) weights and name-keyed optimizer state into a sharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
