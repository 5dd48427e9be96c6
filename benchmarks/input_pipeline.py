"""Throughput of our training input pipeline against torchvision's ImageFolder and against the decode ceiling,
measured in the same run on the same JPEGs.

Per profile, N generated JPEGs are written twice: as WebDataset shards in the shard format (`vgg.data.shard_format`,
read by `vgg.data.loader.train_batches`) and as an ImageFolder tree of `.JPEG` files. Every pipeline runs in a torch
DataLoader with the same number of worker processes and the same batch size, and is timed over full passes
(worker start-up included), in `--repeats` interleaved rounds. The machine is shared and its speed drifts by up to
1.5× within minutes, so each ratio against ours is the median of the rounds' ratios (the two pipelines ran seconds
apart), and the table shows each pipeline's best round:

- ours: shards → decode of the random crop window's box only (draft when S ≪ image) → S-rescaled window → flip
  → uint8 batch, PCA alpha.
- webdataset: the same shards through a plain `webdataset` pipeline, the baseline for our hand-written tar reader:
  WebDataset (shards shuffled, whole shards split among workers) → shuffle buffer of ours' size → our TrainCrop
  and PCA alpha on each sample → batched. Only the reading and batching differ from ours; what it cannot do is why
  ours exists (equal samples per rank, an exact mid-epoch resume that skips without reading: see vgg.data.loader).
- imagefolder-rrc: ImageFolder + torchvision's reference training transforms: RandomResizedCrop(crop),
  RandomHorizontalFlip, ToTensor, Normalize.
- imagefolder-resize: ImageFolder + Resize(S) (S = the middle of the profile's range), RandomCrop(crop),
  RandomHorizontalFlip, ToTensor, Normalize (the paper's fixed-S recipe in torchvision terms).
- decode-pil / decode-tv: the ceiling, each worker only decoding its share of the JPEG bytes (already in memory)
  to full-size RGB with PIL / with torchvision.io (libjpeg-turbo, the same pixels, less overhead).
- decode-tv-ship: decode-tv that also hands crop-sized uint8 batches to the main process, as every loader must,
  the way torch's own collate does (a fresh shared-memory segment per batch; ours reuses a pool of them).

Each pipeline's figures: images/s over the pass, and CPU time per image (this process and its workers), which
other tenants of a shared machine disturb less; ratios of both are printed.

Profiles: paper (~500×375 ImageNet-like JPEGs, crop 224) at each of the paper's training scales — S = 256,
S = 384 and S ~ U[256, 512] — and small (JPEGs as `vgg ingest` stores them at max_side 72, S ~ U[40, 72], crop 32).

    python benchmarks/input_pipeline.py results/bench_input_pipeline.json
    python benchmarks/input_pipeline.py out.json --profiles small --workers 4
    python benchmarks/input_pipeline.py out.json --profiles small paper --pipelines ours webdataset  # the reader only
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode  # also loads torchvision's image ops (torch.ops.image)

from vgg.config import ScaleRange
from vgg.data.loader import train_batches
from vgg.data.preprocessing import ALPHA_STD
from vgg.data.shard_format import (INDEX_FILE, JPEG, LABEL, META, Shard, ShardIndex, Split, encode_index,
                                   shard_file)
from vgg.data.streams import SHUFFLE_BUFFER
from vgg.data.transforms import TrainCrop
from vgg.files import write_atomic

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision reference ImageNet normalisation
CLASSES = 10
PIPELINES = ("ours", "webdataset", "imagefolder-rrc", "imagefolder-resize", "decode-pil", "decode-tv", "decode-tv-ship")


@dataclass(frozen=True)
class Setup:
    sizes: tuple[tuple[int, int], ...]  # (width, height) px of the generated JPEGs, cycled
    scale: ScaleRange
    crop: int  # px
    images: int
    batch_size: int
    shard_size: int


IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (453, 340))  # Flickr's 500 px long side
PROFILES = {
    # ImageNet's typical sizes (mean ≈ 400×350, ~110 KB) at the paper's three training scales (§3.1): the crop
    # window is ~60% of the image at S = 256, ~25% at S = 384 and 15–60% at S ~ U[256, 512].
    "paper": Setup(IMAGENET_SIZES, ScaleRange(256, 256), 224, 960, 32, 64),
    "paper-s384": Setup(IMAGENET_SIZES, ScaleRange(384, 384), 224, 960, 32, 64),
    "paper-s256-512": Setup(IMAGENET_SIZES, ScaleRange(256, 512), 224, 960, 32, 64),
    # What `vgg ingest` stores at max_side 72: smallest side ≤ 72 (generated images are 48–160 px).
    "small": Setup(((96, 72), (72, 96), (72, 72), (64, 48), (108, 72)), ScaleRange(40, 72), 32, 2000, 64, 200),
}


def photo(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG with photo-like statistics: smooth colour fields, edges, and sensor-like noise (quality 90)."""
    rng = np.random.default_rng(seed)
    width, height = size
    field = Image.fromarray(rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8))
    image = field.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-10, 11, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_datasets(root: Path, setup: Setup) -> tuple[list[bytes], Path, Path]:
    """The same JPEGs as contract shards (root/shards) and as an ImageFolder (root/folder)."""
    jpegs = [photo(setup.sizes[i % len(setup.sizes)], i) for i in range(setup.images)]
    shards, folder = root / "shards", root / "folder"
    shards.mkdir(parents=True)
    entries = []
    for number, first in enumerate(range(0, len(jpegs), setup.shard_size)):
        path = shards / shard_file("train", number)
        chunk = range(first, min(first + setup.shard_size, len(jpegs)))
        with wds.TarWriter(str(path), mtime=0) as writer:
            for i in chunk:
                writer.write({"__key__": f"img_{i:06d}", LABEL: str(i % CLASSES).encode(), JPEG: jpegs[i],
                              META: json.dumps({"size": list(setup.sizes[i % len(setup.sizes)])}).encode()})
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append(Shard(file=path.name, path=path, count=len(chunk), sha256=digest, bytes=path.stat().st_size))
    index = ShardIndex(root=shards, classes=tuple(f"n{c:08d}" for c in range(CLASSES)),
                       names=tuple(str(c) for c in range(CLASSES)), max_side=max(max(size) for size in setup.sizes),
                       splits={"train": Split(count=len(jpegs), shards=tuple(entries))}, source={"kind": "benchmark"},
                       converted=(), skipped=())
    write_atomic(shards / INDEX_FILE, encode_index(index))
    for c in range(CLASSES):
        (folder / f"n{c:08d}").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (folder / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG").write_bytes(data)
    return jpegs, shards, folder


def read_datasets(root: Path, setup: Setup) -> tuple[list[bytes], Path, Path]:
    """What `write_datasets` wrote to `root` for the same images."""
    folder = root / "folder"
    jpegs = [(folder / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG").read_bytes() for i in range(setup.images)]
    return jpegs, root / "shards", folder


class DecodeOnly(IterableDataset):
    """The ceiling: worker w decodes JPEGs w, w+W, … from memory and yields one count per batch; with `ship`
    (crop px), also each image's top-left crop × crop px in a uint8 batch in a fresh shared-memory segment, as
    torch's collate hands batches to the main process (the cost of that hand-over: allocation, page faults, the
    main process's share)."""

    def __init__(self, jpegs: list[bytes], *, batch_size: int, decoder: str, ship: int | None = None) -> None:
        self.jpegs, self.batch_size, self.decoder, self.ship = jpegs, batch_size, decoder, ship

    def __iter__(self) -> Iterator[int | tuple[torch.Tensor, list[int]]]:
        info = get_worker_info()
        mine = self.jpegs[info.id :: info.num_workers] if info else self.jpegs
        for first in range(0, len(mine), self.batch_size):
            chunk = mine[first : first + self.batch_size]
            if self.ship:
                shape = (len(chunk), self.ship, self.ship, 3)
                images = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape)))
                images = images.view(shape)
            for i, data in enumerate(chunk):
                if self.decoder == "pil":
                    Image.open(io.BytesIO(data)).convert("RGB")
                    continue
                # the op behind torchvision.io.decode_jpeg, as ours calls it (no per-call deprecation warning)
                image = torch.ops.image.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                    ImageReadMode.RGB.value, False)
                if self.ship:
                    images[i] = image[:, : self.ship, : self.ship].permute(1, 2, 0)
            yield (images, [0] * len(chunk)) if self.ship else len(chunk)


