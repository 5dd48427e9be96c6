"""Device and precision policy: which dtype the forward pass runs in, and how the model is laid out in memory.

`auto` means bf16 autocast where the hardware does bf16 matrix maths natively — CUDA, or a CPU with AMX-BF16
(STACK.md: ~4x faster than fp32 there for a VGG-A step). Elsewhere bf16 on CPU is emulated and slower than fp32,
so `auto` stays fp32. Weights, optimizer state and the loss stay fp32 in every case (autocast casts per op).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Setting = Literal["auto", "fp32", "bf16"]


def cpu_has_amx_bf16() -> bool:
    """True when this CPU advertises AMX-BF16 tile instructions (Linux /proc/cpuinfo `amx_bf16` flag)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def resolve(setting: Setting, device: torch.device) -> torch.dtype:
    """The compute dtype for `setting` on `device`: torch.bfloat16 or torch.float32."""
    if setting == "bf16" or (setting == "auto" and (device.type == "cuda" or cpu_has_amx_bf16())):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Autocast to `dtype` on `device` when it is not fp32; a no-op context otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def place(model: nn.Module, *, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device` (in place), in channels-last layout when asked (oneDNN/cuDNN prefer NHWC for bf16).

    Call it before wrapping the model in DistributedDataParallel: DDP's gradient buckets follow the layout the
    parameters have when it is constructed.
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
