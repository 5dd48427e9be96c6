"""A-LRN's normalisation: torch.nn.LocalResponseNorm against ours (vgg.models.vgg.LocalResponseNorm, the window's
sum of squares as a 1×1 convolution by a banded 0/1 matrix), in the layer where A-LRN has it.

Each arm times conv1_1 + ReLU (+ LRN) forward and backward on one batch, in the same process and interleaved
(round-robin over the arms, `--repeats` rounds, the median of each arm's rounds reported), fp32 and bf16 autocast
(what `precision: auto` picks on an AMX-BF16 CPU or a GPU). Ratios are against conv1_1 + ReLU alone and against
torch's LRN in the same round. Defaults: the small profile's shapes (batch 32, 32 px crops, 8 channels); `--paper`
the paper's (batch 32 per GPU, 224 px, 64 channels).

    python benchmarks/lrn.py benchmarks/out/lrn.json
    python benchmarks/lrn.py benchmarks/out/lrn_paper.json --paper --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vgg.files import write_atomic
from vgg.models import specs
from vgg.models.vgg import LocalResponseNorm


def arms(channels: int) -> dict[str, nn.Module]:
    conv = nn.Conv2d(3, channels, 3, padding=1)  # conv1_1 (Table 1)
    lrn = {"size": specs.LRN_SIZE, "alpha": specs.lrn_alpha("alexnet"), "beta": specs.LRN_BETA, "k": specs.LRN_K}
    return {
        "conv+relu": nn.Sequential(conv, nn.ReLU()),
        "+ torch LRN": nn.Sequential(conv, nn.ReLU(), nn.LocalResponseNorm(**lrn)),
        "+ ours": nn.Sequential(conv, nn.ReLU(), LocalResponseNorm(**lrn)),
    }


def step_ms(module: nn.Module, x: torch.Tensor, precision: str, steps: int) -> float:
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    started = time.perf_counter()
    for _ in range(steps):
        with autocast:
            out = module(x)
        out.float().sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--paper", action="store_true", help="the paper profile's shapes instead of the small one's")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    batch, side, channels = (32, 224, 64) if args.paper else (32, 32, 8)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, side, side, device=device)
    modules = {name: module.to(device) for name, module in arms(channels).items()}
    rows = []
    for precision in ("fp32", "bf16"):
        times: dict[str, list[float]] = {name: [] for name in modules}
        for module in modules.values():  # warm-up: oneDNN / cuDNN pick their kernels
            step_ms(module, x, precision, 2)
        for _ in range(args.repeats):
            for name, module in modules.items():
                times[name].append(step_ms(module, x, precision, args.steps))
        base, torch_lrn = statistics.median(times["conv+relu"]), statistics.median(times["+ torch LRN"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"precision": precision, "arm": name, "ms_median": median, "ms_min": min(values),
                         "ms_max": max(values), "vs_conv_relu": median / base, "vs_torch_lrn": median / torch_lrn})

    print(f"conv1_1 + ReLU (+ LRN), forward + backward, batch {batch} at {side} px, {channels} channels, "
          f"{device}, {torch.get_num_threads()} threads, median of {args.repeats} rounds of {args.steps} steps")
    print(f"{'precision':<10}{'arm':<14}{'ms/step':>9}{'min':>8}{'max':>8}{'× conv+relu':>13}{'× torch LRN':>13}")
    for row in rows:
        print(f"{row['precision']:<10}{row['arm']:<14}{row['ms_median']:>9.2f}{row['ms_min']:>8.2f}"
              f"{row['ms_max']:>8.2f}{row['vs_conv_relu']:>13.2f}{row['vs_torch_lrn']:>13.2f}")
    machine = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": str(device)}
    write_atomic(args.out, json.dumps({"shape": {"batch": batch, "side": side, "channels": channels},
                                       "machine": machine, "rows": rows}, indent=2).encode())
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
