"""Which torch device a run uses: the one rule for turning a configured `device` into a real one.

Every stage, command and server that takes `device: auto | cpu | cuda` calls `resolve`, so that
"auto" means the same everywhere (cuda when a CUDA GPU is visible, else cpu) and asking for a GPU
that is not there fails before any work starts, naming the setting to change.
"""

from __future__ import annotations

from typing import Literal

from albor.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")


def resolve(name: str, *, key: str = "device") -> str:
    """ "cpu" or "cuda" for the configured `name` ("auto", "cpu" or "cuda").

    `key` names the setting in the error messages (a config key such as `device`, or a flag such
    as `--device`), so the user knows what to change.
    """
    if name not in DEVICES:
        raise ConfigError(f"{key}: {name!r} is not a device: use one of {', '.join(DEVICES)}")
    if name == "cpu":
        return name
    import torch

    visible = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if visible else "cpu"
    if not visible:
        raise ConfigError(
            f"{key}: cuda asked for, but torch sees no CUDA GPU here (torch {torch.__version__}): "
            f"set {key} to cpu or auto, or run on a machine with a GPU and a CUDA build of torch"
        )
    return name
