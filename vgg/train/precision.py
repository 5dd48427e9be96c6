"""Device and precision policy: which dtype the forward pass runs in, and how the model is laid out in memory.

`auto` means bf16 autocast where the hardware does bf16 matrix maths natively — CUDA, or a CPU whose oneDNN
kernels have a native bf16 instruction set: AVX512-BF16 (AMD Zen 4, Intel Cooper Lake: ~2x fp32 for a VGG-A step)
or AMX-BF16 (Intel Sapphire Rapids on: ~4x). Elsewhere `auto` stays fp32: oneDNN emulates bf16 on plain AVX-512
and falls back to reference kernels on AVX2, where a bf16 3x3 conv costs 10-35x the CPU time of fp32 (AMD EPYC
dev machine). Weights, optimizer state and the loss stay fp32 in every case (autocast casts per op).

The capability comes from the same CPU probe (cpuinfo) that PyTorch's own ISA dispatch reads, and only counts when
oneDNN is built in and says it runs bf16 on this CPU; one /proc/cpuinfo flag would miss AVX512-BF16 machines and
say nothing about the kernels torch will actually pick.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vgg.config import TrainConfig

Setting = Literal["auto", "fp32", "bf16"]


NATIVE_BF16_ISAS = ("avx512_bf16", "amx_bf16")  # cpuinfo's names: VDPBF16PS (AVX-512) and AMX-BF16 tiles


def native_bf16_isas(capability: Mapping[str, object], *, onednn_bf16: bool) -> tuple[str, ...]:
    """The native bf16 instruction sets in `capability` (cpuinfo's flag → bool map, as
    `torch._C._cpu._get_cpu_capability()` returns it) that oneDNN can use: none unless `onednn_bf16` (oneDNN is
    built in and runs bf16 on this CPU at all)."""
    if not onednn_bf16:
        return ()
    return tuple(isa for isa in NATIVE_BF16_ISAS if capability.get(isa) is True)


def cpu_capability() -> dict[str, object]:
    """This CPU's features as PyTorch's cpuinfo probe reports them; from /proc/cpuinfo's flags (Linux) where this
    torch has no such query (`avx512_bf16`, `amx_bf16` are spelled the same in both)."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if probe is not None:
        return dict(probe())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: True for flag in flags}


def onednn_runs_bf16() -> bool:
    """Whether this torch has oneDNN (mkldnn) and oneDNN accepts bf16 on this CPU (it needs AVX-512 at least)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


@functools.cache  # the CPU does not change under a running process
def cpu_bf16_isas() -> tuple[str, ...]:
    """This CPU's native bf16 instruction sets that oneDNN can use, e.g. ("avx512_bf16", "amx_bf16"); () if none."""
    return native_bf16_isas(cpu_capability(), onednn_bf16=onednn_runs_bf16())


def resolve(setting: Setting, device: torch.device) -> torch.dtype:
    """The compute dtype for `setting` on `device`: torch.bfloat16 or torch.float32."""
    if setting == "bf16" or (setting == "auto" and (device.type == "cuda" or bool(cpu_bf16_isas()))):
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
