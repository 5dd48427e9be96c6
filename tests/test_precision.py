"""`precision: auto`: which CPUs get bf16, from the capability PyTorch's CPU probe and oneDNN report."""

from __future__ import annotations

import pytest
import torch

from vgg.train import precision

CPU = torch.device("cpu")
# cpuinfo capability maps as `torch._C._cpu._get_cpu_capability()` returns them (keys abridged).
AVX2_ONLY = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}
AVX512_CORE = {**AVX2_ONLY, "avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}
ZEN4 = {**AVX512_CORE, "avx512_bf16": True}  # AMD Zen 4, Intel Cooper Lake
SAPPHIRE_RAPIDS = {**ZEN4, "amx_tile": True, "amx_bf16": True}


@pytest.mark.parametrize(
    ("capability", "onednn", "expected"),
    [
        (AVX2_ONLY, False, ()),  # oneDNN refuses bf16 below AVX-512
        (AVX512_CORE, True, ()),  # oneDNN emulates bf16 there: slower than fp32
        (ZEN4, True, ("avx512_bf16",)),
        (SAPPHIRE_RAPIDS, True, ("avx512_bf16", "amx_bf16")),
        (SAPPHIRE_RAPIDS, False, ()),  # torch built without oneDNN: the instructions are there, the kernels not
        ({}, True, ()),
    ],
)
def test_native_bf16_needs_an_avx512_bf16_or_amx_cpu_and_onednn(capability, onednn, expected) -> None:
    assert precision.native_bf16_isas(capability, onednn_bf16=onednn) == expected


def test_this_cpu_agrees_with_the_kernel_flags_linux_reports() -> None:
    flags = {flag for line in open("/proc/cpuinfo") if line.startswith("flags") for flag in line.split()[2:]}
    isas = precision.cpu_bf16_isas()
    assert set(isas) <= set(precision.NATIVE_BF16_ISAS)
    if precision.onednn_runs_bf16():
        assert set(isas) == flags & {"avx512_bf16", "amx_bf16"}
    else:
        assert isas == ()
    assert precision.resolve("auto", CPU) == (torch.bfloat16 if isas else torch.float32)
    assert precision.resolve("fp32", CPU) == torch.float32 and precision.resolve("bf16", CPU) == torch.bfloat16
