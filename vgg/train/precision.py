"""Device and precision policy: which dtype the forward pass runs in, and how the model is laid out in memory.

`auto` means bf16 autocast where the hardware does bf16 matrix maths natively — CUDA, or a CPU with AMX-BF16
(reported ~4x faster than fp32 there for a VGG-A step). Elsewhere `auto` stays fp32: on the AVX2-only dev
machine (AMD EPYC, no AVX512-BF16/AMX) a bf16 3x3 conv costs 10-35x the CPU time of fp32. Weights, optimizer
state and the loss stay fp32 in every case (autocast casts per op).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vgg.config import TrainConfig

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


def channels_last(requested: bool, *, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to lay the model and its input out channels-last: when `requested` and the kernels gain from it —
    cuDNN (CUDA) and oneDNN's bf16 convolutions. In fp32 on the AVX2 dev machine a VGG-A forward+backward took
    ~20% more CPU time in NHWC than in NCHW, so fp32 on CPU stays NCHW."""
    return requested and (device.type == "cuda" or dtype == torch.bfloat16)


def place(model: nn.Module, *, config: TrainConfig, device: torch.device) -> nn.Module:
    """Move `model` to `device` (in place), channels-last where `channels_last` says so for this config and device.

    Call it before wrapping the model in DistributedDataParallel: DDP's gradient buckets follow the layout the
    parameters have when it is constructed. `fit` calls it too (a no-op on a placed model).
    """
    model.to(device)
    dtype = resolve(config.precision, device)
    if channels_last(config.channels_last, device=device, dtype=dtype):
        model.to(memory_format=torch.channels_last)
    return model
