"""Throughput of dense vs multi-crop evaluation (§3.2), measured in the same run on the same images.

Dense evaluation runs the whole image once through the fully-convolutional net (plus its flip); multi-crop
runs 50 crops per scale, which overlap heavily, so the paper calls it less efficient. This script measures
by how much, end to end through `vgg.evaluate.posteriors.score_samples` (JPEG decode, rescale to Q, views, model,
softmax): images/s per mode and per test scale Q.

Default: VGG-16 (config D) at the paper's sizes, fp32, on a few 341×256 JPEGs at Q=256 (measured on the
2-core dev machine: dense ≈ 0.4 s, multi-crop ≈ 6.6 s per image). `--profile small` uses the small
profile's model (crop 32, width ×0.125, FC 128, 10 classes) on 72×54 images at Q=40.

    python benchmarks/evaluation.py --out results/bench_evaluation.json
    python benchmarks/evaluation.py --profile small --q 32 40 48 --images 16
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import ColourStats
from vgg.evaluate.posteriors import score_samples
from vgg.files import write_atomic
from vgg.models import build


@dataclass(frozen=True)
class Setup:
    config: str
    num_classes: int
    width: float
    fc_width: int
    crop: int  # px
    image: tuple[int, int]  # (width, height) px of the generated JPEGs
    q: tuple[int, ...]  # test scales, px


PROFILES = {
    "paper": Setup("D", 1000, 1.0, 4096, 224, (341, 256), (256,)),  # VGG-16, a typical ImageNet aspect (4:3)
    "small": Setup("D", 10, 0.125, 128, 32, (72, 54), (40,)),
}


@dataclass(frozen=True)
class _Sample:
    key: str
    jpeg: bytes
    label: int


def images(count: int, size: tuple[int, int]) -> list[_Sample]:
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    samples = []
    for i in range(count):
        # Gradients plus noise: a realistic JPEG size and decode cost, different per image.
        pixels = np.stack([x * 255 / width, y * 255 / height, rng.uniform(0, 255, (height, width))], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        samples.append(_Sample(f"bench_{i:04d}", buffer.getvalue(), i % 10))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="paper", help="model and image sizes")
    parser.add_argument("--images", type=int, default=2, help="images per measurement")
    parser.add_argument("--q", type=int, nargs="+", help="test scales Q, px (default: the profile's)")
    parser.add_argument("--batch-size", type=int, default=50, help="views per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="NHWC activations")
    parser.add_argument("--workers", type=int, default=0, help="decode threads (0 = inline)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    setup = PROFILES[args.profile]
    scales = tuple(args.q or setup.q)
    model = build(setup.config, num_classes=setup.num_classes, width=setup.width, fc_width=setup.fc_width,
                  crop=setup.crop, init="kaiming", generator=torch.Generator().manual_seed(0))  # fmt: skip
    # (Kaiming init keeps activations at a trained net's scale through 16 layers: no denormal slow-down.)
    # Mean subtraction as in training (§2.1); the values do not change the cost.
    stats = ColourStats(mean_rgb=torch.tensor([124.0, 116.0, 104.0]), eigval=torch.ones(3), eigvec=torch.eye(3))
    preprocess = Preprocess(stats)
    samples = images(args.images, setup.image)
    options = dict(preprocess=preprocess, batch_size=args.batch_size, device=args.device,
                   precision=args.precision, channels_last=args.channels_last, workers=args.workers)  # fmt: skip

    def timed(mode: str, q: int, batch: list[_Sample]) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        score_samples(model, batch, mode=mode, scales=[q], **options)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed("dense", scales[0], samples[:1])  # warm-up: allocator, kernels, thread pools
    rows = []
    for q in scales:
        for mode in ("dense", "multicrop"):
            seconds = timed(mode, q, samples)
            rows.append({"mode": mode, "q": q, "images": len(samples), "seconds": round(seconds, 4),
                         "s_per_image": round(seconds / len(samples), 4),
                         "images_per_s": round(len(samples) / seconds, 3)})  # fmt: skip
    speedups = {
        str(q): round(
            next(r["s_per_image"] for r in rows if r["q"] == q and r["mode"] == "multicrop")
            / next(r["s_per_image"] for r in rows if r["q"] == q and r["mode"] == "dense"),
            2,
        )
        for q in scales
    }

    print(f"VGG-{setup.config} ({args.profile} sizes), {setup.image[0]}×{setup.image[1]} JPEGs, "
          f"{args.device} {args.precision}{' channels_last' if args.channels_last else ''}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'mode':<10} {'Q':>5} {'images':>6} {'s/image':>9} {'images/s':>9}")
    for r in rows:
        print(f"{r['mode']:<10} {r['q']:>5} {r['images']:>6} {r['s_per_image']:>9.3f} {r['images_per_s']:>9.2f}")
    for q, ratio in speedups.items():
        print(f"Q={q}: dense is {ratio}× faster than multi-crop (50 views)")

    if args.out:
        result = {
            "benchmark": "evaluation",
            "profile": args.profile,
            "model": {"config": setup.config, "width": setup.width, "fc_width": setup.fc_width, "crop": setup.crop,
                      "num_classes": setup.num_classes},
            "image": list(setup.image),
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "precision": args.precision,
            "channels_last": args.channels_last,
            "batch_size": args.batch_size,
            "rows": rows,
            "dense_speedup_over_multicrop": speedups,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
