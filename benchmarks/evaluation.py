"""Throughput of evaluation (§3.2), end to end through `vgg.evaluate.posteriors.score_samples` (JPEG decode,
rescale to Q, views, model, softmax), every arm measured in the same run on the same images.

1. Dense evaluation's batching on photos of many aspect ratios (each a different size at Q), against the old
   path as the baseline:
   - `old`: exact sizes grouped only among decoded views, so with sizes that rarely repeat most forward passes
     see one image and its flip (`EvalOptions(pad_multiple=1, buffer_images=1)`: the engine before grouping by
     shape ahead of decoding);
   - `grouped`: images grouped by exact size before decoding (`pad_multiple=1`);
   - `padded`: long side padded up to a multiple of 32 px, masked (posteriors unchanged) (`pad_multiple=32`, the
     default on CUDA, where batches are also padded to `batch_size` views and cuDNN keeps its choice per shape);
   - `padded bf16 NHWC`: the same under bf16 autocast with channels_last (what `precision=auto` gives on CUDA).
   Each arm's max |Δ posterior| against `old` (fp32) is printed: ~1e-7 for the fp32 arms, the bf16 tolerance for
   the last.
2. Dense vs multi-crop (50 views per scale), which the paper calls less efficient, at each Q.

Default: VGG-16 (config D) at the paper's sizes on ImageNet-like JPEGs (long side ≈ 500 px, the common aspect
ratios plus a spread) at Q=256; `--profile small`: the small profile's model (crop 32, width ×0.125, FC 128)
on 72 px-wide images at Q=40. On a GPU, `--passes 2` shows first meeting vs seen shapes.

    python benchmarks/evaluation.py --out benchmarks/out/evaluation.json
    python benchmarks/evaluation.py --profile small --images 64 --q 40 --out benchmarks/out/evaluation_small.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
from vgg.evaluate.posteriors import EvalOptions, score_samples
from vgg.files import write_atomic
from vgg.models import build


@dataclass(frozen=True)
class Setup:
    config: str
    num_classes: int
    width: float
    fc_width: int
    crop: int  # px
    long_side: int  # px of the generated JPEGs
    q: tuple[int, ...]  # test scales, px


PROFILES = {
    "paper": Setup("D", 1000, 1.0, 4096, 224, 500, (256,)),  # VGG-16; ImageNet's photos are mostly 500 px long
    "small": Setup("D", 10, 0.125, 128, 32, 72, (40,)),
}
# Short side / long side: ImageNet's common 3:4, 2:3 and square photos, and a spread in between.
_COMMON_RATIOS = (0.75, 0.75, 0.666, 1.0)


@dataclass(frozen=True)
class _Sample:
    key: str
    jpeg: bytes
    label: int


def images(count: int, long_side: int) -> list[_Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        ratio = _COMMON_RATIOS[i % 4] if i % 2 else rng.uniform(0.6, 1.0)
        short = max(1, round(long_side * ratio))
        width, height = (long_side, short) if rng.random() < 0.75 else (short, long_side)  # landscape mostly
        y, x = np.mgrid[0:height, 0:width]
        # Gradients plus noise: a realistic JPEG size and decode cost, different per image.
        pixels = np.stack([x * 255 / width, y * 255 / height, rng.uniform(0, 255, (height, width))], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        samples.append(_Sample(f"bench_{i:04d}", buffer.getvalue(), i % 10))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="paper", help="model and image sizes")
    parser.add_argument("--images", type=int, default=16, help="images per measurement")
    parser.add_argument("--q", type=int, nargs="+", help="test scales Q, px (default: the profile's)")
    parser.add_argument("--batch-size", type=int, default=32, help="views per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="decode threads (0 = inline)")
    parser.add_argument("--passes", type=int, default=1, help="passes per arm (on a GPU the first meets new shapes)")
    parser.add_argument("--skip-multicrop", action="store_true", help="only the dense arms")
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
    samples = images(args.images, setup.long_side)
    cuda = args.device.startswith("cuda")

    def timed(options: EvalOptions, batch: list[_Sample]) -> tuple[float, np.ndarray]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = score_samples(model, batch, options, preprocess=preprocess)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result.probs

    base = EvalOptions(mode="dense", scales=scales[:1], batch_size=args.batch_size, device=args.device,
                       precision="fp32", workers=args.workers)  # fmt: skip
    arms = {
        "old": dataclasses.replace(base, pad_multiple=1, buffer_images=1),
        "grouped": dataclasses.replace(base, pad_multiple=1),
        "padded": dataclasses.replace(base, pad_multiple=32),
        "padded bf16 NHWC": dataclasses.replace(base, pad_multiple=32, precision="bf16", channels_last=True),
    }
    timed(base, samples[:1])  # warm-up: allocator, kernels, thread pools
    dense_rows = []
    reference = None
    for name, options in arms.items():
        model.to(memory_format=torch.channels_last if options.channels_last else torch.contiguous_format)
        rates = []
        for _ in range(args.passes):
            seconds, probs = timed(options, samples)
            rates.append(len(samples) / seconds)
        reference = probs if reference is None else reference
        dense_rows.append({"arm": name, "q": scales[0], "images": len(samples), "pad_multiple": options.pad_multiple,
                           "precision": options.precision, "channels_last": options.channels_last,
                           "images_per_s": [round(r, 3) for r in rates],
                           "max_abs_diff_vs_old": float(np.abs(probs - reference).max())})  # fmt: skip
    model.to(memory_format=torch.contiguous_format)
    old_rate = dense_rows[0]["images_per_s"][-1]
    for row in dense_rows:
        row["ratio_vs_old"] = round(row["images_per_s"][-1] / old_rate, 2)

    mode_rows = []
    if not args.skip_multicrop:
        for q in scales:
            for mode in ("dense", "multicrop"):
                seconds, _ = timed(dataclasses.replace(base, mode=mode, scales=(q,)), samples)
                mode_rows.append({"mode": mode, "q": q, "images": len(samples), "seconds": round(seconds, 4),
                                  "s_per_image": round(seconds / len(samples), 4),
                                  "images_per_s": round(len(samples) / seconds, 3)})  # fmt: skip
    speedups = {
        str(q): round(
            next(r["s_per_image"] for r in mode_rows if r["q"] == q and r["mode"] == "multicrop")
            / next(r["s_per_image"] for r in mode_rows if r["q"] == q and r["mode"] == "dense"),
            2,
        )
        for q in scales
    } if mode_rows else {}

    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"VGG-{setup.config} ({args.profile} sizes), {len(samples)} JPEGs {setup.long_side} px long of mixed aspect, "
          f"{args.device} ({device_name}), batch {args.batch_size} views, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'dense arm':<18} {'Q':>5} {'images/s (per pass)':>22} {'× old':>7} {'max |Δp| vs old':>16}")
    for r in dense_rows:
        rates = " / ".join(f"{rate:.2f}" for rate in r["images_per_s"])
        print(f"{r['arm']:<18} {r['q']:>5} {rates:>22} {r['ratio_vs_old']:>7.2f} {r['max_abs_diff_vs_old']:>16.2e}")
    if mode_rows:
        print(f"{'mode':<10} {'Q':>5} {'images':>6} {'s/image':>9} {'images/s':>9}")
        for r in mode_rows:
            print(f"{r['mode']:<10} {r['q']:>5} {r['images']:>6} {r['s_per_image']:>9.3f} {r['images_per_s']:>9.2f}")
        for q, ratio in speedups.items():
            print(f"Q={q}: dense is {ratio}× faster than multi-crop (50 views)")

    if args.out:
        result = {
            "benchmark": "evaluation",
            "profile": args.profile,
            "model": {"config": setup.config, "width": setup.width, "fc_width": setup.fc_width, "crop": setup.crop,
                      "num_classes": setup.num_classes},
            "long_side": setup.long_side,
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "dense_arms": dense_rows,
            "modes": mode_rows,
            "dense_speedup_over_multicrop": speedups,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