class Augment:
    """What ours does to a sample, for the webdataset pipeline: our TrainCrop (decode, S-rescaled random crop, flip)
    and a PCA alpha, drawn from one generator per worker (ours seeds one per sample: a cost ours pays)."""

    def __init__(self, setup: Setup) -> None:
        self.crop = TrainCrop(scale=setup.scale, crop=setup.crop)
        self.rng: np.random.Generator | None = None

    def __call__(self, sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, int, np.ndarray]:
        if self.rng is None:
            info = get_worker_info()
            self.rng = np.random.default_rng(info.id if info else 0)
        jpeg, label = sample
        return self.crop(jpeg, self.rng), int(label), self.rng.normal(0.0, ALPHA_STD, 3).astype(np.float32)


def webdataset_loader(shards: Path, setup: Setup, *, workers: int, epoch: int) -> DataLoader:
    """The plain webdataset pipeline over our shards (see the module doc)."""
    urls = [str(path) for path in sorted(shards.glob("train-*.tar"))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, detshuffle=True, empty_check=False)
        .shuffle(SHUFFLE_BUFFER)
        .to_tuple(JPEG, LABEL)
        .map(Augment(setup))
        .batched(setup.batch_size, partial=False)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def timed_pass(batches) -> tuple[int, float, float]:
    """(images, wall s, CPU s of this process and its exited children, the pass's dataloader workers included)."""
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    started, started_cpu = time.perf_counter(), cpu()
    images = 0
    for batch in batches:
        images += batch if isinstance(batch, int) else len(batch[1])
    return images, time.perf_counter() - started, cpu() - started_cpu  # exhausted dataloaders joined their workers


def run_profile(name: str, setup: Setup, *, workers: int, repeats: int, root: Path, keys: list[str]) -> dict:
    # The same images serve every profile that names them.
    data = root / hashlib.sha256(repr((setup.sizes, setup.images, setup.shard_size)).encode()).hexdigest()[:12]
    jpegs, shards, folder = read_datasets(data, setup) if data.exists() else write_datasets(data, setup)
    side = setup.scale.single_q
    normalise = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    folders = {
        "imagefolder-rrc": T.Compose([T.RandomResizedCrop(setup.crop), *normalise]),
        "imagefolder-resize": T.Compose([T.Resize(side), T.RandomCrop(setup.crop), *normalise]),
    }

    def pipelines(epoch: int) -> dict:
        # ours first, then webdataset and the decode ceiling (the ratios that matter most are of passes seconds apart)
        loaders = {"ours": train_batches(shards, scale=setup.scale, crop=setup.crop, batch_size=setup.batch_size,
                                         rank=0, world_size=1, workers=workers, epoch=epoch, seed=0),
                   "webdataset": webdataset_loader(shards, setup, workers=workers, epoch=epoch)}
        for key, decoder, ship in (("decode-tv", "tv", None), ("decode-pil", "pil", None),
                                   ("decode-tv-ship", "tv", setup.crop)):
            loaders[key] = DataLoader(DecodeOnly(jpegs, batch_size=setup.batch_size, decoder=decoder, ship=ship),
                                      batch_size=None, num_workers=workers)
        for key, transform in folders.items():
            loaders[key] = DataLoader(ImageFolder(str(folder), transform=transform), batch_size=setup.batch_size,
                                      shuffle=True, num_workers=workers, drop_last=True)
        return {key: loader for key, loader in loaders.items() if key in keys}

    rate: dict[str, list[float]] = {}  # images/s, per round
    cpu: dict[str, list[float]] = {}  # CPU µs per image (workers and main process), per round
    for round_ in range(repeats):
        for key, loader in pipelines(round_).items():
            images, seconds, cpu_seconds = timed_pass(loader)
            rate.setdefault(key, []).append(images / seconds)
            cpu.setdefault(key, []).append(cpu_seconds / images * 1e6)
    baselines = {"webdataset": rate.get("webdataset"), "decode_pil": rate.get("decode-pil"),
                 "decode_tv_ship": rate.get("decode-tv-ship"), "imagefolder_rrc": rate.get("imagefolder-rrc"),
                 "imagefolder_resize": rate.get("imagefolder-resize")}
    if "decode-pil" in rate and "decode-tv" in rate:
        baselines["decode_ceiling"] = [max(pil, tv) for pil, tv in zip(rate["decode-pil"], rate["decode-tv"])]
    baselines = {key: values for key, values in baselines.items() if values is not None}
    by_cpu = {key: cpu[name] for key, name in (("webdataset", "webdataset"), ("decode_tv", "decode-tv"),
                                               ("decode_tv_ship", "decode-tv-ship")) if name in cpu}
    return {
        "setup": {**asdict(setup), "mean_jpeg_kb": round(float(np.mean([len(j) for j in jpegs])) / 1e3, 1)},
        "images_per_s": {key: round(max(values), 1) for key, values in rate.items()},
        "cpu_us_per_image": {key: round(min(values), 1) for key, values in cpu.items()},
        "rounds": {"images_per_s": rate, "cpu_us_per_image": cpu},
        # CPU per image is what other tenants of a shared host disturb least: the ratio a quiet machine's
        # images/s would show, every core busy.
        "ours_vs_by_cpu": {key: _median_ratio(values, cpu["ours"]) for key, values in by_cpu.items()},
        "ours_vs": {key: _median_ratio(rate["ours"], values) for key, values in baselines.items()},
        # the spread of those ratios over the rounds: [min, max]
        "ours_vs_range": {key: _ratio_range(rate["ours"], values) for key, values in baselines.items()},
    }


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of numerator / denominator, both measured in the same round."""
    return round(float(np.median([a / b for a, b in zip(numerators, denominators, strict=True)])), 3)


def _ratio_range(numerators: list[float], denominators: list[float]) -> list[float]:
    """[min, max] over rounds of numerator / denominator, both measured in the same round."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON results file")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per pipeline")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (ratios: the median round's)")
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=list(PROFILES))
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES),
                        help="which pipelines to time (ours always runs: every ratio is against it)")
    args = parser.parse_args()
    keys = [key for key in PIPELINES if key in args.pipelines or key == "ours"]
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "webdataset": wds.__version__},
               "date": time.strftime("%Y-%m-%d"), "workers": args.workers, "profiles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.profiles:
            results["profiles"][name] = run_profile(name, PROFILES[name], workers=args.workers,
                                                    repeats=args.repeats, root=Path(tmp), keys=keys)
    tables = ((f"images/s ({args.workers} workers)", "images_per_s"), ("CPU µs per image", "cpu_us_per_image"))
    for title, field in tables:
        print(f"{title + ', best round':34s}" + "".join(f"{key:>19s}" for key in keys))
        for name, result in results["profiles"].items():
            print(f"{name:34s}" + "".join(f"{result[field][key]:19.0f}" for key in keys))
    print(f"ratios: the median of {args.repeats} rounds' ratios [min–max]")
    for name, result in results["profiles"].items():
        ratios = ", ".join(f"{value:.2f}× [{low:.2f}–{high:.2f}] {key}"
                           for (key, value), (low, high) in zip(result["ours_vs"].items(),
                                                                result["ours_vs_range"].values()))
        by_cpu = ", ".join(f"{value:.2f}× {key}" for key, value in result["ours_vs_by_cpu"].items())
        print(f"{name}: ours = {ratios}; by CPU per image: {by_cpu}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
